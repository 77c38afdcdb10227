"""Class raster -> polygons per class, with true areas, perimeters and mean scores.

The data flow of :func:`polygonize`::

    class raster ──GDALPolygonize (4-connected, streams the band)──▶ polygons + class ids
                 ──bulk shapely build, make_valid──▶ geometries
                 ──area_m2 / perimeter_m / min area──▶ kept polygons
    score raster ──strips of rows × rasterized polygon ids──▶ mean score per polygon

Memory is bounded by the polygons and by one strip of rows, never by the raster: the class raster
is polygonized by GDAL straight from the open band, with the nodata value and the skipped classes
masked out by a lookup-table VRT (so the huge background polygon is never built in Python).
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape

import numpy as np
import rasterio
import rasterio.features
import shapely
from pyproj import CRS, Transformer
from pyproj.crs import ProjectedCRS
from pyproj.crs.coordinate_operation import LambertCylindricalEqualAreaConversion
from rasterio.windows import Window

from geoseg.errors import InputError

if TYPE_CHECKING:
    import geopandas as gpd

__all__ = ["polygonize", "area_m2", "perimeter_m"]

COLUMNS = ("class_name", "class_id", "area_m2", "perimeter_m", "score", "geometry")

_BUILD_CHUNK = 50_000  # features turned into shapely geometries at a time
_STRIP_PIXELS = 8_000_000  # pixels per strip when scoring (labels int32 + scores: ~64 MB)
_DENSIFY_DEGREES = 0.01  # longest edge kept straight when projecting to an equal-area CRS


# --------------------------------------------------------------------------------------------
# polygonize


def polygonize(
    class_path: str,
    *,
    class_names: Sequence[str],
    skip: Container[int] = (0,),
    score_path: str | None = None,
    score_scale: float = 1 / 65535,
    min_area_m2: float | Mapping[str, float] = 0.0,
    progress: Callable[[int], None] | None = None,
) -> dict[str, gpd.GeoDataFrame]:
    """Polygonize a class raster into one GeoDataFrame per class that is not skipped.

    ``class_path`` is a single-band integer GeoTIFF of class ids (id == index into
    ``class_names``); pixels equal to its nodata value and ids in ``skip`` never become
    polygons. Polygons are 4-connected regions of one id, valid Polygon/MultiPolygon geometries
    in the raster's CRS, with columns ``class_name, class_id, area_m2, perimeter_m, score``.

    ``score`` is the mean of ``score_path`` (a single-band raster on the same grid, usually
    uint16 holding probability x 65535) times ``score_scale`` over each polygon's pixels, NaN
    without a score raster. ``min_area_m2`` drops smaller polygons: one number for all classes
    or ``{class_name: m2}``. ``progress(n)`` receives increments of rows; the total is the
    raster height (polygonizing is one GDAL call, so with a score raster the rows are counted
    while scoring, otherwise all at once when polygonizing finishes).
    """
    class_names = list(class_names)
    if not class_names:
        raise InputError("class_names is empty: pass one name per class id (id 0 first)")
    thresholds = _min_area_per_class(min_area_m2, class_names)
    kept_ids = [i for i in range(len(class_names)) if i not in skip]

    with rasterio.open(class_path) as ds:
        if ds.crs is None:
            raise InputError(
                f"{class_path} has no CRS: areas in m² need one; assign it (e.g. with "
                "`rio edit-info --crs EPSG:32633`) and try again"
            )
        if not np.issubdtype(np.dtype(ds.dtypes[0]), np.integer):
            raise InputError(
                f"{class_path} has {ds.dtypes[0]} pixels: a class raster holds integer class ids "
                "(uint8 usually)"
            )
        crs = CRS.from_wkt(ds.crs.to_wkt())
        height, width, grid = ds.height, ds.width, ds.transform
        geoms, ids = _polygonize_band(ds, skip=skip)

    unknown = np.setdiff1d(np.unique(ids), np.arange(len(class_names)))
    if unknown.size:
        raise InputError(
            f"{class_path} holds class id(s) {unknown.tolist()} but only {len(class_names)} class "
            f"names were given ({class_names}); pass a name for every id, or set the raster's "
            "nodata value"
        )

    geoms = _make_valid_polygonal(geoms)
    present = ~shapely.is_empty(geoms) & ~shapely.is_missing(geoms)
    geoms, ids = geoms[present], ids[present]

    areas = area_m2(geoms, crs)
    limit = np.array([thresholds[class_names[i]] for i in range(len(class_names))])
    big = areas >= limit[ids] if ids.size else np.zeros(0, bool)
    geoms, ids, areas = geoms[big], ids[big], areas[big]
    perimeters = perimeter_m(geoms, crs)

    if score_path is None:
        scores = np.full(len(geoms), np.nan)
        if progress is not None:
            progress(height)
    else:
        scores = _mean_scores(
            score_path,
            geoms,
            shape=(height, width),
            transform=grid,
            scale=score_scale,
            progress=progress,
        )

    return {
        class_names[cid]: _frame(
            class_names[cid], cid, geoms[ids == cid], areas[ids == cid],
            perimeters[ids == cid], scores[ids == cid], crs,
        )
        for cid in kept_ids
    }


def _frame(name, cid, geoms, areas, perimeters, scores, crs) -> gpd.GeoDataFrame:
    import geopandas as gpd

    n = len(geoms)
    return gpd.GeoDataFrame(
        {
            "class_name": np.full(n, name, dtype=object),
            "class_id": np.full(n, cid, dtype=np.int32),
            "area_m2": areas.astype(np.float64),
            "perimeter_m": perimeters.astype(np.float64),
            "score": scores.astype(np.float64),
        },
        geometry=gpd.GeoSeries(geoms, crs=crs),
        crs=crs,
    )


def _min_area_per_class(
    min_area_m2: float | Mapping[str, float], class_names: Sequence[str]
) -> dict[str, float]:
    if isinstance(min_area_m2, Mapping):
        unknown = sorted(set(min_area_m2) - set(class_names))
        if unknown:
            raise InputError(
                f"min_area_m2 names unknown class(es) {unknown}; use names from {list(class_names)}"
            )
        values = {name: float(min_area_m2.get(name, 0.0)) for name in class_names}
    else:
        values = dict.fromkeys(class_names, float(min_area_m2))
    bad = {k: v for k, v in values.items() if not v >= 0}
    if bad:
        raise InputError(f"min_area_m2 must be >= 0 square metres, got {bad}")
    return values


def _polygonize_band(ds, *, skip: Container[int]) -> tuple[np.ndarray, np.ndarray]:
    """(geometries, class ids) of the 4-connected regions of band 1, nodata and skip excluded.

    ``rasterio.features.shapes`` with a Band source and ``mask=None`` gives GDALPolygonize no
    mask band, so nodata pixels come back as polygons of the nodata value. For 8/16-bit rasters
    a VRT band maps every value through a lookup table to 1 (keep) or 0 (nodata, skipped) and
    serves as the mask band, read lazily by GDAL like the class band. Other integer types are
    polygonized whole and filtered afterwards.
    """
    nodata = ds.nodata
    dtype = np.dtype(ds.dtypes[0])
    mask_values = range(256) if dtype == np.uint8 else None
    with _lut_mask(ds, mask_values, drop=lambda v: v == nodata or v in skip) as mask:
        features = rasterio.features.shapes(
            rasterio.band(ds, 1), mask=mask, connectivity=4
        )
        geoms, values = _bulk_polygons(features)
    ids = values.astype(np.int64)
    dropped = [v for v in np.unique(ids).tolist() if v == nodata or v in skip]
    keep = ~np.isin(ids, dropped)
    return geoms[keep], ids[keep]


@contextmanager
def _lut_mask(ds, values: Iterable[int] | None, *, drop: Callable[[int], bool]):
    """Yield a Band (of an in-memory VRT) that is 0 where ``drop(value)``, else 1; or None."""
    if values is None:
        yield None
        return
    lut = ",".join(f"{v}:{0 if drop(v) else 1}" for v in values)
    gt = ", ".join(repr(float(c)) for c in ds.transform.to_gdal())
    vrt = (
        f'<VRTDataset rasterXSize="{ds.width}" rasterYSize="{ds.height}">'
        f"<GeoTransform>{gt}</GeoTransform>"
        '<VRTRasterBand dataType="Byte" band="1"><ComplexSource>'
        f'<SourceFilename relativeToVRT="0">{escape(ds.name)}</SourceFilename>'
        f"<SourceBand>1</SourceBand><LUT>{lut}</LUT>"
        "</ComplexSource></VRTRasterBand></VRTDataset>"
    )
    with rasterio.open(vrt) as mask_ds:
        yield rasterio.band(mask_ds, 1)


def _bulk_polygons(features: Iterable[tuple[dict, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Build shapely Polygons from GeoJSON-like dicts in chunks with array constructors."""
    chunks: list[np.ndarray] = []
    values: list[float] = []
    coords: list[tuple[float, float]] = []
    ring_offsets, poly_offsets = [0], [0]

    def flush() -> None:
        if len(poly_offsets) == 1:
            return
        chunks.append(
            shapely.from_ragged_array(
                shapely.GeometryType.POLYGON,
                np.asarray(coords, dtype=np.float64).reshape(-1, 2),
                (np.asarray(ring_offsets), np.asarray(poly_offsets)),
            )
        )
        coords.clear()
        del ring_offsets[1:], poly_offsets[1:]

    with _gc_paused():
        for geom, value in features:
            for ring in geom["coordinates"]:
                coords.extend(ring)
                ring_offsets.append(len(coords))
            poly_offsets.append(len(ring_offsets) - 1)
            values.append(value)
            if len(poly_offsets) > _BUILD_CHUNK:
                flush()
        flush()
    geoms = np.concatenate(chunks) if chunks else np.empty(0, dtype=object)
    return geoms, np.asarray(values, dtype=np.float64)


