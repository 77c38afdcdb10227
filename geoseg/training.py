"""Train a segmentation model on labelled scenes and save it as a geoseg bundle.

Data flow (every step is a function of its own)::

    images + labels ──load_scene──▶ SceneData: the whole scene at the training GSD, in memory
                    ──split_scene─▶ training and validation rectangles, held out by area with a gap
                                    of one chip between them (or whole validation scenes)
                    ──chip_windows─▶ overlapping candidate chips inside the training rectangles,
                                    mostly-nodata/ignore chips skipped
                    ──ChipSampler──▶ batches: scale jitter, flips and 90° turns, blur, grayscale,
                                    brightness/contrast, band gains (vectorised numpy, seeded per epoch)
                    ──train_on_batch─▶ (optionally an average of the weights, --ema)
                    ──epoch──validate──▶ IoU on the validation areas, pooled and per dataset
                    ──best epoch by validation mean foreground IoU (pooled, or the mean of the
                      datasets' with --val-average datasets)──▶ save_bundle(-o)

Memory: every scene (training and validation) is read whole at the training GSD and kept in memory
(pixels in their native dtype plus one byte of labels per pixel). That is simple and fast for
datasets of up to a few hundred megapixels at the training GSD (the buildings data is ~6 Mpx at
0.28 m); larger collections need a windowed chip reader instead.

Resumable: after every epoch the state (weights, best weights, optimizer variables, averaged weights, epoch, best
score, early-stopping counter, elapsed time, the settings) is written beside the output in
``MODEL.resume/``, ``state.json`` last and atomically, so Ctrl-C at any moment leaves the last
complete epoch's state; ``resume=True`` continues from it. The random streams are derived from
``(seed, epoch)``, so a resumed run draws the same chips as an uninterrupted one. The bundle is
written only when training ends, atomically.

Keras is imported only by the functions that need it.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geoseg.errors import InputError, OutputError
from geoseg.labels import IGNORE
from geoseg.models import ARCHITECTURES
from geoseg.outputs import PALETTE

log = logging.getLogger(__name__)

__all__ = [
    "LOSSES",
    "Augment",
    "ChipSampler",
    "Dataset",
    "Rect",
    "SceneData",
    "TrainConfig",
    "TrainEvent",
    "TrainResult",
    "augment_batch",
    "chip_windows",
    "load_scene",
    "log_path_for",
    "make_loss",
    "parse_class_weights",
    "parse_classes",
    "parse_loss",
    "read_config",
    "resize_image",
    "resumed_config",
    "resume_dir_for",
    "split_scene",
    "train",
    "validation_windows",
]

#: Loss terms ``make_loss`` knows; combine them as ``ce+dice`` or ``0.5*focal+dice``.
LOSSES = ("ce", "dice", "focal")
ARCHS = tuple(ARCHITECTURES)  # the architectures geoseg.models builds
PRECISIONS = ("float32", "mixed_bfloat16")
FOCAL_GAMMA = 2.0
DICE_SMOOTH = 1.0


# --- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Augment:
    """Augmentation of training chips (never of validation). Probabilities are per chip."""

    flips: bool = True  # random horizontal/vertical flips and 90° turns
    scale_jitter: float = 1.6  # chip scale drawn log-uniformly from [1/s, s] (1 = off)
    brightness: float = 0.2  # gain drawn from [1-b, 1+b]
    contrast: float = 0.2  # contrast about the chip mean drawn from [1-c, 1+c]
    grayscale: float = 0.2  # probability of replacing every band by the luminance (panchromatic look)
    blur: float = 0.2  # probability of losing resolution: down by 1..3x and back (soft/upsampled imagery)
    band_gain: float = 0.0  # per-band gain drawn from [1-g, 1+g] (colour casts: white balance, rusty or faded roofs)
    # the satellite look (geoseg.augment); all off by default
    sensor: float = 0.0  # probability of a coarser sensor's view: PSF blur, down by 1.25..sensor_factor, noise, JPEG, back up
    sensor_factor: float = 3.5  # the coarsest of those views, as a multiple of the training GSD
    haze: float = 0.0  # probability of a veil of scattered light
    off_nadir: float = 0.0  # probability of an oblique view (shear and compression along a random direction)
    off_nadir_shear: float = 0.15  # the largest shear (and compression) of that view
    pan_vegetation: float = 0.0  # share of the grayscale chips made as pan with bright vegetation (WorldView-like)

    def __post_init__(self) -> None:
        if not self.scale_jitter >= 1:
            raise InputError(f"--scale-jitter {self.scale_jitter} must be >= 1 (1 turns it off), e.g. 1.6")
        for name in ("brightness", "contrast", "band_gain"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise InputError(f"--{name.replace('_', '-')} {v} must be in [0, 1), e.g. 0.2")
        for name in ("grayscale", "blur", "sensor", "haze", "off_nadir", "pan_vegetation"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise InputError(f"--{name.replace('_', '-')} {v} is a probability; give a value in [0, 1]")
        if not 1.25 <= self.sensor_factor <= 10:
            raise InputError(f"--sensor-factor {self.sensor_factor} must be in [1.25, 10], e.g. 3.5")
        if not 0 < self.off_nadir_shear < 0.5:
            raise InputError(f"--off-nadir-shear {self.off_nadir_shear} must be in (0, 0.5), e.g. 0.15")


@dataclass(frozen=True)
class Dataset:
    """One more set of labelled scenes with its own label conventions (``[[datasets]]`` in a config).

    ``label_values`` maps label raster values to classes, ``ignore`` or sets of classes
    (``geoseg.targets``: ``2=!building`` is any class but building). ``labelled_classes`` names the
    classes the dataset labels; a pixel of any other class (for example the uncovered pixels of
    building footprints, which read as class 0) is then known only not to be one of them, and the
    loss does not push it towards any particular other class. ``weight``: the dataset's share of the
    training chips, drawn evenly over its chips (None: by area). Weights are relative: beside
    weighted datasets the top-level images weigh 1 together (or ``sample_weights`` each).
    """

    images: tuple[str, ...]
    labels: tuple[str, ...]
    val_images: tuple[str, ...] = ()
    val_labels: tuple[str, ...] = ()
    label_values: str | None = None
    labelled_classes: tuple[str, ...] = ()
    label_field: str | None = None  # None: the run's label_field
    line_width: float | None = None  # None: the run's line_width
    weight: float | None = None
    name: str = ""
    aoi: str | None = None  # polygons outside which its labels count for nothing (geoseg.aoi); None: the run's

    def __post_init__(self) -> None:
        for key in ("images", "labels", "val_images", "val_labels", "labelled_classes"):
            value = getattr(self, key)
            object.__setattr__(self, key, tuple(str(v) for v in ([value] if isinstance(value, str) else value)))


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (saved in the resume state and the bundle description)."""

    images: tuple[str, ...]
    labels: tuple[str, ...]
    classes: tuple[str, ...] = ("background", "building")  # "name" or "name:#rrggbb" or "name:#rrggbb:min_area_m2"
    val_images: tuple[str, ...] = ()
    val_labels: tuple[str, ...] = ()
    val_fraction: float = 0.2
    label_field: str = "class"
    label_values: str | None = None  # raster labels: "0=ignore,1=building,2-5=background" (None: values are class ids)
    labelled_classes: tuple[str, ...] = ()  # the classes the top-level labels name (empty: all); see Dataset
    line_width: float | None = None  # metres, to buffer line/point labels
    sample_weights: tuple[float, ...] | None = None  # one per training image: its share of the chips drawn (None: by area)
    bands: tuple[int, ...] | None = None
    gsd: float | None = None  # None: the first image's GSD
    chip_size: int = 256
    chip_stride: int | None = None  # None: chip_size // 2 (50 % overlap)
    min_labelled: float = 0.5  # chips with a smaller fraction of valid, labelled pixels are skipped
    arch: str = "unet"
    encoder: str = "none"  # "efficientnet-lite0": a U-Net on the pretrained encoder (geoseg.models.efficientnet)
    encoder_weights: str = "imagenet"  # with an encoder: start from its ImageNet weights, or "random"
    width: int = 16
    depth: int = 4
    precision: str = "float32"
    epochs: int = 20
    steps_per_epoch: int | None = None  # None: one pass over the training chips
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int | None = None  # None: 5 % of all steps (at most 500)
    loss: str = "ce+dice"
    class_weights: tuple[float, ...] | None = None
    patience: int = 10  # epochs without a better validation IoU before stopping (0: never stop early)
    ema: float = 0.0  # momentum per step of the averaged weights that are validated and saved (0: the raw weights)
    val_average: str = "pixels"  # validation score over all pixels pooled, or the mean of each dataset's ("datasets")
    seed: int = 0
    augment: Augment = Augment()
    tile_size: int = 512  # predict defaults stored in the bundle
    overlap: int = 128
    name: str | None = None  # bundle name; None: the output's stem
    description: str = ""
    max_minutes: float | None = None  # stop after the epoch that would overrun this wall-clock budget
    datasets: tuple[Dataset, ...] = ()  # more labelled scenes, each with its own label conventions
    init_from: str | None = None  # a bundle to fine-tune: its weights, normalisation and (by default) GSD
    threshold: str | None = None  # decision thresholds stored in the bundle: "building=0.3" (predict --threshold)
    scales: Any = None  # zooms stored in the bundle as predict's default: "1,2" or [1, 2] (predict --scales)
    scale_merge: str | None = None  # how they merge: "max" or "mean" (predict --scale-merge)
    aoi: str | None = None  # polygons (any vector file) outside which the top-level labels count for nothing

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "datasets", tuple(d if isinstance(d, Dataset) else Dataset(**d) for d in (self.datasets or ())))
        for key in ("images", "labels", "val_images", "val_labels", "classes", "labelled_classes"):
            set_(self, key, tuple(str(v) for v in getattr(self, key)))
        if self.bands is not None:
            set_(self, "bands", tuple(int(b) for b in self.bands))
        if self.class_weights is not None:
            set_(self, "class_weights", tuple(float(w) for w in self.class_weights))
        if self.sample_weights is not None:
            set_(self, "sample_weights", tuple(float(w) for w in self.sample_weights))
        if isinstance(self.augment, dict):
            set_(self, "augment", Augment(**self.augment))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return json.loads(json.dumps(d))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class TrainEvent:
    """What the progress callback gets: ``kind`` is "step" (after each batch) or "epoch"."""

    kind: str
    epoch: int  # 1-based
    epochs: int
    step: int
    steps: int
    loss: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainResult:
    output: str
    sha256: str
    log: str
    name: str
    classes: list[str]
    best_epoch: int
    best_val_miou: float | None  # the best epoch's score: mean foreground IoU (pooled, or the datasets' mean with --val-average datasets)
    val_iou: dict[str, float | None]
    epochs_run: int
    stopped: str  # "completed" | "early_stopping" | "time_budget"
    resumed_from: int  # epochs already done when this call started (0: a fresh run)
    chips: dict[str, int]
    pixels: dict[str, int]
    gsd: float
    gsd_range: list[float]
    params: int
    seconds_per_step: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


