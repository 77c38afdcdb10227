"""Orchestration only: scene -> tiles -> batches -> model -> blend -> writers -> polygons.

Each step lives in its own module; this one wires them together, streaming:

- a background thread reads one strip of tile rows at a time, cuts it into tiles, skips tiles
  with no valid pixel and queues fixed-shape batches (read-ahead while the model runs);
- the model runs on one batch at a time (``predict_on_batch``: no per-call overhead);
- the strip accumulator blends the logits and hands finished rows to the writers, which append
  them to tiled GeoTIFFs in a scratch folder;
- with several zooms (``geoseg.scales``), all of the above runs once per zoom and the runs'
  probabilities are merged on the scene's grid;
- the class raster is polygonized into the GeoPackage and copied to a COG;
- all outputs are renamed into place together at the end (``atomic.Staging``).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

import geoseg
from geoseg.atomic import Staging, claim_outputs
from geoseg.blend import StripAccumulator, Strip, decision_bias, resolve_thresholds, weight_window
from geoseg.errors import InputError
from geoseg.models.bundle import PRECISIONS, release_keras, sha256_or_blank
from geoseg.scene import SceneInfo, SceneReader, at_gsd, open_scene
from geoseg.threads import Background, Behind, prefetch
from geoseg.tiling import Tile, TilePlan, check_tiling, tile_plan

log = logging.getLogger(__name__)

CLASS_NODATA = 255
SCORE_SCALE = 65535


@dataclass(frozen=True)
class PredictOptions:
    """How to run a model over a scene. ``None`` means "the bundle's default"."""

    tile_size: int | None = None
    overlap: int | None = None
    batch_size: int = 2  # CPU: throughput flat from 1 to 8, memory +100 MiB per tile (benchmarks/batch_size.py)
    blend: str = "cosine"
    precision: str = "auto"  # bfloat16 where measured faster (bf16 CPUs, plain U-Net/SegNet), else float32 (bundle.resolve_precision)
    bands: tuple[int, ...] | None = None
    assume_crs: str | None = None
    min_area_m2: float | Mapping[str, float] | None = None  # one value, or {class: m²} over the model's
    prefetch: int = 2
    chunk_width: int = 8192  # scenes wider than this are blended in column chunks (bounds memory)
    gsd: str = "auto"  # "auto": resample when outside the model's GSD range; "native"; or metres
    force: bool = False  # let --gsd native run a scene more than GSD_FAR times outside the model's range
    stretch: str = "auto"  # "auto": match value ranges when the scene's dtype differs from the model's; "none"
    tta: str = "none"  # test-time augmentation: "none", "flips" (4 passes) or "d4" (8 passes)
    # zooms of the working grid run and merged (geoseg.scales), e.g. (1.0, 2.0); None: the model's
    scales: tuple[float, ...] | None = None
    scale_merge: str | None = None  # "max" or "mean"; None: the model's
    # decision threshold: one value, or {class: probability} over the model's per-class thresholds
    threshold: float | Mapping[str, float] | None = None
    # clean-up (geoseg.cleanup): one value, or {class: value} over the model's per-class defaults
    sieve_m2: float | Mapping[str, float] | None = None
    max_hole_m2: float | Mapping[str, float] | None = None
    simplify_m: float | Mapping[str, float] | None = None
    # "after": polygonize once the model is done; "live": a scene of one column chunk beside the model,
    # strip by strip. Live pays only where the model leaves a core free (a GPU, or fewer TensorFlow
    # threads than cores): 0.95 of model-alone throughput against 0.88 with TensorFlow on one of the
    # 2 cores; with TensorFlow on both it slowed the model and gave 0.81 against 0.85
    # (benchmarks/pipeline.py --polygonize, docs/performance.md).
    polygonize: str = "after"


@dataclass
class PredictResult:
    scene: str
    outputs: dict[str, str]
    model: dict[str, str]
    crs: str
    gsd_m: float
    model_gsd_m: float | None
    width: int
    height: int
    tiles: dict[str, int]
    counts: dict[str, int] = field(default_factory=dict)
    pixels: dict[str, int] = field(default_factory=dict)
    area_m2: dict[str, float] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    centerlines: dict | None = None  # centrelines.Centrelines.summary() of the road_centerline layer
    aoi: str | None = None  # the --aoi file; width and height are then those of its bounding box

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Batch:
    tiles: list[Tile]
    x: np.ndarray  # (batch_size, T, T, bands) float32, zero-padded past len(tiles)
    valid: np.ndarray  # (len(tiles), T, T) bool


Progress = Callable[[int, int], None]  # (tiles done, tiles total)


def match_bands(info: SceneInfo, model_bands: tuple[str, ...]) -> int:
    """How many times to repeat the scene's bands to feed the model (1, or N for gray -> N bands)."""
    n, m = len(info.bands), len(model_bands)
    if n == m:
        return 1
    if n == 1:
        log.warning(
            "%s has one band; repeating it to feed the model's %d bands (%s)",
            info.path, m, ", ".join(model_bands),
        )
        return m
    raise InputError(
        f"{info.path} has {n} image bands ({', '.join(info.band_names)}) but the model expects {m} "
        f"({', '.join(model_bands)}); choose and order them with --bands, e.g. --bands "
        + ",".join(str(i) for i in range(1, m + 1))
    )


