"""Clean-up of a class raster before and while it is polygonized: sieve, hole filling, simplification.

Three steps, each optional and set per class (square metres or metres, by class name):

- **sieve** (``sieve_m2``): a 4-connected region of one class smaller than its class's threshold is
  merged into the neighbouring class it shares the longest border with (counted over its larger
  neighbours only; ties go to the lower class id). Done in up to :data:`SIEVE_ROUNDS` rounds, so a
  speckle whose neighbours are all speckles goes once they have gone. Like GDAL's sieve
  (``rasterio.features.sieve``) the pixels change class, so no gap opens where a speckle was.
- **hole filling** (``max_hole_m2``): a 4-connected area of other classes that only class ``c``
  touches (it touches no nodata and no raster edge) and is smaller than ``c``'s threshold becomes
  ``c``. Done on the raster, so the polygons that occupied the hole are gone too: no overlaps. Where
  two classes would fill the same pixel, the larger hole (the outer one) wins.
- **simplification** (``simplify_m``): :func:`simplify_coverage` simplifies the polygons of every
  class together (``shapely.coverage_simplify``), so an edge shared by two polygons is simplified
  once and stays shared: no gaps, no overlaps.

Memory stays bounded by a strip of rows: :func:`clean_strips` cleans each strip with a halo of
:func:`halo_rows` rows above and below. A region that reaches from the strip through the whole
halo has more pixels than any threshold, so it is large for the whole raster too, and every
decision about the strip's pixels is the one the whole raster gives (``tests/vector/test_cleanup.py``
checks this for any strip height). The halo grows with the thresholds in pixels:
``SIEVE_ROUNDS * (2 s + 3) + h + 2`` rows for a largest sieved region of ``s`` pixels and a largest
filled hole of ``h`` pixels.

Simplification runs on the pieces of each strip (``polygons.iter_polygons``) with the strip's
outline fixed (``simplify_boundary=False``): pieces of one region from neighbouring strips still
meet exactly on the strip line and are dissolved there. The cost: an edge that crosses a strip line
keeps the vertex where it crosses (one every few hundred rows), so the result depends slightly on
the strip height; coverage, overlaps and validity do not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import shapely

from geoseg.errors import InputError
from geoseg.vector.regions import label_regions

__all__ = ["Cleanup", "RasterCleanup", "SIEVE_ROUNDS", "clean_array", "clean_strips", "halo_rows",
           "parse_per_class", "per_class", "simplify_coverage"]

#: Rounds of the sieve: a speckle inside speckles goes in the round after its neighbours went.
SIEVE_ROUNDS = 3

#: The clean-up settings, their option names and units (also the run-table keys).
SETTINGS = {"sieve_m2": ("--sieve", "m²"), "max_hole_m2": ("--max-hole", "m²"), "simplify_m": ("--simplify", "m")}


@dataclass(frozen=True)
class Cleanup:
    """Clean-up settings by class name; a class that is not named gets 0 (off)."""

    sieve_m2: Mapping[str, float] = field(default_factory=dict)
    max_hole_m2: Mapping[str, float] = field(default_factory=dict)
    simplify_m: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, (option, unit) in SETTINGS.items():
            values = dict(getattr(self, name))
            bad = {k: v for k, v in values.items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0)}
            if bad:
                raise InputError(f"{option} {bad}: give values >= 0 in {unit}")
            object.__setattr__(self, name, {k: float(v) for k, v in values.items()})

    @property
    def active(self) -> bool:
        return any(v > 0 for name in SETTINGS for v in getattr(self, name).values())

    def metadata(self, class_names: Sequence[str]) -> dict[str, str]:
        """``{setting: "class=value,..."}`` for the run table and raster tags (all classes)."""
        return {name: ",".join(f"{c}={getattr(self, name).get(c, 0.0):g}" for c in class_names) for name in SETTINGS}

    def for_raster(self, class_names: Sequence[str], pixel_area_m2: float) -> RasterCleanup:
        """The same settings in pixels of a raster whose pixels cover ``pixel_area_m2`` each."""
        unknown = sorted({k for name in SETTINGS for k in getattr(self, name)} - set(class_names))
        if unknown:
            raise InputError(f"clean-up settings name unknown class(es) {', '.join(unknown)}; the classes are "
                             f"{', '.join(class_names)}")

        def px(name: str, scale: float) -> np.ndarray:
            values = getattr(self, name)
            return np.array([values.get(c, 0.0) / scale for c in class_names], dtype=np.float64)

        return RasterCleanup(sieve_px=px("sieve_m2", pixel_area_m2), hole_px=px("max_hole_m2", pixel_area_m2),
                             tolerance_px=px("simplify_m", math.sqrt(pixel_area_m2)))


@dataclass(frozen=True)
class RasterCleanup:
    """Clean-up in pixels, indexed by class id: regions with fewer than ``sieve_px[c]`` pixels are
    sieved, holes with fewer than ``hole_px[c]`` pixels filled, edges simplified with a tolerance of
    ``tolerance_px[c]`` pixels."""

    sieve_px: np.ndarray
    hole_px: np.ndarray
    tolerance_px: np.ndarray

    @property
    def edits_raster(self) -> bool:
        return bool((self.sieve_px > 1).any() or (self.hole_px > 1).any())

    @property
    def simplifies(self) -> bool:
        return bool((self.tolerance_px > 0).any())


def halo_rows(cleanup: RasterCleanup, rounds: int = SIEVE_ROUNDS) -> int:
    """Rows above and below a strip that make its clean-up equal the whole raster's (module doc)."""
    s = _largest(cleanup.sieve_px)
    h = _largest(cleanup.hole_px)
    return (rounds * (2 * s + 3) if s else 0) + (h + 2 if h else 0)


