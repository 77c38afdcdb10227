"""Area of interest: segment only the part of a scene inside some polygons (``predict --aoi``).

``restrict(info, path)`` reads the polygons (GeoPackage, GeoJSON, shapefile, ...; any CRS,
reprojected to the scene's), crops the scene to their bounding box on the scene's own pixel grid,
and carries them along in the ``SceneInfo``. ``SceneReader`` then marks every pixel whose centre is
outside the polygons invalid in the outputs, as if it were nodata, so:

- tiles wholly outside the area never reach the model (they are skipped like empty tiles);
- the model still sees the real pixels around and outside the area, as context, and runs the very
  tiles a run over the whole scene would (``tiling.plan_tiles(window=...)``): inside the area
  every class and probability equals that run's, and two neighbouring areas meet without a seam;
- the outputs cover the area's bounding box, pixel-aligned with the scene, nodata outside the
  polygons, and no polygon crosses the area's edge.

A large scene with a small area of interest (a city boundary in a regional mosaic, a mapping task
in a drone survey) thus costs the area, not the scene.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import rasterio

from geoseg.errors import InputError
from geoseg.io.scene import SceneInfo, crop, open_scene, pixels_inside, window_of

log = logging.getLogger(__name__)

POLYGONAL = ("Polygon", "MultiPolygon")


def read_area(path: str | os.PathLike, crs) -> object:
    """The union of the polygons of the first layer of ``path`` (repaired), in ``crs``."""
    import geopandas as gpd
    import pyogrio
    import shapely

    p = Path(path)
    if not p.exists():
        raise InputError(f"--aoi {p}: no such file; check the path")
    try:
        layers = [name for name, geometry in pyogrio.list_layers(p) if geometry]
        if len(layers) > 1:
            log.info("--aoi %s has %d layers with geometries; using the first, %s", p.name, len(layers), layers[0])
        gdf = gpd.read_file(p, layer=layers[0] if layers else None)
    except Exception as exc:  # pyogrio raises several types for unreadable files
        raise InputError(f"--aoi {p} cannot be read as vectors ({' '.join(str(exc).split())[:200]}); "
                         f"give a GeoPackage, GeoJSON or shapefile of polygons") from exc
    if gdf.crs is None:
        raise InputError(f"--aoi {p} has no CRS; set one (e.g. ogr2ogr -a_srs EPSG:4326 fixed.gpkg {p.name}) and retry")
    gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty]
    kinds = set(gdf.geometry.geom_type)
    if not kinds & set(POLYGONAL):
        raise InputError(f"--aoi {p} holds no polygons ({', '.join(sorted(kinds)) or 'no features'}); "
                         f"give the area as polygons (buffer lines or points first)")
    gdf = gdf[gdf.geometry.geom_type.isin(POLYGONAL)]
    if gdf.crs != crs:
        gdf = gdf.to_crs(crs)
    geoms = shapely.make_valid(gdf.geometry.values)
    area = shapely.union_all(geoms)
    area = shapely.get_parts(area)  # make_valid may add lines or points beside the polygons: drop them
    area = shapely.union_all([g for g in area if g.geom_type in POLYGONAL])
    if area.is_empty or not math.isfinite(area.area) or area.area <= 0:
        raise InputError(f"--aoi {p}: its polygons have no area in {crs}; check them in QGIS")
    return area


def open_within(scene: str | os.PathLike, aoi: str | os.PathLike | None, *, bands=None,
                assume_crs=None) -> SceneInfo:
    """``open_scene(scene)``, restricted to the polygons of ``aoi`` when given (see :func:`restrict`)."""
    info = open_scene(scene, bands=bands, assume_crs=assume_crs)
    return info if aoi is None else restrict(info, aoi)


def restrict(info: SceneInfo, path: str | os.PathLike, *, margin_m: float = 0.0) -> SceneInfo:
    """``info`` cropped to the bounding box of the polygons in ``path``, outputs only inside them
    (grown by ``margin_m`` metres: ``change`` needs a rim of context)."""
    import shapely

    area = read_area(path, info.crs)
    if margin_m > 0:
        area = shapely.buffer(area, margin_m * abs(info.transform.a) / info.gsd)  # metres to CRS units
    window = window_of(info, *area.bounds)
    if window is None:
        x0, y0, x1, y1 = area.bounds
        left, bottom, right, top = rasterio.transform.array_bounds(info.height, info.width, info.transform)
        raise InputError(
            f"--aoi {Path(path).name} does not overlap {Path(info.path).name} (area {x0:.1f},{y0:.1f} to "
            f"{x1:.1f},{y1:.1f}; scene {left:.1f},{bottom:.1f} to {right:.1f},{top:.1f} in {info.crs}); "
            f"check that it is the right file"
        )
    cropped = crop(info, *window, aoi=area)
    if not _covers_a_pixel(cropped):
        raise InputError(f"--aoi {Path(path).name} covers no pixel centre of {Path(info.path).name}; "
                         f"give a larger area (pixels are {info.gsd:.3g} m)")
    log.info("area of interest %s: %d x %d pixels of %s (%.1f %% of the scene)", Path(path).name, cropped.width,
             cropped.height, Path(info.path).name, 100.0 * cropped.width * cropped.height / (info.width * info.height))
    return cropped


def _covers_a_pixel(info: SceneInfo, block: int = 2048) -> bool:
    for r in range(0, info.height, block):
        for c in range(0, info.width, block):
            if pixels_inside(info.aoi, info.transform, r, min(r + block, info.height), c, min(c + block, info.width)).any():
                return True
    return False
