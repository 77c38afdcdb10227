"""Segmentation metrics, counted strip by strip: pixel confusion (IoU, F1, precision, recall,
accuracy), boundary F1 within a tolerance, and object matching (TP / FP / FN at an IoU threshold).

``workflows.evaluate`` scores a class raster against labels with them; training validates with the
confusion matrix. Pixels whose label is ``IGNORE`` (255) or whose prediction is nodata take no
part in the pixel and boundary counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from geoseg.errors import InputError
from geoseg.io.labels import IGNORE

__all__ = ["BoundaryCounter", "ConfusionMatrix", "ObjectMatch", "boundary_pixels", "match_objects",
           "precision_recall_f1", "strips", "valid_polygons"]


class ConfusionMatrix:
    """Counts of (true class, predicted class) pixels, updated strip by strip.

    Pixels whose truth is ``IGNORE`` (255) or whose prediction is nodata (255) are not counted.
    """

    def __init__(self, classes: int) -> None:
        self.classes = classes
        self.matrix = np.zeros((classes, classes), dtype=np.int64)  # [truth, prediction]

    def update(self, prediction: np.ndarray, truth: np.ndarray) -> None:
        p = np.asarray(prediction).ravel()
        t = np.asarray(truth).ravel()
        keep = (t != IGNORE) & (p != IGNORE) & (t < self.classes) & (p < self.classes)
        idx = t[keep].astype(np.int64) * self.classes + p[keep].astype(np.int64)
        self.matrix += np.bincount(idx, minlength=self.classes**2).reshape(self.classes, self.classes)

    def merge(self, other: "ConfusionMatrix") -> None:
        self.matrix += other.matrix

    @property
    def tp(self) -> np.ndarray:
        return np.diag(self.matrix).astype(np.float64)

    def iou(self) -> np.ndarray:
        """Per-class intersection over union; NaN for a class absent from both truth and prediction."""
        tp = self.tp
        denom = self.matrix.sum(0) + self.matrix.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, tp / denom, np.nan)

    def precision(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.tp / self.matrix.sum(0)

    def recall(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.tp / self.matrix.sum(1)

    def f1(self) -> np.ndarray:
        """Per-class Dice / F1 score."""
        tp = self.tp
        denom = self.matrix.sum(0) + self.matrix.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, 2 * tp / denom, np.nan)

    def accuracy(self) -> float:
        total = self.matrix.sum()
        return float(self.tp.sum() / total) if total else float("nan")


# --------------------------------------------------------------------------------------------
# boundary F1


def boundary_pixels(classes: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another class, both valid (edges and invalid pixels are no boundary)."""
    b = np.zeros(classes.shape, dtype=bool)
    d = (classes[1:] != classes[:-1]) & valid[1:] & valid[:-1]
    b[1:] |= d
    b[:-1] |= d
    d = (classes[:, 1:] != classes[:, :-1]) & valid[:, 1:] & valid[:, :-1]
    b[:, 1:] |= d
    b[:, :-1] |= d
    return b


def _near(mask: np.ndarray, tolerance: int) -> np.ndarray:
    """Pixels within ``tolerance`` pixels (Euclidean) of a True pixel of ``mask``."""
    from scipy import ndimage

    if tolerance <= 0:
        return mask
    if tolerance <= 6:  # a small disk: dilation is ~10x faster than a distance transform
        y, x = np.ogrid[-tolerance : tolerance + 1, -tolerance : tolerance + 1]
        return ndimage.binary_dilation(mask, structure=x * x + y * y <= tolerance * tolerance)
    return ndimage.distance_transform_edt(~mask) <= tolerance


class BoundaryCounter:
    """Boundary precision, recall and F1 per class, within ``tolerance`` pixels, strip by strip.

    A predicted boundary pixel of class c counts as correct when a true boundary pixel of class c
    lies within ``tolerance`` pixels (and the other way round for recall). Give each strip with
    ``halo()`` extra rows above and below (``top``/``bottom`` say how many it has), so boundaries
    and matches at the strip's edges are those of the whole raster.
    """

    def __init__(self, classes: int, tolerance: int = 2) -> None:
        if tolerance < 0 or int(tolerance) != tolerance:
            raise InputError(f"boundary tolerance must be a whole number of pixels >= 0, got {tolerance}")
        self.classes, self.tolerance = classes, int(tolerance)
        self.pred_total = np.zeros(classes, dtype=np.int64)
        self.pred_matched = np.zeros(classes, dtype=np.int64)
        self.truth_total = np.zeros(classes, dtype=np.int64)
        self.truth_matched = np.zeros(classes, dtype=np.int64)

    def halo(self) -> int:
        return self.tolerance + 1

    def update(self, prediction: np.ndarray, truth: np.ndarray, *, top: int = 0, bottom: int = 0) -> None:
        """Count the boundary pixels of rows ``[top, rows - bottom)`` (the other rows are halo)."""
        p = np.asarray(prediction)
        t = np.asarray(truth)
        valid = (p < self.classes) & (t < self.classes)  # excludes IGNORE / nodata (255)
        pb = boundary_pixels(p, valid)
        tb = boundary_pixels(t, valid)
        core = np.zeros(p.shape, dtype=bool)
        core[top : p.shape[0] - bottom] = True
        core &= valid
        for c in range(self.classes):
            pc = pb & (p == c)
            tc = tb & (t == c)
            pcount, tcount = int((pc & core).sum()), int((tc & core).sum())
            if not pcount and not tcount:
                continue
            self.pred_total[c] += pcount
            self.truth_total[c] += tcount
            if pcount:
                self.pred_matched[c] += int((pc & core & _near(tc, self.tolerance)).sum())
            if tcount:
                self.truth_matched[c] += int((tc & core & _near(pc, self.tolerance)).sum())

    def merge(self, other: "BoundaryCounter") -> None:
        for name in ("pred_total", "pred_matched", "truth_total", "truth_matched"):
            getattr(self, name).__iadd__(getattr(other, name))

    def precision(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.pred_total > 0, self.pred_matched / np.maximum(self.pred_total, 1), np.nan)

    def recall(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.truth_total > 0, self.truth_matched / np.maximum(self.truth_total, 1), np.nan)

    def f1(self) -> np.ndarray:
        """Per class; 0 when one side has boundaries and the other none, NaN when neither has any."""
        p, r = self.precision(), self.recall()
        p = np.where(np.isnan(p) & ~np.isnan(r), 0.0, p)
        r = np.where(np.isnan(r) & ~np.isnan(p), 0.0, r)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(p + r > 0, 2 * p * r / (p + r), np.where(np.isnan(p + r), np.nan, 0.0))


