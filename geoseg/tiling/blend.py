"""Blend overlapping tile logits into seamless strips of rows, with bounded memory.

Each tile's logits are multiplied by a weight window and added into an accumulator that holds only
``tile_size`` rows of the scene. Tiles arrive in row-major order, so when a tile starting at row
``r`` arrives, every row above ``r`` is finished: those rows are normalised (weighted sum divided by
weight sum), turned into classes and probabilities, handed to the sink, and dropped. Peak memory is
about ``tile_size x width x classes`` floats, whatever the scene's height.

Windows (``weight_window``):

- ``cosine`` (default): 1 in the tile's middle, a raised-cosine taper over the ``overlap`` pixels
  at each edge. It never reaches zero, so every pixel covered by a tile gets some weight.
- ``gaussian``: centred Gaussian with sigma = size / 8, floored at 1e-4.
- ``mean``: all ones (plain averaging of overlaps).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from geoseg.errors import InputError
from geoseg.tiling.tiles import Tile

WINDOWS = ("cosine", "gaussian", "mean")


def _taper(size: int, overlap: int) -> np.ndarray:
    d = np.minimum(np.arange(size), np.arange(size)[::-1]) + 0.5  # distance to the nearer edge
    if overlap <= 0:
        return np.ones(size)
    return np.where(d < overlap, 0.5 - 0.5 * np.cos(np.pi * d / overlap), 1.0)


def weight_window(size: int, *, kind: str = "cosine", overlap: int = 0) -> np.ndarray:
    """A ``(size, size)`` float32 weight window, strictly positive everywhere."""
    if kind == "cosine":
        w1 = _taper(size, overlap)
    elif kind == "gaussian":
        x = np.arange(size) + 0.5 - size / 2.0
        w1 = np.exp(-0.5 * (x / (size / 8.0)) ** 2)
    elif kind == "mean":
        w1 = np.ones(size)
    else:
        raise InputError(f"--blend {kind!r} is not a weight window; choose one of {', '.join(WINDOWS)}")
    w = np.outer(w1, w1)
    return np.maximum(w / w.max(), 1e-4).astype(np.float32)


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    z = logits - logits.max(axis=axis, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=axis, keepdims=True)
    return z


# Reductions over a short last axis (the classes) are slow in numpy (a strided inner loop of a few
# elements per pixel); one whole-array operation per class is 4-5x faster for the class counts of
# segmentation models. Same results: ties go to the first class, as with np.argmax.
def argmax_classes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(argmax, max)`` over the last axis of ``x`` (..., classes)."""
    best = x[..., 0].copy()
    index = np.zeros(best.shape, dtype=np.uint8)
    for k in range(1, x.shape[-1]):
        better = x[..., k] > best
        index[better] = k
        np.maximum(best, x[..., k], out=best)
    return index, best


def decision_bias(thresholds: Sequence[float]) -> np.ndarray | None:
    """Per-class offsets added to the logits before the argmax, from per-class decision thresholds
    (None when every threshold is 0.5: the plain most-probable class).

    Class c gets ``log((1 - t_c) / t_c)``: it then wins against another class k wherever
    ``p_c / p_k >= t_c / (1 - t_c)`` (both at 0.5 otherwise). With two classes that is exactly
    ``p_c >= t_c``. The probabilities written out are not changed, only the class taken.
    """
    t = np.asarray(thresholds, dtype=np.float64)
    if np.all(t == 0.5):
        return None
    return np.log((1 - t) / t).astype(np.float32)


def resolve_thresholds(given: float | Mapping[str, float] | None, defaults: Mapping[str, float],
                       background: Sequence[str] = ()) -> dict[str, float]:
    """Decision threshold per class: ``defaults`` (the model's), replaced by ``given``: some classes by
    name, or one number for every class but the ``background`` ones (``--threshold 0.3`` on a
    buildings model means building=0.3). InputError for unknown classes or values outside (0, 1)."""
    from geoseg.vector.cleanup import per_class

    if given is not None and not isinstance(given, Mapping):
        given = {name: given for name in defaults if name not in background}
    values = per_class(given, defaults, "--threshold", "probability")
    for name, value in values.items():
        if not 0 < value < 1:
            raise InputError(f"--threshold {name}={value:g}: give a probability between 0 and 1, e.g. {name}=0.3")
    return values


