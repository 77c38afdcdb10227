"""Score a segmentation against labels: a streaming confusion matrix and the metrics built on it."""

from __future__ import annotations

import numpy as np

from geoseg.labels import IGNORE


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
