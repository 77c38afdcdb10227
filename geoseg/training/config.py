"""The options of a training run (TrainConfig, Augment, Dataset), TOML recipes, and their checks."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from geoseg.errors import InputError
from geoseg.models import ARCHITECTURES

log = logging.getLogger(__name__)


LOSSES = ("ce", "dice", "focal")
ARCHS = tuple(ARCHITECTURES)  # the architectures geoseg.models builds
PRECISIONS = ("float32", "mixed_bfloat16")


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
    aoi: str | None = None  # polygons outside which its labels count for nothing (geoseg.io.aoi); None: the run's

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
    from geoseg.tiling.blend import resolve_thresholds
    from geoseg.vector.cleanup import parse_per_class

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
        from geoseg.io.outputs import PALETTE

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


def log_path_for(output: str | os.PathLike) -> Path:
    """The CSV log beside the output: ``MODEL.log.csv``."""
    p = Path(output)
    return p.with_name(p.stem + ".log.csv")


# --- scenes in memory ----------------------------------------------------------------------------



VAL_AVERAGES = ("pixels", "datasets")


def check_config(cfg: TrainConfig, multiple: int) -> None:
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


def training_sources(cfg: TrainConfig) -> tuple[list[tuple[str, str, Dataset]], list[tuple[str, str, Dataset]], list | None]:
    """(training (image, labels, dataset) triples, validation triples, weighting). The top-level
    images form a dataset of their own.

    Weighting is None (every chip equally often) or one item per training image: ``("image", w)``
    for a top-level image with ``sample_weights`` (its share of the chips), ``("dataset", i, w)``
    for an image of dataset ``i`` with weight ``w`` (the dataset's share, drawn evenly over its
    chips); ``scene_weights`` turns them into per-scene shares once the chips are known."""
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
