"""Change between two dates: align them on one grid, find class transitions, polygonize them.

``geoseg change BEFORE AFTER -o changes.gpkg``. Each date is one of:

- a **scene** (imagery): segmented with the model (``inference.segment``, probabilities kept);
- a **class raster** from an earlier run (``geoseg predict --raster-out``: one uint8 band, tag
  ``class_names``, nodata 255), or any single-band integer class raster when ``--classes`` names
  its ids;
- a **probabilities raster** from an earlier run (``--probs-out``: float32, one band per class,
  band descriptions ``p_<class>``).

The data flow, one strip of rows at a time (memory bounded by the strip, not by the scenes)::

    BEFORE, AFTER ──WarpedVRT onto the common grid (probabilities bilinear, classes nearest)──▶
        class, valid mask and probabilities per date
    ──transition code per pixel (from BEFORE's class to AFTER's), kept only when it passes the
      probability margin and cannot be explained by a shift of at most the tolerance──▶
        change raster (uint8 codes) + confidence raster (uint16), scratch tiled GeoTIFFs
    ──polygons.iter_polygons (strips, exact merging across strip lines)──▶ one polygon per
      4-connected region of one transition, with area and mean confidence
    ──each polygon goes to the layer of its new class ("appeared") and of its old class
      ("disappeared"), background classes excepted──▶ GeoPackage, styled, + run table

The common grid: BEFORE's CRS, the finer of the two resolutions, the intersection of the two
footprints (snapped to BEFORE's pixel grid). Pixels outside either date's data are nodata.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.windows import Window

import geoseg
from geoseg.io.atomic import Staging, claim_outputs
from geoseg.tiling.blend import decision_bias
from geoseg.errors import InputError
from geoseg.inference.options import PredictOptions, as_options

log = logging.getLogger(__name__)

APPEARED, DISAPPEARED = "appeared", "disappeared"
CHANGE_COLORS = {APPEARED: (26, 152, 80), DISAPPEARED: (215, 48, 39)}  # green, red
NO_CHANGE_COLOR = (220, 220, 220)
CODE_NODATA = 255
CONFIDENCE_SCALE = 65535
MAX_CLASSES = 16  # 16 x 15 transitions + "no change" fit in uint8 beside nodata 255
DEFAULT_TOLERANCE_M = 3.0
DEFAULT_TOLERANCE_PX = 1.5
DEFAULT_MIN_AREA_PX = 4
LAYER_SUFFIX = "_change"
EXTRA_COLUMNS = ("change", "from_class", "to_class", "confidence")
_STRIP_PIXELS = 2_000_000  # pixels per strip of the common grid (both dates' probabilities in memory)

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class ChangeOptions:
    """What counts as a change: one field per option of ``geoseg change``, named like it.

    - ``min_area``: drop change polygons smaller than this many square metres (true m²). ``None``:
      4 pixels of the common grid.
    - ``margin``: probability margin in [0, 1). A pixel whose class went from A (BEFORE) to B
      (AFTER) counts only if A beats B by at least ``margin`` on BEFORE (p_before(A) -
      p_before(B) >= margin) and B beats A by at least ``margin`` on AFTER. A date given as a
      class raster has no probabilities: its class has probability 1, so it always passes.
    - ``tolerance``: misregistration tolerance in metres. A pixel from A to B does not count when
      a shift of at most this distance explains it: B occurs within the radius on BEFORE and A
      occurs within the radius on AFTER. ``None``: 3 m or 1.5 pixels of the common grid, whichever
      is larger; 0 turns it off.
    - ``classes``: names of the class ids of class rasters that carry no ``class_names`` tag (a
      sequence, or one string of comma-separated names).
    """

    min_area: float | None = None  # m²
    margin: float = 0.0
    tolerance: float | None = None  # metres
    classes: tuple[str, ...] | None = None


@dataclass
class ChangeResult:
    before: str
    after: str
    kinds: dict[str, str]  # {"before": "scene"|"classes"|"probs", "after": ...}
    outputs: dict[str, str]
    model: dict[str, str] | None
    class_names: list[str]
    crs: str
    grid: dict[str, Any]  # width, height, transform, pixel size in metres
    tolerance_m: float
    margin: float
    min_area_m2: float
    gained_m2: dict[str, float] = field(default_factory=dict)  # per class: area of "appeared" polygons
    lost_m2: dict[str, float] = field(default_factory=dict)  # per class: area of "disappeared" polygons
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # per class: polygons per change
    pixels: dict[str, int] = field(default_factory=dict)  # compared, changed, suppressed by margin/tolerance
    timings_s: dict[str, float] = field(default_factory=dict)
    aoi: str | None = None  # the --aoi file: the grid covers only its polygons (and a rim of context)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# inputs


@dataclass(frozen=True)
class DateInput:
    """One date: where its pixels are and what they mean."""

    role: str  # "BEFORE" or "AFTER"
    path: str
    kind: str  # "scene", "classes" or "probs" (what the file is)
    crs: Any
    transform: Any
    width: int
    height: int
    class_names: tuple[str, ...] | None = None  # None for a scene until the model is known
    colors: tuple[tuple[int, int, int], ...] | None = None
    read_path: str | None = None  # the raster compared: the file, or a scene's segmented probabilities
    read_kind: str | None = None  # "classes" or "probs"
    # probabilities only: the decision threshold per class (the model's or --threshold, as predict
    # took them; a probabilities raster's ``threshold`` tag); None: the most probable class
    thresholds: tuple[float, ...] | None = None

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return rasterio.transform.array_bounds(self.height, self.width, self.transform)[:4]


def detect_input(path: str | os.PathLike, role: str, *, classes: Sequence[str] | None = None,
                 predict_options: PredictOptions = PredictOptions()) -> DateInput:
    """What ``path`` holds: a probabilities raster (float bands described ``p_<class>``), a class
    raster (one integer band with a ``class_names`` tag, or any such band when ``classes`` is
    given), or else a scene to segment. InputError for files that cannot be used."""
    from geoseg.io.scene import open_dataset, open_scene
    from geoseg.workflows.vectorize import raster_classes

    with open_dataset(path) as ds:
        descriptions = [d or "" for d in ds.descriptions]
        floats = all(np.dtype(t).kind == "f" for t in ds.dtypes)
        integer = ds.count == 1 and np.dtype(ds.dtypes[0]).kind in "iu"
        tags = ds.tags()
        tagged = bool(tags.get("class_names"))
        threshold_tag = tags.get("threshold")
        if ds.count >= 2 and floats and all(d.startswith("p_") and len(d) > 2 for d in descriptions):
            kind, names, colors = "probs", tuple(d[2:] for d in descriptions), None
        elif integer and tagged:
            kind = "classes"
        elif integer and classes:
            fits, top = _looks_like_classes(ds, len(classes))
            kind = "classes" if fits else "scene"
            if not fits:
                log.info("%s %s holds values up to %d, more than the %d --classes: reading it as imagery",
                         role, Path(path).name, top, len(classes))
        else:
            kind = "scene"
        if kind != "scene":
            if ds.crs is None:
                raise InputError(f"{role} {path} has no CRS; assign one first "
                                 f"(gdal_edit.py -a_srs EPSG:32633 {Path(path).name})")
            if ds.transform.b != 0 or ds.transform.d != 0 or ds.transform.is_identity:
                raise InputError(f"{role} {path} has no north-up geotransform; warp it first "
                                 f"(gdalwarp {Path(path).name} northup.tif)")
            crs, transform, width, height = ds.crs, ds.transform, ds.width, ds.height
    if kind == "scene":
        info = open_scene(path, bands=predict_options.bands, assume_crs=predict_options.assume_crs)
        log.info("%s %s: a scene, segmented with the model", role, Path(path).name)
        return DateInput(role, str(path), "scene", info.crs, info.transform, info.width, info.height)
    if kind == "classes":  # a class_names tag wins: --classes names untagged rasters only
        names, colors = raster_classes(path, None if tagged else classes)
        names, colors = tuple(names), tuple(tuple(c) for c in colors)
    thresholds = None
    if kind == "probs" and threshold_tag:  # written by predict --probs-out: decide classes as it did
        from geoseg.vector.cleanup import parse_tagged

        tagged_thresholds = parse_tagged(threshold_tag)
        thresholds = tuple(float(tagged_thresholds.get(name, 0.5)) for name in names)
    log.info("%s %s: a %s raster from an earlier run (%s)", role, Path(path).name,
             "class" if kind == "classes" else "probabilities", ", ".join(names))
    return DateInput(role, str(path), kind, crs, transform, width, height, names, colors,
                     read_path=str(path), read_kind=kind, thresholds=thresholds)


_KIND_WORDS = {"scene": "the model's", "classes": "a class raster", "probs": "a probabilities raster"}


def _same_classes(before: DateInput, after: DateInput) -> None:
    if tuple(before.class_names) != tuple(after.class_names):
        raise InputError(
            f"BEFORE has classes {','.join(before.class_names)} ({_KIND_WORDS[before.kind]}) but AFTER has "
            f"{','.join(after.class_names)} ({_KIND_WORDS[after.kind]}); compare outputs of the same model, or "
            f"name a class raster's ids with --classes"
        )


# --------------------------------------------------------------------------------------------
# the common grid


@dataclass(frozen=True)
class Grid:
    crs: Any
    transform: Any
    width: int
    height: int
    pixel_m: tuple[float, float]  # (x, y) ground size of a pixel in metres, at the grid's centre


def pixel_metres(crs, transform, width: int, height: int) -> tuple[float, float]:
    """Ground size in metres of one pixel along x and y at the grid's centre (any CRS)."""
    from pyproj import CRS as ProjCRS
    from pyproj import Transformer

    pcrs = ProjCRS.from_user_input(crs.to_wkt())
    cx, cy = width / 2.0, height / 2.0
    pts = [transform * (cx, cy), transform * (cx + 1, cy), transform * (cx, cy + 1)]
    try:
        to_lonlat = Transformer.from_crs(pcrs, pcrs.geodetic_crs, always_xy=True)
        (x0, y0), (x1, y1), (x2, y2) = [to_lonlat.transform(x, y) for x, y in pts]
        geod = pcrs.get_geod()
        dx, dy = geod.inv(x0, y0, x1, y1)[2], geod.inv(x0, y0, x2, y2)[2]
    except Exception:  # a local engineering CRS without a datum: its own units
        factor = pcrs.axis_info[0].unit_conversion_factor if pcrs.axis_info else 1.0
        dx, dy = abs(transform.a) * factor, abs(transform.e) * factor
    if not (math.isfinite(dx) and math.isfinite(dy) and dx > 0 and dy > 0):
        raise InputError(f"could not work out the pixel size in metres of the grid in {crs}")
    return float(dx), float(dy)