Progress = Callable[[TrainEvent], None]


# --- parsing settings ----------------------------------------------------------------------------


_HEX = re.compile(r"^#?([0-9a-fA-F]{6})$")


def with_thresholds(class_infos, spec: str | None):
    """``class_infos`` with the decision thresholds of ``spec`` ("building=0.3"; see ``--threshold``)."""
    from geoseg.blend import resolve_thresholds
    from geoseg.cleanup import parse_per_class

    if not spec:
        return class_infos
    values = resolve_thresholds(parse_per_class(str(spec), "--threshold", "P"),
                                {c.name: c.threshold for c in class_infos}, [class_infos[0].name])  # background: id 0
    return [dataclasses.replace(c, threshold=values[c.name]) for c in class_infos]


def parse_classes(spec: str | Sequence[str]):
    """``"background,building:#e6194b:4"`` -> ClassInfo tuple (background is class 0).

    Each class is ``name``, ``name:#rrggbb`` or ``name:#rrggbb:min_area_m2``; colours default to
    ``PALETTE``.
    """
    from geoseg.models.bundle import ClassInfo

    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [str(i).strip() for i in items if str(i).strip()]
    if len(items) < 2:
        raise InputError(f"--classes {','.join(items) or spec!r}: give at least two class names, background first, e.g. background,building")
    out = []
    for i, item in enumerate(items):
        name, *rest = item.split(":")
        name = name.strip()
        color = PALETTE[i % len(PALETTE)]
        area = 0.0
        if rest and rest[0].strip():
            m = _HEX.match(rest[0].strip())
            if not m:
                raise InputError(f"--classes: colour {rest[0]!r} of {name!r} is not #rrggbb; write e.g. {name}:#e6194b")
            h = m.group(1)
            color = (int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16))
        if len(rest) > 1:
            try:
                area = float(rest[1])
            except ValueError:
                raise InputError(f"--classes: minimum area {rest[1]!r} of {name!r} is not a number of m²") from None
        if len(rest) > 2 or not name:
            raise InputError(f"--classes: {item!r} is not name[:#rrggbb[:min_area_m2]]")
        out.append(ClassInfo(name=name, color=color, min_area_m2=area))
    names = [c.name.lower() for c in out]
    if len(set(names)) != len(names):
        raise InputError(f"--classes {','.join(items)}: class names must be unique")
    return tuple(out)


def parse_class_weights(spec: str | Sequence[float] | None, classes: int) -> tuple[float, ...] | None:
    """``"1,3"`` -> (1.0, 3.0): one non-negative weight per class."""
    if spec is None or spec == "" or spec == ():
        return None
    try:
        weights = tuple(float(v) for v in (spec.split(",") if isinstance(spec, str) else spec))
    except ValueError:
        raise InputError(f"--class-weights {spec!r}: give one number per class separated by commas, e.g. 1,3") from None
    if len(weights) != classes or any(not (w >= 0 and math.isfinite(w)) for w in weights) or not any(weights):
        raise InputError(f"--class-weights {spec!r}: give {classes} non-negative numbers (one per class), e.g. {','.join(['1'] * classes)}")
    return weights


_TERM = re.compile(r"^\s*(?:(\d*\.?\d+(?:e-?\d+)?)\s*\*?\s*)?([a-z]+)\s*$")


def parse_loss(spec: str) -> tuple[tuple[float, str], ...]:
    """``"ce+dice"`` -> ((1.0, "ce"), (1.0, "dice")); ``"0.5*focal+dice"`` weights a term."""
    terms = []
    for part in str(spec).lower().split("+"):
        m = _TERM.match(part)
        if not m or m.group(2) not in LOSSES:
            raise InputError(f"--loss {spec!r}: use {', '.join(LOSSES)} or weighted sums like ce+dice or 0.5*focal+dice")
        terms.append((float(m.group(1)) if m.group(1) else 1.0, m.group(2)))
    return tuple(terms)


