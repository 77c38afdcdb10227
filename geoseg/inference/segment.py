"""``segment``: a model over a scene, whatever grid or zooms it runs at; class, score (and
probability) rasters on the scene's grid. One grid runs through ``engine``; a resampled grid is
warped back (``rasters.resample_to_scene``); several zooms run and merge in ``scales``."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from geoseg.inference.engine import predict_fn, segment_grid
from geoseg.inference.grids import column_chunks, match_bands, tiling_for, working_grid
from geoseg.inference.options import PredictOptions, Progress, check_options, scales_for
from geoseg.inference.rasters import Segmentation, resample_to_scene
from geoseg.inference.scales import scale_grids, segment_scales
from geoseg.io.scene import SceneInfo


def grids_for(info: SceneInfo, meta, options: PredictOptions, *, quiet: bool = False) -> list[tuple[float, SceneInfo]]:
    """``(zoom, grid)`` for each run of the model over ``info``: one, on the working grid, unless
    the options or the model ask for more zooms (``scales.scale_grids``)."""
    work = working_grid(info, meta, options.gsd, quiet=quiet, force=options.force)
    scales, _ = scales_for(options, meta)
    return scale_grids(info, work, scales, quiet=quiet) if len(scales) > 1 else [(1.0, work)]


def streams_rows(info: SceneInfo, meta, options: PredictOptions) -> bool:
    """Whether ``segment`` can hand its strips on as it finishes them (``on_rows``): a scene of one
    column chunk (``options.chunk_width``) that the model reads on its own grid."""
    if len(column_chunks(info.width, options.chunk_width)) != 1:
        return False
    grids = grids_for(info, meta, options, quiet=True)
    return len(grids) == 1 and grids[0][1] is info


def check_scene_for(info: SceneInfo, meta, options: PredictOptions) -> None:
    """Everything about the scene and the options that can be checked without the model, so that a
    mistake is an error in a second, before Keras loads: the band count, the tiling (tile size and
    overlap against the model's size multiple), the working grid and zooms."""
    if len(info.bands) != len(meta.bands) and len(info.bands) != 1:
        match_bands(info, meta.bands)  # raises, naming --bands
    tiling_for(info, meta, options)
    grids_for(info, meta, options, quiet=True)


def warm_up(bundle, info: SceneInfo, options: PredictOptions) -> None:
    """Trace the model's ``tf.function`` (:func:`engine.predict_fn`) for every batch shape ``segment`` will
    feed it on ``info``, so that the one-time graph trace (about 1 s for the default model) is part of
    setting the model up, not of its first batch. Nothing for models that run through
    ``predict_on_batch`` (other backends, stand-ins)."""
    model = bundle.model
    fn = predict_fn(model)
    if fn == getattr(model, "predict_on_batch", None):
        return
    shapes = {tiling_for(grid, bundle.meta, options)[0] for _, grid in grids_for(info, bundle.meta, options, quiet=True)}
    for size in sorted(shapes):
        fn(np.zeros((options.batch_size, size, size, len(bundle.meta.bands)), np.float32))


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
        return segment_scales(info, grids, bundle, Path(out_dir), merge=scales_for(options, meta)[1],
                              options=options, probs=probs, progress=progress,
                              timings=timings if timings is not None else {})
    work = grids[0][1]
    if work is not info:
        out_dir = Path(out_dir)
        (out_dir / "work").mkdir(exist_ok=True)
        seg = segment_grid(work, bundle, out_dir / "work", options=options, probs=probs, progress=progress,
                           timings=timings)
        back = resample_to_scene(seg, info, out_dir, classes=len(meta.classes), chunk_width=options.chunk_width)
        return dataclasses.replace(back, work_gsd=seg.info.gsd)
    return segment_grid(info, bundle, out_dir, options=options, probs=probs, progress=progress, timings=timings,
                        on_rows=on_rows)