def common_grid(before: DateInput, after: DateInput) -> Grid:
    """BEFORE's CRS, the finer resolution of the two (per axis), the intersection of the
    footprints, snapped to BEFORE's pixel grid. InputError when they do not overlap."""
    from rasterio.warp import calculate_default_transform, transform_bounds

    bl, bb, br, bt = before.bounds
    try:
        if after.crs == before.crs:
            al, ab, ar, at = after.bounds
            ares = (abs(after.transform.a), abs(after.transform.e))
        else:
            al, ab, ar, at = transform_bounds(after.crs, before.crs, *after.bounds, densify_pts=21)
            t, _, _ = calculate_default_transform(after.crs, before.crs, after.width, after.height,
                                                  *after.bounds)
            ares = (abs(t.a), abs(t.e))
    except Exception as exc:
        raise InputError(f"AFTER {after.path} ({after.crs}) cannot be brought into BEFORE's CRS "
                         f"{before.crs} ({exc}); reproject one of them first") from exc
    if not all(math.isfinite(v) for v in (al, ab, ar, at, *ares)):
        raise InputError(f"AFTER {after.path} lies outside the area where BEFORE's CRS {before.crs} is "
                         f"defined; the two dates do not overlap")
    rx = min(abs(before.transform.a), ares[0])
    ry = min(abs(before.transform.e), ares[1])
    il, ib, ir, it = max(bl, al), max(bb, ab), min(br, ar), min(bt, at)
    eps = 1e-6
    if ir - il < rx * (1 - eps) or it - ib < ry * (1 - eps):
        raise InputError(
            f"BEFORE {Path(before.path).name} and AFTER {Path(after.path).name} do not overlap (BEFORE covers "
            f"x {bl:.6g}..{br:.6g}, y {bb:.6g}..{bt:.6g}; AFTER, in BEFORE's CRS, x {al:.6g}..{ar:.6g}, "
            f"y {ab:.6g}..{at:.6g}); give two dates of the same place"
        )
    x0 = bl + math.floor((il - bl) / rx + eps) * rx
    y0 = bt - math.floor((bt - it) / ry + eps) * ry
    width = max(1, math.ceil((ir - x0) / rx - eps))
    height = max(1, math.ceil((y0 - ib) / ry - eps))
    transform = rasterio.Affine(rx, 0, x0, 0, -ry, y0)
    return Grid(before.crs, transform, width, height, pixel_metres(before.crs, transform, width, height))