@contextmanager
def _gc_paused():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _make_valid_polygonal(geoms: np.ndarray) -> np.ndarray:
    """Repair invalid geometries with make_valid, keeping only their polygonal parts."""
    geoms = np.asarray(geoms, dtype=object)
    invalid = ~shapely.is_valid(geoms)
    if not invalid.any():
        return geoms
    fixed = _as_multi(shapely.make_valid(geoms[invalid]))
    fixed[shapely.is_empty(fixed)] = None
    single = shapely.get_num_geometries(fixed) == 1
    fixed[single] = shapely.get_geometry(fixed[single], 0)
    geoms = geoms.copy()
    geoms[invalid] = fixed
    return geoms


# --------------------------------------------------------------------------------------------
# score


def _mean_scores(
    score_path: str,
    geoms: np.ndarray,
    *,
    shape: tuple[int, int],
    transform,
    scale: float,
    progress: Callable[[int], None] | None,
) -> np.ndarray:
    """Mean score per polygon, one strip of rows at a time (memory bounded by the strip)."""
    n = len(geoms)
    if n >= np.iinfo(np.int32).max:
        raise InputError(f"{n} polygons are too many to score in one raster; split the scene")
    sums = np.zeros(n + 1, dtype=np.float64)
    counts = np.zeros(n + 1, dtype=np.int64)
    tree = shapely.STRtree(geoms)
    with rasterio.open(score_path) as sds:
        if (sds.height, sds.width) != shape or not sds.transform.almost_equals(transform):
            raise InputError(
                f"score raster {score_path} ({sds.width}x{sds.height}, {tuple(sds.transform)[:6]})"
                f" is not on the class raster's grid ({shape[1]}x{shape[0]}, "
                f"{tuple(transform)[:6]}); write both from the same prediction"
            )
        height, width = shape
        rows = _strip_rows(sds)
        nodata = sds.nodata
        for row0 in range(0, height, rows):
            window = Window(0, row0, width, min(rows, height - row0))
            h = int(window.height)
            bounds = _strip_bounds(sds.transform, width=width, row0=row0, rows=h)
            idx = tree.query(shapely.box(*bounds))
            if idx.size:
                pieces = shapely.clip_by_rect(geoms[idx], *bounds)
                ok = ~shapely.is_empty(pieces)
                labels = rasterio.features.rasterize(
                    zip(_geojson(pieces[ok]), (idx[ok] + 1).tolist()),
                    out_shape=(h, width),
                    transform=sds.window_transform(window),
                    fill=0,
                    dtype="int32",
                    all_touched=False,
                )
                inside = labels > 0
                values = sds.read(1, window=window)
                if nodata is not None:
                    inside &= values != nodata
                lab = labels[inside]
                sums += np.bincount(lab, weights=values[inside], minlength=n + 1)
                counts += np.bincount(lab, minlength=n + 1)
            if progress is not None:
                progress(h)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums[1:] / counts[1:] * scale
    mean[counts[1:] == 0] = np.nan
    return mean