def _largest(threshold_px: np.ndarray) -> int:
    """Pixels in the largest region below a threshold (count < threshold): ceil(t) - 1."""
    top = float(threshold_px.max()) if len(threshold_px) else 0.0
    return max(0, math.ceil(top) - 1)


# --------------------------------------------------------------------------------------------
# the raster steps


def clean_array(cls: np.ndarray, valid: np.ndarray, cleanup: RasterCleanup, rounds: int = SIEVE_ROUNDS) -> np.ndarray:
    """Sieve, then fill holes, in a whole array of class ids (``valid``: pixels that hold a class;
    ids outside ``0..len(classes)-1`` count as invalid). Returns a new array; invalid pixels keep
    their values."""
    k = len(cleanup.sieve_px)
    cls = np.asarray(cls).astype(np.int64)
    valid = np.asarray(valid, bool) & (cls >= 0) & (cls < k)
    if (cleanup.sieve_px > 1).any():
        for _ in range(rounds):
            cls, stranded = _sieve_round(cls, valid, cleanup.sieve_px)
            if not stranded:
                break
    if (cleanup.hole_px > 1).any():
        cls = _fill_holes(cls, valid, cleanup.hole_px)
    return cls


def _sieve_round(cls: np.ndarray, valid: np.ndarray, sieve_px: np.ndarray) -> tuple[np.ndarray, bool]:
    """One round: every small region with a large neighbour takes its class. Returns the new classes
    and whether a small region with only small neighbours is left (only those can change in another
    round: large regions keep their pixels, and merged ones only grow)."""
    k = len(sieve_px)
    labels, region_class = label_regions(cls, valid)
    n = len(region_class)
    if not n:
        return cls, False
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    small = np.zeros(n + 1, bool)
    small[1:] = sizes[1:] < sieve_px[region_class]
    if not small.any():
        return cls, False
    # Border length between each small region and the large regions of each class around it.
    keys = []
    for a, b, ca, cb in ((labels[:, :-1], labels[:, 1:], cls[:, :-1], cls[:, 1:]),
                         (labels[:-1], labels[1:], cls[:-1], cls[1:])):
        for x, y, cy in ((a, b, cb), (b, a, ca)):
            hit = small[x] & (y > 0) & ~small[y]
            keys.append(x[hit].astype(np.int64) * k + cy[hit])
    keys = np.concatenate(keys)
    if not keys.size:
        return cls, False
    border = np.bincount(keys, minlength=(n + 1) * k).reshape(n + 1, k)
    merged = small & (border.sum(1) > 0)
    target = np.where(merged, border.argmax(1), -1)  # argmax: lowest id on ties
    new = target[labels]
    return np.where(new >= 0, new, cls), bool((small & ~merged).any())