# --------------------------------------------------------------------------------------------
# transitions


def transition_table(n: int) -> np.ndarray:
    """``(n, n)`` uint8 codes: 0 on the diagonal (no change), ``from * (n-1) + to' + 1`` elsewhere
    (``to'``: ``to`` less one when it comes after ``from``), so codes run 1..n(n-1)."""
    if n > MAX_CLASSES:
        raise InputError(f"{n} classes: change rasters hold the transitions of at most {MAX_CLASSES} classes")
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    codes = 1 + i * (n - 1) + j - (j > i)
    return np.where(i == j, 0, codes).astype(np.uint8)


def transitions(n: int) -> list[tuple[int, int]]:
    """``(from, to)`` of each code (code 0, no change: ``(-1, -1)``)."""
    table = transition_table(n)
    out = [(-1, -1)] * (n * (n - 1) + 1)
    for i in range(n):
        for j in range(n):
            if i != j:
                out[table[i, j]] = (i, j)
    return out


def code_names(class_names: Sequence[str]) -> list[str]:
    """``no_change``, ``<from>_to_<to>``, ... (index = code)."""
    return ["no_change"] + [f"{class_names[i]}_to_{class_names[j]}" for i, j in transitions(len(class_names))[1:]]


def code_colors(class_names: Sequence[str], colors: Sequence[tuple[int, int, int]],
                background: set[int]) -> list[tuple[int, int, int]]:
    """Colour of each code: grey for no change, green when a class appears on background, red when
    one disappears into background, else the new class's colour."""
    out = [NO_CHANGE_COLOR]
    for i, j in transitions(len(class_names))[1:]:
        if i in background and j in background:
            out.append(NO_CHANGE_COLOR)
        elif i in background:
            out.append(CHANGE_COLORS[APPEARED])
        elif j in background:
            out.append(CHANGE_COLORS[DISAPPEARED])
        else:
            out.append(tuple(colors[j]))
    return out


@dataclass
class StripChange:
    codes: np.ndarray  # uint8 transition codes, 0 no change, CODE_NODATA outside either date
    confidence: np.ndarray | None  # uint16 x CONFIDENCE_SCALE on changed pixels, 0 elsewhere
    changed: int
    by_margin: int  # class changed but failed the probability margin
    by_tolerance: int  # class changed but explained by a shift within the tolerance


def compare(cls_b: np.ndarray, cls_a: np.ndarray, valid: np.ndarray, probs_b: np.ndarray | None,
            probs_a: np.ndarray | None, *, n_classes: int, margin: float = 0.0, tolerance_m: float = 0.0,
            pixel_m: tuple[float, float] = (1.0, 1.0), core: slice = slice(None),
            area: np.ndarray | None = None) -> StripChange:
    """Change codes of one strip. ``cls_*``: class ids (rows, cols), any value where not ``valid``;
    ``probs_*``: (classes, rows, cols) or None (a class raster: probability 1 for its class).
    ``core``: the rows to return (the rest is context for the tolerance). ``area``: the pixels to
    report (an area of interest); the others are nodata and uncounted, but still context."""
    from scipy import ndimage

    report = valid if area is None else valid & area

    cls_b = np.where(valid, cls_b, n_classes)  # outside the data: no class at all
    cls_a = np.where(valid, cls_a, n_classes)
    cand = valid & (cls_b != cls_a)
    fb, ta = np.minimum(cls_b, n_classes - 1), np.minimum(cls_a, n_classes - 1)

    def p(probs, own, ids):
        """Probability of class ``ids`` on a date; a class raster (``probs`` None) gives 1 to its
        own class ``own`` and 0 to the others."""
        if probs is None:
            return (own == ids).astype(np.float32)
        return np.take_along_axis(probs, ids[None].astype(np.intp), 0)[0]

    by_margin = 0
    if margin > 0 and (probs_b is not None or probs_a is not None):
        ok = ((p(probs_b, cls_b, fb) - p(probs_b, cls_b, ta) >= margin)
              & (p(probs_a, cls_a, ta) - p(probs_a, cls_a, fb) >= margin))
        by_margin = int((cand & ~ok & report)[core].sum())
        cand &= ok
    by_tolerance = 0
    if tolerance_m > 0 and cand.any():
        sampling = (pixel_m[1], pixel_m[0])
        cache: dict[tuple[int, int], np.ndarray] = {}

        def near(which: int, cls: np.ndarray, c: int) -> np.ndarray:
            """Pixels within the tolerance of class c on one date."""
            key = (which, c)
            if key not in cache:
                mask = cls == c
                if not mask.any():
                    cache[key] = mask
                elif mask.all():
                    cache[key] = mask
                else:
                    cache[key] = ndimage.distance_transform_edt(~mask, sampling=sampling) <= tolerance_m * (1 + 1e-9)
            return cache[key]

        explained = np.zeros(cand.shape, bool)
        present = np.flatnonzero(np.bincount(cls_b[cand].astype(np.int64) * n_classes + cls_a[cand],
                                             minlength=n_classes * n_classes))
        for i, j in (divmod(int(k), n_classes) for k in present):
            sel = cand & (cls_b == i) & (cls_a == j)
            explained[sel] = near(0, cls_b, j)[sel] & near(1, cls_a, i)[sel]
        by_tolerance = int((explained & cand & report)[core].sum())
        cand &= ~explained
    table = transition_table(n_classes)
    cand &= report
    codes = np.where(cand, table[fb, ta], 0).astype(np.uint8)
    codes[~report] = CODE_NODATA
    confidence = None
    if probs_b is not None or probs_a is not None:
        conf = np.minimum(p(probs_b, cls_b, fb), p(probs_a, cls_a, ta))
        confidence = np.where(cand, np.clip(np.rint(conf * CONFIDENCE_SCALE), 1, CONFIDENCE_SCALE), 0).astype(np.uint16)
        confidence = confidence[core]
    codes = codes[core]
    return StripChange(codes, confidence, int(((codes != 0) & (codes != CODE_NODATA)).sum()), by_margin, by_tolerance)