def strips(height: int, rows: int, halo: int = 0) -> Iterator[tuple[int, int, int, int]]:
    """``(row0, row1, read0, read1)``: core rows ``[row0, row1)`` and the rows to read, halo included
    (``read0`` may be negative and ``read1`` past ``height``: read those boundless)."""
    if rows <= 0:
        raise InputError(f"strip height must be at least 1 row, got {rows}")
    for r0 in range(0, height, rows):
        r1 = min(r0 + rows, height)
        yield r0, r1, r0 - halo, r1 + halo


# --------------------------------------------------------------------------------------------
# object F1


@dataclass(frozen=True)
class ObjectMatch:
    """One-to-one matches between predicted and true objects (indexes into each array)."""

    predicted: int
    true: int
    pairs: np.ndarray  # (matches, 2) int: predicted index, true index
    iou: np.ndarray  # (matches,) IoU of each pair

    @property
    def tp(self) -> int:
        return len(self.pairs)

    @property
    def fp(self) -> int:
        return self.predicted - self.tp

    @property
    def fn(self) -> int:
        return self.true - self.tp


def match_objects(predicted: Sequence | np.ndarray, truth: Sequence | np.ndarray, *,
                  iou_threshold: float = 0.5) -> ObjectMatch:
    """Match predicted to true polygons one-to-one, greedily by IoU, keeping pairs with IoU >= threshold.

    Candidate pairs come from an STRtree; their intersection areas are computed in one vectorised
    call. Areas are planar in the geometries' CRS (a ratio, so the unit does not matter).
    """
    import shapely

    if not 0 < iou_threshold <= 1:
        raise InputError(f"the object IoU threshold must be in (0, 1], got {iou_threshold}")
    pred = valid_polygons(predicted)
    true = valid_polygons(truth)
    empty = ObjectMatch(len(pred), len(true), np.zeros((0, 2), dtype=np.int64), np.zeros(0))
    if not len(pred) or not len(true):
        return empty
    ip, it = shapely.STRtree(true).query(pred, predicate="intersects")
    if not len(ip):
        return empty
    inter = shapely.area(shapely.intersection(pred[ip], true[it]))
    union = shapely.area(pred)[ip] + shapely.area(true)[it] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    keep = (iou >= iou_threshold) & (inter > 0)
    ip, it, iou = ip[keep], it[keep], iou[keep]
    order = np.lexsort((it, ip, -iou))  # best IoU first; ties in index order (deterministic)
    used_p = np.zeros(len(pred), dtype=bool)
    used_t = np.zeros(len(true), dtype=bool)
    chosen = []
    for k in order.tolist():  # only pairs above the threshold: at most min(n, m) for thresholds >= 0.5
        if not used_p[ip[k]] and not used_t[it[k]]:
            used_p[ip[k]] = used_t[it[k]] = True
            chosen.append(k)
    chosen = np.asarray(chosen, dtype=np.int64)
    return ObjectMatch(len(pred), len(true), np.stack([ip[chosen], it[chosen]], axis=1).astype(np.int64), iou[chosen])


def valid_polygons(geoms) -> np.ndarray:
    import shapely

    geoms = np.asarray(getattr(geoms, "values", geoms), dtype=object).ravel()
    if not len(geoms):
        return geoms
    geoms = geoms[~shapely.is_missing(geoms)]
    invalid = ~shapely.is_valid(geoms)
    if invalid.any():
        geoms = geoms.copy()
        geoms[invalid] = shapely.make_valid(geoms[invalid])
    return geoms[~shapely.is_empty(geoms) & (shapely.area(geoms) > 0)]


def precision_recall_f1(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else math.nan
    r = tp / (tp + fn) if tp + fn else math.nan
    if tp + fp + fn == 0:
        return p, r, math.nan
    return p, r, 2 * tp / (2 * tp + fp + fn)


# --------------------------------------------------------------------------------------------
# results