def decide_two(acc: np.ndarray, inv: np.ndarray, covered: np.ndarray,
               bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Class and score of a two-class weighted logit sum ``acc`` (..., 2) times ``inv`` (the
    reciprocal weight sum), without the full softmax: the class is 1 where ``z1 - z0`` beats the
    bias difference (ties go to class 0, as with ``argmax_classes``), and the score is
    ``sigmoid(±(z1 - z0))``, the softmax probability of the class taken; 0 where not ``covered``."""
    d = acc[..., 1] - acc[..., 0]
    d *= inv
    cut = 0.0 if bias is None else float(bias[0] - bias[1])
    ones = d > cut
    classes = ones.view(np.uint8).copy()
    np.negative(d, out=d, where=ones)  # -|d| for the class taken: score = 1 / (1 + exp(-(±d)))
    np.exp(d, out=d)
    d += 1
    np.reciprocal(d, out=d)
    d[~covered] = 0
    return classes, d


def softmax_classes(z: np.ndarray, zmax: np.ndarray) -> np.ndarray:
    """Softmax over the last axis of ``z`` (modified in place), given its maximum ``zmax``."""
    z -= zmax[..., None]
    np.exp(z, out=z)
    total = z[..., 0].copy()
    for k in range(1, z.shape[-1]):
        total += z[..., k]
    z /= total[..., None]
    return z


@dataclass(frozen=True)
class Strip:
    """Finished rows ``[row_off, row_off + rows)``, full width."""

    row_off: int
    col_off: int
    classes: np.ndarray  # (rows, cols) uint8, nodata where invalid
    probs: np.ndarray | None  # (rows, width, classes) float32, 0 where invalid; None unless asked for
    valid: np.ndarray  # (rows, width) bool
    score: np.ndarray | None = None  # (rows, width) float32: probability of the class taken, 0 where invalid

    @property
    def rows(self) -> int:
        return self.classes.shape[0]


class StripAccumulator:
    """Weighted sum of tile logits over a rolling band of ``tile_size`` rows.

    It covers columns ``[col_off, col_off + width)`` of the scene (the whole width by default);
    tiles reaching past those columns are clipped, so a wide scene can be blended as column chunks,
    each fed every tile that touches it. ``sink(strip)`` is called with each finished strip, top to
    bottom; ``finish()`` flushes the rest.
    """

    def __init__(
        self,
        *,
        height: int,
        width: int,
        classes: int,
        tile_size: int,
        window: np.ndarray,
        sink: Callable[[Strip], None],
        nodata: int = 255,
        flush_rows: int = 64,
        col_off: int = 0,
        bias: np.ndarray | None = None,
        probs: bool = True,
    ) -> None:
        if classes > 255 or nodata < classes:
            raise InputError(f"{classes} classes do not fit a uint8 class raster with nodata {nodata}")
        self.height, self.width, self.classes = height, width, classes
        self.col_off = col_off
        self.bias = bias  # decision_bias(): per-class logit offsets for the class taken, or None
        self.probs = probs  # strips carry every class's probability (else only the score of the class taken)
        self.rows = min(tile_size, height)
        self.window = window
        self.sink = sink
        self.nodata = nodata
        self.flush_rows = max(1, flush_rows)  # finished rows go out in slices this high (bounds temporaries)
        self.top = 0  # scene row held in buffer row 0
        self.acc = np.zeros((self.rows, width, classes), dtype=np.float32)
        self.wsum = np.zeros((self.rows, width), dtype=np.float32)
        self.valid = np.zeros((self.rows, width), dtype=bool)

    def add(self, tile: Tile, logits: np.ndarray, valid: np.ndarray) -> None:
        """Add one tile's ``(size, size, classes)`` logits and its ``(size, size)`` valid mask."""
        first = max(tile.row, 0)  # a crop's tile may start above it (tiling.plan_tiles(window=...))
        if first < self.top:
            raise ValueError(f"tile {tile.index} at row {tile.row} arrived after row {self.top} was flushed")
        if first > self.top:
            self._flush(first)
        skip = first - tile.row  # the tile's rows above the scene
        h = min(tile.row + tile.size, self.height) - first
        if h <= 0:
            return
        c0 = max(tile.col, self.col_off)  # scene columns of the tile inside this accumulator
        c1 = min(tile.col + tile.size, self.col_off + self.width)
        if c1 <= c0:
            return
        r0 = first - self.top
        rows, cols = slice(r0, r0 + h), slice(c0 - self.col_off, c1 - self.col_off)
        tr = slice(skip, skip + h)  # the same rows in the tile
        tc = slice(c0 - tile.col, c1 - tile.col)  # the same columns in the tile
        win = self.window[tr, tc]
        self.acc[rows, cols] += logits[tr, tc] * win[..., None]
        self.wsum[rows, cols] += win
        self.valid[rows, cols] |= valid[tr, tc]

    def _decide(self, z: np.ndarray, covered: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Classes, probabilities (None unless ``self.probs``) and score of normalised logits ``z``."""
        classes, zmax = argmax_classes(z)
        if self.bias is not None:
            classes = argmax_classes(z + self.bias)[0]
        probs = softmax_classes(z, zmax)
        score = np.take_along_axis(probs, classes[..., None], -1)[..., 0]
        score[~covered] = 0
        if not self.probs:
            return classes, None, score
        probs[~covered] = 0
        return classes, probs, score

    def finish(self) -> None:
        """Flush every remaining row."""
        self._flush(self.height)

    def _flush(self, upto: int) -> None:
        upto = min(upto, self.height)
        while self.top < upto:
            n = min(upto - self.top, self.rows)  # finished rows held in the buffer
            for s0 in range(0, n, self.flush_rows):  # handed out in slices (bounds temporaries)
                s1 = min(n, s0 + self.flush_rows)
                acc, wsum, valid = self.acc[s0:s1], self.wsum[s0:s1], self.valid[s0:s1]
                covered = valid & (wsum > 0)
                inv = np.reciprocal(np.where(covered, wsum, 1))
                if self.probs or self.classes != 2:
                    classes, probs, score = self._decide(acc * inv[..., None], covered)
                else:
                    classes, score = decide_two(acc, inv, covered, self.bias)
                    probs = None
                classes[~covered] = self.nodata
                self.sink(Strip(row_off=self.top + s0, col_off=self.col_off, classes=classes, probs=probs,
                                valid=covered, score=score))
            keep = self.rows - n  # one shift per flush, not one per slice
            for buf in (self.acc, self.wsum, self.valid):
                buf[:keep] = buf[n:]  # numpy copies through a buffer when the two overlap
                buf[keep:] = 0
            self.top += n
