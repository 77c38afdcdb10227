"""Writers: a streaming tiled GeoTIFF, its copy to a COG, QGIS styles, and the GeoPackage.

- :class:`TiledTiffWriter` takes finished strips of rows (top to bottom) and writes whole tile
  rows, so memory is one tile row of the raster, never the raster.
- :func:`write_cog` copies that GeoTIFF to a Cloud-Optimized GeoTIFF with the GDAL COG driver
  (``driver="COG"`` on a rasterio dataset would buffer the whole raster), nearest overviews.
- :func:`write_raster_qml` / :func:`layer_qml`: QGIS styles, so classes show named and coloured.
- :func:`write_geopackage`: one layer per class plus ``layer_styles`` (QGIS default styles) and
  ``geoseg_run`` (run metadata); :func:`read_run_metadata` reads the latter back;
  :func:`write_line_layer` adds a styled line layer (road centre-lines) to one.

Callers write to a temporary name and rename (outputs appear whole or not at all).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import xml.etree.ElementTree as ET
from collections.abc import Container, Iterable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.windows import Window

from geoseg.errors import InputError, OutputError

if TYPE_CHECKING:
    import geopandas as gpd

__all__ = [
    "TiledTiffWriter",
    "write_cog",
    "class_colormap",
    "write_raster_qml",
    "layer_qml",
    "categorized_qml",
    "write_geopackage",
    "append_layer",
    "read_run_metadata",
]

log = logging.getLogger(__name__)

BLOCK_SIZE = 512
# Intermediate rasters (read back once, then deleted) are compressed with ZSTD level 1: 7x less CPU
# than DEFLATE's default level for 12 % more bytes (benchmarks/scratch_compression.py); outputs
# users keep stay DEFLATE, which every GIS reads.
SCRATCH_COMPRESS = {"compress": "zstd", "zstd_level": 1}
RESAMPLINGS = ("nearest", "mode", "average", "bilinear", "cubic", "cubicspline", "lanczos")
POLYGON_COLUMNS = ("class_name", "class_id", "area_m2", "perimeter_m", "score")
RUN_TABLE = "geoseg_run"
STYLE_TABLE = "layer_styles"
QGIS_VERSION = "3.34.0-Prizren"

RGB = tuple[int, int, int]


# --------------------------------------------------------------------------------------------
# rasters


@dataclass
class _ColumnBand:
    """Progress of one column band of a TiledTiffWriter."""

    col_off: int
    width: int
    next_row: int = 0  # next row expected
    buffer_start: int = 0  # first row held in the buffer (a multiple of the block height)
    buffer: np.ndarray | None = None


class TiledTiffWriter:
    """Write a tiled GeoTIFF strip by strip, top to bottom.

    Rows are buffered until a whole row of tiles is complete, so GDAL compresses each tile once
    (no partial tiles rewritten) and memory stays at one tile row (``count x block_size x
    width``); strips that start and end on tile rows are written without the buffer. The raster may
    also be written as column bands (``col_off``), each top to bottom, one after the other: give
    bands that start on a multiple of ``block_size`` so no tile is shared by two bands.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        width: int,
        height: int,
        count: int,
        dtype: str,
        crs,
        transform,
        nodata: float | None = None,
        compress: str = "deflate",
        num_threads: int = 2,
        block_size: int = BLOCK_SIZE,
        zstd_level: int | None = None,
    ) -> None:
        if block_size < 16 or block_size % 16:
            raise OutputError(f"block_size={block_size} must be a multiple of 16 (e.g. 256, 512)")
        if width < 1 or height < 1 or count < 1:
            raise OutputError(
                f"cannot write a {width}x{height} raster with {count} band(s): all must be >= 1"
            )
        self.path = os.fspath(path)
        self.width, self.height, self.count = int(width), int(height), int(count)
        self.dtype = np.dtype(dtype)
        block = int(block_size)
        profile = dict(
            driver="GTiff",
            width=self.width,
            height=self.height,
            count=self.count,
            dtype=self.dtype.name,
            crs=crs,
            transform=transform,
            nodata=nodata,
            tiled=True,
            blockxsize=block,
            blockysize=block,
            compress=compress,
            num_threads=str(num_threads),
            bigtiff="IF_SAFER",
        )
        if zstd_level is not None:
            profile["zstd_level"] = str(zstd_level)
        if self.count > 1:
            profile["interleave"] = "band"
        try:
            self._ds = rasterio.open(self.path, "w", **profile)
        except rasterio.errors.RasterioIOError as exc:
            raise OutputError(
                f"cannot create {self.path}: {exc}; check that the folder exists and is writable"
            ) from exc
        self._block = block
        self._bands: dict[int, _ColumnBand] = {}  # col_off -> rows received for that column band

    @property
    def rows_written(self) -> int:
        """Rows received so far (written to disk or buffered) by the column band that has fewest."""
        return min((b.next_row for b in self._bands.values()), default=0)

    def write(self, array: np.ndarray, *, row_off: int, col_off: int = 0) -> None:
        """Write rows starting at ``row_off``: (count, rows, cols), or (rows, cols).

        Columns ``[col_off, col_off + cols)`` form a column band (the whole width by default); each
        band is written top to bottom, and a band's first write fixes its width.
        """
        array = np.asarray(array)
        if array.ndim == 2 and self.count == 1:
            array = array[np.newaxis]
        band = self._bands.get(col_off)
        cols = band.width if band else (array.shape[2] if array.ndim == 3 else -1)
        if (array.ndim != 3 or array.shape[0] != self.count or array.shape[2] != cols
                or col_off < 0 or col_off + cols > self.width):
            raise ValueError(
                f"expected an array of shape ({self.count}, rows, {cols if band else self.width - col_off}) "
                f"for columns from {col_off}, got {array.shape}"
            )
        if band is None:
            band = self._bands[col_off] = _ColumnBand(col_off=col_off, width=cols)
        if row_off != band.next_row:
            raise ValueError(
                f"rows must be written in order, top to bottom: expected row_off={band.next_row},"
                f" got {row_off}"
            )
        if row_off + array.shape[1] > self.height:
            raise ValueError(
                f"rows {row_off}..{row_off + array.shape[1]} run past the raster's "
                f"height {self.height}"
            )
        integers = array.dtype.kind in "biu" and self.dtype.kind in "iu"
        if not (integers or np.can_cast(array.dtype, self.dtype, casting="same_kind")):
            raise ValueError(f"cannot store {array.dtype} values in a {self.dtype} raster")
        done = 0
        rows = array.shape[1]
        while done < rows:
            filled = band.next_row - band.buffer_start
            whole = (rows - done) // self._block * self._block
            if filled == 0 and whole:  # aligned whole tile rows: no copy
                self._write_rows(array[:, done : done + whole], band.next_row, col_off)
                done += whole
                band.next_row += whole
                band.buffer_start = band.next_row
                continue
            if band.buffer is None:
                band.buffer = np.empty((self.count, self._block, band.width), dtype=self.dtype)
            take = min(self._block - filled, rows - done)
            band.buffer[:, filled : filled + take] = array[:, done : done + take]
            done += take
            band.next_row += take
            if band.next_row - band.buffer_start == self._block:
                self._flush(band)
        if band.next_row == self.height:
            self._flush(band)
            band.buffer = None  # a finished band frees its buffer

    def _flush(self, band: "_ColumnBand") -> None:
        rows = band.next_row - band.buffer_start
        if rows:
            self._write_rows(band.buffer[:, :rows], band.buffer_start, band.col_off)
        band.buffer_start = band.next_row

    def _write_rows(self, array: np.ndarray, row_off: int, col_off: int = 0) -> None:
        window = Window(col_off, row_off, array.shape[2], array.shape[1])
        try:
            self._ds.write(array.astype(self.dtype, copy=False), window=window)
        except rasterio.errors.RasterioIOError as exc:
            raise OutputError(f"writing {self.path} failed: {exc}; check free disk space") from exc

    def close(self, *, complete: bool = True) -> None:
        """Write the last buffered rows and close the file (idempotent). ``complete=False`` (the run
        failed or was interrupted, and the file is scratch to be removed) skips the check that every
        column was written and its warning, which would only be noise on top of the real error."""
        self._close(warn_incomplete=complete)

    def _close(self, *, warn_incomplete: bool) -> None:
        if self._ds.closed:
            return
        try:
            for band in self._bands.values():
                self._flush(band)
        finally:
            self._ds.close()
            for band in self._bands.values():
                band.buffer = None
        if warn_incomplete:
            verify_tiff(self.path)
        covered = sum(b.width for b in self._bands.values() if b.next_row == self.height)
        if warn_incomplete and covered != self.width:
            log.warning("%s closed with %d of %d columns written in full", self.path, covered, self.width)

    def __enter__(self) -> TiledTiffWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._close(warn_incomplete=exc_type is None)