#: Config keys that are paths (relative to the config file's folder).
_PATH_KEYS = ("images", "labels", "val_images", "val_labels", "output", "init_from", "aoi")
_LIST_KEYS = ("images", "labels", "val_images", "val_labels", "classes", "class_weights", "bands", "sample_weights",
              "labelled_classes")


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML training config into option values (keys as the CLI options, ``-`` or ``_``).

    Relative paths are made relative to the config file's folder. Augmentation settings may also be
    given in an ``[augment]`` table. InputError for unknown keys, naming the known ones.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config {path}: no such file; check the path")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"config {path} is not valid TOML ({exc})") from None
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "datasets":
            flat["datasets"] = value
        elif key == "augment" and isinstance(value, dict):
            for k, v in value.items():
                flat[k.replace("-", "_")] = v
        else:
            flat[key.replace("-", "_")] = value
    known = set(_config_keys())
    unknown = sorted(set(flat) - known)
    if unknown:
        raise InputError(f"config {path}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
    base = path.resolve().parent
    for key in _PATH_KEYS:
        if key not in flat:
            continue
        value = flat[key]
        if key == "init_from" and not str(value).endswith(".keras"):
            continue  # a built-in model's name
        if key in ("output", "init_from", "aoi"):
            flat[key] = str(base / value) if not Path(value).is_absolute() else value
        else:
            values = [value] if isinstance(value, str) else list(value)
            flat[key] = tuple(str(base / v) if not Path(v).is_absolute() else v for v in values)
    if "datasets" in flat:
        flat["datasets"] = tuple(_read_dataset(path, base, i, d) for i, d in enumerate(_as_list(flat["datasets"])))
    for key in _LIST_KEYS:
        if key in flat and isinstance(flat[key], str) and key not in _PATH_KEYS:
            flat[key] = tuple(v.strip() for v in flat[key].split(",") if v.strip())
        elif key in flat and isinstance(flat[key], list):
            flat[key] = tuple(flat[key])
    return flat


def _as_list(value: Any) -> list[Any]:
    return [value] if isinstance(value, dict) else list(value)


def _read_dataset(path: Path, base: Path, index: int, table: Any) -> Dataset:
    """One ``[[datasets]]`` table: paths relative to the config's folder; InputError for unknown keys."""
    if not isinstance(table, dict):
        raise InputError(f"config {path}: datasets must be [[datasets]] tables, got {table!r}")
    table = {k.replace("-", "_"): v for k, v in table.items()}
    known = {f.name for f in dataclasses.fields(Dataset)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise InputError(f"config {path}: dataset {index + 1} has unknown key(s) {', '.join(unknown)}; "
                         f"known keys: {', '.join(sorted(known))}")
    for key in ("images", "labels", "val_images", "val_labels"):
        if key in table:
            values = [table[key]] if isinstance(table[key], str) else list(table[key])
            table[key] = tuple(str(base / v) if not Path(v).is_absolute() else v for v in values)
    if table.get("aoi") is not None:
        table["aoi"] = str(base / str(table["aoi"]))
    if isinstance(table.get("labelled_classes"), str):
        table["labelled_classes"] = tuple(v.strip() for v in table["labelled_classes"].split(",") if v.strip())
    try:
        return Dataset(**table)
    except TypeError as exc:
        raise InputError(f"config {path}: dataset {index + 1}: {exc}; give images and labels") from None


def _config_keys() -> list[str]:
    keys = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "augment"]
    keys += [f.name for f in dataclasses.fields(Augment)]
    return keys + ["output", "datasets"]


def resume_dir_for(output: str | os.PathLike) -> Path:
    """Where the resume state of a run writing ``output`` lives: ``MODEL.resume/`` beside it."""
    p = Path(output)
    return p.with_name(p.stem + ".resume")


def resumed_config(output: str | os.PathLike) -> TrainConfig:
    """The settings of the interrupted run whose state lies beside ``output``."""
    state = _State(resume_dir_for(output))
    if not state.exists():
        raise InputError(f"--resume: no saved state at {state.folder}; start the run without --resume")
    return TrainConfig.from_dict(state.read()["config"])


def log_path_for(output: str | os.PathLike) -> Path:
    """The CSV log beside the output: ``MODEL.log.csv``."""
    p = Path(output)
    return p.with_name(p.stem + ".log.csv")


# --- scenes in memory ----------------------------------------------------------------------------


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
    ``aoi``: polygons (any vector file, any CRS) outside which the labels are ignored (``geoseg.aoi``);
    the pixels stay, as context for the chips that reach the edge.

    With ``targets`` (a ``geoseg.targets.TargetSets``) the labels are codes of allowed class sets:
    ``label_values`` may name sets (``2=!building``, ``3=road|water``), and ``labelled_classes``
    turns pixels of any other class into "not one of these" (``TargetSets.restrict``)."""
    from geoseg.labels import LabelReader, parse_label_values
    from geoseg.scene import SceneReader, at_gsd, open_scene

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
        from geoseg.aoi import read_area
        from geoseg.scene import pixels_inside

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
        from geoseg.tiling import spaced_starts

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


def _check_config(cfg: TrainConfig, multiple: int) -> None:
    def positive_int(name: str, value: Any, minimum: int = 1) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise InputError(f"--{name.replace('_', '-')} must be a whole number >= {minimum}, got {value!r}")

    if not cfg.images and not any(d.images for d in cfg.datasets):
        raise InputError("no training images; give --images A.tif B.tif ... (or images = [...] in --config)")
    if len(cfg.images) != len(cfg.labels):
        raise InputError(f"{len(cfg.images)} --images but {len(cfg.labels)} --labels; give one labels file per image, in the same order")
    if len(cfg.val_images) != len(cfg.val_labels):
        raise InputError(f"{len(cfg.val_images)} --val-images but {len(cfg.val_labels)} --val-labels; give one labels file per validation image")
    class_names = [c.name for c in parse_classes(cfg.classes)]
    from geoseg.targets import TargetSets, parse_label_sets

    for i, d in enumerate(cfg.datasets, start=1):
        what = f"dataset {i}{f' ({d.name})' if d.name else ''}"
        if len(d.images) != len(d.labels) or len(d.val_images) != len(d.val_labels):
            raise InputError(f"{what}: give one labels file per image and per validation image, in the same order")
        if d.weight is not None and not (math.isfinite(d.weight) and d.weight >= 0):
            raise InputError(f"{what}: weight {d.weight} must be a number >= 0")
        parse_label_sets(d.label_values, class_names)
        for name in d.labelled_classes:
            TargetSets(class_names).class_id(name)
    for name in cfg.labelled_classes:
        TargetSets(class_names).class_id(name)
    if cfg.arch not in ARCHS:
        raise InputError(f"--arch {cfg.arch!r} is not one of {', '.join(ARCHS)}")
    from geoseg.models.efficientnet import ENCODER_WEIGHTS, ENCODERS

    if cfg.encoder not in ENCODERS:
        raise InputError(f"--encoder {cfg.encoder!r} is not one of {', '.join(ENCODERS)}")
    if cfg.encoder != "none" and cfg.arch != "unet":
        raise InputError(f"--encoder {cfg.encoder} builds a U-Net; use it with --arch unet (not {cfg.arch})")
    if cfg.encoder_weights not in ENCODER_WEIGHTS:
        raise InputError(f"--encoder-weights {cfg.encoder_weights!r} is not one of {', '.join(ENCODER_WEIGHTS)}")
    if cfg.precision not in PRECISIONS:
        raise InputError(f"--precision {cfg.precision!r} is not one of {', '.join(PRECISIONS)}")
    for name in ("chip_size", "width", "depth", "epochs", "batch_size", "tile_size"):
        positive_int(name, getattr(cfg, name))
    for name in ("steps_per_epoch", "chip_stride"):
        if getattr(cfg, name) is not None:
            positive_int(name, getattr(cfg, name))
    positive_int("patience", cfg.patience, 0)
    positive_int("overlap", cfg.overlap, 0)
    if cfg.warmup_steps is not None:
        positive_int("warmup_steps", cfg.warmup_steps, 0)
    why = f"--encoder {cfg.encoder}" if cfg.encoder != "none" else f"--depth {cfg.depth}"
    if cfg.chip_size % multiple:
        lower = max(multiple, cfg.chip_size // multiple * multiple)
        raise InputError(f"--chip-size {cfg.chip_size} must be a multiple of {multiple} for {why}; use {lower} or {lower + multiple}")
    if cfg.tile_size % multiple:
        raise InputError(f"--tile-size {cfg.tile_size} must be a multiple of {multiple} for {why}")
    if 2 * cfg.overlap >= cfg.tile_size:
        raise InputError(f"--overlap {cfg.overlap} must be less than half of --tile-size {cfg.tile_size}")
    if not 0 <= cfg.val_fraction < 0.9:
        raise InputError(f"--val-fraction {cfg.val_fraction} must be in [0, 0.9), e.g. 0.2")
    if not 0 <= cfg.min_labelled <= 1:
        raise InputError(f"--min-labelled {cfg.min_labelled} must be a fraction in [0, 1]")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise InputError(f"--lr {cfg.lr} must be a positive number, e.g. 0.001")
    if cfg.gsd is not None and not cfg.gsd > 0:
        raise InputError(f"--gsd {cfg.gsd} must be a positive number of metres per pixel")
    if cfg.max_minutes is not None and not cfg.max_minutes > 0:
        raise InputError(f"--max-minutes {cfg.max_minutes} must be positive")
    if not 0 <= cfg.ema < 1:
        raise InputError(f"--ema {cfg.ema} must be in [0, 1): the momentum per step, e.g. 0.995 (0: off)")
    if cfg.val_average not in VAL_AVERAGES:
        raise InputError(f"--val-average {cfg.val_average!r} is not one of {', '.join(VAL_AVERAGES)}")
    if cfg.sample_weights is not None:
        w = cfg.sample_weights
        if len(w) != len(cfg.images):
            raise InputError(f"{len(w)} --sample-weights for {len(cfg.images)} --images; give one weight per training image")
        if not all(math.isfinite(v) and v >= 0 for v in w) or not sum(w) > 0:
            raise InputError(f"--sample-weights {','.join(f'{v:g}' for v in w)}: weights must be >= 0 and not all 0")
    parse_loss(cfg.loss)
    parse_label_sets(cfg.label_values, class_names)


def _sources(cfg: TrainConfig) -> tuple[list[tuple[str, str, Dataset]], list[tuple[str, str, Dataset]], list | None]:
    """(training (image, labels, dataset) triples, validation triples, weighting). The top-level
    images form a dataset of their own.

    Weighting is None (every chip equally often) or one item per training image: ``("image", w)``
    for a top-level image with ``sample_weights`` (its share of the chips), ``("dataset", i, w)``
    for an image of dataset ``i`` with weight ``w`` (the dataset's share, drawn evenly over its
    chips); ``_scene_weights`` turns them into per-scene shares once the chips are known."""
    top = Dataset(images=cfg.images, labels=cfg.labels, val_images=cfg.val_images, val_labels=cfg.val_labels,
                  label_values=cfg.label_values, labelled_classes=cfg.labelled_classes, name="top-level", aoi=cfg.aoi)
    train, val, weighting = [], [], []
    weighted = any(d.weight is not None for d in cfg.datasets)
    for i, d in enumerate((top, *cfg.datasets)):
        train += [(im, lab, d) for im, lab in zip(d.images, d.labels)]
        val += [(im, lab, d) for im, lab in zip(d.val_images, d.val_labels)]
        if i == 0 and cfg.sample_weights is not None:
            weighting += [("image", w) for w in cfg.sample_weights]
        elif i == 0:  # beside weighted datasets the top-level images weigh 1 together
            weighting += [("dataset", 0, 1.0) if weighted else None] * len(d.images)
        else:
            weighting += [None if d.weight is None else ("dataset", i, d.weight)] * len(d.images)
    if all(w is None for w in weighting):
        return train, val, None
    if any(w is None for w in weighting):
        raise InputError("give every [[datasets]] table a weight, or none of them")
    return train, val, weighting


def _scene_weights(weighting: list | None, windows: Sequence[tuple[int, int, int]], scenes: int) -> list[float] | None:
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


def _build(cfg: TrainConfig, bands: int, classes: int, mean: Sequence[float], std: Sequence[float], precision: str):
    import keras

    from geoseg.models import build_model

    kwargs = _arch_config(cfg, bands, classes)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        return build_model(cfg.arch, **kwargs, mean=list(mean), std=list(std))
    finally:
        keras.config.set_dtype_policy(previous)


def _init_meta(init_from: str):
    """The metadata of the ``--init-from`` bundle; InputError when there is no such model."""
    from geoseg.errors import BundleError
    from geoseg.models import read_meta, resolve_model

    try:
        path = resolve_model(init_from)
    except BundleError:
        raise InputError(f"--init-from {init_from}: no such model file nor built-in model; give a .keras bundle "
                         f"written by geoseg train or a name that `geoseg models` lists") from None
    return path, read_meta(path)


def architecture_of(init_from: str) -> dict[str, Any]:
    """The training options that rebuild the ``--init-from`` bundle's network: ``arch`` and
    ``encoder``, and ``width`` and ``depth`` for geoseg's own encoder. The CLI fills in those a
    fine-tuning run leaves unset, so ``--init-from buildings`` needs no architecture options."""
    _, meta = _init_meta(init_from)
    encoder = meta.arch_config.get("encoder", "none")
    found: dict[str, Any] = {"arch": meta.architecture, "encoder": encoder}
    if encoder == "none":
        found.update(width=meta.arch_config.get("width"), depth=meta.arch_config.get("depth"))
    return {k: v for k, v in found.items() if v is not None}


def _starting_bundle(cfg: TrainConfig, class_names: Sequence[str]):
    """The metadata of ``cfg.init_from`` (None without it), checked against the run's architecture
    and classes before any data is read. InputError says what differs and how to match it."""
    if not cfg.init_from:
        return None
    path, meta = _init_meta(cfg.init_from)
    wanted = {"arch": cfg.arch, "encoder": cfg.encoder}
    has = {"arch": meta.architecture, "encoder": meta.arch_config.get("encoder", "none")}
    if cfg.encoder == "none" and has["encoder"] == "none":
        wanted.update(width=cfg.width, depth=cfg.depth)
        has.update(width=meta.arch_config.get("width"), depth=meta.arch_config.get("depth"))
    differ = [f"--{k} {has[k]} (not {wanted[k]})" for k in wanted if has[k] != wanted[k]]
    if tuple(meta.class_names) != tuple(class_names):
        differ.append(f"--classes {','.join(meta.class_names)} (not {','.join(class_names)})")
    if differ:
        raise InputError(f"--init-from {path.name} is a different model; fine-tuning it needs {', '.join(differ)}")
    return meta


def _load_start_weights(model, cfg: TrainConfig) -> None:
    """Give ``model`` the weights of the ``--init-from`` bundle (same architecture, checked)."""
    from geoseg.models import load_bundle, resolve_model

    weights = load_bundle(resolve_model(cfg.init_from)).model.get_weights()
    if [w.shape for w in weights] != [tuple(v.shape) for v in model.weights]:
        raise InputError(f"--init-from {Path(cfg.init_from).name}: its weights do not fit a {_arch_text(cfg)}; "
                         f"it was written by another version of geoseg")
    model.set_weights(weights)


def _arch_text(cfg: TrainConfig) -> str:
    if cfg.encoder != "none":
        return f"{cfg.arch} on {cfg.encoder}"
    return f"{cfg.arch} (width {cfg.width}, depth {cfg.depth})"


def _arch_config(cfg: TrainConfig, bands: int, classes: int) -> dict[str, Any]:
    if cfg.encoder != "none":
        from geoseg.models.unet import LITE0_DECODER

        return {"bands": bands, "classes": classes, "encoder": cfg.encoder, "decoder_widths": list(LITE0_DECODER)}
    return {"bands": bands, "classes": classes, "width": cfg.width, "depth": cfg.depth}


def _size_multiple(cfg: TrainConfig) -> int:
    """Chip and tile sizes must be multiples of this: 32 on an encoder, else 2**depth."""
    from geoseg.models import size_multiple

    if cfg.encoder != "none":
        return 32
    depth = cfg.depth
    return size_multiple(depth) if isinstance(depth, int) and not isinstance(depth, bool) and depth >= 0 else 1


def _encoder_stats(dtype: np.dtype, value_range: tuple[float, float], bands: int) -> tuple[np.ndarray, np.ndarray]:
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


def _stats(scenes: Sequence[SceneData], rects: Sequence[Rect]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-band mean, std, min and max of the valid training pixels (every 2nd row and column, or
    sparser in large areas: about 4 M pixels per area at most).

    See ``_value_range`` for the 2nd-98th percentile over all bands that the bundle also records.
    """
    parts = []
    for rect in rects:
        scene = scenes[rect.scene]
        k = max(2, math.ceil(math.sqrt(rect.height * rect.width / 4e6)))
        img = scene.image[rect.r0 : rect.r1 : k, rect.c0 : rect.c1 : k]
        ok = scene.labels[rect.r0 : rect.r1 : k, rect.c0 : rect.c1 : k] != IGNORE
        parts.append(img[ok].astype(np.float64))
    pixels = np.concatenate(parts) if parts else np.zeros((0, 1))
    if not len(pixels):
        raise InputError("the training areas hold no labelled, valid pixels; check the labels and the nodata mask")
    std = pixels.std(axis=0)
    return pixels.mean(axis=0), np.where(std > 0, std, 1.0), pixels.min(axis=0), pixels.max(axis=0)


def _value_range(scenes: Sequence[SceneData], rects: Sequence[Rect]) -> tuple[float, float]:
    """2nd and 98th percentiles of the valid training pixel values, all bands together (every 4th
    row and column). Predict maps scenes of another data type onto this range."""
    parts = []
    for rect in rects:
        scene = scenes[rect.scene]
        k = max(4, math.ceil(math.sqrt(rect.height * rect.width / 1e6)))
        img = scene.image[rect.r0 : rect.r1 : k, rect.c0 : rect.c1 : k]
        ok = scene.labels[rect.r0 : rect.r1 : k, rect.c0 : rect.c1 : k] != IGNORE
        parts.append(img[ok].astype(np.float64).ravel())
    values = np.concatenate(parts) if parts else np.zeros(0)
    if not values.size:
        return (0.0, 1.0)
    lo, hi = np.percentile(values, [2, 98])
    return (float(lo), float(hi) if hi > lo else float(lo) + 1.0)


class _State:
    """The resume state folder: files named per epoch, ``state.json`` replaced last and atomically."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def exists(self) -> bool:
        return (self.folder / "state.json").is_file()

    def read(self) -> dict[str, Any]:
        try:
            return json.loads((self.folder / "state.json").read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"resume state {self.folder} is unreadable ({exc}); start again without --resume (with --overwrite)") from None

    def write(self, model, state: dict[str, Any], *, best_improved: bool, averaged: "_Averaged | None" = None) -> None:
        """Save this epoch's weights and optimizer variables (and the averaged weights with
        ``--ema``, which are then the ones kept as the best), then point ``state.json`` at them."""
        self.folder.mkdir(exist_ok=True)
        epoch = state["epoch"]
        previous = self.read()["files"] if self.exists() else {}
        files = {"weights": f"epoch-{epoch:04d}.weights.h5", "optimizer": f"epoch-{epoch:04d}.optimizer.npz",
                 "best": previous.get("best")}
        model.save_weights(self.folder / files["weights"])
        with open(self.folder / files["optimizer"], "wb") as f:
            np.savez(f, *[np.asarray(v) for v in model.optimizer.variables])
        if averaged is not None and averaged.values is not None:
            files["ema"] = f"epoch-{epoch:04d}.ema.npz"
            with open(self.folder / files["ema"], "wb") as f:
                np.savez(f, *averaged.values)
        if best_improved or files["best"] is None:
            files["best"] = f"best-{epoch:04d}.weights.h5"
            if averaged is not None and averaged.values is not None:
                with averaged.applied(model):
                    model.save_weights(self.folder / files["best"])
            else:
                shutil.copyfile(self.folder / files["weights"], self.folder / files["best"])
        tmp = self.folder / f"state.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps({**state, "files": files}, indent=1))
        os.replace(tmp, self.folder / "state.json")
        keep = set(files.values()) | {"state.json"}
        for p in self.folder.iterdir():
            if p.name not in keep:
                p.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _write_log(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


VAL_AVERAGES = ("pixels", "datasets")


class _Averaged:
    """Exponential moving average of a model's trainable weights (``--ema``), kept in numpy.

    ``update`` after each training step; ``with averaged.applied(model):`` swaps the average in
    (to validate or save it) and the raw weights back afterwards. The first update copies the
    weights, so a fine-tuning run averages from its starting point."""

    def __init__(self, momentum: float, values: list[np.ndarray] | None = None) -> None:
        self.momentum = momentum
        self.values = values

    def update(self, model) -> None:
        weights = [np.asarray(v.numpy()) for v in model.trainable_variables]
        if self.values is None:
            self.values = [w.astype(np.float32, copy=True) for w in weights]
            return
        m = self.momentum
        for avg, w in zip(self.values, weights):
            avg *= m
            avg += (1 - m) * w

    @contextlib.contextmanager
    def applied(self, model):
        if self.values is None:
            yield
            return
        raw = [np.array(v.numpy()) for v in model.trainable_variables]
        for var, avg in zip(model.trainable_variables, self.values):
            var.assign(avg)
        try:
            yield
        finally:
            for var, w in zip(model.trainable_variables, raw):
                var.assign(w)


def _prefetched(batches, depth: int = 2):
    """Yield the items of the iterator ``batches``, drawn ahead by a background thread (``depth``
    at most), so that sampling and augmenting the next batch (numpy, which releases the GIL in
    its heavy loops) overlaps the model's step. The order is unchanged; an error in the thread
    is raised here, and leaving the loop early stops the thread."""
    import queue
    import threading

    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(entry: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                items.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def fill() -> None:
        try:
            for item in batches:
                if not put(("item", item)):
                    return
            put(("end", done))
        except BaseException as exc:  # handed to the consumer
            put(("error", exc))

    thread = threading.Thread(target=fill, name="geoseg-chips", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = items.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join(timeout=5)


def _miou(iou: np.ndarray) -> float:
    fg = iou[1:]
    return float(np.nanmean(fg)) if np.isfinite(fg).any() else 0.0


def _validate(model, loss_fn, batches: list[tuple[np.ndarray, np.ndarray]], classes: int,
              groups: Sequence[int] | None = None) -> tuple[float, np.ndarray, list[np.ndarray]]:
    """(mean loss, IoU per class over all batches, IoU per class of each group). ``groups`` gives
    each batch's group (its dataset); None: one group."""
    from geoseg.workflows.evaluate import ConfusionMatrix

    groups = list(groups) if groups is not None else [0] * len(batches)
    cms = [ConfusionMatrix(classes) for _ in range(max(groups, default=-1) + 1)]
    total, weight = 0.0, 0
    for (x, y), g in zip(batches, groups):
        logits = np.asarray(model.predict_on_batch(x.astype(np.float32)), dtype=np.float32)
        n = int((y != IGNORE).sum())
        if n:
            total += float(loss_fn(y, logits)) * n
            weight += n
        # IoU counts only pixels whose class is known: partial-label codes (>= classes) are left out
        cms[g].update(np.argmax(logits, axis=-1).astype(np.uint8), np.where(y < classes, y, IGNORE))
    pooled = ConfusionMatrix(classes)
    for cm in cms:
        pooled.merge(cm)
    return (total / weight if weight else float("nan")), pooled.iou(), [cm.iou() for cm in cms]