def effective_tiling(info: SceneInfo, *, tile_size: int, overlap: int, multiple: int) -> tuple[int, int]:
    """Shrink the tile for a scene smaller than one tile (one tile, less padding). A crop is tiled
    as its parent is."""
    check_tiling(tile_size=tile_size, overlap=overlap, size_multiple=multiple)
    grid = info.parent if info.parent is not None else info
    longest = max(grid.width, grid.height)
    if longest < tile_size:
        tile_size = max(multiple, -(-longest // multiple) * multiple)
        overlap = min(overlap, tile_size // 2)
        if overlap >= tile_size:
            overlap = 0
    return tile_size, overlap


def tiling_for(info: SceneInfo, meta, options: "PredictOptions") -> tuple[int, int]:
    """Tile size and overlap for ``info``: the options', else the model's, shrunk for a small scene."""
    return effective_tiling(
        info,
        tile_size=options.tile_size or meta.tile_size,
        overlap=meta.overlap if options.overlap is None else options.overlap,
        multiple=meta.size_multiple,
    )


def plan_chunks(info: SceneInfo, tile_size: int, overlap: int,
                chunk_width: int) -> tuple[TilePlan, list[TilePlan], list[tuple[int, int]]]:
    """The tiles of ``info`` (a crop: its parent's tiles that touch it), the tiles each column chunk
    runs (a tile on a chunk edge is run by both) and the chunks' column ranges. Lazy plans: their
    size is O(rows + columns of tiles), whatever the scene's (or its header's) size."""
    grid = info.parent if info.parent is not None else info
    plan = tile_plan(grid.height, grid.width, tile_size=tile_size, overlap=overlap,
                     window=(info.row_off, info.row_off + info.height, info.col_off, info.col_off + info.width))
    chunks = column_chunks(info.width, chunk_width)
    return plan, [plan.touching(a, b) for a, b in chunks], chunks


def value_stretch(info: SceneInfo, meta, mode: str = "auto") -> tuple[float, float] | None:
    """``(scale, offset)`` mapping the scene's pixel values onto the range the model was trained on.

    With ``auto`` this happens only when the scene's data type differs from the training imagery's
    (for example 11-bit WorldView data in uint16 on a model trained on uint8 photos): the scene's
    2nd-98th percentiles are mapped linearly onto the training data's. ``none`` feeds values as they are.
    """
    if mode not in ("auto", "none"):
        raise InputError(f"--stretch {mode!r} must be auto or none")
    if mode == "none" or not meta.value_range or not meta.dtype or info.dtype == meta.dtype:
        return None
    from geoseg.scene import value_percentiles

    lo, hi = value_percentiles(info)
    tlo, thi = meta.value_range
    scale = (thi - tlo) / (hi - lo)
    log.info("%s is %s, the model was trained on %s: stretching values %.4g-%.4g onto %.4g-%.4g (--stretch none to turn off)",
             Path(info.path).name, info.dtype, meta.dtype, lo, hi, tlo, thi)
    return (scale, tlo - lo * scale)


@dataclass
class Skips:
    """Tiles found to have no valid pixels: ``runs`` counts them per chunk that reads them,
    ``tiles`` once each (a tile on a chunk edge is read by two chunks)."""

    runs: int = 0
    tiles: int = 0


def iter_batches(
    info: SceneInfo,
    tiles: TilePlan,
    *,
    batch_size: int,
    fill: np.ndarray,
    repeat: int,
    skipped: Skips,
    stretch: tuple[float, float] | None = None,
    first_col: int | None = None,
) -> Iterator[Batch]:
    """Read the scene strip by strip and yield fixed-shape batches of the tiles that have data.

    ``tiles``: the plan of one column chunk; a skipped tile counts in ``skipped.tiles`` only in the
    chunk it starts in (``first_col``: the chunk's first column; None: the first chunk, which also
    counts the tiles that start left of the scene)."""
    if not len(tiles):
        return
    size = tiles.size
    nb = len(info.bands) * repeat
    c_min, c_max = tiles.col_span()  # read only the columns these tiles need
    pending: list[tuple[Tile, np.ndarray]] = []
    x = np.zeros((batch_size, size, size, nb), dtype=np.float32)  # the batch being filled, tile by tile

    def emit() -> Batch:
        nonlocal x
        b = Batch(tiles=[t for t, _ in pending], x=x, valid=np.stack([v for _, v in pending]))
        pending.clear()
        x = np.zeros_like(b.x)
        return b

    with SceneReader(info) as reader:
        for i in range(len(tiles.rows)):
            row = tiles.row_tiles(i)
            r = row[0].row
            data, valid = reader.read(r, r + size, c_min, c_max)
            area = reader.area(r, r + size, c_min, c_max)  # a crop's own pixels (None: all)
            for t in row:
                c = t.col - c_min
                v = valid[:, c : c + size]
                out = v if area is None else v & area[:, c : c + size]
                if not out.any():
                    skipped.runs += 1
                    if first_col is None or t.col >= first_col:  # counted by the chunk it starts in
                        skipped.tiles += 1
                    continue
                slot = x[len(pending)]  # converted to float32 straight into the batch
                if repeat > 1:
                    slot[:] = np.repeat(data[:, c : c + size], repeat, axis=-1)
                else:
                    slot[:] = data[:, c : c + size]
                if stretch is not None:
                    slot *= np.float32(stretch[0])
                    slot += np.float32(stretch[1])
                if not v.all():
                    slot[~v] = fill  # invalid pixels become the band means: 0 after normalisation
                pending.append((t, out))  # pixels outside a crop's area are context, not output
                if len(pending) == batch_size:
                    yield emit()
        if pending:
            yield emit()


def quantize_score(score: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The uint16 score raster's values: probability x SCORE_SCALE, rounded, at least 1 where valid, 0 elsewhere."""
    q = np.multiply(score, SCORE_SCALE, dtype=np.float32)
    np.rint(q, out=q)
    np.clip(q, 1, SCORE_SCALE, out=q)
    out = q.astype(np.uint16)
    out[~valid] = 0
    return out


class RasterSinks:
    """Writes finished strips: class ids, per-pixel score, and (optionally) class probabilities."""

    def __init__(self, info: SceneInfo, *, classes: int, scratch: Path, probs: bool,
                 on_rows: Callable[[int, np.ndarray, np.ndarray], None] | None = None) -> None:
        from geoseg.outputs import SCRATCH_COMPRESS, TiledTiffWriter

        self.on_rows = on_rows  # also gets each full-width strip's (row_off, classes, score): LiveRows.add

        common = dict(width=info.width, height=info.height, crs=info.crs, transform=info.transform,
                      **SCRATCH_COMPRESS)
        self.class_path = scratch / "classes.tif"
        self.score_path = scratch / "score.tif"
        self.probs_path = scratch / "probs.tif" if probs else None
        self.counts = np.zeros(classes, dtype=np.int64)
        self._writers = [
            TiledTiffWriter(self.class_path, count=1, dtype="uint8", nodata=CLASS_NODATA, **common),
            TiledTiffWriter(self.score_path, count=1, dtype="uint16", nodata=0, **common),
        ]
        if self.probs_path:
            self._writers.append(TiledTiffWriter(self.probs_path, count=classes, dtype="float32", **common))

    def __call__(self, strip: Strip) -> None:
        score = quantize_score(strip.score, strip.valid)
        probs = np.moveaxis(strip.probs, -1, 0) if self.probs_path else None
        self.write(strip.row_off, strip.col_off, strip.classes, score, probs, strip.valid)
        if self.on_rows is not None:
            self.on_rows(strip.row_off, strip.classes, score)

    def write(self, row_off: int, col_off: int, classes: np.ndarray, score: np.ndarray,
              probs: np.ndarray | None, valid: np.ndarray) -> None:
        """Write one window: classes (rows, cols), score (rows, cols), probs (classes, rows, cols)."""
        at = dict(row_off=row_off, col_off=col_off)
        self._writers[0].write(classes, **at)
        self._writers[1].write(score, **at)
        if self.probs_path:
            self._writers[2].write(probs, **at)
        # invalid pixels hold CLASS_NODATA (255), past every class: one bincount without a mask
        self.counts += np.bincount(classes.ravel(), minlength=256)[: len(self.counts)]

    def close(self, *, complete: bool = True) -> None:
        """Close the rasters; ``complete=False`` when the run failed: no check, no warning."""
        for w in self._writers:
            w.close(complete=complete)


class _Stopped(Exception):
    """The segmentation feeding a LiveRows stopped (its error is raised in the main thread)."""


class LiveRows:
    """The class and score rows of a scene as the blender finishes them, for a polygonizer running
    beside the model (``polygons.iter_polygons_of``) instead of after it.

    For scenes of one column chunk on their own grid: strips then come full width, top to bottom.
    ``add`` (the blender's thread) keeps them until both readers have passed them; it waits while
    more than ``max_rows`` rows are held and the polygonizer is busy (never while it waits for rows,
    so the two cannot wait on each other). ``stop`` (the main thread, when segmenting fails) makes
    the polygonizer's next read raise; when the polygonizer fails, ``add`` raises its error, which
    stops the model. Waits poll every 0.1 s, so a flag set without the lock is seen.
    """

    def __init__(self, info: SceneInfo, *, max_rows: int = 2048) -> None:
        self.name, self.height, self.width = str(info.path), info.height, info.width
        self.crs, self.transform = info.crs, info.transform
        self.max_rows = max(1, max_rows)
        self._strips: list[tuple[int, np.ndarray, np.ndarray]] = []
        self._received = 0
        self._cursor = [0, 0]  # rows read so far: class ids, scores
        self._reader_waits = False
        self._cond = threading.Condition()
        self.stopped = False  # segmenting failed
        self.reader_done = False  # the polygonizer finished or failed
        self.reader_error: BaseException | None = None

    def rows(self):
        """The :class:`geoseg.polygons.RasterRows` the polygonizer reads."""
        from pyproj import CRS

        from geoseg.polygons import RasterRows

        return RasterRows(name=self.name, crs=CRS.from_wkt(self.crs.to_wkt()), transform=self.transform,
                          height=self.height, width=self.width, dtype=np.dtype(np.uint8), nodata=CLASS_NODATA,
                          block_rows=512, read=lambda r0, r1: self._read(0, r0, r1),
                          read_score=lambda r0, r1: self._read(1, r0, r1), score_nodata=0)

    def add(self, row_off: int, classes: np.ndarray, score: np.ndarray) -> None:
        with self._cond:
            while (self._received - min(self._cursor) >= self.max_rows and not self._reader_waits
                   and not self.reader_done and not self.stopped):
                self._cond.wait(0.1)
            if self.reader_error is not None:
                raise self.reader_error
            if self.reader_done or self.stopped:
                return
            if row_off != self._received or classes.shape[1] != self.width:
                raise RuntimeError(f"LiveRows got rows {row_off}+{classes.shape[0]} x {classes.shape[1]} after "
                                   f"{self._received} rows of {self.width}: strips must come full width, in order")
            self._strips.append((row_off, classes, score))
            self._received += classes.shape[0]
            self._cond.notify_all()

    def _read(self, which: int, r0: int, r1: int) -> np.ndarray:
        with self._cond:
            self._reader_waits = True
            self._cond.notify_all()
            while self._received < r1 and not self.stopped:
                self._cond.wait(0.1)
            self._reader_waits = False
            if self.stopped:
                raise _Stopped()
            parts = [s[1 + which][max(r0 - s[0], 0): r1 - s[0]] for s in self._strips
                     if s[0] < r1 and s[0] + s[1].shape[0] > r0]
            self._cursor[which] = max(self._cursor[which], r1)
            low = min(self._cursor)
            self._strips = [s for s in self._strips if s[0] + s[1].shape[0] > low]
            self._cond.notify_all()
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def stop(self) -> None:
        self.stopped = True  # seen by the reader within 0.1 s even if the lock below is not taken
        with self._cond:
            self._cond.notify_all()

    def reader_finished(self, error: BaseException | None = None) -> None:
        self.reader_error = error
        self.reader_done = True
        with self._cond:
            self._strips = []
            self._cond.notify_all()


def column_chunks(width: int, chunk_width: int, *, block: int = 512) -> list[tuple[int, int]]:
    """Column ranges ``[a, b)`` that split a scene into chunks no wider than ``chunk_width``.

    Chunk edges fall on multiples of ``block`` (the output rasters' tile size) when chunks are at
    least that wide, so each output tile is written by exactly one chunk.
    """
    if chunk_width <= 0:
        raise InputError(f"chunk width must be positive, got {chunk_width}")
    if width <= chunk_width:
        return [(0, width)]
    step = chunk_width // block * block if chunk_width >= block else chunk_width
    return [(a, min(a + step, width)) for a in range(0, width, step)]


def run_model(
    info: SceneInfo,
    bundle,
    *,
    tile_size: int,
    overlap: int,
    options: PredictOptions,
    sink: Callable[[Strip], None],
    progress: Progress | None = None,
    timings: dict[str, float] | None = None,
    probs: bool = True,
) -> dict[str, int]:
    """Segment the whole scene, handing finished strips to ``sink``; returns tile counts.

    A scene wider than ``options.chunk_width`` is done in column chunks, each top to bottom, so
    memory is bounded by one tile of rows of one chunk whatever the scene's size. A chunk runs every
    tile that touches it; tiles on a chunk edge are run by both neighbours (a few percent more model
    work), which keeps the blend exactly what it would be for the whole scene at once.
    ``probs``: the strips carry every class's probability (``Strip.probs``, for a probability
    raster); without it a two-class model's strips get only the class and its score, which skips
    the softmax (``blend.decide_two``).
    """
    meta = bundle.meta
    repeat = match_bands(info, meta.bands)
    # a crop runs its parent's tiles that touch it, so it blends exactly as a run over the whole parent
    tiles, per_chunk, chunks = plan_chunks(info, tile_size, overlap, options.chunk_width)
    fill = np.asarray(meta.mean, dtype=np.float32)
    window = weight_window(tile_size, kind=options.blend, overlap=overlap)
    stretch = value_stretch(info, meta, options.stretch)
    bias = decision_bias(list(thresholds(options, meta).values()))
    timings = timings if timings is not None else {}
    t_model = t_blend = t_wait = 0.0
    skipped = Skips()
    total = sum(map(len, per_chunk))  # tiles on chunk edges count once per chunk
    done = run = 0
    if progress:
        progress(0, total)  # the bar and its total show before the first batch (a huge scene's plan is known at once)
    for (a, b), chunk_tiles in zip(chunks, per_chunk):
        acc = StripAccumulator(
            height=info.height, width=b - a, col_off=a, classes=len(meta.classes), tile_size=tile_size,
            window=window, sink=sink, nodata=CLASS_NODATA, bias=bias, probs=probs,
        )
        runs_before = skipped.runs
        gen = iter_batches(info, chunk_tiles, batch_size=options.batch_size, fill=fill, repeat=repeat,
                           skipped=skipped, stretch=stretch, first_col=a if a > chunks[0][0] else None)

        def blend(item, acc=acc) -> None:
            tiles_, logits_, valid_ = item
            for i, tile in enumerate(tiles_):
                acc.add(tile, logits_[i], valid_[i])

        blender = Behind(blend)
        try:
            for batch in prefetch(gen, options.prefetch):
                t0 = time.perf_counter()
                logits = forward(bundle.model, batch.x, options.tta)
                t_model += time.perf_counter() - t0
                blender.put((batch.tiles, logits, batch.valid))
                run += len(batch.tiles)
                if progress:
                    progress(done + run + skipped.runs - runs_before, total)
        except BaseException:
            blender.close(raise_error=False)
            raise
        t1 = time.perf_counter()
        blender.close()
        t_wait += time.perf_counter() - t1
        t_blend += blender.busy_s
        t1 = time.perf_counter()
        acc.finish()
        t_blend += time.perf_counter() - t1
        done += skipped.runs - runs_before
    if progress:
        progress(total, total)
    timings["model"] = round(t_model, 3)
    timings["blend_write"] = round(t_blend, 3)  # in a background thread, overlapping the model
    timings["blend_wait"] = round(t_wait, 3)  # waiting for the blender after the last batch
    return {"total": len(tiles), "skipped": skipped.tiles, "run": run, "chunks": len(chunks), "size": tile_size,
            "overlap": overlap, "batch_size": options.batch_size}


@dataclass(frozen=True)
class Segmentation:
    """The rasters ``segment`` wrote (tiled GeoTIFFs on the scene's grid) and how it went."""

    info: SceneInfo
    class_path: Path  # uint8 class ids, nodata 255
    score_path: Path  # uint16 probability of each pixel's class x 65535, nodata 0
    probs_path: Path | None  # float32, one band per class
    tiles: dict[str, int]
    tile_size: int
    overlap: int
    pixels: dict[str, int]  # pixel count per class
    work_gsd: float | None = None  # the GSD the model ran at, when the scene was read resampled

    @property
    def scales(self) -> list[float]:
        """The zooms the model ran at (``geoseg.scales``); [1.0] for one run."""
        return self.tiles.get("scales", [1.0])


MAX_UPSAMPLING = 8.0
#: A scene whose pixels are more than this many times outside the model's GSD range is far from
#: what the model learned: a warning, and ``--gsd native`` there needs ``--force``.
GSD_FAR = 4.0


def gsd_distance(info: SceneInfo, meta) -> float:
    """How many times the scene's GSD lies outside the model's range (1: inside it)."""
    if not meta.gsd_range or not info.gsd:
        return 1.0
    lo, hi = meta.gsd_range
    return max(1.0, info.gsd / hi, lo / info.gsd)


def working_grid(info: SceneInfo, meta, gsd: str = "auto", *, quiet: bool = False, force: bool = False) -> SceneInfo:
    """The grid the model runs on: the scene's own, or the scene resampled to the model's GSD.

    ``gsd``: ``"auto"`` resamples only when the scene's GSD is outside the range the model was
    trained on; ``"native"`` never resamples, and refuses (unless ``force``) a scene more than
    ``GSD_FAR`` times outside that range; a number (metres) forces that GSD. ``quiet``: do not
    log (a caller that only asks).
    """
    far = gsd_distance(info, meta)
    if gsd == "native":
        if far > GSD_FAR and meta.gsd_range:
            lo, hi = meta.gsd_range
            text = (f"{Path(info.path).name} has {info.gsd:.3g} m pixels, {far:.0f}x outside the {lo:.3g}-{hi:.3g} m "
                    f"the model was trained on; run as they are, its objects look {far:.0f}x "
                    f"{'smaller' if info.gsd > hi else 'larger'} than the model learned them")
            if not force:
                raise InputError(f"{text}: use a model trained near {info.gsd:.3g} m, or --gsd auto, or pass "
                                 f"--force to run it anyway")
            if not quiet:
                log.warning("%s (--force)", text)
        return info
    if gsd == "auto":
        if not meta.gsd or not meta.gsd_range or meta.gsd_range[0] <= info.gsd <= meta.gsd_range[1]:
            return info
        target = meta.gsd
    else:
        try:
            target = float(gsd)
        except ValueError:
            raise InputError(f"--gsd {gsd!r} must be auto, native or a number of metres per pixel") from None
        if target <= 0:
            raise InputError(f"--gsd {gsd} must be a positive number of metres per pixel")
    factor = info.gsd / target
    if factor > MAX_UPSAMPLING:
        raise InputError(
            f"{info.path} has {info.gsd:.3g} m pixels but the model works at {target:.3g} m: upsampling "
            f"{factor:.0f}x would only invent detail; use a model trained near {info.gsd:.3g} m, "
            f"or pass --gsd native --force to run it on the scene as it is"
        )
    if not quiet:
        log.info("reading %s (%.3g m pixels) resampled to %.3g m, the model's GSD; outputs stay on the scene's grid",
                 Path(info.path).name, info.gsd, target)
        if gsd == "auto" and far > GSD_FAR and info.gsd > target:
            log.warning("%s has %.3g m pixels, %.0fx coarser than the model's range (%.3g-%.3g m): resampling "
                        "adds no detail, so objects under about %.2g m cannot be found; a model trained near "
                        "%.3g m would do better", Path(info.path).name, info.gsd, far, *meta.gsd_range,
                        2 * info.gsd, info.gsd)
    return at_gsd(info, target)


def resample_to_scene(work: "Segmentation", info: SceneInfo, out_dir: Path, *, classes: int,
                      chunk_width: int) -> "Segmentation":
    """Warp rasters made on a resampled grid back onto the scene's own grid, window by window.

    Classes and scores use nearest neighbour, probabilities bilinear; the scene's own nodata mask
    is applied at full resolution.
    """
    from rasterio.vrt import WarpedVRT

    Resampling = rasterio.enums.Resampling
    sinks = RasterSinks(info, classes=classes, scratch=out_dir, probs=work.probs_path is not None)
    sources = [(work.class_path, Resampling.nearest), (work.score_path, Resampling.nearest)]
    if work.probs_path:
        sources.append((work.probs_path, Resampling.bilinear))
    files = [rasterio.open(p) for p, _ in sources]
    grid = dict(crs=info.crs, transform=info.transform, width=info.width, height=info.height)
    vrts = [WarpedVRT(f, resampling=r, **grid) for f, (_, r) in zip(files, sources)]
    try:
        with SceneReader(info) as reader:
            for a, b in column_chunks(info.width, chunk_width):
                for r0 in range(0, info.height, 512):
                    r1 = min(r0 + 512, info.height)
                    win = Window(a, r0, b - a, r1 - r0)
                    valid = reader.read_valid(r0, r1, a, b)
                    cls = vrts[0].read(1, window=win)
                    valid &= cls != CLASS_NODATA
                    cls[~valid] = CLASS_NODATA
                    score = np.where(valid, vrts[1].read(1, window=win), 0).astype(np.uint16)
                    probs = np.where(valid, vrts[2].read(window=win), 0).astype(np.float32) if work.probs_path else None
                    sinks.write(r0, a, cls, score, probs, valid)
    finally:
        for handle in [*vrts, *files]:
            handle.close()
        sinks.close(complete=sys.exc_info()[0] is None)  # failed or interrupted: no noise about scratch
    return dataclasses.replace(
        work, info=info, class_path=sinks.class_path, score_path=sinks.score_path, probs_path=sinks.probs_path,
        pixels={name: int(n) for name, n in zip(work.pixels, sinks.counts)},
    )


def check_options(options: PredictOptions) -> None:
    if options.batch_size <= 0:
        raise InputError(f"--batch-size must be at least 1, got {options.batch_size}")
    if options.tile_size is not None and options.tile_size <= 0:
        raise InputError(f"--tile-size must be a positive number of pixels, got {options.tile_size}")
    if options.overlap is not None and options.overlap < 0:
        raise InputError(f"--overlap must be 0 or more pixels, got {options.overlap}")
    if options.precision not in PRECISIONS:
        raise InputError(f"--precision {options.precision!r} is not one of {', '.join(PRECISIONS)}")
    if options.tta not in TTA:
        raise InputError(f"--tta {options.tta!r} is not one of {', '.join(TTA)}")
    if options.polygonize not in ("live", "after"):
        raise InputError(f"--polygonize {options.polygonize!r} is not one of live, after")
    from geoseg.zooms import MERGES, check_scales

    if options.scales is not None:
        check_scales(options.scales, options.scale_merge or "mean")
    elif options.scale_merge is not None and options.scale_merge not in MERGES:
        raise InputError(f"--scale-merge {options.scale_merge!r} is not one of {', '.join(MERGES)}")


def scales_for(options: PredictOptions, meta) -> tuple[tuple[float, ...], str]:
    """The zooms to run and how to merge them (``geoseg.scales``): the options', else the model's."""
    return (options.scales or meta.scales, options.scale_merge or meta.scale_merge)


def grids_for(info: SceneInfo, meta, options: PredictOptions, *, quiet: bool = False) -> list[tuple[float, SceneInfo]]:
    """``(zoom, grid)`` for each run of the model over ``info``: one, on the working grid, unless
    the options or the model ask for more zooms (``geoseg.scales.scale_grids``)."""
    from geoseg.scales import scale_grids

    work = working_grid(info, meta, options.gsd, quiet=quiet, force=options.force)
    scales, _ = scales_for(options, meta)
    return scale_grids(info, work, scales, quiet=quiet) if len(scales) > 1 else [(1.0, work)]


TTA = {
    # (turns of 90°, flip left-right) applied to each tile; the logits are turned back and averaged
    "none": ((0, False),),
    "flips": ((0, False), (0, True), (2, False), (2, True)),  # identity, left-right, 180°, up-down
    "d4": tuple((k, f) for k in range(4) for f in (False, True)),
}


_PREDICT_FNS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _predict_fn(model) -> Callable[[np.ndarray], Any]:
    """The model's forward pass. Under TensorFlow a ``tf.function`` traced once per tile shape:
    Keras's own ``predict_on_batch`` relaxes the third shape it meets to unknown height and width,
    and the bilinear ``UpSampling2D`` of the EfficientNet-Lite0 U-Net cannot be traced that way (a
    model reused over scenes of several sizes, as batch and the tuning scripts do, failed). Other
    backends, and objects that are not Keras models (or whose ``predict_on_batch`` was replaced on
    the instance), use ``predict_on_batch``."""
    import keras

    if not isinstance(model, keras.Model) or "predict_on_batch" in vars(model):
        return model.predict_on_batch
    fn = _PREDICT_FNS.get(model)
    if fn is None:
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            fn = tf.function(lambda t: model(t, training=False), reduce_retracing=False)
        else:
            fn = model.predict_on_batch
        _PREDICT_FNS[model] = fn
    return fn


def warm_up(bundle, info: SceneInfo, options: PredictOptions) -> None:
    """Trace the model's ``tf.function`` (:func:`_predict_fn`) for every batch shape ``segment`` will
    feed it on ``info``, so that the one-time graph trace (about 1 s for the default model) is part of
    setting the model up, not of its first batch. Nothing for models that run through
    ``predict_on_batch`` (other backends, stand-ins)."""
    model = bundle.model
    fn = _predict_fn(model)
    if fn == getattr(model, "predict_on_batch", None):
        return
    shapes = {tiling_for(grid, bundle.meta, options)[0] for _, grid in grids_for(info, bundle.meta, options, quiet=True)}
    for size in sorted(shapes):
        fn(np.zeros((options.batch_size, size, size, len(bundle.meta.bands)), np.float32))


def forward(model, x: np.ndarray, tta: str = "none") -> np.ndarray:
    """Logits (B, H, W, classes) float32 of ``model`` on ``x`` (B, H, W, bands), averaged over the
    flips and turns of ``tta`` (square tiles; each view is one more forward pass)."""
    views = TTA[tta]
    predict_on_batch = _predict_fn(model)
    if len(views) == 1:
        return np.asarray(predict_on_batch(x), dtype=np.float32)
    total = None
    for k, flip in views:
        v = np.flip(x, axis=2) if flip else x
        v = np.rot90(v, k, axes=(1, 2))
        out = np.asarray(predict_on_batch(np.ascontiguousarray(v)), dtype=np.float32)
        out = np.rot90(out, -k, axes=(1, 2))
        out = np.flip(out, axis=2) if flip else out
        total = out if total is None else total + out
    return total / len(views)


def building_class(class_names) -> int:
    """The id of the class ``--regularize`` works on (``building``); InputError if there is none."""
    if "building" not in class_names:
        raise InputError(f"--regularize squares building outlines, but the classes are {', '.join(class_names)}; "
                         f"it needs a class named building")
    return list(class_names).index("building")


def min_areas(options: PredictOptions, meta) -> dict[str, float]:
    """Minimum polygon area per class: the model's values, replaced by ``--min-area`` (one number for
    every class, or some classes by name). InputError for unknown class names or negative areas."""
    from geoseg.cleanup import per_class

    return per_class(options.min_area_m2, {c.name: c.min_area_m2 for c in meta.classes}, "--min-area")


def thresholds(options: PredictOptions, meta) -> dict[str, float]:
    """Decision threshold per class: the model's values, replaced by ``--threshold`` (one number for
    every class but background, or some classes by name). InputError for unknown class names or values outside (0, 1)."""
    return resolve_thresholds(options.threshold, {c.name: c.threshold for c in meta.classes},
                              [meta.class_names[i] for i in meta.background])


def cleanup_for(options: PredictOptions, meta):
    """The clean-up of the polygons (``geoseg.cleanup.Cleanup``): the model's per-class defaults,
    replaced by ``--sieve``, ``--max-hole`` and ``--simplify`` (one value for every class, or some
    classes by name). InputError for unknown class names or negative values."""
    from geoseg.cleanup import SETTINGS, Cleanup, per_class

    return Cleanup(**{key: per_class(getattr(options, key), {c.name: getattr(c, key) for c in meta.classes},
                                     option, unit) for key, (option, unit) in SETTINGS.items()})


def parse_min_area(text: str | None) -> float | dict[str, float] | None:
    """``"4"`` -> 4.0 (every class); ``"building=10,water=200"`` -> {class: m²}."""
    from geoseg.cleanup import parse_per_class

    return parse_per_class(text, "--min-area")


def model_meta(model: str | os.PathLike | None):
    """The metadata of ``--model`` (None: the default), read without Keras (milliseconds)."""
    from geoseg.models.bundle import read_meta, resolve_model

    return read_meta(resolve_model(None if model is None else str(model)))


def check_scene_for(info: SceneInfo, meta, options: PredictOptions) -> None:
    """Everything about the scene and the options that can be checked without the model, so that a
    mistake is an error in a second, before Keras loads: the band count, the tiling (tile size and
    overlap against the model's size multiple), the working grid and zooms."""
    if len(info.bands) != len(meta.bands) and len(info.bands) != 1:
        match_bands(info, meta.bands)  # raises, naming --bands
    tiling_for(info, meta, options)
    grids_for(info, meta, options, quiet=True)


def load_model_for(model: str | os.PathLike | None, options: PredictOptions):
    """Resolve ``--model`` (None: the default) and load it with the requested precision."""
    from geoseg.models.bundle import load_bundle, resolve_model

    return load_bundle(resolve_model(None if model is None else str(model)), precision=options.precision)


def streams_rows(info: SceneInfo, meta, options: PredictOptions) -> bool:
    """Whether ``segment`` can hand its strips on as it finishes them (``on_rows``): a scene of one
    column chunk (``options.chunk_width``) that the model reads on its own grid."""
    if len(column_chunks(info.width, options.chunk_width)) != 1:
        return False
    grids = grids_for(info, meta, options, quiet=True)
    return len(grids) == 1 and grids[0][1] is info


def segment(
    info: SceneInfo,
    bundle,
    out_dir: str | os.PathLike,
    *,
    options: PredictOptions = PredictOptions(),
    probs: bool = False,
    progress: Progress | None = None,
    timings: dict[str, float] | None = None,
    on_rows: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
) -> Segmentation:
    """Run ``bundle`` over the scene and write class, score (and probability) rasters into ``out_dir``.

    The rasters are plain tiled GeoTIFFs on the scene's grid; callers turn them into COGs, polygons
    or metrics. Memory is bounded by one tile of rows, whatever the scene's size. ``on_rows`` also
    gets every finished strip (:class:`RasterSinks`); only for a scene of one column chunk on its own
    grid (:func:`streams_rows`), where strips come full width and in order.
    """
    check_options(options)
    meta = bundle.meta
    if on_rows is not None and not streams_rows(info, meta, options):
        raise ValueError("on_rows needs a scene of one column chunk on its own grid (see streams_rows)")
    grids = grids_for(info, meta, options)
    if len(grids) > 1:
        from geoseg.scales import segment_scales

        return segment_scales(info, grids, bundle, Path(out_dir), merge=scales_for(options, meta)[1],
                              options=options, probs=probs, progress=progress,
                              timings=timings if timings is not None else {})
    work = grids[0][1]
    if work is not info:
        out_dir = Path(out_dir)
        (out_dir / "work").mkdir(exist_ok=True)
        seg = segment(work, bundle, out_dir / "work", options=dataclasses.replace(options, gsd="native", scales=(1.0,)),
                      probs=probs, progress=progress, timings=timings)
        back = resample_to_scene(seg, info, out_dir, classes=len(meta.classes), chunk_width=options.chunk_width)
        return dataclasses.replace(back, work_gsd=seg.info.gsd)
    tile_size, overlap = tiling_for(info, meta, options)
    sinks = RasterSinks(info, classes=len(meta.classes), scratch=Path(out_dir), probs=probs, on_rows=on_rows)
    try:
        tiles = run_model(info, bundle, tile_size=tile_size, overlap=overlap, options=options,
                          sink=sinks, progress=progress, timings=timings, probs=probs)
    finally:
        sinks.close(complete=sys.exc_info()[0] is None)  # failed or interrupted: no noise about scratch
    if tiles["skipped"] == tiles["total"]:
        log.warning("%s has no valid pixels (all nodata); the outputs are empty", info.path)
    return Segmentation(
        info=info, class_path=sinks.class_path, score_path=sinks.score_path, probs_path=sinks.probs_path,
        tiles=tiles, tile_size=tile_size, overlap=overlap,
        pixels={name: int(n) for name, n in zip(meta.class_names, sinks.counts)},
    )


def predict(
    scene: str | os.PathLike,
    output: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    raster_out: str | os.PathLike | None = None,
    probs_out: str | os.PathLike | None = None,
    options: PredictOptions = PredictOptions(),
    overwrite: bool = False,
    progress: Progress | None = None,
    bundle=None,
    regularize: bool = False,
    centerlines: bool | None = None,
    centerline_options=None,
    aoi: str | os.PathLike | None = None,
    preview: str | os.PathLike | None = None,
) -> PredictResult:
    """Segment ``scene`` and write the GeoPackage ``output`` (and optional rasters), all or nothing.
    ``regularize``: straight, right-angled outlines for the ``building`` class (``geoseg.regularize``).
    ``centerlines``: a ``road_centerline`` line layer too (``geoseg.centrelines``; None: when the model
    has a class named ``centerline_options.class_name``, default ``road``). ``aoi``: polygons (any
    vector file, any CRS) outside which nothing is written (``geoseg.aoi``); the outputs cover their
    bounding box. ``preview``: a PNG quick look of the classes over the scene (``geoseg.preview``)."""
    from geoseg import centrelines as roads
    from geoseg import outputs, polygons
    from geoseg.zooms import zoom_text

    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    check_options(options)
    if Path(output).suffix.lower() != ".gpkg":
        raise InputError(f"-o {output}: the polygon output must be a GeoPackage ending in .gpkg")
    for path, what in ((raster_out, "--raster-out"), (probs_out, "--probs-out")):
        if path is not None and Path(path).suffix.lower() not in (".tif", ".tiff"):
            raise InputError(f"{what} {path}: raster outputs are GeoTIFFs; use a name ending in .tif")
    if preview is not None and Path(preview).suffix.lower() != ".png":
        raise InputError(f"--preview {preview}: the quick look is a PNG; use a name ending in .png")
    info = open_scene(scene, bands=options.bands, assume_crs=options.assume_crs)
    if aoi is not None:
        from geoseg.aoi import restrict

        info = restrict(info, aoi)
    # Fail on outputs before any heavy work: none is an input, and this run is their only writer.
    inputs = {"SCENE": scene, "--aoi": aoi, "--model": model if model is not None and Path(str(model)).is_file() else None}
    with claim_outputs({"-o": output, "--raster-out": raster_out, "--probs-out": probs_out, "--preview": preview},
                       inputs=inputs, overwrite=overwrite):
        own_model = bundle is None
        meta = bundle.meta if bundle is not None else model_meta(model)  # no Keras yet: check everything first
        class_names = list(meta.class_names)
        colors = list(meta.colors)
        min_area = min_areas(options, meta)
        cleanup = cleanup_for(options, meta)
        threshold = thresholds(options, meta)
        if regularize:
            building_class(class_names)
        line_options = centerline_options or roads.CentrelineOptions()
        if centerlines is not False:
            line_options.check()
        if centerlines:
            roads.road_class(class_names, line_options.class_name, required=True)
        check_scene_for(info, meta, options)
        if own_model:
            bundle = load_model_for(model, options)
        timings["load"] = round(time.perf_counter() - t_start, 3)
        scene_hash = Background(sha256_or_blank, info.path)  # the scene's checksum, read while the model runs
        t0 = time.perf_counter()
        warm_up(bundle, info, options)
        timings["trace"] = round(time.perf_counter() - t0, 3)
        with Staging(overwrite=overwrite) as staging:
            gpkg_tmp = staging.output(output)
            raster_tmp = staging.output(raster_out) if raster_out else None
            probs_tmp = staging.output(probs_out) if probs_out else None
            kept = [name for i, name in enumerate(class_names) if i not in set(meta.background)]

            how = dict(class_names=class_names, skip=set(meta.background), score_scale=1.0 / SCORE_SCALE,
                       min_area_m2=min_area, cleanup=cleanup)

            def write_polygons(batches, pixel: float) -> dict:
                """Write polygons.iter_polygons batches to the GeoPackage; {layer: (count, area)}."""
                if regularize:
                    batches = polygons.regularize_batches(batches, class_id=building_class(class_names), pixel=pixel)
                return outputs.write_polygon_stream(
                    gpkg_tmp, batches, class_names=class_names, layers=kept, crs=info.crs,
                    colors={name: tuple(c) for name, c in zip(class_names, colors)},
                    columns={"building": polygons.REGULARIZE_COLUMNS} if regularize else None,
                )

            # A scene of one column chunk is polygonized beside the model, strip by strip as the blender
            # finishes them (LiveRows); otherwise from the class raster once the model is done.
            live = LiveRows(info) if options.polygonize == "live" and streams_rows(info, meta, options) else None
            live_polygons = None
            if live is not None:
                def polygonize_live():
                    error = None
                    try:
                        return write_polygons(polygons.iter_polygons_of(live.rows(), **how), abs(info.transform.a))
                    except BaseException as exc:
                        error = exc
                        raise
                    finally:
                        live.reader_finished(error)

                live_polygons = Background(polygonize_live)
            try:
                seg = segment(info, bundle, staging.scratch(output), options=options, probs=probs_out is not None,
                              progress=progress, timings=timings, on_rows=live.add if live else None)
            except BaseException:
                if live is not None:
                    live.stop()
                    try:
                        live_polygons.result()
                    except BaseException:  # noqa: S110 - the segmenting error is the one to report
                        pass
                raise
            if own_model:  # polygonizing does not need the model: give its memory back first
                bundle = dataclasses.replace(bundle, model=None)
                release_keras()

            t0 = time.perf_counter()
            if live_polygons is not None:
                totals = live_polygons.result()
            else:
                # the outlines' detail is the model's pixel when the scene was read resampled
                coarser = max(1.0, (seg.work_gsd or info.gsd) / info.gsd)
                totals = write_polygons(polygons.iter_polygons(seg.class_path, score_path=seg.score_path, **how),
                                        abs(info.transform.a) * coarser)
            timings["polygonize"] = round(time.perf_counter() - t0, 3)  # after the model (live: what was left)
            run_meta = {
                "geoseg_version": geoseg.__version__,
                "model_name": meta.name,
                "model_sha256": bundle.sha256,
                "model_path": str(bundle.path),
                "scene": str(Path(info.path).resolve()),
                "scene_sha256": scene_hash.result(),
                **({"aoi": str(Path(aoi).resolve()), "aoi_window": f"rows {info.row_off}-{info.row_off + info.height}, "
                    f"columns {info.col_off}-{info.col_off + info.width} of the scene"} if aoi is not None else {}),
                "tile_size": str(seg.tile_size),
                "overlap": str(seg.overlap),
                "batch_size": str(options.batch_size),
                "blend": options.blend,
                "precision": bundle.precision,
                "tta": options.tta,
                "scales": zoom_text(seg.scales),
                **({"scale_merge": scales_for(options, meta)[1]} if len(seg.scales) > 1 else {}),
                "threshold": ",".join(f"{k}={v:g}" for k, v in threshold.items()),
                "regularize": str(regularize).lower(),
                "min_area_m2": ",".join(f"{k}={v:g}" for k, v in min_area.items()),
                **cleanup.metadata(class_names),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            outputs.add_run_metadata(gpkg_tmp, run_meta)
            t0 = time.perf_counter()
            lines = roads.write_centreline_layer(gpkg_tmp, seg.class_path, class_names=class_names,
                                                 colors={name: tuple(c) for name, c in zip(class_names, colors)},
                                                 enabled=centerlines, options=line_options)
            if lines:
                timings["centerlines"] = round(time.perf_counter() - t0, 3)
            t0 = time.perf_counter()
            if raster_tmp:
                outputs.write_cog(
                    seg.class_path,
                    raster_tmp,
                    colormap=outputs.class_colormap(colors, nodata=CLASS_NODATA),
                    band_descriptions=["class"],
                    tags={**run_meta, "class_names": ",".join(class_names)},
                )
                outputs.write_raster_qml(raster_tmp.with_suffix(".qml"), class_names=class_names, colors=colors,
                                         transparent=set(meta.background))
            if probs_tmp:
                outputs.write_cog(
                    seg.probs_path,
                    probs_tmp,
                    band_descriptions=[f"p_{name}" for name in class_names],
                    tags=run_meta,
                    resampling="average",
                )
            timings["write"] = round(time.perf_counter() - t0, 3)
            if preview is not None:
                from geoseg.preview import write_preview

                t0 = time.perf_counter()
                write_preview(staging.output(preview), info.path, seg.class_path, class_names=class_names, colors=colors,
                              hidden=set(meta.background), nodata=CLASS_NODATA, bands=info.bands, gsd_m=info.gsd)
                timings["preview"] = round(time.perf_counter() - t0, 3)
            staging.commit()

    timings["total"] = round(time.perf_counter() - t_start, 3)
    outs = {"gpkg": str(output)}
    if raster_out:
        outs["raster"] = str(raster_out)
    if probs_out:
        outs["probs"] = str(probs_out)
    if preview:
        outs["preview"] = str(preview)
    return PredictResult(
        scene=str(info.path),
        model_gsd_m=bundle.meta.gsd,
        outputs=outs,
        model={"name": meta.name, "sha256": bundle.sha256, "path": str(bundle.path), "precision": bundle.precision},
        crs=info.crs.to_string(),
        gsd_m=round(info.gsd, 6),
        width=info.width,
        height=info.height,
        tiles=seg.tiles,
        counts={name: n for name, (n, _) in totals.items()},
        area_m2={name: round(area, 3) for name, (_, area) in totals.items()},
        pixels=seg.pixels,
        timings_s=timings,
        centerlines=lines,
        aoi=str(aoi) if aoi is not None else None,
    )
