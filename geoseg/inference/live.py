"""Polygonizing beside the model (``--polygonize live``): the class and score rows handed from
the blender's thread to a polygonizer in another, as they are finished."""

from __future__ import annotations

import threading

import numpy as np

from geoseg.inference.rasters import CLASS_NODATA
from geoseg.io.scene import SceneInfo


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
        """The :class:`geoseg.vector.polygons.RasterRows` the polygonizer reads."""
        from pyproj import CRS

        from geoseg.vector.polygons import RasterRows

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