# --------------------------------------------------------------------------------------------
# reading a date on the common grid


class Aligned:
    """One date read on the common grid, strip by strip: classes, valid mask, probabilities."""

    def __init__(self, date: DateInput, grid: Grid) -> None:
        from rasterio.vrt import WarpedVRT

        self.date, self.grid = date, grid
        self.n = len(date.class_names)
        self.probs = date.read_kind == "probs"
        bias = decision_bias(date.thresholds) if self.probs and date.thresholds else None
        # argmax(p * w) == argmax(log p + bias): the class predict takes from the same probabilities
        self.weights = None if bias is None else np.exp(bias)[:, None, None]
        self._src = rasterio.open(date.read_path)
        vrt_grid = dict(crs=grid.crs, transform=grid.transform, width=grid.width, height=grid.height)
        if self.probs:
            if self._src.count != self.n:
                raise InputError(f"{date.role} {date.path} has {self._src.count} bands for {self.n} classes")
            # no nodata: outside the data every probability is 0 (predict writes 0 where invalid too)
            self._vrt = WarpedVRT(self._src, resampling=Resampling.bilinear, **vrt_grid)
            self.nodata = None
        else:
            nodata = self._src.nodata
            if nodata is None:  # ids are < MAX_CLASSES: a value no class uses marks "outside"
                nodata = 255 if np.dtype(self._src.dtypes[0]) != np.int8 else -1
            self.nodata = nodata
            self._vrt = WarpedVRT(self._src, resampling=Resampling.nearest, src_nodata=self._src.nodata,
                                  nodata=nodata, **vrt_grid)

    def read(self, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        window = Window(0, r0, self.grid.width, r1 - r0)
        try:
            if self.probs:
                p = self._vrt.read(window=window).astype(np.float32, copy=False)
                p = np.where(np.isfinite(p), p, 0).astype(np.float32, copy=False)
                total = p.sum(0)
                # bilinear mixes in the zeros of invalid neighbours: renormalise, keep the pixels
                # that are mostly made of valid ones
                valid = total >= 0.5
                p /= np.where(valid, total, 1)[None]
                decide = p if self.weights is None else p * self.weights
                return np.argmax(decide, 0).astype(np.int16), valid, p
            v = self._vrt.read(1, window=window)
        except RasterioError as exc:
            raise InputError(f"{self.date.role} {self.date.path}: reading failed ({str(exc).splitlines()[0]}); "
                             f"the file is truncated or corrupted, re-download or re-export it") from exc
        valid = v != self.nodata
        bad = valid & ((v < 0) | (v >= self.n))
        if bad.any():
            raise InputError(
                f"{self.date.role} {self.date.path} holds class id(s) {np.unique(v[bad]).tolist()[:10]} but only "
                f"{self.n} class names ({','.join(self.date.class_names)}); name every id with --classes, or "
                f"set the raster's nodata value"
            )
        return np.where(valid, v, self.n).astype(np.int16), valid, None

    def close(self) -> None:
        self._vrt.close()
        self._src.close()

    def __enter__(self) -> "Aligned":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _strip_rows(width: int) -> int:
    rows = max(16, _STRIP_PIXELS // max(width, 1))
    return rows - rows % 512 if rows >= 512 else rows


# --------------------------------------------------------------------------------------------
# the whole job


def change(
    before: str | os.PathLike,
    after: str | os.PathLike,
    output: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    raster_out: str | os.PathLike | None = None,
    options: ChangeOptions = ChangeOptions(),
    predict_options: PredictOptions | Mapping[str, Any] = PredictOptions(),
    overwrite: bool = False,
    progress: Progress | None = None,
    bundle=None,
    aoi: str | os.PathLike | None = None,
    preview: str | os.PathLike | None = None,
) -> ChangeResult:
    """Compare ``before`` and ``after`` and write change polygons to the GeoPackage ``output`` (and
    the change raster to ``raster_out``), all or nothing. ``aoi``: only inside these polygons (any
    vector file, any CRS; ``geoseg.io.aoi``): the common grid shrinks to them, scenes are segmented
    only there (with a rim of context for the tolerance), nothing outside is reported. ``preview``: a
    PNG quick look of what appeared and disappeared over AFTER (``geoseg.preview``; over BEFORE when
    only BEFORE is a scene, over AFTER's class ids in gray when neither is).

    Scenes are segmented with ``bundle`` (already loaded) or ``model`` (name or path; default the
    built-in model, loaded only when a scene needs it); rasters from earlier runs are reused.
    ``progress(stage, done, total)`` is called with stages ``before``/``after`` (model tiles),
    ``compare`` and ``polygonize`` (rows of the common grid).
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    options, predict_options = _checked(options, predict_options)
    _check_output_names(output, raster_out, preview)
    dates, meta = _read_dates(before, after, options, predict_options, model, bundle)
    names, colors, background = _class_setup(*dates, meta)
    grid, tolerance, area, min_area = _comparison_grid(*dates, options, aoi)
    # outputs before any heavy work: none is an input, and this run is their only writer
    inputs = {"BEFORE": before, "AFTER": after, "--aoi": aoi,
              "--model": model if model is not None and Path(str(model)).is_file() else None}
    with claim_outputs({"-o": output, "--raster-out": raster_out, "--preview": preview}, inputs=inputs,
                       overwrite=overwrite):
        hashes = _hash_in_background(dates)

        with Staging(overwrite=overwrite) as staging:
            gpkg_tmp = staging.output(output)
            raster_tmp = staging.output(raster_out) if raster_out else None
            scratch = staging.scratch(output)
            timings["prepare"] = round(time.perf_counter() - t_start, 3)
            dates, model_info = _segment_scenes(dates, bundle, model, meta, predict_options, scratch,
                                                aoi=aoi, margin_m=tolerance + 3 * max(grid.pixel_m),
                                                progress=progress, timings=timings)
            b, a = dates
            has_probs = "probs" in (b.read_kind, a.read_kind)
            code_path, conf_path, pixels = _compare_on_grid(b, a, grid, scratch, len(names), options, tolerance,
                                                            area=area, has_probs=has_probs, progress=progress,
                                                            timings=timings)

            run_meta = _run_metadata(b, a, {role: h.result() for role, h in hashes.items()}, model_info,
                                     predict_options, names=names, background=background, grid=grid,
                                     tolerance=tolerance, margin=options.margin, min_area=min_area,
                                     has_probs=has_probs, aoi=aoi)
            t0 = time.perf_counter()
            totals = _write_polygons(gpkg_tmp, code_path, conf_path, names=names,
                                     colors=colors, background=background, crs=grid.crs, min_area=min_area,
                                     metadata=run_meta, height=grid.height, progress=progress)
            timings["polygonize"] = round(time.perf_counter() - t0, 3)
            if raster_tmp:
                _write_change_raster(raster_tmp, code_path, run_meta, names, colors, background, min_area)
            if preview is not None:
                _write_change_preview(staging.output(preview), code_path, b, a, names, colors, background,
                                      bands=predict_options.bands, gsd_m=grid.pixel_m[0], timings=timings)
            staging.commit()

    timings["total"] = round(time.perf_counter() - t_start, 3)
    outs = {key: str(path) for key, path in (("gpkg", output), ("raster", raster_out), ("preview", preview)) if path}
    return ChangeResult(
        before=str(before), after=str(after), kinds={"before": b.kind, "after": a.kind}, outputs=outs,
        model=model_info, class_names=names, crs=grid.crs.to_string(), grid=_grid_summary(grid),
        tolerance_m=round(tolerance, 6), margin=options.margin, min_area_m2=round(min_area, 6),
        pixels=pixels, timings_s=timings, aoi=str(aoi) if aoi is not None else None,
        **_areas_and_counts(totals, [nm for i, nm in enumerate(names) if i not in background]),
    )


def _grid_summary(grid: Grid) -> dict:
    return {"width": grid.width, "height": grid.height, "transform": list(grid.transform)[:6],
            "pixel_m": [round(v, 6) for v in grid.pixel_m]}


def _areas_and_counts(totals: dict, layers: list[str]) -> dict[str, dict]:
    """ChangeResult's gained_m2, lost_m2 and counts from {layer: {code: (count, area)}}."""
    return {
        "gained_m2": {nm: round(totals[nm][APPEARED][1], 3) for nm in layers},
        "lost_m2": {nm: round(totals[nm][DISAPPEARED][1], 3) for nm in layers},
        "counts": {nm: {c: totals[nm][c][0] for c in (APPEARED, DISAPPEARED)} for nm in layers},
    }


def _compare_on_grid(b: DateInput, a: DateInput, grid: Grid, scratch: Path, n: int, options: ChangeOptions,
                     tolerance: float, *, area, has_probs: bool, progress: Progress | None,
                     timings: dict[str, float]) -> tuple[Path, Path | None, dict]:
    """The change codes (and, when a date has probabilities, the confidence) on the common grid,
    written into ``scratch``; returns their paths and the pixel counts."""
    t0 = time.perf_counter()
    code_path, conf_path = scratch / "change.tif", (scratch / "confidence.tif" if has_probs else None)
    pixels = _compare_dates(b, a, grid, code_path, conf_path, n=n, margin=options.margin, tolerance_m=tolerance,
                            progress=progress, area=area)
    timings["compare"] = round(time.perf_counter() - t0, 3)
    return code_path, conf_path, pixels


def _hash_in_background(dates: list[DateInput]) -> dict:
    """Each date's file checksum, read by a background thread while the rest runs."""
    from geoseg.models.bundle import sha256_or_blank
    from geoseg.threads import Background

    return {d.role: Background(sha256_or_blank, d.path) for d in dates}


def _check_output_names(output, raster_out, preview) -> None:
    """Each output's name says its format: .gpkg, .tif for the change raster, .png for the quick look."""
    if Path(output).suffix.lower() != ".gpkg":
        raise InputError(f"-o {output}: the change polygons go to a GeoPackage; use a name ending in .gpkg")
    if raster_out is not None and Path(raster_out).suffix.lower() not in (".tif", ".tiff"):
        raise InputError(f"--raster-out {raster_out}: the change raster is a GeoTIFF; use a name ending in .tif")
    if preview is not None and Path(preview).suffix.lower() != ".png":
        raise InputError(f"--preview {preview}: the quick look is a PNG; use a name ending in .png")


def _read_dates(before, after, options: ChangeOptions, predict_options: PredictOptions, model, bundle,
                ) -> tuple[list[DateInput], Any]:
    """What each date is (a scene, a class raster, a probabilities raster) and, when one is a
    scene, the model's metadata (None otherwise), every option and scene checked against it
    before any model loads; scenes take the model's class names and colours."""
    from geoseg.inference.options import check_options, thresholds
    from geoseg.models.bundle import read_meta, resolve_model

    dates = [detect_input(p, role, classes=options.classes, predict_options=predict_options)
             for p, role in ((before, "BEFORE"), (after, "AFTER"))]
    scenes = [d for d in dates if d.kind == "scene"]
    if not scenes:
        if model is not None or bundle is not None:
            log.warning("--model is not used: both dates are rasters from earlier runs")
        return dates, None
    check_options(predict_options)
    meta = bundle.meta if bundle is not None else read_meta(resolve_model(None if model is None else str(model)))
    thresholds(predict_options, meta)  # a bad --threshold fails before any work
    from geoseg.inference.segment import check_scene_for
    from geoseg.io.scene import open_scene

    for d in scenes:  # and so do each scene's bands, the tiling and the GSD
        check_scene_for(open_scene(d.path, bands=predict_options.bands, assume_crs=predict_options.assume_crs),
                        meta, predict_options)
    return [replace(d, class_names=tuple(meta.class_names), colors=tuple(tuple(c) for c in meta.colors))
            if d.kind == "scene" else d for d in dates], meta


def _class_setup(b: DateInput, a: DateInput, meta) -> tuple[list[str], Any, set[int]]:
    """The classes both dates share, their colours and the background ids (refused: one class, too many)."""
    _same_classes(b, a)
    names = list(b.class_names)
    n = len(names)
    if n < 2:
        raise InputError(f"{b.path} has a single class ({names[0]}); change needs at least two")
    transition_table(n)  # refuses too many classes before any work
    colors = next((d.colors for d in (b, a) if d.kind == "scene"), None) or b.colors or a.colors or _palette(n)
    background = set(meta.background) if meta is not None else {0}
    return names, colors, background


def _comparison_grid(b: DateInput, a: DateInput, options: ChangeOptions, aoi) -> tuple[Grid, float, Any, float]:
    """The common grid (shrunk to ``aoi`` with a margin for the tolerance), the tolerance in metres,
    the area's polygons (None without ``aoi``) and the minimum polygon area in m² (default 4 pixels)."""
    grid = common_grid(b, a)
    tolerance = _tolerance(options, grid)
    area = None
    if aoi is not None:
        from geoseg.io.aoi import read_area

        area = read_area(aoi, grid.crs)
        grid = _grid_within(grid, area, margin_px=math.ceil(tolerance / min(grid.pixel_m)) + 2, aoi=aoi)
    min_area = options.min_area if options.min_area is not None else DEFAULT_MIN_AREA_PX * grid.pixel_m[0] * grid.pixel_m[1]
    log.info("comparing on %s, %d x %d pixels of %.3g x %.3g m; tolerance %.3g m, margin %g, min area %.3g m²",
             grid.crs.to_string(), grid.width, grid.height, *grid.pixel_m, tolerance, options.margin, min_area)
    return grid, tolerance, area, min_area


def _segment_scenes(dates: list[DateInput], bundle, model, meta, predict_options: PredictOptions, scratch: Path,
                    *, aoi, margin_m: float, progress: Progress | None, timings: dict[str, float],
                    ) -> tuple[list[DateInput], dict | None]:
    """Segment each date that is a scene (probabilities into ``scratch``), with ``bundle`` or the
    model loaded here and released after. Returns the dates, now read from those probabilities, and
    the model's run information (with the zooms each date ran); both as given when ``meta`` is None
    (no date is a scene)."""
    if meta is None:
        return dates, None
    from geoseg.inference.options import scales_for, thresholds
    from geoseg.inference.segment import segment
    from geoseg.models.bundle import release_keras
    from geoseg.io.scene import open_scene
    from geoseg.workflows.predict import load_model_for
    from geoseg.zooms import zoom_text

    dates = list(dates)
    own_model = bundle is None
    t0 = time.perf_counter()
    if own_model:
        bundle = load_model_for(model, predict_options)
        timings["load_model"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    ran: dict[str, list[float]] = {}  # the zooms each date ran (one finer than its pixels is left out)
    for i, d in enumerate(dates):
        if d.kind != "scene":
            continue
        info = open_scene(d.path, bands=predict_options.bands, assume_crs=predict_options.assume_crs)
        if aoi is not None:  # segment the area and a rim around it: context for the tolerance
            from geoseg.io.aoi import restrict

            info = restrict(info, aoi, margin_m=margin_m)
        folder = scratch / d.role.lower()
        folder.mkdir()
        stage = d.role.lower()
        seg = segment(info, bundle, folder, options=predict_options, probs=True,
                      progress=(lambda done, total, s=stage: progress(s, done, total)) if progress else None)
        dates[i] = replace(d, read_path=str(seg.probs_path), read_kind="probs",
                           thresholds=tuple(thresholds(predict_options, meta).values()))
        ran[d.role] = seg.scales
    timings["segment"] = round(time.perf_counter() - t0, 3)
    texts = {role: zoom_text(z) for role, z in ran.items()}
    multi = any(len(z) > 1 for z in ran.values())
    model_info = {"name": meta.name, "sha256": bundle.sha256, "path": str(bundle.path),
                  "precision": bundle.precision,
                  "scales": (next(iter(texts.values())) if len(set(texts.values())) == 1
                             else "; ".join(f"{role.lower()} {t}" for role, t in texts.items())),
                  **({"scale_merge": scales_for(predict_options, meta)[1]} if multi else {})}
    if own_model:  # the rest does not need the model: give its memory back
        bundle = None
        release_keras()
    return dates, model_info


def _run_metadata(b: DateInput, a: DateInput, hashes: dict[str, str], model_info: dict | None,
                  predict_options: PredictOptions, *, names: list[str], background: set[int], grid: Grid,
                  tolerance: float, margin: float, min_area: float, has_probs: bool, aoi) -> dict[str, str]:
    """The run's provenance, written into the GeoPackage and the change raster's tags."""
    return {
        "geoseg_version": geoseg.__version__,
        "command": "change",
        "before": str(Path(b.path).resolve()),
        "before_kind": b.kind,
        "before_sha256": hashes["BEFORE"],
        "after": str(Path(a.path).resolve()),
        "after_kind": a.kind,
        "after_sha256": hashes["AFTER"],
        **({"aoi": str(Path(aoi).resolve())} if aoi is not None else {}),
        **({"model_name": model_info["name"], "model_sha256": model_info["sha256"],
            "model_path": model_info["path"], "tile_size": str(predict_options.tile_size or ""),
            "overlap": str("" if predict_options.overlap is None else predict_options.overlap),
            "batch_size": str(predict_options.batch_size), "blend": predict_options.blend,
            "precision": model_info["precision"], "gsd": predict_options.gsd, "tta": predict_options.tta,
            **{k: model_info[k] for k in ("scales", "scale_merge") if k in model_info}}
           if model_info else {}),
        "class_names": ",".join(names),
        "background": ",".join(names[i] for i in sorted(background)),
        "crs": grid.crs.to_string(),
        "resolution": f"{grid.transform.a:.12g},{-grid.transform.e:.12g}",
        "size": f"{grid.width}x{grid.height}",
        "tolerance_m": f"{tolerance:g}",
        "margin": f"{margin:g}",
        "min_area_m2": f"{min_area:g}",
        "confidence": ("mean over the polygon of min(p_before(from_class), p_after(to_class)); a date "
                       "given as a class raster counts as probability 1" if has_probs else
                       "none: both dates are class rasters"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _write_change_raster(path: Path, code_path: Path, run_meta: dict[str, str], names: list[str], colors,
                         background: set[int], min_area: float) -> None:
    """The change codes as a COG with their colour table, names in the tags and a QGIS style."""
    from geoseg.io import outputs

    n = len(names)
    labels = ["no change"] + [f"{names[i]} → {names[j]}" for i, j in transitions(n)[1:]]
    ccolors = code_colors(names, colors, background)
    outputs.write_cog(
        code_path, path,
        colormap=outputs.class_colormap(ccolors, nodata=CODE_NODATA),
        band_descriptions=["change"],
        tags={**run_meta, "class_names": ",".join(code_names(names)), "source_class_names": ",".join(names),
              "change_codes": ",".join(f"{k}={v}" for k, v in enumerate(code_names(names))),
              "min_area_m2": f"{min_area:g}"},
    )
    outputs.write_raster_qml(path.with_suffix(".qml"), class_names=labels, colors=ccolors, transparent={0})


def _write_change_preview(path: Path, code_path: Path, b: DateInput, a: DateInput, names: list[str], colors,
                          background: set[int], *, bands, gsd_m: float, timings: dict[str, float]) -> None:
    """The quick look: what appeared and disappeared, over AFTER (over BEFORE when only it is a scene)."""
    from geoseg.preview import write_preview

    t0 = time.perf_counter()
    n = len(names)
    quiet = {0} | {k for k, (i, j) in enumerate(transitions(n)) if i in background and j in background}
    # the legend in words (and ASCII: the picture's font has no arrow)
    said = ["no change"] + [f"{names[j]} appeared" if i in background else f"{names[i]} disappeared"
                            if j in background else f"{names[i]} -> {names[j]}" for i, j in transitions(n)[1:]]
    under = next((d for d in (a, b) if d.kind == "scene"), a)
    write_preview(path, under.path, code_path, class_names=said, colors=code_colors(names, colors, background),
                  hidden=quiet, nodata=CODE_NODATA, bands=bands if under.kind == "scene" else None, gsd_m=gsd_m)
    timings["preview"] = round(time.perf_counter() - t0, 3)

def _grid_within(grid: Grid, area, *, margin_px: int, aoi) -> Grid:
    """The part of ``grid`` that covers ``area`` (polygons in its CRS) and ``margin_px`` pixels more
    on each side (the tolerance's context). InputError when the area misses the grid."""
    from geoseg.io.scene import window_of

    window = window_of(grid, *area.bounds)
    if window is None:
        left, bottom, right, top = rasterio.transform.array_bounds(grid.height, grid.width, grid.transform)
        raise InputError(f"--aoi {Path(aoi).name} does not overlap where BEFORE and AFTER overlap (x {left:.6g}.."
                         f"{right:.6g}, y {bottom:.6g}..{top:.6g} in {grid.crs}); check that it is the right file")
    r0, r1, c0, c1 = window
    r0, c0 = max(0, r0 - margin_px), max(0, c0 - margin_px)
    r1, c1 = min(grid.height, r1 + margin_px), min(grid.width, c1 + margin_px)
    return Grid(grid.crs, grid.transform * rasterio.Affine.translation(c0, r0), c1 - c0, r1 - r0, grid.pixel_m)


def _palette(n: int) -> tuple[tuple[int, int, int], ...]:
    from geoseg.io.outputs import PALETTE

    return tuple(PALETTE[i % len(PALETTE)] for i in range(n))


def _looks_like_classes(ds, n: int) -> tuple[bool, int]:
    """Whether an untagged single-band integer raster holds class ids ``0..n-1`` (else it is
    imagery), judged from a decimated read (at most 1024 px a side; overviews where there are any)."""
    scale = max(1.0, max(ds.width, ds.height) / 1024)
    shape = (max(1, int(ds.height / scale)), max(1, int(ds.width / scale)))
    values = ds.read(1, out_shape=shape, resampling=Resampling.nearest)
    if ds.nodata is not None:
        values = values[values != ds.nodata]
    top = int(values.max()) if values.size else 0
    return (values.size == 0 or (int(values.min()) >= 0 and top < n)), top


def _checked(options: ChangeOptions, predict_options) -> tuple[ChangeOptions, PredictOptions]:
    """The options with ``classes`` given as one comma-separated string split, bad values refused;
    the predict options as PredictOptions (checked later, when a date is a scene)."""
    if isinstance(options.classes, str):
        options = replace(options, classes=tuple(c.strip() for c in options.classes.split(",")))
    _check_options(options)
    return options, as_options(predict_options, check=False)


def _check_options(options: ChangeOptions) -> None:
    m = options.min_area
    if m is not None and not (isinstance(m, (int, float)) and math.isfinite(m) and m >= 0):
        raise InputError(f"--min-area {m}: give an area >= 0 in square metres")
    if not (isinstance(options.margin, (int, float)) and 0 <= options.margin < 1):
        raise InputError(f"--margin {options.margin}: give a probability margin from 0 (off) up to, not including, 1")
    t = options.tolerance
    if t is not None and not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
        raise InputError(f"--tolerance {t}: give a distance >= 0 in metres (0 turns it off)")
    if options.classes is not None:
        names = [c for c in options.classes]
        if not names or any(not c or "," in c for c in names) or len(set(names)) != len(names):
            raise InputError(f"--classes {','.join(names)}: give unique, non-empty names separated by commas")


def _tolerance(options: ChangeOptions, grid: Grid) -> float:
    if options.tolerance is not None:
        return float(options.tolerance)
    return max(DEFAULT_TOLERANCE_M, DEFAULT_TOLERANCE_PX * max(grid.pixel_m))


def _compare_dates(b: DateInput, a: DateInput, grid: Grid, code_path: Path, conf_path: Path | None, *, n: int,
                   margin: float, tolerance_m: float, progress: Progress | None, area=None) -> dict[str, int]:
    """Write the change codes (and confidences) of the whole grid, strip by strip; only inside
    ``area`` (shapely polygons in the grid's CRS) when given."""
    from geoseg.io.outputs import SCRATCH_COMPRESS, TiledTiffWriter

    common = dict(width=grid.width, height=grid.height, crs=grid.crs, transform=grid.transform,
                  **SCRATCH_COMPRESS)
    halo = math.ceil(tolerance_m / grid.pixel_m[1]) + 1 if tolerance_m > 0 else 0
    rows = max(_strip_rows(grid.width), 4 * halo)  # the halo read twice costs at most half a strip more
    counts = {"compared": 0, "changed": 0, "suppressed_by_margin": 0, "suppressed_by_tolerance": 0}
    writers = [TiledTiffWriter(code_path, count=1, dtype="uint8", nodata=CODE_NODATA, **common)]
    if conf_path is not None:
        writers.append(TiledTiffWriter(conf_path, count=1, dtype="uint16", nodata=0, **common))
    try:
        with Aligned(b, grid) as rb, Aligned(a, grid) as ra:
            for r0 in range(0, grid.height, rows):
                r1 = min(r0 + rows, grid.height)
                h0, h1 = max(0, r0 - halo), min(grid.height, r1 + halo)
                cb, vb, pb = rb.read(h0, h1)
                ca, va, pa = ra.read(h0, h1)
                valid = vb & va
                inside = None
                if area is not None:
                    from geoseg.io.scene import pixels_inside

                    inside = pixels_inside(area, grid.transform, h0, h1, 0, grid.width)
                out = compare(cb, ca, valid, pb, pa, n_classes=n, margin=margin, tolerance_m=tolerance_m,
                              pixel_m=grid.pixel_m, core=slice(r0 - h0, r1 - h0), area=inside)
                writers[0].write(out.codes, row_off=r0)
                if conf_path is not None:
                    writers[1].write(out.confidence, row_off=r0)
                counts["compared"] += int((valid if inside is None else valid & inside)[r0 - h0 : r1 - h0].sum())
                counts["changed"] += out.changed
                counts["suppressed_by_margin"] += out.by_margin
                counts["suppressed_by_tolerance"] += out.by_tolerance
                if progress:
                    progress("compare", r1, grid.height)
    finally:
        for w in writers:
            w.close(complete=sys.exc_info()[0] is None)  # failed or interrupted: no noise about scratch
    if counts["compared"] == 0:
        log.warning("BEFORE and AFTER overlap in their extents but no pixel has data on both dates")
    return counts


def _write_polygons(path: Path, code_path: Path, conf_path: Path | None, *, names: list[str], colors, background: set[int],
                    crs, min_area: float, metadata: dict[str, str], height: int, progress: Progress | None,
                    buffer: int = 50_000) -> dict[str, dict[str, tuple[int, float]]]:
    """Polygonize the change raster into one layer per non-background class, ``<class>_change``."""
    import geopandas as gpd

    from geoseg.io import outputs

    from geoseg.vector import polygons

    n = len(names)
    pairs = transitions(n)
    layers = {i: names[i] + LAYER_SUFFIX for i in range(n) if i not in background}
    style = outputs.categorized_qml(attr="change", categories=[(c, c, CHANGE_COLORS[c]) for c in (APPEARED, DISAPPEARED)])

    def frame(cid: int, geoms, areas, perimeters, conf, change, from_class, to_class) -> gpd.GeoDataFrame:
        k = len(geoms)
        return gpd.GeoDataFrame(
            {"class_name": np.full(k, names[cid], dtype=object), "class_id": np.full(k, cid, np.int32),
             "area_m2": np.asarray(areas, np.float64), "perimeter_m": np.asarray(perimeters, np.float64),
             "score": np.asarray(conf, np.float64), "change": np.asarray(change, dtype=object),
             "from_class": np.asarray(from_class, dtype=object), "to_class": np.asarray(to_class, dtype=object),
             "confidence": np.asarray(conf, np.float64)},
            geometry=gpd.GeoSeries(np.asarray(geoms, dtype=object), crs=crs), crs=crs)

    empty = {name: frame(cid, [], [], [], [], [], [], []) for cid, name in layers.items()}
    outputs.write_geopackage(path, empty, colors={}, metadata=metadata, styles=dict.fromkeys(empty, style))
    totals = {names[cid]: {APPEARED: (0, 0.0), DISAPPEARED: (0, 0.0)} for cid in layers}
    waiting: dict[int, list[gpd.GeoDataFrame]] = {}

    def flush(cid: int) -> None:
        got = waiting.pop(cid, [])
        if got:
            import pandas as pd

            outputs.append_layer(path, layers[cid], gpd.GeoDataFrame(pd.concat(got, ignore_index=True), crs=crs))

    skip = {0} | {k for k, (i, j) in enumerate(pairs) if k and i in background and j in background}
    done = 0

    def rows(k: int) -> None:
        nonlocal done
        done += k
        if progress:
            progress("polygonize", done, height)

    batches = polygons.iter_polygons(str(code_path), class_names=code_names(names), skip=skip,
                                     score_path=str(conf_path) if conf_path else None,
                                     score_scale=1.0 / CONFIDENCE_SCALE, min_area_m2=min_area, progress=rows)
    for batch in batches:
        i, j = pairs[batch.class_id]
        k = len(batch.geoms)
        for cid, change in ((j, APPEARED), (i, DISAPPEARED)):
            if cid not in layers:
                continue
            waiting.setdefault(cid, []).append(frame(cid, batch.geoms, batch.areas, batch.perimeters, batch.scores,
                                                     [change] * k, [names[i]] * k, [names[j]] * k))
            count, area = totals[names[cid]][change]
            totals[names[cid]][change] = (count + k, area + float(np.sum(batch.areas)))
            if sum(len(f) for f in waiting[cid]) >= buffer:
                flush(cid)
    for cid in list(waiting):
        flush(cid)
    return totals