@dataclass
class _Plan:
    """What a run's config resolves to before any data is read: the classes, zooms, chip grid and
    where the weights start (a bundle to fine-tune, the ImageNet encoder, or nothing)."""

    cfg: TrainConfig
    class_infos: tuple
    class_weights: tuple[float, ...] | None
    zooms: tuple[float, ...]
    multiple: int
    stride: int
    start: Any  # the starting bundle's metadata (--init-from), or None
    pretrained: Any  # the ImageNet encoder weights to set, or None

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.class_infos]

    @property
    def nclasses(self) -> int:
        return len(self.class_infos)

    @property
    def chip(self) -> int:
        return self.cfg.chip_size


@dataclass
class _Data:
    """The run's scenes, chips, validation batches and input statistics."""

    scenes: list[SceneData]
    val_scenes: list[SceneData]
    band_names: list[str]
    gsd: float
    targets: Any
    train_rects: list[Rect]
    windows: list[tuple[int, int, int]]
    val_windows: list[tuple[int, int, int]]
    val_batches: list[tuple[np.ndarray, np.ndarray]]
    val_groups: list[int]
    group_names: list[str]
    train_pixels: int
    val_pixels: int
    mean: np.ndarray
    std: np.ndarray
    value_range: tuple[float, float]
    sampler: ChipSampler
    steps: int

    @property
    def all_scenes(self) -> list[SceneData]:
        return self.scenes + self.val_scenes

    @property
    def scored_groups(self) -> list[int]:
        return sorted(set(self.val_groups))


