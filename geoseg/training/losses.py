"""The training losses (cross-entropy, Dice, focal, and weighted sums of them), in ``keras.ops``."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

from geoseg.errors import InputError
from geoseg.training.config import parse_loss

FOCAL_GAMMA = 2.0
DICE_SMOOTH = 1.0


def make_loss(spec: str, classes: int, class_weights: Sequence[float] | None = None,
              target_sets: np.ndarray | None = None) -> Callable:
    """A Keras loss ``f(y_true, logits) -> scalar`` for a spec like ``ce``, ``dice``, ``focal``,
    ``ce+dice`` or ``0.5*focal+dice``, computed in float32.

    ``y_true``: class ids (B, H, W) or (B, H, W, 1), ``IGNORE`` (255) where unlabelled; ``logits``:
    (B, H, W, classes). Ignored pixels add nothing to the loss or its gradient, and a batch with no
    labelled pixel gives 0.

    ``target_sets`` (``geoseg.targets.TargetSets.matrix()``, (256, classes) of 0/1): label codes
    stand for sets of allowed classes (partial labels). A pixel's probability of being right is
    then the sum of the softmax over its allowed set ``A``:

    - ``ce``: ``-log(sum_{c in A} p_c)``, mean over pixels with a non-empty set (weighted by
      ``class_weights``: a pixel weighs the mean weight of its allowed classes). For a one-class
      set this is the ordinary cross-entropy; for a larger set it depends only on the total
      probability of the set, so it does not push a pixel towards any particular allowed class.
    - ``focal``: the same with the focal factor ``(1 - sum_{c in A} p_c)^2``.
    - ``dice``: 1 - soft Dice per class over the batch (smoothing 1), averaged over the classes
      (weighted by ``class_weights``). For class ``c`` a pixel counts where its class is known to be
      ``c`` (a one-class set {c}) or known not to be ``c`` (``c`` outside its set); a pixel whose
      set holds ``c`` and others says nothing about ``c`` and is left out of class ``c``'s sums.

    Without ``target_sets`` codes are class ids (codes >= ``classes`` are ignored like ``IGNORE``).
    """
    from keras import ops

    terms = parse_loss(spec)
    weights = np.ones(classes, np.float32) if class_weights is None else np.asarray(class_weights, np.float32)
    if len(weights) != classes:
        raise InputError(f"--class-weights: give {classes} weights, one per class")
    if target_sets is None:
        table = np.zeros((256, classes), np.float32)
        table[np.arange(classes), np.arange(classes)] = 1.0
    else:
        table = np.asarray(target_sets, np.float32)
        if table.shape != (256, classes):
            raise ValueError(f"target_sets must be (256, {classes}), got {table.shape}")

    def loss(y_true, logits):
        y = ops.cast(y_true, "int32")
        if len(y.shape) == 4:
            y = ops.squeeze(y, axis=-1)
        logits = ops.cast(logits, "float32")
        y = ops.clip(y, 0, 255)
        allowed = ops.take(ops.convert_to_tensor(table), y, axis=0)  # (B, H, W, C) 0/1
        count = ops.sum(allowed, axis=-1)
        mask = ops.cast(count > 0, "float32")
        logp = ops.log_softmax(logits, axis=-1)
        cw = ops.convert_to_tensor(weights)
        total = ops.convert_to_tensor(0.0, dtype="float32")
        for weight, name in terms:
            if name in ("ce", "focal"):
                # log of the allowed set's probability; -1e4 keeps excluded classes out without inf/NaN
                logp_t = ops.logsumexp(ops.where(allowed > 0, logp, -1e4), axis=-1)
                pix = -logp_t
                if name == "focal":
                    pix = pix * ops.power(1.0 - ops.exp(logp_t), FOCAL_GAMMA)
                w = mask * ops.divide_no_nan(ops.sum(allowed * cw, axis=-1), count)
                value = ops.divide_no_nan(ops.sum(w * pix), ops.sum(w))
            else:
                single = ops.cast(count == 1, "float32")[..., None]
                truth = allowed * single  # one-hot where the class is known, 0 elsewhere
                known = (1.0 - allowed) * mask[..., None] + truth  # known to be c, or known not to be c
                probs = ops.exp(logp) * known
                inter = ops.sum(probs * truth, axis=(0, 1, 2))
                denom = ops.sum(probs, axis=(0, 1, 2)) + ops.sum(truth, axis=(0, 1, 2))
                dice = (2.0 * inter + DICE_SMOOTH) / (denom + DICE_SMOOTH)
                value = ops.sum(cw * (1.0 - dice)) / ops.sum(cw)
            total = total + weight * value
        return total

    loss.__name__ = "geoseg_" + re.sub(r"[^a-z0-9]+", "_", str(spec).lower())
    return loss


# --- the training run ------------------------------------------------------------------------------
