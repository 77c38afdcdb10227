"""Which grid the model runs on and how it is cut: band matching, the working grid (the scene's
own pixels or the scene resampled to the model's GSD), tile size and overlap, column chunks, and
the value stretch of a scene whose data type differs from the training imagery's."""

from __future__ import annotations

import logging
from pathlib import Path

from geoseg.errors import InputError
from geoseg.inference.options import STRETCHES, PredictOptions
from geoseg.io.scene import SceneInfo, at_gsd
from geoseg.tiling.tiles import TilePlan, check_tiling, tile_plan

log = logging.getLogger(__name__)


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


def tiling_for(info: SceneInfo, meta, options: PredictOptions) -> tuple[int, int]:
    """Tile size and overlap for ``info``: the options', else the model's, shrunk for a small scene."""
    return effective_tiling(
        info,
        tile_size=options.tile_size or meta.tile_size,
        overlap=meta.overlap if options.overlap is None else options.overlap,
        multiple=meta.size_multiple,
    )


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


def value_stretch(info: SceneInfo, meta, mode: str = "auto") -> tuple[float, float] | None:
    """``(scale, offset)`` mapping the scene's pixel values onto the range the model was trained on.

    With ``auto`` this happens only when the scene's data type differs from the training imagery's
    (for example 11-bit WorldView data in uint16 on a model trained on uint8 photos): the scene's
    2nd-98th percentiles are mapped linearly onto the training data's. ``none`` feeds values as they are.
    """
    if mode not in STRETCHES:
        raise InputError(f"--stretch {mode!r} must be auto or none")
    if mode == "none" or not meta.value_range or not meta.dtype or info.dtype == meta.dtype:
        return None
    from geoseg.io.scene import value_percentiles

    lo, hi = value_percentiles(info)
    tlo, thi = meta.value_range
    scale = (thi - tlo) / (hi - lo)
    log.info("%s is %s, the model was trained on %s: stretching values %.4g-%.4g onto %.4g-%.4g (--stretch none to turn off)",
             Path(info.path).name, info.dtype, meta.dtype, lo, hi, tlo, thi)
    return (scale, tlo - lo * scale)