@dataclass
class _Record:
    """The run so far, saved in the resume state after every epoch."""

    best_iou: np.ndarray
    start_epoch: int = 0
    best: float = -1.0
    best_epoch: int = 0
    waited: int = 0
    elapsed_before: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)


def train(cfg: TrainConfig, output: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
          progress: Progress | None = None) -> TrainResult:
    """Train a model as ``cfg`` says and write the best epoch's bundle to ``output`` (``.keras``).

    Beside it: ``MODEL.log.csv`` (one row per epoch) and, while training, ``MODEL.resume/``
    (removed when the bundle is written, unless ``max_minutes`` stopped the run before its last
    epoch: then the bundle holds the best epoch so far and the state stays, so a resume with a
    larger budget trains the remaining epochs). ``resume=True`` continues an interrupted run from its
    state; the settings then come from the state (``cfg`` may change only ``epochs``,
    ``patience`` and ``max_minutes``). InputError / OutputError for anything the user can fix.
    """
    started = time.perf_counter()
    output = Path(output)
    cfg, state_dir, state = _open_run(cfg, output, resume=resume, overwrite=overwrite)
    plan = _plan(cfg, fresh=state is None)
    data = _prepare_data(plan)
    model, schedule, loss_fn = _compile(plan, data, fresh=state is None)
    log_path = log_path_for(output)
    record = _Record(best_iou=np.full(plan.nclasses, np.nan))
    averaged = _Averaged(cfg.ema) if cfg.ema > 0 else None
    if state is not None:
        _restore(state, state_dir, model, averaged, record, log_path)
    stopped, epoch, step_times, elapsed = _run_epochs(plan, data, model, schedule, loss_fn, record, state_dir,
                                                      averaged, log_path, started=started, progress=progress)
    final, meta, sha = _write_bundle(plan, data, state_dir, record, output)
    if stopped == "time_budget":  # epochs remain: the run can go on with a larger budget
        log.info("the run's state stays in %s: to train the remaining epochs %d-%d, rerun with --resume and a "
                 "--max-minutes above the %.0f minutes spent so far", state_dir.folder, epoch + 1, cfg.epochs,
                 elapsed / 60)
    else:
        state_dir.remove()
    names, scored = plan.class_names, bool(data.val_batches)
    return TrainResult(
        output=str(output), sha256=sha, log=str(log_path), name=meta.name, classes=names,
        best_epoch=record.best_epoch, best_val_miou=round(record.best, 6) if scored else None,
        val_iou={n: (round(float(v), 6) if math.isfinite(v) else None) for n, v in zip(names, record.best_iou)},
        epochs_run=epoch, stopped=stopped, resumed_from=record.start_epoch,
        chips={"train": len(data.windows), "val": len(data.val_windows)},
        pixels={"train": data.train_pixels, "val": data.val_pixels},
        gsd=round(data.gsd, 6), gsd_range=[round(v, 6) for v in meta.gsd_range], params=int(final.count_params()),
        seconds_per_step=round(float(np.median(step_times)), 4) if step_times else 0.0,
        seconds=round(time.perf_counter() - started, 2),
    )


