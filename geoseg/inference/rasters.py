"""The rasters a run writes on the scene's grid: class ids, score and probabilities as tiled
GeoTIFFs in a scratch folder (``RasterSinks``), what they hold (``Segmentation``), and the warp
back onto the scene's grid of a run made on a resampled grid."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

from geoseg.tiling.blend import Strip
from geoseg.inference.grids import column_chunks
from geoseg.io.scene import SceneInfo, SceneReader


CLASS_NODATA = 255


SCORE_SCALE = 65535


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
        from geoseg.io.outputs import SCRATCH_COMPRESS, TiledTiffWriter

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
        """The zooms the model ran at (``geoseg.inference.scales``); [1.0] for one run."""
        return self.tiles.get("scales", [1.0])


@contextlib.contextmanager
def on_scene_grid(info: SceneInfo, sources: Sequence[tuple[Path, str, bool]]) -> Iterator[list]:
    """Open each ``(path, resampling, warp)`` of ``sources`` as read on the scene's grid: through a
    WarpedVRT with that resampling ("nearest", "bilinear") where ``warp``, as it is otherwise.
    The one warp-back: :func:`resample_to_scene` and the zoom merge (``inference.scales``) read
    their runs onto the scene through it, window by window (:func:`scene_windows`)."""
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    grid = dict(crs=info.crs, transform=info.transform, width=info.width, height=info.height)
    handles, readers = [], []
    try:
        for path, resampling, warp in sources:
            f = rasterio.open(path)
            handles.append(f)
            if warp:
                f = WarpedVRT(f, resampling=Resampling[resampling], **grid)
                handles.append(f)
            readers.append(f)
        yield readers
    finally:
        for handle in reversed(handles):
            handle.close()


def scene_windows(info: SceneInfo, reader: SceneReader, *, chunk_width: int, rows: int,
                  ) -> Iterator[tuple[int, int, Window, np.ndarray]]:
    """``(first row, first column, window, valid)`` over the scene's grid, column chunk by column
    chunk, ``rows`` rows at a time, with the scene's own valid mask of the window."""
    for a, b in column_chunks(info.width, chunk_width):
        for r0 in range(0, info.height, rows):
            r1 = min(r0 + rows, info.height)
            yield r0, a, Window(a, r0, b - a, r1 - r0), reader.read_valid(r0, r1, a, b)


def resample_to_scene(work: Segmentation, info: SceneInfo, out_dir: Path, *, classes: int,
                      chunk_width: int) -> Segmentation:
    """Warp rasters made on a resampled grid back onto the scene's own grid, window by window.

    Classes and scores use nearest neighbour, probabilities bilinear; the scene's own nodata mask
    is applied at full resolution.
    """
    sinks = RasterSinks(info, classes=classes, scratch=out_dir, probs=work.probs_path is not None)
    sources = [(work.class_path, "nearest", True), (work.score_path, "nearest", True)]
    if work.probs_path:
        sources.append((work.probs_path, "bilinear", True))
    try:
        with on_scene_grid(info, sources) as vrts, SceneReader(info) as reader:
            for r0, a, win, valid in scene_windows(info, reader, chunk_width=chunk_width, rows=512):
                cls = vrts[0].read(1, window=win)
                valid &= cls != CLASS_NODATA
                cls[~valid] = CLASS_NODATA
                score = np.where(valid, vrts[1].read(1, window=win), 0).astype(np.uint16)
                probs = np.where(valid, vrts[2].read(window=win), 0).astype(np.float32) if work.probs_path else None
                sinks.write(r0, a, cls, score, probs, valid)
    finally:
        sinks.close(complete=sys.exc_info()[0] is None)  # failed or interrupted: no noise about scratch
    return dataclasses.replace(
        work, info=info, class_path=sinks.class_path, score_path=sinks.score_path, probs_path=sinks.probs_path,
        pixels={name: int(n) for name, n in zip(work.pixels, sinks.counts)},
    )