def _fill_holes(cls: np.ndarray, valid: np.ndarray, hole_px: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    four = ndimage.generate_binary_structure(2, 1)
    best_size = np.zeros(cls.shape, np.int64)
    best_class = np.full(cls.shape, -1, np.int64)
    present = np.unique(cls[valid]).tolist()
    for c in present:
        if hole_px[c] <= 1:
            continue
        comp, n = ndimage.label(~(valid & (cls == c)), structure=four)
        if not n:
            continue
        sizes = np.bincount(comp.ravel(), minlength=n + 1)
        hole = sizes < hole_px[c]
        hole[0] = False
        # open to the outside: touching the array's edge or nodata
        hole[np.unique(np.concatenate([comp[0], comp[-1], comp[:, 0], comp[:, -1], comp[~valid]]))] = False
        if not hole.any():
            continue
        size = np.where(hole, sizes, 0)[comp]
        better = size > best_size  # larger holes (outer ones) win; ties: the lower class id
        best_size[better] = size[better]
        best_class[better] = c
    return np.where(best_class >= 0, best_class, cls)


def clean_strips(read: Callable[[int, int], np.ndarray], *, height: int, strip_rows: int, valid_of: Callable,
                 cleanup: RasterCleanup, rounds: int = SIEVE_ROUNDS) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(row0, raw strip, cleaned strip)`` for strips of ``strip_rows`` rows from the top.

    ``read(r0, r1)`` returns rows ``r0..r1-1`` of class ids; ``valid_of(array)`` their valid pixels.
    Each strip is cleaned with :func:`halo_rows` rows around it (rows read once are kept for the next
    strip's halo), which gives exactly what :func:`clean_array` gives on the whole raster."""
    halo = halo_rows(cleanup, rounds) if cleanup.edits_raster else 0
    buf, buf0 = None, 0
    for row0 in range(0, height, strip_rows):
        h = min(strip_rows, height - row0)
        a, b = max(0, row0 - halo), min(height, row0 + h + halo)
        if buf is not None and buf0 <= a <= buf0 + len(buf):
            end = buf0 + len(buf)
            parts = [buf[a - buf0:]] + ([read(end, b)] if b > end else [])
            window = np.concatenate(parts) if len(parts) > 1 else parts[0]
            window = window[: b - a]
        else:
            window = read(a, b)
        buf, buf0 = window, a
        raw = window[row0 - a: row0 - a + h]
        if not cleanup.edits_raster:
            yield row0, raw, raw
            continue
        cleaned = clean_array(window, valid_of(window), cleanup, rounds)
        yield row0, raw, cleaned[row0 - a: row0 - a + h]


# --------------------------------------------------------------------------------------------
# simplification


def simplify_coverage(geoms: np.ndarray, classes: np.ndarray, tolerance_px: np.ndarray) -> np.ndarray:
    """Simplify polygons that form a coverage (GDAL's polygons of a labelled strip, in pixel units)
    with the tolerance of their class, keeping the coverage's outline fixed.

    GDAL's polygons share edges but not all vertices (a T-junction is a vertex on one side only);
    ``segmentize`` at one pixel puts a vertex on every pixel corner, which makes them a valid
    coverage. Classes with different tolerances: one pass per tolerance, largest first, over the
    classes with at least that tolerance (the others' edges stay fixed), so an edge between two
    classes is simplified with the smaller of their tolerances and both sides stay identical."""
    geoms = np.asarray(geoms, dtype=object)
    tol = tolerance_px[classes]
    if not len(geoms) or not (tol > 0).any():
        return geoms
    out = shapely.segmentize(geoms, 1.0)
    for t in sorted({float(v) for v in tol if v > 0}, reverse=True):
        sel = tol >= t
        out[sel] = shapely.coverage_simplify(out[sel], t, simplify_boundary=False)
    return shapely.simplify(out, 0.0)  # the vertices segmentize left on straight outline edges


# --------------------------------------------------------------------------------------------
# options


def parse_per_class(text: str | None, option: str, unit: str = "M2") -> float | dict[str, float] | None:
    """``"4"`` -> 4.0 (every class); ``"building=10,water=200"`` -> {class: value}; None/"" -> None."""
    if text is None or not str(text).strip():
        return None
    text = str(text).strip()
    try:
        if "=" not in text:
            return float(text)
        pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
        return {name.strip(): float(value) for name, value in pairs}
    except ValueError:
        raise InputError(f"{option} {text!r}: give one value (e.g. 4) or CLASS={unit} pairs "
                         f"(e.g. building=10,water=200)") from None


def per_class(given: float | Mapping[str, float] | None, defaults: Mapping[str, float], option: str,
              unit: str = "m²") -> dict[str, float]:
    """``defaults`` (one value per class name), replaced by ``given``: one number for every class,
    or some classes by name. InputError for unknown class names or values below 0."""
    values = {k: float(v) for k, v in defaults.items()}
    if given is None:
        return values
    if not isinstance(given, Mapping):
        given = dict.fromkeys(values, given)
    unknown = sorted(set(given) - set(values))
    if unknown:
        raise InputError(f"{option} names unknown class(es) {', '.join(unknown)}; the classes are "
                         f"{', '.join(values)}")
    for name, value in given.items():
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise InputError(f"{option} {name}={value}: give a value >= 0 in {unit}")
        values[name] = float(value)
    return values


def parse_tagged(text: str | None) -> dict[str, float]:
    """The ``class=value,...`` strings this module writes to run tables and raster tags."""
    parsed = parse_per_class(text, "tag")
    return parsed if isinstance(parsed, dict) else {}
