"""Open a scene and read windows of it: CRS, transform, bands, nodata mask and GSD.

A scene is any GeoTIFF (or other GDAL raster) with 1..N bands of an integer or float type. Nodata
may be a value, NaN, an internal mask or an alpha band; ``read`` returns the pixels and one boolean
"valid" mask that folds all of these together (and marks NaN and infinite values invalid).

Reads are windowed and boundless: a window that passes the scene's edge comes back padded with the
fill value and marked invalid there, so edge tiles and scenes smaller than one tile just work.
Padding is done here rather than with rasterio's ``boundless=True`` (which goes through a VRT and
is much slower).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import ColorInterp, MaskFlags
from rasterio.errors import RasterioError, RasterioIOError
from rasterio.windows import Window

from geoseg.errors import InputError
from geoseg.io.tiffheader import HeaderError, check_tiff

SUPPORTED_KINDS = "uifb"  # unsigned, signed, float, bool; complex ("c") is refused


@dataclass(frozen=True)
class SceneInfo:
    """What geoseg needs to know about a scene, read once when it is opened."""

    path: str
    width: int
    height: int
    crs: rasterio.crs.CRS
    transform: rasterio.Affine
    bands: tuple[int, ...]  # 1-based band indexes fed to the model, in order
    band_names: tuple[str, ...]
    dtype: str
    nodata: float | None
    mask_kind: str  # "none" | "nodata" | "mask" (internal/per-dataset mask or alpha band)
    alpha_band: int | None
    gsd: float  # metres per pixel on the ground, at the scene's centre
    resampled: bool = False  # True: width/height/transform describe a grid the file is warped onto
    # A window of another grid (``crop``): rows and columns start at (row_off, col_off) of ``parent``,
    # which reads them, with real pixels around the window for the model's context.
    parent: "SceneInfo | None" = None
    row_off: int = 0
    col_off: int = 0
    aoi: object | None = None  # shapely polygons in ``crs`` (geoseg.io.aoi): outputs only where pixel centres are inside

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)


def is_virtual(path: str | os.PathLike) -> bool:
    """A GDAL virtual path (``/vsizip/...``, ``/vsicurl/...``) or a URL (``https://...``): passed to
    GDAL as it is, never through ``pathlib`` (which would collapse the ``//``)."""
    text = os.fspath(path)
    return text.startswith("/vsi") or "://" in text


def _missing_vrt_sources(path: str) -> list[str]:
    """The local source files a VRT names that do not exist (GDAL opens such a VRT and fails only
    when it reads, with a message about the read, not the missing file)."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError):
        return []
    base = Path(path).parent
    missing = []
    for node in root.iter("SourceFilename"):
        name = (node.text or "").strip()
        if not name or is_virtual(name):
            continue
        source = base / name if node.get("relativeToVRT") == "1" else Path(name)
        if not source.exists() and str(source) not in missing:
            missing.append(str(source))
    return missing


def _check_path(path: str | os.PathLike) -> str:
    if is_virtual(path):
        return os.fspath(path)
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file; check the path")
    if p.is_dir():
        raise InputError(f"{p} is a directory; give the path of a GeoTIFF file")
    if p.stat().st_size == 0:
        raise InputError(f"{p} is an empty file (0 bytes); was it copied completely?")
    return str(p)


def open_dataset(path: str | os.PathLike) -> rasterio.DatasetReader:
    """Open a raster for reading, turning GDAL's complaints into one clear InputError."""
    path = _check_path(path)
    if path.lower().endswith(".vrt") and not is_virtual(path):
        missing = _missing_vrt_sources(path)
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise InputError(f"{path} is a VRT whose source file {missing[0]}{more} does not exist; restore it, "
                             f"or rebuild the VRT (gdalbuildvrt) from the files that are there")
    try:
        ds = rasterio.open(path)
    except RasterioIOError as exc:
        if is_virtual(path):
            raise InputError(f"{path} could not be opened by GDAL ({_first_line(exc)}); check the path inside "
                             f"the archive or the URL (and, for a URL, the network)") from exc
        raise InputError(f"{path} is not a raster GDAL can read ({_first_line(exc)})") from exc
    except (RasterioError, UnicodeDecodeError, ValueError, OverflowError) as exc:
        # found by fuzzing: a damaged CRS name (not UTF-8) or georeference fails inside rasterio.open
        raise InputError(f"{path} is a damaged raster: its header does not decode ({_first_line(exc)}); "
                         f"re-export or re-download it") from exc
    if ds.driver == "GTiff" and not is_virtual(path):
        try:
            check_tiff(path)
        except (HeaderError, OSError) as exc:
            ds.close()
            raise InputError(f"{path} is damaged: {exc}") from exc
    return ds


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def ground_sample_distance(crs: rasterio.crs.CRS, transform: rasterio.Affine, width: int, height: int) -> float:
    """Metres per pixel at the scene's centre, measured on the ellipsoid (true for any CRS).

    Web Mercator's nominal pixel size is not its ground size (it is inflated by 1/cos(latitude));
    a geographic CRS has pixels in degrees. Both are measured geodesically here.
    """
    from pyproj import CRS as ProjCRS
    from pyproj import Geod, Transformer

    pcrs = ProjCRS.from_user_input(crs.to_wkt())
    cx, cy = width / 2.0, height / 2.0
    corners = [transform @ (cx, cy), transform @ (cx + 1, cy), transform @ (cx, cy + 1)]
    try:
        to_lonlat = Transformer.from_crs(pcrs, pcrs.geodetic_crs, always_xy=True)
        (x0, y0), (x1, y1), (x2, y2) = [to_lonlat.transform(x, y) for x, y in corners]
        geod = pcrs.get_geod() or Geod(ellps="WGS84")
        dx = geod.inv(x0, y0, x1, y1)[2]
        dy = geod.inv(x0, y0, x2, y2)[2]
        gsd = math.sqrt(abs(dx * dy))
    except Exception:  # a local engineering CRS without a datum: fall back to its units
        factor = pcrs.axis_info[0].unit_conversion_factor if pcrs.axis_info else 1.0
        gsd = math.sqrt(abs(transform.a * transform.e)) * factor
    if not math.isfinite(gsd) or gsd <= 0:
        raise InputError(f"could not work out the pixel size in metres from the CRS {crs} and transform {tuple(transform)[:6]}")
    return gsd


def _band_names(ds: rasterio.DatasetReader, bands: tuple[int, ...]) -> tuple[str, ...]:
    """Each band's description, else its colour interpretation (red, ...), else ``bandN``
    (rasterio builds the description and interpretation lists whole: read them once)."""
    descriptions, interps = ds.descriptions, ds.colorinterp
    names = []
    for band in bands:
        if descriptions[band - 1]:
            names.append(descriptions[band - 1])
        elif interps[band - 1] in (ColorInterp.undefined, ColorInterp.gray):
            names.append(f"band{band}")
        else:
            names.append(interps[band - 1].name)
    return tuple(names)


#: More bands than any imagery geoseg segments (hyperspectral scenes have a few hundred); a header
#: claiming more is damaged, and reading it would take hours (found by fuzzing).
MAX_BANDS = 1024


def describe(ds: rasterio.DatasetReader, *, bands: tuple[int, ...] | None = None, assume_crs: str | None = None) -> SceneInfo:
    """Check an open dataset and describe it; InputError for anything geoseg cannot use."""
    path = ds.name
    if ds.count == 0:
        raise InputError(f"{path} has no raster bands")
    if ds.count > MAX_BANDS:
        raise InputError(f"{path} claims {ds.count} bands, more than geoseg reads ({MAX_BANDS}); the file is "
                         f"probably damaged: check it with gdalinfo, or extract the bands you need with gdal_translate -b")
    kinds = {np.dtype(d).kind for d in ds.dtypes}
    if not kinds <= set(SUPPORTED_KINDS):
        raise InputError(f"{path} has {ds.dtypes[0]} data; geoseg reads integer and float imagery, not complex numbers")
    crs = ds.crs
    transform = ds.transform
    if assume_crs:
        try:
            crs = rasterio.crs.CRS.from_user_input(assume_crs)
        except RasterioError as exc:
            raise InputError(f"--assume-crs {assume_crs!r} is not a CRS ({_first_line(exc)}); use e.g. EPSG:32633") from exc
    gcps, gcp_crs = ds.gcps if hasattr(ds, "gcps") else ([], None)
    if transform.is_identity and gcps and not assume_crs:
        raise InputError(
            f"{path} is georeferenced by {len(gcps)} ground control points (GCPs"
            f"{f', in {gcp_crs}' if gcp_crs else ''}) but has no geotransform; geoseg reads north-up grids: "
            f"warp it onto one with its GCPs first (gdalwarp -r bilinear {Path(path).name} warped.tif)"
        )
    if crs is None and transform.is_identity:
        raise InputError(
            f"{path} has no georeference (no CRS, no geotransform); georeference it, or pass --assume-crs "
            f"(for example --assume-crs EPSG:32633) to work in pixel coordinates"
        )
    if crs is None:
        raise InputError(
            f"{path} has no CRS; if you know it, pass --assume-crs (for example --assume-crs EPSG:32633)"
        )
    if transform.is_identity and not assume_crs:
        raise InputError(
            f"{path} has no geotransform (pixel coordinates only); georeference it first, "
            f"or pass --assume-crs to work in pixel coordinates"
        )
    if transform.b != 0 or transform.d != 0:
        raise InputError(
            f"{path} has a rotated or skewed geotransform; warp it to a north-up grid first "
            f"(gdalwarp {Path(path).name} northup.tif)"
        )
    alpha = None
    for i, interp in enumerate(ds.colorinterp, start=1):
        if interp == ColorInterp.alpha:
            alpha = i
    data_bands = tuple(i for i in range(1, ds.count + 1) if i != alpha)
    if bands:
        for b in bands:
            if not 1 <= b <= ds.count:
                raise InputError(f"--bands {','.join(map(str, bands))}: band {b} does not exist; {path} has bands 1..{ds.count}")
        data_bands = tuple(bands)
    if not data_bands:
        raise InputError(f"{path} has only an alpha band; it needs image bands")

    flags = ds.mask_flag_enums[data_bands[0] - 1]
    if alpha is not None or MaskFlags.per_dataset in flags or MaskFlags.alpha in flags:
        mask_kind = "mask"
    elif ds.nodata is not None:
        mask_kind = "nodata"
    else:
        mask_kind = "none"
    gsd = ground_sample_distance(crs, transform, ds.width, ds.height)
    return SceneInfo(
        path=path,
        width=ds.width,
        height=ds.height,
        crs=crs,
        transform=transform,
        bands=data_bands,
        band_names=_band_names(ds, data_bands),
        dtype=ds.dtypes[data_bands[0] - 1],
        nodata=ds.nodata,
        mask_kind=mask_kind,
        alpha_band=alpha,
        gsd=gsd,
    )


def open_scene(path: str | os.PathLike, *, bands: tuple[int, ...] | None = None, assume_crs: str | None = None) -> SceneInfo:
    """Open ``path``, check it and return its SceneInfo (the file is closed again)."""
    with open_dataset(path) as ds:
        return describe(ds, bands=bands, assume_crs=assume_crs)


class SceneReader:
    """Reads boundless windows of one scene through its own dataset handle.

    Use one reader per thread: a rasterio dataset must not be shared between threads. A crop
    (``crop``) is read through its parent's reader: its windows may reach past the crop's edge into
    the parent's real pixels (context for the model); ``area`` says which pixels are the crop's.
    """

    def __init__(self, info: SceneInfo) -> None:
        self.info = info
        self._parent = SceneReader(info.parent) if info.parent is not None else None
        if self._parent is not None:
            return
        self._file = open_dataset(info.path)
        self._ds = self._file
        if info.resampled:
            from rasterio.vrt import WarpedVRT

            # An alpha band is carried into the VRT as its alpha already (GDAL refuses a second one);
            # an internal mask needs an added alpha band to survive the warp.
            has_alpha = any(MaskFlags.alpha in flags for flags in self._file.mask_flag_enums)
            self._ds = WarpedVRT(
                self._file, crs=info.crs, transform=info.transform, width=info.width, height=info.height,
                resampling=rasterio.enums.Resampling.bilinear, src_crs=info.crs,
                add_alpha=info.mask_kind == "mask" and not has_alpha,
            )

    def close(self) -> None:
        if self._parent is not None:
            self._parent.close()
            return
        if self._ds is not self._file:
            self._ds.close()
        self._file.close()

    def __enter__(self) -> "SceneReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def area(self, row0: int, row1: int, col0: int, col1: int) -> np.ndarray | None:
        """For a crop, which pixels of a window are its own (``own_pixels``); None: all (no crop)."""
        return own_pixels(self.info, row0, row1, col0, col1)

    def read_valid(self, row0: int, row1: int, col0: int, col1: int) -> np.ndarray:
        """Only the valid mask of a window (see ``read``), without reading the image bands when the
        mask does not depend on them (a mask band or alpha, or no nodata at all in integer data).
        For a crop, only its own pixels (``area``) are valid."""
        info = self.info
        if self._parent is not None:
            dr, dc = info.row_off, info.col_off
            return self._parent.read_valid(row0 + dr, row1 + dr, col0 + dc, col1 + dc) & self.area(row0, row1, col0, col1)
        if info.mask_kind == "nodata" or np.dtype(info.dtype).kind == "f":
            return self.read(row0, row1, col0, col1)[1]
        valid = np.zeros((row1 - row0, col1 - col0), dtype=bool)
        r0, r1 = max(row0, 0), min(row1, info.height)
        c0, c1 = max(col0, 0), min(col1, info.width)
        if r0 >= r1 or c0 >= c1:
            return valid
        inner = valid[r0 - row0 : r1 - row0, c0 - col0 : c1 - col0]
        if info.mask_kind == "none":
            inner[:] = True
            return valid
        try:
            inner[:] = self._ds.read_masks(info.bands[0], window=Window(c0, r0, c1 - c0, r1 - r0)) > 0
        except RasterioError as exc:
            raise InputError(
                f"{info.path}: reading rows {r0}-{r1} failed ({_first_line(exc)}); "
                f"the file is truncated or corrupted, re-download or re-export it"
            ) from exc
        return valid

    def read(self, row0: int, row1: int, col0: int, col1: int) -> tuple[np.ndarray, np.ndarray]:
        """Pixels ``(rows, cols, bands)`` in the scene's dtype and a boolean valid mask ``(rows, cols)``.

        The window is half-open and may extend past any edge; outside pixels are 0 and invalid.
        Non-finite float values are set to 0 and marked invalid. For a crop, the window is read from
        its parent, so pixels past the crop's edge (or outside its area of interest) are real and
        valid here: they are context; ``area`` tells the crop's own pixels.
        """
        info = self.info
        if self._parent is not None:
            dr, dc = info.row_off, info.col_off
            return self._parent.read(row0 + dr, row1 + dr, col0 + dc, col1 + dc)
        h, w = row1 - row0, col1 - col0
        nb = len(info.bands)
        data = np.zeros((h, w, nb), dtype=info.dtype)
        valid = np.zeros((h, w), dtype=bool)
        r0, r1 = max(row0, 0), min(row1, info.height)
        c0, c1 = max(col0, 0), min(col1, info.width)
        if r0 >= r1 or c0 >= c1:
            return data, valid
        win = Window(c0, r0, c1 - c0, r1 - r0)
        try:
            inner = self._ds.read(list(info.bands), window=win)  # (bands, rows, cols)
            if info.mask_kind == "mask":
                inner_valid = self._ds.read_masks(info.bands[0], window=win) > 0
            else:
                inner_valid = None
        except RasterioError as exc:
            raise InputError(
                f"{info.path}: reading rows {r0}-{r1} failed ({_first_line(exc)}); "
                f"the file is truncated or corrupted, re-download or re-export it"
            ) from exc
        inner = np.moveaxis(inner, 0, -1)
        if inner_valid is None:
            if info.mask_kind == "nodata":
                nd = info.nodata
                if isinstance(nd, float) and math.isnan(nd):
                    inner_valid = ~np.all(np.isnan(inner), axis=-1)
                else:
                    inner_valid = np.any(inner != np.asarray(nd).astype(inner.dtype), axis=-1)
            else:
                inner_valid = np.ones(inner.shape[:2], dtype=bool)
        if inner.dtype.kind == "f":
            finite = np.isfinite(inner)
            if not finite.all():
                inner_valid &= finite.all(axis=-1)
                inner = np.where(finite, inner, 0)
        data[r0 - row0 : r1 - row0, c0 - col0 : c1 - col0] = inner
        valid[r0 - row0 : r1 - row0, c0 - col0 : c1 - col0] = inner_valid
        return data, valid


def pixels_inside(area, transform: rasterio.Affine, row0: int, row1: int, col0: int, col1: int) -> np.ndarray:
    """Whether each pixel of the window rows ``row0:row1``, columns ``col0:col1`` of the grid
    ``transform`` has its centre inside ``area`` (shapely polygons in the grid's CRS)."""
    import shapely
    from rasterio.features import rasterize

    shapely.prepare(area)  # once per geometry (a no-op afterwards): speeds up the tests below, window after window
    h, w = row1 - row0, col1 - col0
    at = transform * rasterio.Affine.translation(col0, row0)
    left, top = at * (0, 0)
    right, bottom = at * (w, h)
    box = shapely.box(min(left, right), min(top, bottom), max(left, right), max(top, bottom))
    if shapely.contains(area, box):
        return np.ones((h, w), dtype=bool)
    part = shapely.clip_by_rect(area, *box.bounds)
    if part.is_empty:
        return np.zeros((h, w), dtype=bool)
    return rasterize([(part, 1)], out_shape=(h, w), transform=at, fill=0, dtype="uint8").astype(bool)


def own_pixels(info: SceneInfo, row0: int, row1: int, col0: int, col1: int) -> np.ndarray | None:
    """For a crop (``crop``), which pixels of a window of its grid are its own: inside the grid and,
    with an area of interest, with their centre inside the area (``geoseg.io.aoi``). None for a scene
    that is no crop: every pixel inside it is its own."""
    if info.parent is None:
        return None
    inside = np.zeros((row1 - row0, col1 - col0), dtype=bool)
    inside[max(0, -row0) : max(0, info.height - row0), max(0, -col0) : max(0, info.width - col0)] = True
    if info.aoi is not None and inside.any():
        inside &= pixels_inside(info.aoi, info.transform, row0, row1, col0, col1)
    return inside


def crop(info: SceneInfo, row0: int, row1: int, col0: int, col1: int, *, aoi: object | None = None) -> SceneInfo:
    """The window rows ``row0:row1``, columns ``col0:col1`` of ``info`` as a grid of its own (same
    pixels, shifted transform), read through ``info`` (see ``SceneReader``). ``aoi``: polygons in
    the scene's CRS outside which nothing is output (``geoseg.io.aoi``)."""
    if not (0 <= row0 < row1 <= info.height and 0 <= col0 < col1 <= info.width):
        raise ValueError(f"window rows {row0}:{row1}, columns {col0}:{col1} is not inside {info.height}x{info.width}")
    parent, dr, dc = info, row0, col0
    if info.parent is not None:  # a crop of a crop is a crop of the first grid
        parent, dr, dc = info.parent, info.row_off + row0, info.col_off + col0
        aoi = info.aoi if aoi is None else aoi
    return dataclasses.replace(info, width=col1 - col0, height=row1 - row0,
                               transform=info.transform * rasterio.Affine.translation(col0, row0),
                               parent=parent, row_off=dr, col_off=dc, aoi=aoi)


def window_of(info: SceneInfo, left: float, bottom: float, right: float, top: float) -> tuple[int, int, int, int] | None:
    """Rows and columns ``(row0, row1, col0, col1)`` of ``info``'s grid that cover the bounds (in its
    CRS), clipped to the grid; None when they do not overlap it."""
    inverse = ~info.transform
    cols, rows = zip(*(inverse * (x, y) for x in (left, right) for y in (bottom, top)))
    c0, c1 = max(0, math.floor(min(cols) + 1e-9)), min(info.width, math.ceil(max(cols) - 1e-9))
    r0, r1 = max(0, math.floor(min(rows) + 1e-9)), min(info.height, math.ceil(max(rows) - 1e-9))
    return (r0, r1, c0, c1) if r0 < r1 and c0 < c1 else None


def at_gsd(info: SceneInfo, gsd: float) -> SceneInfo:
    """The same scene on a grid of ``gsd`` metres per pixel (same CRS, same extent, north-up).

    Reads of the returned SceneInfo are warped on the fly (bilinear for imagery); the nodata mask is
    warped with it. Used to bring a scene to a model's training GSD. A crop becomes the matching
    window of its parent at that GSD (context around it stays readable).
    """
    if gsd <= 0:
        raise InputError(f"a ground sample distance must be positive, got {gsd}")
    if info.parent is not None:
        whole = at_gsd(info.parent, gsd)
        window = window_of(whole, *rasterio.transform.array_bounds(info.height, info.width, info.transform))
        if window is None:  # cannot happen for a window of the parent; kept as a clear failure
            raise ValueError("a crop outside its parent")
        # two coarse pixels more on each side: bilinear resampling back onto the crop needs them
        r0, r1, c0, c1 = window
        window = (max(0, r0 - 2), min(whole.height, r1 + 2), max(0, c0 - 2), min(whole.width, c1 + 2))
        aoi = info.aoi
        if aoi is not None:  # one coarse pixel more, so that every fine pixel inside gets a value back
            import shapely

            aoi = shapely.buffer(aoi, 1.5 * abs(whole.transform.a))
        return crop(whole, *window, aoi=aoi)
    scale = gsd / info.gsd
    width = max(1, int(round(info.width / scale)))
    height = max(1, int(round(info.height / scale)))
    t = info.transform
    transform = rasterio.Affine(t.a * info.width / width, 0, t.c, 0, t.e * info.height / height, t.f)
    return dataclasses.replace(info, width=width, height=height, transform=transform, gsd=gsd, resampled=True)


def value_percentiles(info: SceneInfo, q: tuple[float, float] = (2.0, 98.0), *, max_side: int = 1024) -> tuple[float, float]:
    """Percentiles of the valid pixel values of all image bands, from a decimated read.

    The scene is read at most ``max_side`` pixels on its longer side (GDAL picks overviews when
    there are any), so this costs little even for a huge scene.
    """
    with open_dataset(info.path) as ds:
        scale = max(1.0, max(ds.width, ds.height) / max_side)
        shape = (max(1, int(ds.height / scale)), max(1, int(ds.width / scale)))
        try:
            data = ds.read(list(info.bands), out_shape=(len(info.bands), *shape), masked=True)
        except RasterioError as exc:
            raise InputError(
                f"{info.path}: reading an overview failed ({_first_line(exc)}); the file is truncated or "
                f"corrupted, re-download or re-export it"
            ) from exc
    values = data.compressed().astype(np.float64)
    values = values[np.isfinite(values)]
    if info.nodata is not None and not math.isnan(info.nodata):
        values = values[values != info.nodata]
    if values.size == 0:
        return (0.0, 1.0)
    lo, hi = np.percentile(values, q)
    return (float(lo), float(hi) if hi > lo else float(lo) + 1.0)