def _open_run(cfg: TrainConfig, output: Path, *, resume: bool, overwrite: bool,
              ) -> tuple[TrainConfig, _State, dict[str, Any] | None]:
    """Check the output and the resume state: with ``resume`` the interrupted run's settings (only
    epochs, patience and max_minutes from ``cfg``) and its state; otherwise a stale state is
    refused, or removed with ``overwrite``."""
    if output.suffix != ".keras":
        raise InputError(f"-o {output}: a model file name must end in .keras, e.g. {output.with_suffix('.keras').name}")
    state_dir = _State(resume_dir_for(output))
    state: dict[str, Any] | None = None
    if resume:
        if not state_dir.exists():
            raise InputError(f"--resume: no saved state at {state_dir.folder}; start the run without --resume")
        state = state_dir.read()
        stored = TrainConfig.from_dict(state["config"])
        cfg = dataclasses.replace(stored, epochs=cfg.epochs, patience=cfg.patience, max_minutes=cfg.max_minutes)
    elif state_dir.exists():
        if not overwrite:
            raise OutputError(f"{state_dir.folder} holds an interrupted run; continue it with --resume, or start over with --overwrite")
        state_dir.remove()
    from geoseg.atomic import check_output

    check_output(output, overwrite=overwrite or resume)
    return cfg, state_dir, state