def _geojson(geoms: np.ndarray) -> list[dict]:
    """GeoJSON-like MultiPolygon dicts, built from one ragged array (shapely's per-geometry
    ``__geo_interface__`` costs several times more than GDAL's rasterizing)."""
    if len(geoms) == 0:
        return []
    _, coords, (ring_off, poly_off, multi_off) = shapely.to_ragged_array(
        _as_multi(geoms)
    )
    xy = coords.tolist()
    rings = [xy[a:b] for a, b in zip(ring_off[:-1].tolist(), ring_off[1:].tolist())]
    polys = [rings[a:b] for a, b in zip(poly_off[:-1].tolist(), poly_off[1:].tolist())]
    return [
        {"type": "MultiPolygon", "coordinates": polys[a:b]}
        for a, b in zip(multi_off[:-1].tolist(), multi_off[1:].tolist())
    ]


def _as_multi(geoms: np.ndarray) -> np.ndarray:
    """Polygonal parts of each geometry as one MultiPolygon (clipping can yield collections)."""
    parts, owner = shapely.get_parts(geoms, return_index=True)
    parts, sub = shapely.get_parts(parts, return_index=True)
    owner = owner[sub]
    polygonal = shapely.get_type_id(parts) == shapely.GeometryType.POLYGON
    out = np.empty(len(geoms), dtype=object)
    shapely.multipolygons(parts[polygonal], indices=owner[polygonal], out=out)
    missing = shapely.is_missing(out)
    out[missing] = shapely.from_wkt("MULTIPOLYGON EMPTY")
    return out