def write_cog(
    src_path: str | os.PathLike,
    dst_path: str | os.PathLike,
    *,
    colormap: Mapping[int, tuple[int, int, int, int]] | None = None,
    band_descriptions: Sequence[str] | None = None,
    tags: Mapping[str, str] | None = None,
    resampling: str = "nearest",
    compress: str = "deflate",
    num_threads: int | str = "ALL_CPUS",
) -> None:
    """Copy a tiled GeoTIFF to a Cloud-Optimized GeoTIFF with the GDAL COG driver.

    The colour table (band 1), band descriptions and dataset tags are set on ``src_path`` (in
    place) and the COG driver carries them over, with the nodata value. ``resampling`` is used
    for the overviews and any warping; keep "nearest" (or "mode") for class rasters: GDAL's
    default (cubic) invents classes.
    """
    if resampling not in RESAMPLINGS:
        raise InputError(f"resampling={resampling!r} is not one of {RESAMPLINGS}")
    src_path, dst_path = os.fspath(src_path), os.fspath(dst_path)
    try:
        with rasterio.open(src_path, "r+") as src:
            if colormap:
                src.write_colormap(1, {int(k): tuple(int(c) for c in v) for k, v in colormap.items()})
            if band_descriptions is not None:
                if len(band_descriptions) != src.count:
                    raise InputError(
                        f"{len(band_descriptions)} band descriptions given for {src.count} "
                        f"band(s) in {src_path}; give one per band"
                    )
                for i, text in enumerate(band_descriptions, start=1):
                    src.set_band_description(i, str(text))
            if tags:
                src.update_tags(**{str(k): str(v) for k, v in tags.items()})
        rasterio.shutil.copy(
            src_path,
            dst_path,
            driver="COG",
            compress=compress.upper(),
            resampling=resampling.upper(),
            overview_resampling=resampling.upper(),
            blocksize=str(BLOCK_SIZE),
            bigtiff="IF_SAFER",
            num_threads=str(num_threads),
        )
    except rasterio.errors.RasterioIOError as exc:
        raise OutputError(f"cannot write COG {dst_path} from {src_path}: {exc}") from exc
    verify_tiff(dst_path)


