"""The model over one grid: batches in, forward passes (with test-time augmentation), logits
blended strip by strip behind the model, finished strips handed to the raster writers."""

from __future__ import annotations

import logging
import os
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from geoseg.tiling.blend import Strip, StripAccumulator, decision_bias, weight_window
from geoseg.inference.batches import Skips, iter_batches
from geoseg.inference.grids import match_bands, plan_chunks, tiling_for, value_stretch
from geoseg.inference.options import TTA, PredictOptions, Progress, thresholds
from geoseg.inference.rasters import CLASS_NODATA, RasterSinks, Segmentation
from geoseg.io.scene import SceneInfo
from geoseg.threads import Behind, prefetch

log = logging.getLogger(__name__)


_PREDICT_FNS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def predict_fn(model) -> Callable[[np.ndarray], Any]:
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


def forward(model, x: np.ndarray, tta: str = "none") -> np.ndarray:
    """Logits (B, H, W, classes) float32 of ``model`` on ``x`` (B, H, W, bands), averaged over the
    flips and turns of ``tta`` (square tiles; each view is one more forward pass)."""
    views = TTA[tta]
    predict_on_batch = predict_fn(model)
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


def segment_grid(
    info: SceneInfo,
    bundle,
    out_dir: str | os.PathLike,
    *,
    options: PredictOptions,
    probs: bool = False,
    progress: Progress | None = None,
    timings: dict[str, float] | None = None,
    on_rows: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
) -> Segmentation:
    """Run ``bundle`` over ``info`` on its own grid, as it is (no resampling, one zoom): class, score
    (and with ``probs`` probability) rasters in ``out_dir``; ``on_rows`` also gets each finished
    strip (``RasterSinks``). ``segment`` is the entry point that chooses the grid and the zooms."""
    meta = bundle.meta
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