def _strip_bounds(transform, *, width: int, row0: int, rows: int) -> tuple[float, ...]:
    """Bounding box of a strip of rows, for any affine transform (rotated too)."""
    a, b, c, d, e, f = tuple(transform)[:6]
    cols = np.array([0, width, 0, width], dtype=np.float64)
    lines = np.array([row0, row0, row0 + rows, row0 + rows], dtype=np.float64)
    xs, ys = a * cols + b * lines + c, d * cols + e * lines + f
    return (xs.min(), ys.min(), xs.max(), ys.max())


def _strip_rows(ds) -> int:
    """Rows per strip: about _STRIP_PIXELS pixels, whole blocks when that fits."""
    rows = max(1, _STRIP_PIXELS // max(ds.width, 1))
    block_h = ds.block_shapes[0][0]
    if rows >= block_h:
        rows -= rows % block_h
    return min(rows, ds.height)


# --------------------------------------------------------------------------------------------
# true areas and perimeters


def area_m2(geoms, crs) -> np.ndarray:
    """True area in square metres of each geometry, for any CRS.

    Projected CRSs (other than Mercator and equidistant cylindrical, whose scale grows with
    latitude) use the planar area times the square of the linear unit in metres (US feet too).
    Geographic, Mercator and equidistant cylindrical CRSs are projected to a cylindrical
    equal-area projection on the same ellipsoid (centred on the data), which keeps areas
    exactly; there, pixels from a lon/lat or Mercator grid stay exact rectangles.
    """
    geoms = _as_array(geoms)
    crs = _as_crs(crs)
    if geoms.size == 0:
        return np.zeros(0, dtype=np.float64)
    if not _needs_ellipsoid(crs):
        return shapely.area(geoms) * _unit_m(crs) ** 2
    lonlat = _to_lonlat(geoms, crs)
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
    geoms = _as_array(geoms)
    crs = _as_crs(crs)
    if geoms.size == 0:
        return np.zeros(0, dtype=np.float64)
    if not _needs_ellipsoid(crs):
        return shapely.length(geoms) * _unit_m(crs)
    lonlat = _to_lonlat(geoms, crs)
    parts, part_owner = shapely.get_parts(lonlat, return_index=True)
    rings, ring_part = shapely.get_rings(parts, return_index=True)
    xy, ring_of_vertex = shapely.get_coordinates(rings, return_index=True)
    same_ring = ring_of_vertex[1:] == ring_of_vertex[:-1]
    a, b = xy[:-1][same_ring], xy[1:][same_ring]
    _, _, dist = crs.get_geod().inv(a[:, 0], a[:, 1], b[:, 0], b[:, 1])
    per_ring = np.bincount(ring_of_vertex[:-1][same_ring], weights=dist, minlength=len(rings))
    return np.bincount(part_owner[ring_part], weights=per_ring, minlength=len(geoms))


def _as_array(geoms) -> np.ndarray:
    if hasattr(geoms, "values") and hasattr(geoms, "crs"):  # GeoSeries
        geoms = geoms.values
    return np.asarray(geoms, dtype=object).reshape(-1)


def _as_crs(crs) -> CRS:
    if crs is None:
        raise InputError("no CRS given: true areas need the geometries' CRS (e.g. 'EPSG:32633')")
    if isinstance(crs, CRS):
        return crs
    if hasattr(crs, "to_wkt"):  # rasterio.crs.CRS
        return CRS.from_wkt(crs.to_wkt())
    return CRS.from_user_input(crs)


def _needs_ellipsoid(crs: CRS) -> bool:
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


def _unit_m(crs: CRS) -> float:
    factor = crs.axis_info[0].unit_conversion_factor if crs.axis_info else 1.0
    return float(factor) if factor and math.isfinite(factor) else 1.0


def _to_lonlat(geoms: np.ndarray, crs: CRS) -> np.ndarray:
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