def verify_tiff(path: str | os.PathLike) -> None:
    """OutputError unless every tile of ``path`` (full resolution) lies whole inside the file.

    GDAL writes most tiles when a dataset is closed and does not report failed writes then: a disk
    that fills up, or a file-size limit, leaves tiles that are missing (size 0, read back as
    zeros) or cut short. Checking the tile index against the file's size costs one lookup per tile.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    problem = None
    try:
        with rasterio.open(path) as ds:
            bh, bw = ds.block_shapes[0]
            rows, cols = -(-ds.height // bh), -(-ds.width // bw)
            bands = range(1, ds.count + 1) if ds.interleaving != rasterio.enums.Interleaving.pixel else [1]
            for b in bands:
                for r in range(rows):
                    for c in range(cols):
                        off = ds.get_tag_item(f"BLOCK_OFFSET_{c}_{r}", "TIFF", bidx=b)
                        n = ds.get_tag_item(f"BLOCK_SIZE_{c}_{r}", "TIFF", bidx=b)
                        if not off or not n or int(n) == 0 or int(off) + int(n) > size:
                            problem = f"tile {c},{r} of band {b} is missing"
                            break
                    if problem:
                        break
                if problem:
                    break
    except rasterio.errors.RasterioIOError as exc:
        problem = f"it does not open ({exc})"
    if problem:
        raise OutputError(f"{path} was not written completely ({problem}): the disk may be full or a "
                          f"file-size limit reached; free some disk space and run again")


#: Default class colours, by class id (background first).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195),
)

#: Opacity (0-255) of a class in the class raster's QGIS style: the imagery under an overlay stays
#: visible. Background classes (and "no change") are fully transparent there. (A GeoTIFF colour
#: table holds no alpha: the TIFF ColorMap tag is RGB only, and GDAL reads every entry back opaque.)
CLASS_ALPHA = 180


def class_colormap(
    colors: Sequence[RGB], *, nodata: int | None
) -> dict[int, tuple[int, int, int, int]]:
    """GeoTIFF colour table: class id -> RGBA (opaque: TIFF stores no alpha); nodata transparent black."""
    colors = [_rgb(c) for c in colors]
    if len(colors) > 256:
        raise InputError(f"{len(colors)} colours given; a uint8 colour table holds at most 256")
    cmap = {i: (*c, 255) for i, c in enumerate(colors)}
    if nodata is not None:
        if not 0 <= int(nodata) <= 255:
            raise InputError(f"nodata={nodata} does not fit a uint8 colour table (0..255)")
        if int(nodata) < len(colors):
            raise InputError(
                f"nodata={nodata} is also a class id (there are {len(colors)} classes); "
                "use 255 for nodata"
            )
        cmap[int(nodata)] = (0, 0, 0, 0)
    return cmap


def _rgb(color) -> RGB:
    rgb = tuple(int(c) for c in color)
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise InputError(f"colour {tuple(color)} is not an (r, g, b) triple of 0..255 integers")
    return rgb  # type: ignore[return-value]


def _hex(color: RGB) -> str:
    return "#{:02x}{:02x}{:02x}".format(*color)


# --------------------------------------------------------------------------------------------
# QGIS styles


def _qgis_root(**attrs: str) -> ET.Element:
    return ET.Element("qgis", {"version": QGIS_VERSION, **attrs})


def _to_qml(root: ET.Element) -> str:
    ET.indent(root)
    return "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n" + ET.tostring(
        root, encoding="unicode"
    ) + "\n"


def raster_qml(
    *, class_names: Sequence[str], colors: Sequence[RGB], skip: Container[int] = (),
    transparent: Container[int] = (), alpha: int = CLASS_ALPHA
) -> str:
    """QML of a paletted renderer on band 1: one named entry per class id not in ``skip``, at
    ``alpha`` opacity, fully transparent for the ids in ``transparent`` (background, "no change"),
    so the class raster overlays the imagery without hiding it."""
    if len(class_names) != len(colors):
        raise InputError(
            f"{len(class_names)} class names but {len(colors)} colours; give one colour per class"
        )
    root = _qgis_root(styleCategories="AllStyleCategories")
    pipe = ET.SubElement(root, "pipe")
    renderer = ET.SubElement(
        pipe,
        "rasterrenderer",
        type="paletted", band="1", opacity="1", alphaBand="-1", nodataColor="",
    )
    ET.SubElement(renderer, "rasterTransparency")
    palette = ET.SubElement(renderer, "colorPalette")
    for class_id, (name, color) in enumerate(zip(class_names, colors)):
        if class_id in skip:
            continue
        ET.SubElement(
            palette,
            "paletteEntry",
            value=str(class_id), color=_hex(_rgb(color)), alpha="0" if class_id in transparent else str(int(alpha)),
            label=str(name),
        )
    ET.SubElement(pipe, "brightnesscontrast", brightness="0", contrast="0", gamma="1")
    ET.SubElement(pipe, "huesaturation", saturation="0", grayscaleMode="0", colorizeOn="0")
    ET.SubElement(pipe, "rasterresampler", maxOversampling="2")
    ET.SubElement(root, "blendMode").text = "0"
    return _to_qml(root)


def write_raster_qml(
    qml_path: str | os.PathLike,
    *,
    class_names: Sequence[str],
    colors: Sequence[RGB],
    skip: Container[int] = (),
    transparent: Container[int] = (),
) -> None:
    """Write the QGIS sidecar ``name.qml`` (loaded automatically beside ``name.tif``)."""
    text = raster_qml(class_names=class_names, colors=colors, skip=skip, transparent=transparent)
    try:
        Path(qml_path).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"cannot write {qml_path}: {exc}") from exc


def layer_qml(*, class_name: str, color: RGB, geometry: str = "polygon") -> str:
    """QML of a categorized renderer on ``class_name`` for one class.

    Polygons: the class colour at 60 % opacity with a darker outline; ``geometry="line"``
    draws a line in the colour given (road centre-lines get :func:`line_color` of their class's).
    """
    return categorized_qml(attr="class_name", categories=[(str(class_name), str(class_name), color)],
                           geometry=geometry)


def line_color(color: RGB) -> RGB:
    """The colour of a class's centre-lines: the class colour at 40 % brightness, so that a line
    stands out on the class's own (lighter, translucent) polygons."""
    return tuple(int(round(c * 0.4)) for c in _rgb(color))  # type: ignore[return-value]


def categorized_qml(*, attr: str, categories: Sequence[tuple[str, str, RGB]], geometry: str = "polygon") -> str:
    """QML of a categorized renderer on the attribute ``attr``: one ``(value, label, colour)`` per
    category, each drawn like :func:`layer_qml` draws a class (e.g. ``change`` = appeared /
    disappeared in two colours)."""
    if geometry not in ("polygon", "line"):
        raise InputError(f"geometry={geometry!r} is not 'polygon' or 'line'")
    if not categories:
        raise InputError("a categorized style needs at least one category")
    geometry_type = "2" if geometry == "polygon" else "1"
    root = _qgis_root(styleCategories="Symbology")
    renderer = ET.SubElement(
        root,
        "renderer-v2",
        type="categorizedSymbol", attr=str(attr), symbollevels="0", enableorderby="0",
        forceraster="0", referencescale="-1",
    )
    cats = ET.SubElement(renderer, "categories")
    for i, (value, label, _) in enumerate(categories):
        ET.SubElement(cats, "category", symbol=str(i), value=str(value), label=str(label), render="true",
                      type="string")
    symbols = ET.SubElement(renderer, "symbols")
    for i, (_, _, color) in enumerate(categories):
        _symbol(symbols, str(i), color, geometry)
    _symbol(ET.SubElement(renderer, "source-symbol"), "0", categories[0][2], geometry)
    ET.SubElement(root, "blendMode").text = "0"
    ET.SubElement(root, "featureBlendMode").text = "0"
    ET.SubElement(root, "layerGeometryType").text = geometry_type
    return _to_qml(root)


def _symbol(parent: ET.Element, name: str, color: RGB, geometry: str) -> None:
    """One QGIS symbol: a fill at 60 % opacity with a darker outline, or a line."""
    r, g, b = _rgb(color)
    dark = tuple(int(c * 0.6) for c in (r, g, b))
    if geometry == "polygon":
        symbol_type, layer_class = "fill", "SimpleFill"
        props = {
            "color": f"{r},{g},{b},153",
            "style": "solid",
            "outline_color": "{},{},{},255".format(*dark),
            "outline_style": "solid",
            "outline_width": "0.3",
            "outline_width_unit": "MM",
            "joinstyle": "miter",
        }
    else:
        symbol_type, layer_class = "line", "SimpleLine"
        props = {
            "line_color": f"{r},{g},{b},255",
            "line_style": "solid",
            "line_width": "0.6",
            "line_width_unit": "MM",
            "capstyle": "round",
            "joinstyle": "round",
        }
    symbol = ET.SubElement(
        parent, "symbol",
        type=symbol_type, name=name, alpha="1", clip_to_extent="1", force_rhr="0",
        frame_rate="10", is_animated="0",
    )
    layer = ET.SubElement(symbol, "layer", {"class": layer_class, "enabled": "1", "pass": "0", "locked": "0"})
    options = ET.SubElement(layer, "Option", type="Map")  # QGIS >= 3.26
    for key, value in props.items():
        ET.SubElement(options, "Option", name=key, type="QString", value=value)
    for key, value in props.items():  # older QGIS reads <prop>
        ET.SubElement(layer, "prop", k=key, v=value)


# --------------------------------------------------------------------------------------------
# GeoPackage

_STYLE_DDL = f"""
CREATE TABLE {STYLE_TABLE} (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    f_table_catalog TEXT(256),
    f_table_schema TEXT(256),
    f_table_name TEXT(256),
    f_geometry_column TEXT(256),
    styleName TEXT(30),
    styleQML TEXT,
    styleSLD TEXT,
    useAsDefault BOOLEAN,
    description TEXT,
    owner TEXT(30),
    ui TEXT(30),
    update_time DATETIME DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
)
"""
_RUN_DDL = f"CREATE TABLE {RUN_TABLE} (key TEXT PRIMARY KEY, value TEXT)"
_CONTENTS_SQL = (
    "INSERT INTO gpkg_contents (table_name, data_type, identifier, description, last_change) "
    "VALUES (?, 'attributes', ?, ?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))"
)


def write_geopackage(
    path: str | os.PathLike,
    layers: Mapping[str, gpd.GeoDataFrame],
    *,
    colors: Mapping[str, RGB],
    metadata: Mapping[str, str] | None = None,
    styles: Mapping[str, str] | None = None,
) -> None:
    """Write a new GeoPackage: one layer per entry (in order, empty ones too) plus styles.

    Each layer gets the columns ``class_name, class_id (int32), area_m2, perimeter_m, score``
    (missing ones are added empty), any extra columns, and MultiPolygon geometry in the frame's
    CRS (MultiLineString when the frame holds lines). ``layer_styles`` holds one default QGIS
    style per layer (``colors[layer name]``, or the QML ``styles[layer name]`` where given, e.g.
    from :func:`categorized_qml`) and ``geoseg_run`` holds ``metadata``.
    ``path`` must end in ".gpkg" and must not exist (pass a temporary name, then rename).
    """
    import pyogrio

    path = os.fspath(path)
    if not path.lower().endswith(".gpkg"):
        raise OutputError(f"{path} does not end in '.gpkg'; GDAL needs the extension")
    if os.path.exists(path):
        raise OutputError(f"{path} already exists; write to a new temporary name, then rename")
    if not layers:
        raise OutputError("no layers to write; pass at least one {name: GeoDataFrame}")
    reserved = {STYLE_TABLE, RUN_TABLE}
    for name in layers:
        if not name or name in reserved or name.lower().startswith(("gpkg_", "rtree_")):
            raise OutputError(f"layer name {name!r} is empty or reserved; rename the class")
    styles = dict(styles or {})
    missing = [name for name in layers if name not in colors and name not in styles]
    if missing:
        raise OutputError(f"no colour for layer(s) {missing}; add them to colors")

    rows = []
    try:
        for name, frame in layers.items():
            frame, geometry = _layer_frame(frame)
            pyogrio.write_dataframe(
                frame,
                path,
                layer=name,
                driver="GPKG",
                promote_to_multi=True,
                geometry_type=geometry,
                dataset_options={"VERSION": "1.3"},
            )
            class_name = str(frame["class_name"].iloc[0]) if len(frame) else name
            qml = styles.get(name) or layer_qml(
                class_name=class_name,
                color=colors[name],
                geometry="line" if "Line" in geometry else "polygon",
            )
            column = pyogrio.read_info(path, layer=name)["geometry_name"]
            rows.append(("", name, column, name, qml, "", 1, f"geoseg default style for {name}"))

        with closing(sqlite3.connect(path)) as db, db:
            db.execute(_STYLE_DDL)
            db.executemany(
                f"INSERT INTO {STYLE_TABLE} (f_table_schema, f_table_name, f_geometry_column, "
                "styleName, styleQML, styleSLD, useAsDefault, description) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            db.execute(_CONTENTS_SQL, (STYLE_TABLE, STYLE_TABLE, "QGIS layer styles"))
            db.execute(_RUN_DDL)
            db.executemany(
                f"INSERT INTO {RUN_TABLE} (key, value) VALUES (?, ?)",
                [(str(k), str(v)) for k, v in (metadata or {}).items()],
            )
            db.execute(_CONTENTS_SQL, (RUN_TABLE, RUN_TABLE, "geoseg run metadata"))
    except (OSError, sqlite3.Error, pyogrio.errors.DataSourceError) as exc:
        raise OutputError(f"writing {path} failed: {exc}; check free disk space") from exc


def polygon_frame(name, cid, geoms, areas, perimeters, scores, crs) -> gpd.GeoDataFrame:
    """A GeoDataFrame of one class's polygons with geoseg's columns (``geoseg.vector.polygons.COLUMNS``)."""
    import geopandas as gpd

    n = len(geoms)
    return gpd.GeoDataFrame(
        {
            "class_name": np.full(n, name, dtype=object),
            "class_id": np.full(n, cid, dtype=np.int32),
            "area_m2": np.asarray(areas, dtype=np.float64),
            "perimeter_m": np.asarray(perimeters, dtype=np.float64),
            "score": np.asarray(scores, dtype=np.float64),
        },
        geometry=gpd.GeoSeries(np.asarray(geoms, dtype=object), crs=crs),
        crs=crs,
    )


def write_polygon_stream(
    path: str | os.PathLike,
    batches: Iterable,
    *,
    class_names: Sequence[str],
    layers: Sequence[str],
    crs,
    colors: Mapping[str, RGB],
    metadata: Mapping[str, str] | None = None,
    buffer: int = 50_000,
    columns: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, tuple[int, float]]:
    """Write a new GeoPackage from ``polygons.iter_polygons`` batches as they come.

    The layers (``layers``: class names, empty ones too), their styles and the run table are
    created first; then polygons are appended per layer whenever ``buffer`` of them are waiting,
    so memory holds at most that many polygons per layer. ``columns``: extra columns per layer
    (``{layer: {column: dtype}}``) that the batches carry in ``extra``, created with the layer.
    Returns ``{layer: (count, area_m2)}``.
    """
    import geopandas as gpd

    columns = columns or {}
    empty = {name: gpd.GeoDataFrame({"class_name": np.zeros(0, object),
                                     **{c: np.zeros(0, t) for c, t in columns.get(name, {}).items()}},
                                    geometry=gpd.GeoSeries([], crs=crs), crs=crs)
             for name in layers}
    write_geopackage(path, empty, colors=colors, metadata=metadata)
    waiting: dict[int, list] = {}
    totals = {name: (0, 0.0) for name in layers}

    def flush(cid: int) -> None:
        got = waiting.pop(cid, [])
        if not got:
            return
        name = class_names[cid]
        frame = polygon_frame(name, cid, *(np.concatenate([getattr(b, f) for b in got])
                                    for f in ("geoms", "areas", "perimeters", "scores")), crs)
        for key in got[0].extra:
            if all(key in b.extra for b in got):
                frame[key] = np.concatenate([b.extra[key] for b in got])
        append_layer(path, name, frame)
        n, area = totals[name]
        totals[name] = (n + len(frame), area + float(frame["area_m2"].sum()))

    for batch in batches:
        cid = int(batch.class_id)
        waiting.setdefault(cid, []).append(batch)
        if sum(len(b.geoms) for b in waiting[cid]) >= buffer:
            flush(cid)
    for cid in list(waiting):
        flush(cid)
    return totals


def append_layer(path: str | os.PathLike, layer: str, frame: gpd.GeoDataFrame) -> None:
    """Append polygons to a layer made by :func:`write_geopackage` (same schema and column order)."""
    import pyogrio

    frame, _ = _layer_frame(frame)
    try:
        pyogrio.write_dataframe(frame, os.fspath(path), layer=layer, driver="GPKG", append=True,
                                promote_to_multi=True, geometry_type="MultiPolygon")
    except (OSError, pyogrio.errors.DataSourceError) as exc:
        raise OutputError(f"writing {path} failed: {exc}; check free disk space") from exc


def write_line_layer(
    path: str | os.PathLike,
    name: str,
    frame: gpd.GeoDataFrame,
    *,
    color: RGB,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Add a LineString layer (e.g. road centre-lines) to a GeoPackage made by :func:`write_geopackage`
    or :func:`write_polygon_stream`, with its own columns as they are, its default QGIS style (a
    line in ``color``, categorized on ``class_name``) and more ``metadata`` rows in ``geoseg_run``."""
    import pyogrio

    path = os.fspath(path)
    if not name or name in {STYLE_TABLE, RUN_TABLE} or name.lower().startswith(("gpkg_", "rtree_")):
        raise OutputError(f"layer name {name!r} is empty or reserved")
    if "class_name" not in frame.columns:
        raise OutputError(f"layer {name!r} has no class_name column; its style is categorized on it")
    class_name = str(frame["class_name"].iloc[0]) if len(frame) else name
    try:
        pyogrio.write_dataframe(frame, path, layer=name, driver="GPKG", geometry_type="LineString")
        column = pyogrio.read_info(path, layer=name)["geometry_name"]
        with closing(sqlite3.connect(path)) as db, db:
            db.execute(
                f"INSERT INTO {STYLE_TABLE} (f_table_schema, f_table_name, f_geometry_column, styleName, "
                "styleQML, styleSLD, useAsDefault, description) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                ("", name, column, name, layer_qml(class_name=class_name, color=color, geometry="line"), "", 1,
                 f"geoseg default style for {name}"),
            )
    except (OSError, sqlite3.Error, pyogrio.errors.DataSourceError) as exc:
        raise OutputError(f"writing layer {name} to {path} failed: {exc}; check free disk space") from exc
    if metadata:
        add_run_metadata(path, metadata)


def add_run_metadata(path: str | os.PathLike, metadata: Mapping[str, str]) -> None:
    """Add (or replace) rows of the ``geoseg_run`` table of a GeoPackage made by :func:`write_geopackage`."""
    path = os.fspath(path)
    try:
        with closing(sqlite3.connect(path)) as db, db:
            db.executemany(f"INSERT OR REPLACE INTO {RUN_TABLE} (key, value) VALUES (?, ?)",
                           [(str(k), str(v)) for k, v in metadata.items()])
    except sqlite3.Error as exc:
        raise OutputError(f"writing the run metadata to {path} failed: {exc}; check free disk space") from exc


def _layer_frame(frame: gpd.GeoDataFrame) -> tuple[gpd.GeoDataFrame, str]:
    """Frame with the polygon schema (columns in order, dtypes fixed) and its geometry type."""
    import geopandas as gpd

    frame = frame.copy()
    n = len(frame)
    defaults = {
        "class_name": np.full(n, "", dtype=object),
        "class_id": np.zeros(n, dtype=np.int32),
        "area_m2": np.full(n, np.nan),
        "perimeter_m": np.full(n, np.nan),
        "score": np.full(n, np.nan),
    }
    for column, values in defaults.items():
        if column not in frame.columns:
            frame[column] = values
    frame["class_name"] = frame["class_name"].astype(str).astype(object)
    frame["class_id"] = frame["class_id"].astype(np.int32)
    for column in ("area_m2", "perimeter_m", "score"):
        frame[column] = frame[column].astype(np.float64)
    geometry_column = frame.geometry.name
    extra = [c for c in frame.columns if c not in POLYGON_COLUMNS and c != geometry_column]
    frame = gpd.GeoDataFrame(
        frame[[*POLYGON_COLUMNS, *extra, geometry_column]],
        geometry=geometry_column,
        crs=frame.crs,
    )
    types = set(frame.geom_type.dropna())
    geometry = "MultiLineString" if types and types <= {"LineString", "MultiLineString"} else (
        "MultiPolygon"
    )
    return frame, geometry


def read_run_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``geoseg_run`` key/value table of a GeoPackage written by :func:`write_geopackage`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    uri = path.resolve().as_uri() + "?mode=ro"
    try:
        with closing(sqlite3.connect(uri, uri=True)) as db:
            rows = db.execute(f"SELECT key, value FROM {RUN_TABLE}").fetchall()
    except sqlite3.Error as exc:
        raise InputError(
            f"{path} has no readable {RUN_TABLE} table ({exc}); was it written by geoseg?"
        ) from exc
    return {key: value for key, value in rows}
