"""Where geometries are on the ground and how big they are, for any CRS.

Pixel coordinates to the raster's CRS (``pixels_to_world``), and true areas, perimeters and line
lengths in metres: planar measures times the unit for projected CRSs, and on the ellipsoid for
geographic, Mercator and equidistant cylindrical CRSs (whose scale grows with latitude). Used by
the polygonizer, the road centre-lines and their metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import shapely
from pyproj import CRS, Transformer
from pyproj.crs import ProjectedCRS
from pyproj.crs.coordinate_operation import LambertCylindricalEqualAreaConversion

from geoseg.errors import InputError

_DENSIFY_DEGREES = 0.01  # longest edge kept straight when projecting to an equal-area CRS


def pixels_to_world(geoms: np.ndarray, transform) -> np.ndarray:
    """Pixel (col, row) coordinates -> the raster's CRS, with the geotransform's own formula."""
    a, b, c, d, e, f = tuple(transform)[:6]

    def apply(xy: np.ndarray) -> np.ndarray:
        return np.column_stack([c + a * xy[:, 0] + b * xy[:, 1], f + d * xy[:, 0] + e * xy[:, 1]])

    return shapely.transform(geoms, apply) if len(geoms) else geoms


def area_m2(geoms, crs) -> np.ndarray:
    """True area in square metres of each geometry, for any CRS.

    Projected CRSs (other than Mercator and equidistant cylindrical, whose scale grows with
    latitude) use the planar area times the square of the linear unit in metres (US feet too).
    Geographic, Mercator and equidistant cylindrical CRSs are projected to a cylindrical
    equal-area projection on the same ellipsoid (centred on the data), which keeps areas
    exactly; there, pixels from a lon/lat or Mercator grid stay exact rectangles.
    """
    geoms = as_geometries(geoms)
    crs = as_crs(crs)
    if geoms.size == 0:
        return np.zeros(0, dtype=np.float64)
    if not needs_ellipsoid(crs):
        return shapely.area(geoms) * unit_m(crs) ** 2
    lonlat = to_lonlat(geoms, crs)
    finite = shapely.bounds(lonlat)
    lon0 = float(np.nanmedian((finite[:, 0] + finite[:, 2]) / 2))
    cea = ProjectedCRS(
        conversion=LambertCylindricalEqualAreaConversion(longitude_natural_origin=lon0),
        geodetic_crs=crs.geodetic_crs,
    )
    to_cea = Transformer.from_crs(crs.geodetic_crs, cea, always_xy=True)
    projected = shapely.transform(
        shapely.segmentize(lonlat, _DENSIFY_DEGREES), _xy(to_cea)
    )
    return shapely.area(projected)


def perimeter_m(geoms, crs) -> np.ndarray:
    """True perimeter in metres (exterior plus interior rings) of each geometry, for any CRS.

    Same rule as :func:`area_m2`; on the ellipsoid each edge is measured as a geodesic.
    """
    geoms = as_geometries(geoms)
    crs = as_crs(crs)
    if geoms.size == 0:
        return np.zeros(0, dtype=np.float64)
    if not needs_ellipsoid(crs):
        return shapely.length(geoms) * unit_m(crs)
    parts, part_owner = shapely.get_parts(to_lonlat(geoms, crs), return_index=True)
    rings, ring_part = shapely.get_rings(parts, return_index=True)
    return np.bincount(part_owner[ring_part], weights=_geodesic_lengths(rings, crs), minlength=len(geoms))


def as_geometries(geoms) -> np.ndarray:
    if hasattr(geoms, "values") and hasattr(geoms, "crs"):  # GeoSeries
        geoms = geoms.values
    return np.asarray(geoms, dtype=object).reshape(-1)


def as_crs(crs) -> CRS:
    if crs is None:
        raise InputError("no CRS given: true areas need the geometries' CRS (e.g. 'EPSG:32633')")
    if isinstance(crs, CRS):
        return crs
    if hasattr(crs, "to_wkt"):  # rasterio.crs.CRS
        return CRS.from_wkt(crs.to_wkt())
    return CRS.from_user_input(crs)


def needs_ellipsoid(crs: CRS) -> bool:
    """True for CRSs whose planar measures are far from metres on the ground."""
    if crs.is_geographic:
        return True
    if not crs.is_projected:
        raise InputError(
            f"CRS {crs.name!r} is neither geographic nor projected; reproject the raster to a "
            "projected or geographic CRS"
        )
    operation = crs.coordinate_operation
    method = (operation.method_name if operation else "").lower()
    cylindrical = "mercator" in method and not ("transverse" in method or "oblique" in method)
    return cylindrical or "equidistant cylindrical" in method or "plate carr" in method


def unit_m(crs: CRS) -> float:
    factor = crs.axis_info[0].unit_conversion_factor if crs.axis_info else 1.0
    return float(factor) if factor and math.isfinite(factor) else 1.0


def to_lonlat(geoms: np.ndarray, crs: CRS) -> np.ndarray:
    if crs.is_geographic:
        # shapely geometries from rasters hold x = longitude whatever the CRS's axis order
        return geoms
    to_lonlat = Transformer.from_crs(crs, crs.geodetic_crs, always_xy=True)
    return shapely.transform(geoms, _xy(to_lonlat))


def _xy(transformer: Transformer) -> Callable[[np.ndarray], np.ndarray]:
    def apply(coords: np.ndarray) -> np.ndarray:
        x, y = transformer.transform(coords[:, 0], coords[:, 1])
        return np.column_stack([x, y])

    return apply


def line_length_m(geoms, crs) -> np.ndarray:
    """True length in metres of each (multi)line, for any CRS: planar length times the unit for
    projected CRSs, geodesic length on the ellipsoid for geographic and Mercator-like ones."""
    geoms = as_geometries(geoms)
    crs = as_crs(crs)
    if geoms.size == 0:
        return np.zeros(0, np.float64)
    if not needs_ellipsoid(crs):
        return shapely.length(geoms) * unit_m(crs)
    parts, owner = shapely.get_parts(to_lonlat(geoms, crs), return_index=True)
    return np.bincount(owner, weights=_geodesic_lengths(parts, crs), minlength=len(geoms))


def _geodesic_lengths(lines: np.ndarray, crs: CRS) -> np.ndarray:
    """Length in metres of each lon/lat linestring or ring of ``lines``, edge by edge along the
    geodesic of ``crs``'s ellipsoid."""
    xy, line_of = shapely.get_coordinates(lines, return_index=True)
    same = line_of[1:] == line_of[:-1]
    a, b = xy[:-1][same], xy[1:][same]
    _, _, dist = crs.get_geod().inv(a[:, 0], a[:, 1], b[:, 0], b[:, 1])
    return np.bincount(line_of[:-1][same], weights=dist, minlength=len(lines))