def _plan(cfg: TrainConfig, *, fresh: bool) -> _Plan:
    """Check the config and resolve it; the ImageNet weights (a fresh run of a pretrained encoder
    that does not fine-tune a bundle) are found, checked and converted before any data is read."""
    from geoseg.zooms import check_scales, parse_scales

    multiple = _size_multiple(cfg)
    _check_config(cfg, multiple)
    class_infos = with_thresholds(parse_classes(cfg.classes), cfg.threshold)
    zooms = parse_scales(cfg.scales, "--scales") or (1.0,)
    check_scales(zooms, cfg.scale_merge or "mean")
    class_weights = parse_class_weights(cfg.class_weights, len(class_infos))
    start = _starting_bundle(cfg, [c.name for c in class_infos])
    pretrained = None
    if cfg.encoder != "none" and cfg.encoder_weights == "imagenet" and start is None and fresh:
        from geoseg.models.pretrained import imagenet_weights

        pretrained = imagenet_weights()
    return _Plan(cfg=cfg, class_infos=class_infos, class_weights=class_weights, zooms=zooms, multiple=multiple,
                 stride=cfg.chip_stride or max(multiple, cfg.chip_size // 2), start=start, pretrained=pretrained)


def _prepare_data(plan: _Plan) -> _Data:
    """Read the scenes at the run's GSD, cut them into training and validation areas, pick the
    training chips, build the validation batches and the input statistics, and the chip sampler."""
    from geoseg.scene import open_scene
    from geoseg.targets import TargetSets

    cfg, chip = plan.cfg, plan.chip
    sources, val_sources, weighting = _sources(cfg)
    gsd = cfg.gsd or (plan.start.gsd if plan.start else open_scene(sources[0][0], bands=cfg.bands).gsd)
    targets = TargetSets(plan.class_names)
    scenes, val_scenes = _load_scenes(plan, sources, val_sources, gsd, targets)
    train_rects, val_rects = _areas(cfg, scenes, val_scenes, gsd)
    all_scenes = scenes + val_scenes
    windows = _training_windows(cfg, all_scenes, train_rects, stride=plan.stride, gsd=gsd)
    group_names, scene_group = _validation_groups([d for _, _, d in sources + val_sources])
    val_windows = [w for rect in val_rects for w in validation_windows(rect, chip=chip)]
    val_batches, val_groups = _validation_batches(all_scenes, val_rects, val_windows, scene_group, len(group_names),
                                                  chip=chip, batch_size=cfg.batch_size)
    val_pixels = int(sum((y != IGNORE).sum() for _, y in val_batches))

    mean, std, lo, hi = _stats(all_scenes, train_rects)
    value_range = _value_range(all_scenes, train_rects)
    if cfg.encoder != "none":
        mean, std = _encoder_stats(all_scenes[0].image.dtype, value_range, len(scenes[0].band_names))
    if plan.start:  # the weights were learnt on inputs normalised with the starting model's statistics
        mean, std = np.asarray(plan.start.mean), np.asarray(plan.start.std)
    steps = cfg.steps_per_epoch or max(1, len(windows) // cfg.batch_size)
    sampler = ChipSampler(all_scenes, train_rects, windows, chip=chip, stride=plan.stride, augment=cfg.augment,
                          lo=lo, hi=hi, scene_weights=_scene_weights(weighting, windows, len(scenes)))
    train_pixels = int(sum((all_scenes[r.scene].labels[r.r0:r.r1, r.c0:r.c1] != IGNORE).sum() for r in train_rects))
    log.info("training on %d chips (%d px labelled) from %d scene(s) at %.3g m; validating on %d px; %d steps/epoch",
             len(windows), train_pixels, len(scenes), gsd, val_pixels, steps)
    if not val_pixels:
        log.warning("no validation pixels: the best epoch is the last one and early stopping is off")
    return _Data(scenes=scenes, val_scenes=val_scenes, band_names=scenes[0].band_names, gsd=gsd, targets=targets,
                 train_rects=train_rects, windows=windows, val_windows=val_windows, val_batches=val_batches,
                 val_groups=val_groups, group_names=group_names, train_pixels=train_pixels, val_pixels=val_pixels,
                 mean=mean, std=std, value_range=value_range, sampler=sampler, steps=steps)


def _load_scenes(plan: _Plan, sources, val_sources, gsd: float, targets) -> tuple[list[SceneData], list[SceneData]]:
    """The training and validation scenes on their labels, all with the same number of bands
    (and that of the bundle fine-tuned)."""
    cfg, class_names = plan.cfg, plan.class_names

    def load(image: str, labels: str, d: Dataset) -> SceneData:
        return load_scene(image, labels, class_names=class_names, gsd=gsd, bands=cfg.bands,
                          label_field=d.label_field or cfg.label_field,
                          line_width=d.line_width if d.line_width is not None else cfg.line_width,
                          label_values=d.label_values, targets=targets, labelled_classes=d.labelled_classes,
                          aoi=d.aoi if d.aoi is not None else cfg.aoi)

    scenes = [load(*src) for src in sources]
    val_scenes = [load(*src) for src in val_sources]
    if targets.partial:
        log.info("partial labels: %s", "; ".join(
            f"code {i}: one of {', '.join(class_names[c] for c in sorted(s))}"
            for i, s in enumerate(targets.sets) if i >= plan.nclasses))
    band_names = scenes[0].band_names
    for s in scenes + val_scenes:
        if len(s.band_names) != len(band_names):
            raise InputError(f"{s.name} has {len(s.band_names)} bands but {scenes[0].name} has {len(band_names)}; "
                             f"give images with the same bands (or pick them with --bands)")
    if plan.start and len(plan.start.bands) != len(band_names):
        raise InputError(f"--init-from {Path(cfg.init_from).name} takes {len(plan.start.bands)} band(s) "
                         f"({', '.join(plan.start.bands)}) but the training images have {len(band_names)}; "
                         f"pick matching ones with --bands")
    return scenes, val_scenes


def _areas(cfg: TrainConfig, scenes: list[SceneData], val_scenes: list[SceneData], gsd: float,
           ) -> tuple[list[Rect], list[Rect]]:
    """The training and validation areas: whole scenes when validation scenes are given, else each
    scene split into blocks with ``val_fraction`` held back a chip's width apart."""
    chip = cfg.chip_size
    if val_scenes:
        return ([Rect(i, 0, s.shape[0], 0, s.shape[1]) for i, s in enumerate(scenes)],
                [Rect(len(scenes) + i, 0, s.shape[0], 0, s.shape[1]) for i, s in enumerate(val_scenes)])
    train_rects: list[Rect] = []
    val_rects: list[Rect] = []
    for i, s in enumerate(scenes):
        t, v = split_scene(i, *s.shape, val_fraction=cfg.val_fraction, gap=chip)
        train_rects += t
        val_rects += v
    if cfg.val_fraction > 0 and not val_rects:
        raise InputError(f"no scene is large enough to hold back --val-fraction {cfg.val_fraction} with a gap of one "
                         f"--chip-size ({chip} px at {gsd:.3g} m); pass --val-images/--val-labels or a smaller --chip-size")
    return train_rects, val_rects


def _training_windows(cfg: TrainConfig, all_scenes: list[SceneData], train_rects: list[Rect], *, stride: int,
                      gsd: float) -> list[tuple[int, int, int]]:
    """The training chips (scene, row, column) with at least ``min_labelled`` labelled valid pixels."""
    chip = cfg.chip_size
    windows = []
    for rect in train_rects:
        cand = chip_windows(rect, all_scenes[rect.scene].shape, chip=chip, stride=stride)
        frac = labelled_fraction(all_scenes[rect.scene].labels, [(r, c) for _, r, c in cand], chip)
        windows += [w for w, f in zip(cand, frac) if f >= cfg.min_labelled and f > 0]
    if not windows:
        raise InputError(f"no training chips: no {chip}x{chip} window at {gsd:.3g} m has at least {cfg.min_labelled:.0%} "
                         f"labelled valid pixels; check that labels cover the images, or lower --chip-size / --min-labelled")
    return windows


def _validation_groups(datasets: Sequence[Dataset]) -> tuple[list[str], list[int]]:
    """The validation groups, one per dataset (the top-level images are one), each scored on its
    own too: their names, and each scene's group."""
    group_names: list[str] = []
    scene_group = []
    for d in datasets:
        name = d.name or f"dataset{len(group_names)}"
        if name not in group_names:
            group_names.append(name)
        scene_group.append(group_names.index(name))
    return group_names, scene_group


def _validation_batches(all_scenes: list[SceneData], val_rects: list[Rect], val_windows, scene_group: list[int],
                        groups: int, *, chip: int, batch_size: int) -> tuple[list, list[int]]:
    """The validation chips in batches of one group each (labels beyond their block ignored), and
    each batch's group; batches without a scored pixel are left out."""
    val_batches, val_groups = [], []
    for g in range(groups):
        group_windows = [w for w in val_windows if scene_group[w[0]] == g]
        for i in range(0, len(group_windows), batch_size):
            xs, ys = [], []
            for s, r, c in group_windows[i : i + batch_size]:
                rect = next(v for v in val_rects if v.scene == s and v.r0 <= r < v.r1 and v.c0 <= c < v.c1)
                scene = all_scenes[s]
                xs.append(crop(scene.image, r, c, chip, chip))
                lab = crop(scene.labels, r, c, chip, chip, fill=IGNORE)
                lab[max(0, rect.r1 - r):, :] = IGNORE  # context beyond the validation block is not scored
                lab[:, max(0, rect.c1 - c):] = IGNORE
                ys.append(lab)
            if any((y != IGNORE).any() for y in ys):
                val_batches.append((np.stack(xs), np.stack(ys)))
                val_groups.append(g)
    return val_batches, val_groups


def _compile(plan: _Plan, data: _Data, *, fresh: bool):
    """The network, seeded, with its starting weights (a fresh run: the bundle fine-tuned or the
    ImageNet encoder), compiled with Adam on a warm-up + cosine schedule and the run's loss."""
    import keras

    cfg = plan.cfg
    keras.utils.set_random_seed(cfg.seed)
    model = _build(cfg, len(data.band_names), plan.nclasses, data.mean, data.std, cfg.precision)
    if plan.start and fresh:
        _load_start_weights(model, cfg)
        log.info("starting from the weights of %s (%s)", Path(cfg.init_from).name, plan.start.name)
    elif plan.pretrained is not None:
        from geoseg.models.efficientnet import load_imagenet

        log.info("encoder %s: ImageNet weights set in %d layers", cfg.encoder, load_imagenet(model, plan.pretrained))
    total_steps = cfg.epochs * data.steps
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(500, total_steps // 20)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=cfg.lr / 100 if warmup else cfg.lr, decay_steps=max(1, total_steps - warmup),
        alpha=0.01, warmup_target=cfg.lr if warmup else None, warmup_steps=warmup)
    loss_fn = make_loss(cfg.loss, plan.nclasses, plan.class_weights, data.targets.matrix())
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=schedule), loss=loss_fn, jit_compile=False)
    return model, schedule, loss_fn


def _restore(state: dict[str, Any], state_dir: _State, model, averaged: _Averaged | None, record: _Record,
             log_path: Path) -> None:
    """Put an interrupted run's last epoch back: weights, optimizer variables, averaged weights and
    the record so far (the log rewritten to match)."""
    model.optimizer.build(model.trainable_variables)
    model.load_weights(state_dir.folder / state["files"]["weights"])
    with np.load(state_dir.folder / state["files"]["optimizer"]) as saved:
        arrays = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    if len(arrays) != len(model.optimizer.variables):
        raise InputError(f"resume state {state_dir.folder} does not fit this model; start over with --overwrite")
    for var, value in zip(model.optimizer.variables, arrays):
        var.assign(value)
    record.start_epoch, record.best, record.best_epoch = state["epoch"], state["best"], state["best_epoch"]
    record.waited, record.elapsed_before = state["waited"], state["elapsed"]
    record.best_iou = np.array([np.nan if v is None else v for v in state["best_iou"]])
    record.rows = state["rows"]
    if averaged is not None and state["files"].get("ema"):
        with np.load(state_dir.folder / state["files"]["ema"]) as saved:
            averaged.values = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    _write_log(log_path, record.rows)
    log.info("resuming after epoch %d (best val IoU %.4f at epoch %d)", record.start_epoch, record.best,
             record.best_epoch)


def _run_epochs(plan: _Plan, data: _Data, model, schedule, loss_fn, record: _Record, state_dir: _State,
                averaged: _Averaged | None, log_path: Path, *, started: float, progress: Progress | None):
    """Train epoch after epoch, validating, logging and saving the state after each, until the last
    epoch, early stopping or the time budget. Returns (why it stopped, the last epoch, the step
    times, the seconds spent in all sessions)."""
    cfg, steps = plan.cfg, data.steps
    budget = cfg.max_minutes * 60 if cfg.max_minutes else None
    stopped, epoch, step_times, elapsed = "completed", record.start_epoch, [], record.elapsed_before
    for epoch in range(record.start_epoch + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        losses = _train_steps(model, data.sampler, cfg, epoch, steps, averaged, step_times, progress)
        group_iou: list[np.ndarray] = []
        if data.val_batches:
            with averaged.applied(model) if averaged else contextlib.nullcontext():
                val_loss, iou, group_iou = _validate(model, loss_fn, data.val_batches, plan.nclasses, data.val_groups)
        else:
            val_loss, iou = float("nan"), np.full(plan.nclasses, np.nan)
        score = _val_score(cfg, iou, [group_iou[g] for g in data.scored_groups]) if data.val_batches else float(epoch)
        improved = score > record.best
        if improved:
            record.best, record.best_epoch, record.best_iou, record.waited = score, epoch, iou, 0
        else:
            record.waited += 1
        seconds = time.perf_counter() - t0
        lr = float(np.asarray(schedule(model.optimizer.iterations)))
        row = _epoch_row(plan, data, epoch, losses, val_loss, iou, group_iou, score, lr, seconds)
        record.rows.append(row)
        _write_log(log_path, record.rows)
        elapsed = record.elapsed_before + time.perf_counter() - started
        state_dir.write(model, {
            "epoch": epoch, "best": record.best, "best_epoch": record.best_epoch, "waited": record.waited,
            "elapsed": elapsed, "best_iou": [None if not math.isfinite(v) else float(v) for v in record.best_iou],
            "rows": record.rows, "config": cfg.to_dict(), "seed": cfg.seed,
            "rng": {"kind": "numpy default_rng", "entropy": [cfg.seed, epoch + 1]},
            "gsd": data.gsd, "mean": list(map(float, data.mean)), "std": list(map(float, data.std)),
        }, best_improved=improved, averaged=averaged)
        if progress:
            progress(TrainEvent("epoch", epoch, cfg.epochs, steps, steps, row["train_loss"],
                                {"val_loss": val_loss, "val_miou": score if data.val_batches else float("nan"),
                                 "best_epoch": record.best_epoch, "lr": lr}))
        _log_epoch(plan, data, epoch, row, val_loss, iou, group_iou, seconds)
        if data.val_batches and cfg.patience and record.waited >= cfg.patience:
            stopped = "early_stopping"
            break
        if budget is not None and elapsed + seconds > budget and epoch < cfg.epochs:
            stopped = "time_budget"
            log.info("stopping after epoch %d: another epoch would pass --max-minutes %s", epoch, cfg.max_minutes)
            break
    return stopped, epoch, step_times, elapsed


def _train_steps(model, sampler: ChipSampler, cfg: TrainConfig, epoch: int, steps: int, averaged: _Averaged | None,
                 step_times: list[float], progress: Progress | None) -> list[float]:
    """One epoch's training steps on the sampler's batches (drawn ahead by a thread); their losses."""
    losses = []
    batches = _prefetched(sampler.epoch_batches(cfg.seed, epoch, steps, cfg.batch_size))
    for step, (x, y) in enumerate(batches, start=1):
        ts = time.perf_counter()
        value = float(np.asarray(model.train_on_batch(x, y)))
        if averaged is not None:
            averaged.update(model)
        step_times.append(time.perf_counter() - ts)
        if not math.isfinite(value):
            raise InputError(f"the training loss became {value} at epoch {epoch}, step {step}; lower --lr (now {cfg.lr})")
        losses.append(value)
        if progress:
            progress(TrainEvent("step", epoch, cfg.epochs, step, steps, value))
    return losses


def _val_score(cfg: TrainConfig, iou: np.ndarray, group_ious: list[np.ndarray]) -> float:
    """The score that picks the best epoch: the mean foreground IoU, pooled or (``val_average =
    "datasets"``) the mean of each dataset's."""
    if cfg.val_average == "datasets" and group_ious:
        return float(np.mean([_miou(g) for g in group_ious]))
    return _miou(iou)


def _epoch_row(plan: _Plan, data: _Data, epoch: int, losses: list[float], val_loss: float, iou: np.ndarray,
               group_iou: list[np.ndarray], score: float, lr: float, seconds: float) -> dict[str, Any]:
    """The epoch's row of ``MODEL.log.csv``."""
    row = {"epoch": epoch, "train_loss": round(float(np.mean(losses)), 6),
           "val_loss": round(val_loss, 6) if math.isfinite(val_loss) else ""}
    for name, v in zip(plan.class_names, iou):
        row[f"val_iou_{name}"] = round(float(v), 6) if math.isfinite(v) else ""
    row["val_miou"] = round(_miou(iou), 6) if data.val_batches else ""
    if len(data.scored_groups) > 1:  # each dataset's own mean foreground IoU, and the score that picks the best
        for g in data.scored_groups:
            row[f"val_miou_{data.group_names[g]}"] = round(_miou(group_iou[g]), 6)
        row["val_score"] = round(score, 6)
    row.update({"lr": f"{lr:.6g}", "seconds": round(seconds, 2)})
    return row


def _log_epoch(plan: _Plan, data: _Data, epoch: int, row: dict[str, Any], val_loss: float, iou: np.ndarray,
               group_iou: list[np.ndarray], seconds: float) -> None:
    scored = data.scored_groups
    per_group = "".join(f"; {data.group_names[g]} mIoU {_miou(group_iou[g]):.3f}" for g in scored) \
        if len(scored) > 1 else ""
    scores = (f"val loss {val_loss:.4f}, val IoU " + " ".join(f"{n}={v:.3f}" for n, v in zip(plan.class_names, iou))
              + per_group) if data.val_batches else "no validation"
    log.info("epoch %d/%d: loss %.4f, %s, %.0f s", epoch, plan.cfg.epochs, row["train_loss"], scores, seconds)


def _write_bundle(plan: _Plan, data: _Data, state_dir: _State, record: _Record, output: Path):
    """The best epoch's weights in a float32 network, saved as the bundle with its metadata.
    Returns (the network, the metadata, the bundle's sha256)."""
    from geoseg.models import BundleMeta, save_bundle

    cfg, class_names, gsd = plan.cfg, plan.class_names, data.gsd
    files = state_dir.read()["files"]
    final = _build(cfg, len(data.band_names), plan.nclasses, data.mean, data.std, "float32")
    final.load_weights(state_dir.folder / files["best"])
    jitter = cfg.augment.scale_jitter
    description = cfg.description or (
        f"{_arch_text(cfg)} trained by geoseg on {len(data.scenes)} scene(s) at {gsd:.3g} m "
        f"(scale jitter x{jitter:g})")
    if plan.start:
        description = f"{description.strip().rstrip('.')}; fine-tuned from {plan.start.name} ({Path(cfg.init_from).name})"
    ious = ", ".join(f"{n} {v:.3f}" for n, v in zip(class_names, record.best_iou) if math.isfinite(v))
    score_text = f"; validation IoU {ious} at epoch {record.best_epoch}" if data.val_batches else ""
    meta = BundleMeta(
        name=cfg.name or output.stem, classes=plan.class_infos, background=(0,), bands=tuple(data.band_names),
        mean=tuple(map(float, data.mean)), std=tuple(map(float, data.std)), architecture=cfg.arch,
        arch_config=_arch_config(cfg, len(data.band_names), plan.nclasses), size_multiple=plan.multiple,
        tile_size=cfg.tile_size, overlap=cfg.overlap, gsd=gsd, gsd_range=(gsd / jitter, gsd * jitter),
        scales=plan.zooms, scale_merge=cfg.scale_merge or "mean", dtype=str(data.scenes[0].image.dtype),
        value_range=data.value_range,
        description=(description.strip().rstrip(".") + score_text).strip(),
    )
    return final, meta, save_bundle(final, meta, output)
