"""How zooms are written, read and checked: the vocabulary of multi-zoom inference (a leaf module).

A zoom factor ``s`` runs the model on a grid ``s`` times finer than the working grid (``1`` is the
working grid itself); the runs are merged back on the scene's grid by ``max`` or ``mean`` of the
class probabilities (``geoseg.inference.scales`` does the running and merging). Model bundles, the CLI,
batch manifests and training recipes all read and check zooms here, so that none of them needs
the inference code to do it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from geoseg.errors import InputError

MERGES = ("max", "mean")


def zoom_text(scales: Sequence[float]) -> str:
    """``(1.0, 2.0)`` -> ``"1,2"``: how zooms are written in messages and run metadata."""
    return ",".join(f"{s:g}" for s in scales)


def parse_scales(text: str | Sequence[float] | None, what: str = "--scales") -> tuple[float, ...] | None:
    """``"1,2"`` -> (1.0, 2.0); a sequence of numbers as it is; None stays None. Checked with
    :func:`check_scales`."""
    if text is None:
        return None
    if isinstance(text, str):
        try:
            values = tuple(float(v) for v in text.replace(" ", "").split(",") if v)
        except ValueError:
            raise InputError(f"{what} {text!r}: give zoom factors separated by commas, e.g. 1,2") from None
    else:
        try:
            values = tuple(float(v) for v in text)
        except (TypeError, ValueError):
            raise InputError(f"{what} {text!r}: give a list of zoom factors, e.g. [1, 2]") from None
    check_scales(values, what=what)
    return values


def check_scales(scales: Sequence[float], merge: str = "mean", *, what: str = "--scales") -> None:
    """InputError unless ``scales`` are distinct positive zooms including 1 and ``merge`` is known."""
    if not scales or any(not math.isfinite(s) or s <= 0 for s in scales):
        raise InputError(f"{what} {zoom_text(scales) or '(none)'}: zoom factors must be positive "
                         f"numbers, e.g. 1,2")
    if 1.0 not in scales:
        raise InputError(f"{what} {zoom_text(scales)}: include 1 (the grid the model runs on), "
                         f"e.g. 1,{scales[0]:g}")
    if len(set(scales)) != len(scales):
        raise InputError(f"{what} {zoom_text(scales)}: each zoom once")
    if merge not in MERGES:
        raise InputError(f"--scale-merge {merge!r} is not one of {', '.join(MERGES)}")
