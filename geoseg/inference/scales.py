"""Multi-scale inference: the model run at several zooms of its working grid, the probabilities
merged on the scene's grid.

The working grid is where the model runs with one zoom (``grids.working_grid``: the scene's own
pixels, or the scene resampled to the model's GSD). A zoom of 2 reads the scene at pixels half that
size, so the model sees every object twice as large; 0.5 at pixels twice the size. Each zoom is a
full run of the tiles-batches-blend pipeline on its own grid, with its probabilities kept; the runs
are then read back onto the scene's grid (bilinear) window by window and merged:

- ``max``: every non-background class takes its highest probability over the zooms and every
  background class its lowest, renormalised (with two classes: the building probability is the
  highest any zoom gave). Something found at any zoom counts.
- ``mean``: the average of the zooms' probabilities.

The class of each pixel is then taken from the merged probabilities with the decision thresholds,
as for one zoom. A zoom above 1 never reads finer than the scene's own pixels: upsampling invents
no detail, it only costs time, so such a zoom is read at the scene's pixels, and dropped when that
is not at least 10 % finer than the working grid (a 1 m satellite scene already read at a 0.3 m
model's GSD runs at zoom 1 only).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from geoseg.tiling.blend import argmax_classes, decision_bias
from geoseg.inference.engine import segment_grid
from geoseg.inference.grids import plan_chunks, tiling_for, working_grid
from geoseg.inference.options import PredictOptions, Progress, thresholds
from geoseg.inference.rasters import CLASS_NODATA, SCORE_SCALE, RasterSinks, Segmentation, on_scene_grid, scene_windows
from geoseg.io.scene import SceneInfo, SceneReader, at_gsd

log = logging.getLogger(__name__)

MIN_GAIN = 1.1  # a zoom's grid must be at least this much finer (or coarser) than another's to run


def scale_grids(info: SceneInfo, work: SceneInfo, scales: Sequence[float], *,
                quiet: bool = False) -> list[tuple[float, SceneInfo]]:
    """``(zoom, grid)`` for each zoom that runs, zoom 1 first: ``work`` itself for zoom 1, the scene
    resampled to ``work.gsd / zoom`` otherwise (a zoom above 1 no finer than the scene's own
    pixels; dropped when that leaves it within ``MIN_GAIN`` of a grid already taken)."""
    grids: list[tuple[float, SceneInfo]] = [(1.0, work)]
    for zoom in sorted(s for s in scales if s != 1.0):
        target = work.gsd / zoom
        if zoom > 1 and target < info.gsd:
            target = info.gsd
        near = next((z for z, g in grids if max(target, g.gsd) / min(target, g.gsd) < MIN_GAIN), None)
        if zoom > 1 and target * MIN_GAIN > work.gsd:
            if not quiet:
                log.info("zoom %g left out: %s has %.3g m pixels, not finer than the %.3g m the model reads it at; "
                         "a zoom never reads finer than the scene's own pixels", zoom, Path(info.path).name,
                         info.gsd, work.gsd)
            continue
        if near is not None:
            if not quiet:
                log.info("zoom %g left out: zoom %g already reads %s at nearly that pixel size (%.3g m)",
                         zoom, near, Path(info.path).name, target)
            continue
        own = abs(target - info.gsd) <= 1e-9 * info.gsd and not info.resampled
        grids.append((zoom, info if own else at_gsd(info, target)))
    return grids


def merge_probs(stack: np.ndarray, covered: np.ndarray, merge: str, background: Sequence[int]) -> np.ndarray:
    """Merge per-zoom probabilities ``stack`` (zooms, classes, rows, cols) where each zoom ``covered``
    (zooms, rows, cols) a pixel; (classes, rows, cols), 0 where no zoom did."""
    cover = covered[:, None]
    if merge == "mean":
        n = covered.sum(axis=0, dtype=np.float32)
        out = np.where(cover, stack, 0).sum(axis=0) / np.maximum(n, 1)
        return out.astype(np.float32, copy=False)
    if merge != "max":
        raise ValueError(f"unknown merge {merge!r}")
    out = np.where(cover, stack, -np.inf).max(axis=0)
    for b in background:
        out[b] = np.where(covered, stack[:, b], np.inf).min(axis=0)
    out[:, ~covered.any(axis=0)] = 0
    total = out.sum(axis=0)
    out /= np.where(total > 0, total, 1)
    return out.astype(np.float32, copy=False)


def decide(probs: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """The class of each pixel from probabilities (classes, rows, cols) and the decision thresholds'
    logit offsets (``blend.decision_bias``): the class with the largest ``log(p) + bias``."""
    x = np.moveaxis(probs, 0, -1)
    if bias is not None:
        x = np.log(np.maximum(x, 1e-30)) + bias
    return argmax_classes(x)[0]


def _tile_total(grid: SceneInfo, meta, options: PredictOptions) -> int:
    return sum(map(len, plan_chunks(grid, *tiling_for(grid, meta, options), options.chunk_width)[1]))


def segment_scales(
    info: SceneInfo,
    grids: list[tuple[float, SceneInfo]],
    bundle,
    out_dir: Path,
    *,
    merge: str,
    options: PredictOptions,
    probs: bool,
    progress: Progress | None,
    timings: dict[str, float],
) -> Segmentation:
    """Run ``bundle`` on each grid of :func:`scale_grids` and merge the runs on the scene's grid
    (class, score and, with ``probs``, probability rasters in ``out_dir``, as ``segment.segment``)."""
    meta = bundle.meta
    totals = [_tile_total(g, meta, options) for _, g in grids]
    runs = []
    one = dataclasses.replace(options, gsd="native", scales=(1.0,))
    for i, (zoom, grid) in enumerate(grids):
        offset = sum(totals[:i])

        def report(done: int, _total: int, offset: int = offset) -> None:
            progress(offset + done, sum(totals))

        log.info("zoom %g: reading %s at %.3g m", zoom, Path(info.path).name, grid.gsd)
        sub = Path(out_dir) / f"zoom{i}"
        sub.mkdir(exist_ok=True)
        run_timings: dict[str, float] = {}
        working_grid(grid, meta, "native", force=options.force)  # a zoom far outside the model's GSDs: error or warning
        runs.append(segment_grid(grid, bundle, sub, options=one, probs=True, progress=report if progress else None,
                                 timings=run_timings))
        for key, value in run_timings.items():
            timings[key] = round(timings.get(key, 0.0) + value, 3)
    t0 = time.perf_counter()
    merged = merge_to_scene(runs, info, Path(out_dir), merge=merge, background=meta.background,
                            thresholds=_thresholds(options, meta), probs=probs, chunk_width=options.chunk_width)
    timings["merge"] = round(time.perf_counter() - t0, 3)
    tiles = {key: sum(r.tiles[key] for r in runs) for key in ("total", "skipped", "run")}
    tiles = {**runs[0].tiles, **tiles, "scales": [zoom for zoom, _ in grids]}
    finest = min(r.info.gsd for r in runs)
    return dataclasses.replace(merged, tiles=tiles, tile_size=runs[0].tile_size, overlap=runs[0].overlap,
                               work_gsd=finest if finest != info.gsd else None)


def _thresholds(options: PredictOptions, meta) -> list[float]:
    return list(thresholds(options, meta).values())


def merge_to_scene(runs: list[Segmentation], info: SceneInfo, out_dir: Path, *, merge: str,
                   background: Sequence[int], thresholds: Sequence[float], probs: bool,
                   chunk_width: int, rows: int = 256) -> Segmentation:
    """Read every run's probabilities onto the scene's grid (bilinear; coverage from its class
    raster, nearest) window by window, merge them and write class, score (and probability) rasters.
    The scene's own nodata mask is applied at full resolution."""
    classes = len(thresholds)
    bias = decision_bias(list(thresholds))
    sinks = RasterSinks(info, classes=classes, scratch=out_dir, probs=probs)
    # per run its class raster (coverage, nearest) and its probabilities (bilinear), on the scene's grid
    sources = [(path, resampling, run.info is not info) for run in runs
               for path, resampling in ((run.class_path, "nearest"), (run.probs_path, "bilinear"))]
    try:
        with on_scene_grid(info, sources) as readers, SceneReader(info) as reader:
            pairs = list(zip(readers[0::2], readers[1::2]))
            for r0, a, win, valid in scene_windows(info, reader, chunk_width=chunk_width, rows=rows):
                covered = np.stack([cls.read(1, window=win) != CLASS_NODATA for cls, _ in pairs])
                stack = np.stack([p.read(window=win) for _, p in pairs])
                valid &= covered.any(axis=0)
                merged = merge_probs(stack, covered & valid, merge, background)
                cls = decide(merged, bias)
                cls[~valid] = CLASS_NODATA
                win_p = np.take_along_axis(merged, np.minimum(cls, classes - 1)[None], 0)[0]
                score = np.where(valid, np.clip(np.rint(win_p * SCORE_SCALE), 1, SCORE_SCALE), 0).astype(np.uint16)
                sinks.write(r0, a, cls, score, merged if probs else None, valid)
    finally:
        sinks.close(complete=sys.exc_info()[0] is None)  # failed or interrupted: no noise about scratch
    return Segmentation(info=info, class_path=sinks.class_path, score_path=sinks.score_path,
                        probs_path=sinks.probs_path, tiles={}, tile_size=0, overlap=0,
                        pixels={name: int(n) for name, n in zip(runs[0].pixels, sinks.counts)})
