"""Training data: scenes read whole at the training GSD, training and validation areas, chip
windows, augmentation and the chip sampler, and the input statistics."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geoseg.errors import InputError
from geoseg.io.labels import IGNORE
from geoseg.training.config import Augment


@dataclass
class SceneData:
    """One labelled scene at the training GSD, whole, in memory."""

    name: str
    image: np.ndarray  # (H, W, bands), native dtype
    labels: np.ndarray  # (H, W) uint8 class ids, IGNORE where unlabelled or nodata
    band_names: tuple[str, ...]
    gsd: float

    @property
    def shape(self) -> tuple[int, int]:
        return self.labels.shape


def load_scene(image: str | os.PathLike, labels: str | os.PathLike, *, class_names: Sequence[str],
               gsd: float | None = None, bands: tuple[int, ...] | None = None, label_field: str = "class",
               line_width: float | None = None, label_values: str | None = None, targets=None,
               labelled_classes: Sequence[str] = (), aoi: str | os.PathLike | None = None) -> SceneData:
    """Read a scene and its labels whole, on a grid of ``gsd`` m/px (default: the scene's own).
    ``label_values`` says what a label raster's values mean (``labels.parse_label_values``).
    ``aoi``: polygons (any vector file, any CRS) outside which the labels are ignored (``geoseg.io.aoi``);
    the pixels stay, as context for the chips that reach the edge.

    With ``targets`` (a ``geoseg.targets.TargetSets``) the labels are codes of allowed class sets:
    ``label_values`` may name sets (``2=!building``, ``3=road|water``), and ``labelled_classes``
    turns pixels of any other class into "not one of these" (``TargetSets.restrict``)."""
    from geoseg.io.labels import LabelReader, parse_label_values
    from geoseg.io.scene import SceneReader, at_gsd, open_scene

    info = open_scene(image, bands=bands)
    grid = info if gsd is None or abs(gsd / info.gsd - 1) < 1e-3 else at_gsd(info, gsd)
    with SceneReader(grid) as reader:
        pixels, valid = reader.read(0, grid.height, 0, grid.width)
    if targets is None:
        value_map, codes = parse_label_values(label_values, class_names), None
    else:
        value_map, codes = targets.value_map(label_values), len(targets.sets)
    with LabelReader(labels, grid, class_names=class_names, class_field=label_field, line_width_m=line_width,
                     value_map=value_map, codes=codes) as lr:
        ids = lr.read(0, grid.height, 0, grid.width)
    ids = np.where(valid, ids, IGNORE).astype(np.uint8)
    if aoi is not None:
        from geoseg.io.aoi import read_area
        from geoseg.io.scene import pixels_inside

        ids[~pixels_inside(read_area(aoi, grid.crs), grid.transform, 0, grid.height, 0, grid.width)] = IGNORE
    if targets is not None and labelled_classes:
        ids = targets.restrict(ids, labelled_classes)
    if not (ids != IGNORE).any():
        where = f" inside --aoi {Path(aoi).name}" if aoi is not None else ""
        raise InputError(f"labels {labels} do not overlap the valid pixels of {image}{where}; "
                         f"pair each image with its own labels" + (" and area" if aoi is not None else ""))
    return SceneData(name=Path(image).name, image=pixels, labels=ids, band_names=grid.band_names, gsd=grid.gsd)


# --- splitting by area, chips ----------------------------------------------------------------------


@dataclass(frozen=True)
class Rect:
    """A half-open rectangle of one scene: rows r0..r1, columns c0..c1."""

    scene: int
    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def height(self) -> int:
        return self.r1 - self.r0

    @property
    def width(self) -> int:
        return self.c1 - self.c0


def split_scene(scene: int, height: int, width: int, *, val_fraction: float, gap: int) -> tuple[list[Rect], list[Rect]]:
    """Hold back the last ``val_fraction`` of a scene (along its longer side) as one validation block.

    A band ``gap`` pixels wide (one chip) between the training and validation blocks belongs to
    neither, so no training chip touches or neighbours a validation pixel. Returns (training,
    validation) rectangles; a scene too short to split (less than 2 gaps plus the validation block)
    stays whole in training and gives no validation block.
    """
    full = Rect(scene, 0, height, 0, width)
    if val_fraction <= 0:
        return [full], []
    rows = height >= width
    length = height if rows else width
    val = max(1, int(round(length * val_fraction)))
    train_end = length - val - gap
    if train_end < gap:  # not even one gap of training left: keep it all for training
        return [full], []
    if rows:
        return [Rect(scene, 0, train_end, 0, width)], [Rect(scene, length - val, height, 0, width)]
    return [Rect(scene, 0, height, 0, train_end)], [Rect(scene, 0, height, length - val, width)]


def _axis_starts(lo: int, hi: int, size: int, chip: int, stride: int) -> list[int]:
    """Starts of chips along one axis inside [lo, hi); a chip may pass the rectangle only where the
    rectangle ends at the scene's edge (the part outside the scene is padding)."""
    if hi - lo >= chip:
        from geoseg.tiling.tiles import spaced_starts

        return spaced_starts(lo, hi, chip, stride)
    if lo == 0 and hi == size:
        return [(size - chip) // 2]  # a scene smaller than a chip: centred, padded on both sides
    return []


def chip_windows(rect: Rect, shape: tuple[int, int], *, chip: int, stride: int) -> list[tuple[int, int, int]]:
    """(scene, row, col) of the top-left corners of overlapping chips inside ``rect``."""
    rows = _axis_starts(rect.r0, rect.r1, shape[0], chip, stride)
    cols = _axis_starts(rect.c0, rect.c1, shape[1], chip, stride)
    return [(rect.scene, r, c) for r in rows for c in cols]


def _fit_window(lo: int, hi: int, size: int, k: int, centre: float) -> tuple[int, int]:
    """(start, k') of a window of about ``k`` pixels centred near ``centre`` that stays in [lo, hi)
    (or passes it only at the scene's edge); ``k'`` shrinks when the rectangle is too short."""
    if hi - lo >= k:
        start = int(round(centre - k / 2))
        return min(max(start, lo), hi - k), k
    if lo == 0 and hi == size:
        return (size - k) // 2, k
    return lo, hi - lo


def labelled_fraction(labels: np.ndarray, windows: Sequence[tuple[int, int]], chip: int) -> np.ndarray:
    """Fraction of labelled (not IGNORE) pixels in each chip window (boundless), via an integral image."""
    h, w = labels.shape
    integral = np.zeros((h + 1, w + 1), dtype=np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(labels != IGNORE, axis=0), axis=1)
    if not len(windows):
        return np.zeros(0)
    rc = np.asarray(windows, dtype=np.int64)
    r0, c0 = np.clip(rc[:, 0], 0, h), np.clip(rc[:, 1], 0, w)
    r1, c1 = np.clip(rc[:, 0] + chip, 0, h), np.clip(rc[:, 1] + chip, 0, w)
    counts = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
    return counts / float(chip * chip)


def validation_windows(rect: Rect, *, chip: int) -> list[tuple[int, int, int]]:
    """Chips that tile ``rect`` without overlap (the last ones pass its far edges; those pixels are
    read as context but not scored), so every validation pixel is scored exactly once."""
    rows = range(rect.r0, rect.r1, chip)
    cols = range(rect.c0, rect.c1, chip)
    return [(rect.scene, r, c) for r in rows for c in cols]


def crop(array: np.ndarray, r0: int, c0: int, h: int, w: int, fill: int = 0) -> np.ndarray:
    """A boundless window of a (H, W, ...) array, padded with ``fill``."""
    out = np.full((h, w) + array.shape[2:], fill, dtype=array.dtype)
    H, W = array.shape[:2]
    a0, a1 = max(r0, 0), min(r0 + h, H)
    b0, b1 = max(c0, 0), min(c0 + w, W)
    if a0 < a1 and b0 < b1:
        out[a0 - r0 : a1 - r0, b0 - c0 : b1 - c0] = array[a0:a1, b0:b1]
    return out


# --- resizing and augmentation (vectorised numpy) -------------------------------------------------


def _taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and weights of a triangle (linear) filter from n_in to n_out samples, widened when
    shrinking so that it averages instead of aliasing."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centre = (np.arange(n_out) + 0.5) * scale - 0.5
    first = np.floor(centre - support).astype(np.int64) + 1
    ntaps = int(math.ceil(2 * support)) + 1
    idx = first[:, None] + np.arange(ntaps)[None, :]
    weights = np.maximum(0.0, 1.0 - np.abs(idx - centre[:, None]) / support)
    weights /= weights.sum(axis=1, keepdims=True)
    return np.clip(idx, 0, n_in - 1), weights.astype(np.float32)


def resize_image(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Resize a (H, W, B) float image with a linear filter (anti-aliased when shrinking)."""
    h, w = image.shape[:2]
    if (h, w) == (rows, cols):
        return image
    idx, wt = _taps(h, rows)
    x = np.einsum("rtwb,rt->rwb", image[idx], wt)
    idx, wt = _taps(w, cols)
    return np.einsum("rctb,ct->rcb", x[:, idx], wt)


def resize_labels(labels: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Nearest-neighbour resize of class ids."""
    h, w = labels.shape
    ri = np.minimum(((np.arange(rows) + 0.5) * h / rows).astype(np.int64), h - 1)
    ci = np.minimum(((np.arange(cols) + 0.5) * w / cols).astype(np.int64), w - 1)
    return labels[ri][:, ci]


def augment_batch(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, aug: Augment, *,
                  lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Augment a float32 batch ``x`` (B, H, W, bands) and its labels ``y`` (B, H, W) in place-ish.

    Flips and 90° turns and oblique views (labels follow), loss of resolution, grayscale (some of
    it as pan with bright vegetation), a coarser sensor's view, haze, brightness and contrast,
    per-band gains (``geoseg.augment`` for the satellite look);
    values are clipped to the training data's range ``lo..hi`` per band. The loop runs over the
    chips of the batch, never over pixels.
    """
    b, h, w, nb = x.shape
    if aug.flips:
        turns = rng.integers(0, 4, size=b)
        flip = rng.random(b) < 0.5
        square = h == w
        for i in range(b):
            xi, yi = x[i], y[i]
            if flip[i]:
                xi, yi = xi[:, ::-1], yi[:, ::-1]
            if square and turns[i]:
                xi, yi = np.rot90(xi, turns[i], axes=(0, 1)), np.rot90(yi, turns[i], axes=(0, 1))
            x[i], y[i] = xi, yi
    from geoseg import augment as look

    if aug.off_nadir > 0:
        for i in np.flatnonzero(rng.random(b) < aug.off_nadir):
            x[i], y[i] = look.off_nadir(x[i], y[i], rng, max_shear=aug.off_nadir_shear, ignore=IGNORE)
    if aug.blur > 0:
        soft = rng.random(b) < aug.blur
        factors = rng.uniform(1.0, 3.0, size=b)
        for i in np.flatnonzero(soft):
            small = max(1, int(round(h / factors[i]))), max(1, int(round(w / factors[i])))
            x[i] = resize_image(resize_image(x[i], *small), h, w)
    if aug.grayscale > 0 and nb > 1:
        # Panchromatic sensors weigh the bands differently from luminance (WorldView's pan reaches
        # into the near infrared, where vegetation is bright): half the gray chips use random
        # band weights around luminance.
        gray = np.flatnonzero(rng.random(b) < aug.grayscale)
        base = np.array([0.299, 0.587, 0.114], np.float32) if nb == 3 else np.full(nb, 1 / nb, np.float32)
        for i in gray:
            if nb == 3 and aug.pan_vegetation > 0 and rng.random() < aug.pan_vegetation:
                x[i] = look.pan_vegetation(x[i], rng, lo=lo, hi=hi)
                continue
            weights = base if rng.random() < 0.5 else rng.dirichlet(base * 6).astype(np.float32)
            x[i] = (x[i] @ weights)[..., None]
    if aug.sensor > 0:
        for i in np.flatnonzero(rng.random(b) < aug.sensor):
            x[i] = look.sensor_look(x[i], rng, max_factor=aug.sensor_factor, lo=lo, hi=hi)
    if aug.haze > 0:
        for i in np.flatnonzero(rng.random(b) < aug.haze):
            x[i] = look.haze(x[i], rng, lo=lo, hi=hi)
    if aug.brightness > 0 or aug.contrast > 0:
        gain = rng.uniform(1 - aug.brightness, 1 + aug.brightness, size=(b, 1, 1, 1)).astype(np.float32)
        con = rng.uniform(1 - aug.contrast, 1 + aug.contrast, size=(b, 1, 1, 1)).astype(np.float32)
        mean = x.mean(axis=(1, 2), keepdims=True)
        x = ((x - mean) * con + mean) * gain
    if aug.band_gain > 0 and nb > 1:
        x = x * rng.uniform(1 - aug.band_gain, 1 + aug.band_gain, size=(b, 1, 1, nb)).astype(np.float32)
    np.clip(x, lo, hi, out=x)
    return x, y


class ChipSampler:
    """Draws augmented training batches from candidate chips; the stream is a pure function of
    ``(seed, epoch)``, so a resumed run sees the same chips as an uninterrupted one."""

    def __init__(self, scenes: Sequence[SceneData], rects: Sequence[Rect], windows: Sequence[tuple[int, int, int]], *,
                 chip: int, stride: int, augment: Augment, lo: np.ndarray, hi: np.ndarray,
                 scene_weights: Sequence[float] | None = None) -> None:
        """``scene_weights`` (one per scene, by index): each scene's share of the chips drawn;
        None draws every candidate chip equally often (scenes by their labelled area)."""
        self.scenes, self.windows = scenes, list(windows)
        self.p = None
        if scene_weights is not None:
            of_scene = np.array([w[0] for w in self.windows])
            counts = np.bincount(of_scene, minlength=len(scenes))
            weights = np.asarray(scene_weights, dtype=np.float64)[of_scene] / counts[of_scene]
            self.p = weights / weights.sum()
        self.rect_of = {}
        for rect in rects:  # each window lies in exactly one training rectangle
            for w in chip_windows(rect, scenes[rect.scene].shape, chip=chip, stride=stride):
                self.rect_of.setdefault(w, rect)
        self.chip, self.stride, self.augment = chip, stride, augment
        self.lo, self.hi = lo.astype(np.float32), hi.astype(np.float32)

    def crop_window(self, window: tuple[int, int, int], scale: float, shift: tuple[float, float]) -> tuple[int, int, int, int]:
        """(scene, row, col, size) of the scaled crop around a candidate chip, kept inside its
        training rectangle (so scale jitter never reaches the gap or a validation area)."""
        s, r, c = window
        rect = self.rect_of[window]
        h, w = self.scenes[s].shape
        k = max(1, int(round(self.chip * scale)))
        cr = r + self.chip / 2 + shift[0]
        cc = c + self.chip / 2 + shift[1]
        _, kr = _fit_window(rect.r0, rect.r1, h, k, cr)
        _, kc = _fit_window(rect.c0, rect.c1, w, k, cc)
        k = min(kr, kc)  # square crops
        r0, _ = _fit_window(rect.r0, rect.r1, h, k, cr)
        c0, _ = _fit_window(rect.c0, rect.c1, w, k, cc)
        return s, r0, c0, k

    def epoch_batches(self, seed: int, epoch: int, steps: int, batch_size: int):
        """Yield ``steps`` batches (x float32 (B, chip, chip, bands), y int32 (B, chip, chip))."""
        rng = np.random.default_rng([seed, epoch])
        if self.p is None:
            order = np.concatenate([rng.permutation(len(self.windows))
                                    for _ in range(math.ceil(steps * batch_size / len(self.windows)))])
        else:
            order = rng.choice(len(self.windows), size=steps * batch_size, p=self.p)
        jitter = math.log(self.augment.scale_jitter)
        for step in range(steps):
            picks = order[step * batch_size : (step + 1) * batch_size]
            scales = np.exp(rng.uniform(-jitter, jitter, size=len(picks)))
            shifts = rng.uniform(-self.stride / 2, self.stride / 2, size=(len(picks), 2))
            xs, ys = [], []
            for i, p in enumerate(picks):
                s, r0, c0, k = self.crop_window(self.windows[p], scales[i], tuple(shifts[i]))
                scene = self.scenes[s]
                img = crop(scene.image, r0, c0, k, k).astype(np.float32)
                lab = crop(scene.labels, r0, c0, k, k, fill=IGNORE)
                xs.append(resize_image(img, self.chip, self.chip))
                ys.append(resize_labels(lab, self.chip, self.chip))
            x, y = augment_batch(np.stack(xs), np.stack(ys), rng, self.augment, lo=self.lo, hi=self.hi)
            yield np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(y).astype(np.int32)


# --- losses (keras.ops; label IGNORE takes no part) -------------------------------------------------




def scene_weights(weighting: list | None, windows: Sequence[tuple[int, int, int]], scenes: int) -> list[float] | None:
    """Per training scene, its share of the chips (``ChipSampler``'s ``scene_weights``)."""
    if weighting is None:
        return None
    counts = np.bincount([w[0] for w in windows], minlength=scenes).astype(np.float64)
    out = []
    for s, item in enumerate(weighting):
        if item[0] == "image":
            out.append(float(item[1]))
        else:
            group = [k for k, other in enumerate(weighting) if other[0] == "dataset" and other[1] == item[1]]
            total = counts[group].sum()
            out.append(float(item[2] * counts[s] / total) if total else 0.0)
    if not sum(out) > 0:
        raise InputError("the weighted datasets have no training chips; check their labels or the weights")
    return out




def encoder_stats(dtype: np.dtype, value_range: tuple[float, float], bands: int) -> tuple[np.ndarray, np.ndarray]:
    """The fixed input mapping of a pretrained encoder: ``(x - 127) / 128`` on 8-bit imagery (as
    the ImageNet weights were trained); other data types have their 2-98 % value range mapped onto
    0-255 first, folded into one mean and std per band."""
    if np.dtype(dtype) == np.uint8:
        lo, span = 0.0, 255.0
    else:
        lo, span = value_range[0], max(value_range[1] - value_range[0], 1e-6)
    mean = lo + 127.0 * span / 255.0
    std = 128.0 * span / 255.0
    return np.full(bands, mean), np.full(bands, std)


def _labelled_sample(scenes: Sequence[SceneData], rects: Sequence[Rect], *, step: int, budget: float,
                     ) -> list[np.ndarray]:
    """Per area, its labelled valid pixels (pixels x bands, float64) on every ``step``-th row and
    column, or sparser so that an area gives about ``budget`` pixels at most."""
    parts = []
    for rect in rects:
        scene = scenes[rect.scene]
        k = max(step, math.ceil(math.sqrt(rect.height * rect.width / budget)))
        img = scene.image[rect.r0 : rect.r1 : k, rect.c0 : rect.c1 : k]
        ok = scene.labels[rect.r0 : rect.r1 : k, rect.c0 : rect.c1 : k] != IGNORE
        parts.append(img[ok].astype(np.float64))
    return parts


def input_stats(scenes: Sequence[SceneData], rects: Sequence[Rect]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-band mean, std, min and max of the valid training pixels (every 2nd row and column, or
    sparser in large areas: about 4 M pixels per area at most).

    See ``input_value_range`` for the 2nd-98th percentile over all bands that the bundle also records.
    """
    parts = _labelled_sample(scenes, rects, step=2, budget=4e6)
    pixels = np.concatenate(parts) if parts else np.zeros((0, 1))
    if not len(pixels):
        raise InputError("the training areas hold no labelled, valid pixels; check the labels and the nodata mask")
    std = pixels.std(axis=0)
    return pixels.mean(axis=0), np.where(std > 0, std, 1.0), pixels.min(axis=0), pixels.max(axis=0)


def input_value_range(scenes: Sequence[SceneData], rects: Sequence[Rect]) -> tuple[float, float]:
    """2nd and 98th percentiles of the valid training pixel values, all bands together (every 4th
    row and column). Predict maps scenes of another data type onto this range."""
    parts = [p.ravel() for p in _labelled_sample(scenes, rects, step=4, budget=1e6)]
    values = np.concatenate(parts) if parts else np.zeros(0)
    if not values.size:
        return (0.0, 1.0)
    lo, hi = np.percentile(values, [2, 98])
    return (float(lo), float(hi) if hi > lo else float(lo) + 1.0)
