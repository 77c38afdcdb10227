"""Set-valued training targets: what a label pixel says about its class when it does not say which.

A dataset may label only some classes. In a buildings-only set a pixel outside every footprint is
not a building, but it may be road, water, vegetation or background: forcing it into
``background`` would teach a multi-class model that roads are background. So each label value maps
to a *set* of allowed classes:

- one class: an ordinary, fully labelled pixel;
- several classes: the pixel is one of them, unknown which (``"!building"``: any class but
  building; ``"road|water"``: road or water);
- no class (``ignore``): the pixel takes no part in the loss or the metrics.

The loss of a pixel is ``-log(sum of the softmax probabilities over its allowed set)``, which is the
ordinary cross-entropy for a one-class set and does not depend on how the probability is shared
among the allowed classes (see ``training.make_loss``). Metrics count only pixels with exactly one
allowed class.

Label arrays stay ``uint8``: ids ``0..C-1`` are the classes themselves, ``IGNORE`` (255) the empty
set, and the codes ``C, C+1, ...`` stand for the multi-class sets of a ``TargetSets`` table, which
the loss turns into a (codes, classes) 0/1 matrix.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

from geoseg.errors import InputError
from geoseg.io.labels import IGNORE

__all__ = ["TargetSets", "parse_class_set", "parse_label_sets"]


def parse_class_set(target: str, class_names: Sequence[str]) -> frozenset[int]:
    """``"building"`` -> {1}; ``"road|water"`` -> {2, 3}; ``"!building"`` -> every class but 1;
    ``"!building|road"`` -> every class but building and road; ``"ignore"`` -> the empty set.
    Classes are names or ids. InputError naming the bad part."""
    text = str(target).strip()
    if text.lower() == "ignore":
        return frozenset()
    negate = text.startswith("!")
    if negate:
        text = text[1:].strip()
    names = {n.lower(): i for i, n in enumerate(class_names)}
    ids = set()
    for part in text.split("|"):
        p = part.strip().lower()
        if p in names:
            ids.add(names[p])
        elif p.isdigit() and int(p) < len(class_names):
            ids.add(int(p))
        else:
            raise InputError(f"label target {target!r}: {part.strip()!r} is not a class ({', '.join(class_names)}); "
                             f"write a class, 'ignore', 'a|b' (a or b) or '!a' (any class but a)")
    if negate:
        ids = set(range(len(class_names))) - ids
    return frozenset(ids)


def parse_label_sets(spec: str | None, class_names: Sequence[str]) -> dict[int, frozenset[int]]:
    """``"0=ignore,1=building,2=!building"`` -> {label value: allowed class set}. Values are 0-255,
    single or ``A-B`` ranges; targets as ``parse_class_set``. Values not listed are absent (they
    keep their meaning as class ids)."""
    out: dict[int, frozenset[int]] = {}
    if spec is None or not str(spec).strip():
        return out
    example = f"0=ignore,1={class_names[-1]},2=!{class_names[-1]}"
    for item in str(spec).split(","):
        if not item.strip():
            continue
        key, sep, target = item.partition("=")
        m = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", key)
        if not sep or not m or not target.strip():
            raise InputError(f"label values {item.strip()!r}: give VALUE=CLASS items separated by commas, e.g. {example}")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if not 0 <= lo <= hi <= 255:
            raise InputError(f"label values {key.strip()!r}: values must be 0-255 (a range low-high), e.g. {example}")
        allowed = parse_class_set(target, class_names)
        for v in range(lo, hi + 1):
            out[v] = allowed
    return out


class TargetSets:
    """The codes of a training run's label arrays: ``0..C-1`` the classes, then one code per
    multi-class set met in any dataset (at most ``254 - C`` of them), ``IGNORE`` the empty set."""

    def __init__(self, class_names: Sequence[str]) -> None:
        self.class_names = tuple(class_names)
        self.sets: list[frozenset[int]] = [frozenset([i]) for i in range(len(self.class_names))]

    @property
    def classes(self) -> int:
        return len(self.class_names)

    @property
    def partial(self) -> bool:
        """Whether any multi-class set is in use."""
        return len(self.sets) > self.classes

    def code(self, allowed: Iterable[int]) -> int:
        """The label code of a set of allowed class ids (registering a new multi-class set)."""
        allowed = frozenset(int(c) for c in allowed)
        if not allowed:
            return IGNORE
        if any(not 0 <= c < self.classes for c in allowed):
            raise InputError(f"class ids {sorted(allowed)} are not all classes of {', '.join(self.class_names)}")
        if allowed in self.sets:
            return self.sets.index(allowed)
        if len(self.sets) >= IGNORE:
            raise InputError(f"more than {IGNORE - self.classes} different partial label sets; merge some")
        self.sets.append(allowed)
        return len(self.sets) - 1

    def value_map(self, spec: str | None) -> dict[int, int] | None:
        """A label raster's values -> codes, from a ``parse_label_sets`` spec (None: values are class ids)."""
        sets = parse_label_sets(spec, self.class_names)
        return {v: self.code(s) for v, s in sets.items()} or None

    def restrict(self, codes: np.ndarray, labelled: Sequence[str] | None) -> np.ndarray:
        """Codes of a dataset that labels only the classes ``labelled``: a pixel whose class is not
        one of them is known only not to be any of them (the set of the other classes)."""
        if not labelled:
            return codes
        ids = {self.class_id(n) for n in labelled}
        others = self.code(set(range(self.classes)) - ids)
        single = codes < self.classes
        unlabelled = single & ~np.isin(codes, sorted(ids))
        return np.where(unlabelled, np.uint8(others), codes).astype(np.uint8)

    def class_id(self, name: str) -> int:
        names = {n.lower(): i for i, n in enumerate(self.class_names)}
        key = str(name).strip().lower()
        if key not in names:
            raise InputError(f"labelled classes: {name!r} is not a class ({', '.join(self.class_names)})")
        return names[key]

    def matrix(self) -> np.ndarray:
        """(256, C) float32: row ``code`` is 1 for each allowed class; rows of unused codes and
        ``IGNORE`` are 0 (no allowed class: no part in the loss)."""
        out = np.zeros((256, self.classes), np.float32)
        for code, allowed in enumerate(self.sets):
            out[code, sorted(allowed)] = 1.0
        return out

    def single(self, codes: np.ndarray) -> np.ndarray:
        """Codes with every multi-class set turned into ``IGNORE``: the pixels metrics count."""
        return np.where(codes < self.classes, codes, IGNORE).astype(np.uint8)
