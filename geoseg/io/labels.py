"""Labels on a scene's grid: class ids from vector labels (any CRS) or from a mask raster.

``LabelReader(path, grid, class_names=...)`` reads windows of class ids exactly aligned with a
scene (``SceneInfo``, possibly resampled with ``scene.at_gsd``), the same windows the scene reader
returns, so training chips and evaluation strips line up pixel for pixel.

- Vectors (GeoPackage, GeoJSON, shapefile, ...): reprojected to the scene's CRS, invalid geometries
  repaired (counted in the log), a class attribute mapped to class names (or ids), lines and points
  buffered by ``line_width_m``. Pixels no polygon covers are background (class 0).
- Rasters: warped onto the scene's grid with nearest-neighbour resampling. With two classes, any
  non-zero value is the foreground class (0/1 and 0/255 masks); otherwise values are class ids.
  ``value_map`` remaps values first (for example an "unlabeled" value to ``IGNORE``); see
  ``parse_label_values`` for the ``0=ignore,1=building`` form users give.

``IGNORE`` (255) marks pixels that take no part in losses and metrics.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import RasterioIOError
from rasterio.windows import Window

from geoseg.errors import InputError
from geoseg.io.scene import SceneInfo, own_pixels

log = logging.getLogger(__name__)

IGNORE = 255
RASTER_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".vrt", ".img")


def parse_label_values(spec: str | Mapping[object, object] | None, class_names: Sequence[str]) -> dict[int, int] | None:
    """``"0=ignore,1=building,2-5=background"`` -> ``{0: IGNORE, 1: 1, 2: 0, ...}``: which class each
    value of a label raster means. Values are 0-255, single or ``A-B`` ranges; targets are class
    names, class ids, or ``ignore`` (no part in losses and metrics). Values not listed keep their
    meaning (class ids). InputError naming the bad item."""
    if spec is None or spec == "" or spec == {}:
        return None
    items = list(spec.items()) if isinstance(spec, Mapping) else \
        [tuple(part.split("=", 1)) if "=" in part else (part, None) for part in str(spec).split(",") if part.strip()]
    names = {n.lower(): i for i, n in enumerate(class_names)}
    example = f"0=ignore,1={class_names[-1]},2-5={class_names[0]}"
    out: dict[int, int] = {}
    for key, target in items:
        key, target = str(key).strip(), None if target is None else str(target).strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", key)
        if target is None or not m:
            raise InputError(f"label values {key!r}: give VALUE=CLASS items separated by commas, e.g. {example}")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if not 0 <= lo <= hi <= 255:
            raise InputError(f"label values {key!r}: values must be 0-255 (a range low-high), e.g. {example}")
        if target.lower() == "ignore":
            cid = IGNORE
        elif target.lower() in names:
            cid = names[target.lower()]
        elif target.isdigit() and int(target) < len(class_names):
            cid = int(target)
        else:
            raise InputError(f"label values {key}={target}: {target!r} is not a class "
                             f"({', '.join(class_names)}) or 'ignore'")
        for v in range(lo, hi + 1):
            out[v] = cid
    return out


class LabelReader:
    """Windows of class ids (uint8, ``IGNORE`` where unknown) on the grid of ``grid``."""

    def __init__(
        self,
        path: str | os.PathLike,
        grid: SceneInfo,
        *,
        class_names: Sequence[str],
        class_field: str = "class",
        line_width_m: float | None = None,
        value_map: Mapping[int, int] | None = None,
        codes: int | None = None,
        label_class: str | None = None,
    ) -> None:
        """``codes``: label values below it are kept (default: the number of classes); training
        passes a larger number when ``value_map`` maps values to partial-label set codes
        (``geoseg.targets``). ``label_class``: every vector feature is this class, whatever its
        attributes say (for files without a class attribute, such as SpaceNet road lines)."""
        self.path = Path(path)
        self._codes = len(class_names) if codes is None else int(codes)
        self.grid = grid
        self.class_names = list(class_names)
        self.label_class = label_class
        if label_class is not None and label_class.lower() not in [n.lower() for n in self.class_names]:
            raise InputError(f"--label-class {label_class!r} is not a class of this model "
                             f"({', '.join(self.class_names)}); name one of them")
        if not self.path.exists():
            raise InputError(f"labels {self.path}: no such file; check the path")
        if self.path.suffix.lower() in RASTER_SUFFIXES:
            self._kind = "raster"
            self._open_raster(value_map)
        else:
            self._kind = "vector"
            self._load_vectors(class_field, line_width_m)

    # --- vectors -----------------------------------------------------------------------------

    def _load_vectors(self, class_field: str, line_width_m: float | None) -> None:
        import geopandas as gpd
        import shapely

        try:
            gdf = gpd.read_file(self.path)
        except Exception as exc:  # pyogrio raises several types for unreadable files
            raise InputError(f"labels {self.path} cannot be read as vectors ({' '.join(str(exc).split())[:200]})") from exc
        if gdf.crs is None:
            raise InputError(f"labels {self.path} have no CRS; set one (e.g. ogr2ogr -a_srs EPSG:4326) and retry")
        gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty]
        if gdf.crs != self.grid.crs:
            gdf = gdf.to_crs(self.grid.crs)
        geoms = gdf.geometry.values
        invalid = ~shapely.is_valid(geoms)
        if invalid.any():
            log.info("labels %s: repaired %d invalid geometries", self.path.name, int(invalid.sum()))
            geoms = np.where(invalid, shapely.make_valid(geoms), geoms)
        ids = self._class_ids(gdf, class_field)
        kinds = shapely.get_type_id(geoms)
        linear = np.isin(kinds, [0, 1, 2, 4, 5])  # points and lines
        if linear.any():
            if not line_width_m:
                raise InputError(
                    f"labels {self.path} contain {int(linear.sum())} lines or points; give their width "
                    f"with --line-width METRES so they can be buffered into areas"
                )
            # grid units per metre, from the scene's pixel size in units and in metres
            units = line_width_m / 2 * abs(self.grid.transform.a) / self.grid.gsd
            geoms = np.where(linear, shapely.buffer(geoms, units, cap_style="flat"), geoms)
        left, bottom, right, top = rasterio.transform.array_bounds(self.grid.height, self.grid.width, self.grid.transform)
        if len(geoms):
            gx0, gy0, gx1, gy1 = shapely.total_bounds(geoms)
            if gx1 < left or gx0 > right or gy1 < bottom or gy0 > top:
                raise InputError(
                    f"labels {self.path} do not overlap the image {Path(self.grid.path).name} "
                    f"(labels span {gx0:.1f},{gy0:.1f} to {gx1:.1f},{gy1:.1f}; the image {left:.1f},{bottom:.1f} "
                    f"to {right:.1f},{top:.1f} in {self.grid.crs})"
                )
        order = np.argsort(ids, kind="stable")  # higher class ids are burned last, on top
        self._geoms = geoms[order]
        self._ids = ids[order]
        self._tree = shapely.STRtree(self._geoms)

    def _class_ids(self, gdf, class_field: str) -> np.ndarray:
        foreground = [i for i, n in enumerate(self.class_names) if i != 0]
        if self.label_class is not None:
            return np.full(len(gdf), [n.lower() for n in self.class_names].index(self.label_class.lower()), np.int32)
        if class_field not in gdf.columns:
            if len(foreground) == 1:
                return np.full(len(gdf), foreground[0], dtype=np.int32)
            raise InputError(
                f"labels {self.path} have no attribute {class_field!r} to tell the classes "
                f"{', '.join(self.class_names[1:])} apart; name it with --label-field, or give every "
                f"feature one class with --label-class NAME "
                f"(attributes: {', '.join(c for c in gdf.columns if c != 'geometry')})"
            )
        lookup = {n.lower(): i for i, n in enumerate(self.class_names)}
        ids = []
        unknown = set()
        for v in gdf[class_field].tolist():
            if isinstance(v, str) and v.strip().lower() in lookup:
                ids.append(lookup[v.strip().lower()])
            elif isinstance(v, (int, np.integer, float)) and not isinstance(v, bool) and v == int(v) and 0 <= int(v) < len(self.class_names):
                ids.append(int(v))
            else:
                unknown.add(v)
                ids.append(-1)
        if unknown:
            raise InputError(
                f"labels {self.path}: {class_field} values {sorted(map(str, unknown))[:5]} are not classes of "
                f"this model ({', '.join(self.class_names)}); rename them or choose --label-field"
            )
        return np.asarray(ids, dtype=np.int32)

    @property
    def kind(self) -> str:
        """``"vector"`` or ``"raster"``."""
        return self._kind

    def objects(self) -> tuple[np.ndarray, np.ndarray]:
        """The label polygons (repaired, in the scene's CRS) and their class ids; vectors only."""
        if self._kind != "vector":
            raise ValueError("objects() is for vector labels; polygonize a label raster instead")
        return self._geoms, self._ids

    # --- rasters -----------------------------------------------------------------------------

    def _open_raster(self, value_map: Mapping[int, int] | None) -> None:
        from rasterio.vrt import WarpedVRT

        try:
            self._src = rasterio.open(self.path)
        except RasterioIOError as exc:
            raise InputError(f"labels {self.path} is not a raster GDAL can read") from exc
        self._offset = (0, 0)
        if self._src.crs is None:
            whole = self.grid.parent if self.grid.parent is not None else self.grid  # a crop: its scene's size
            if self._src.shape == (whole.height, whole.width) and not whole.resampled:
                log.info("labels %s have no CRS; using the image's grid (same size)", self.path.name)
                self._ds = self._src
                if whole is not self.grid:
                    self._offset = (self.grid.row_off, self.grid.col_off)
            else:
                raise InputError(f"label raster {self.path} has no CRS and is not the image's size; georeference it")
        else:
            # Without a nodata value the warped raster would call pixels outside the labels valid
            # (class 0); an alpha band marks them, so they read as IGNORE.
            self._ds = WarpedVRT(self._src, crs=self.grid.crs, transform=self.grid.transform,
                                 width=self.grid.width, height=self.grid.height,
                                 resampling=rasterio.enums.Resampling.nearest,
                                 add_alpha=self._src.nodata is None)
        self._map = None
        if value_map:
            lut = np.arange(256, dtype=np.uint8)
            for k, v in value_map.items():
                lut[int(k)] = int(v)
            self._map = lut
        self._binary = len(self.class_names) == 2

    def read(self, row0: int, row1: int, col0: int, col1: int) -> np.ndarray:
        """Class ids ``(rows, cols)``, uint8; the window may pass the grid's edge (``IGNORE`` there)."""
        out = np.full((row1 - row0, col1 - col0), IGNORE, dtype=np.uint8)
        r0, r1 = max(row0, 0), min(row1, self.grid.height)
        c0, c1 = max(col0, 0), min(col1, self.grid.width)
        if r0 >= r1 or c0 >= c1:
            return out
        inner = self._read_inner(r0, r1, c0, c1)
        out[r0 - row0 : r1 - row0, c0 - col0 : c1 - col0] = inner
        own = own_pixels(self.grid, row0, row1, col0, col1)  # an area of interest: nothing outside is scored
        if own is not None:
            out[~own] = IGNORE
        return out

    def _read_inner(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        if self._kind == "vector":
            from rasterio.features import rasterize
            import shapely

            transform = rasterio.windows.transform(Window(c0, r0, c1 - c0, r1 - r0), self.grid.transform)
            left, bottom, right, top = rasterio.windows.bounds(Window(c0, r0, c1 - c0, r1 - r0), self.grid.transform)
            hits = np.sort(self._tree.query(shapely.box(left, bottom, right, top)))
            if not len(hits):
                return np.zeros((r1 - r0, c1 - c0), dtype=np.uint8)
            return rasterize(zip(self._geoms[hits], self._ids[hits].tolist()), out_shape=(r1 - r0, c1 - c0),
                             transform=transform, fill=0, dtype="uint8")
        window = Window(c0 + self._offset[1], r0 + self._offset[0], c1 - c0, r1 - r0)
        values = self._ds.read(1, window=window)
        valid = self._ds.read_masks(1, window=window) > 0
        if self._map is not None:
            values = self._map[np.clip(values, 0, 255).astype(np.uint8)]
        elif self._binary:
            values = (values != 0).astype(np.uint8)
        values = np.where((values < self._codes) | (values == IGNORE), values, IGNORE)
        return np.where(valid, values, IGNORE).astype(np.uint8)

    def close(self) -> None:
        if self._kind == "raster":
            if self._ds is not self._src:
                self._ds.close()
            self._src.close()

    def __enter__(self) -> "LabelReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
