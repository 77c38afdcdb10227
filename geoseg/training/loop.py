"""The training job: open the run, plan, prepare the data, compile, run the epochs, write the bundle."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geoseg.errors import InputError, OutputError
from geoseg.io.labels import IGNORE
from geoseg.training.chips import (
    ChipSampler,
    Rect,
    SceneData,
    chip_windows,
    crop,
    encoder_stats,
    input_stats,
    input_value_range,
    labelled_fraction,
    load_scene,
    scene_weights,
    split_scene,
    validation_windows,
)
from geoseg.training.config import (
    Dataset,
    Progress,
    TrainConfig,
    TrainEvent,
    TrainResult,
    check_config,
    log_path_for,
    parse_class_weights,
    parse_classes,
    resume_dir_for,
    training_sources,
    with_thresholds,
)
from geoseg.training.losses import make_loss
from geoseg.training.network import (
    arch_config,
    arch_text,
    build_network,
    load_start_weights,
    size_multiple_of,
    starting_bundle,
)
from geoseg.training.state import Averaged, RunState, prefetched, write_log

log = logging.getLogger(__name__)


def miou(iou: np.ndarray) -> float:
    fg = iou[1:]
    return float(np.nanmean(fg)) if np.isfinite(fg).any() else 0.0


def validate(model, loss_fn, batches: list[tuple[np.ndarray, np.ndarray]], classes: int,
              groups: Sequence[int] | None = None) -> tuple[float, np.ndarray, list[np.ndarray]]:
    """(mean loss, IoU per class over all batches, IoU per class of each group). ``groups`` gives
    each batch's group (its dataset); None: one group."""
    from geoseg.metrics import ConfusionMatrix

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
    averaged = Averaged(cfg.ema) if cfg.ema > 0 else None
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
              ) -> tuple[TrainConfig, RunState, dict[str, Any] | None]:
    """Check the output and the resume state: with ``resume`` the interrupted run's settings (only
    epochs, patience and max_minutes from ``cfg``) and its state; otherwise a stale state is
    refused, or removed with ``overwrite``."""
    if output.suffix != ".keras":
        raise InputError(f"-o {output}: a model file name must end in .keras, e.g. {output.with_suffix('.keras').name}")
    state_dir = RunState(resume_dir_for(output))
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
    from geoseg.io.atomic import check_output

    check_output(output, overwrite=overwrite or resume)
    return cfg, state_dir, state


def _plan(cfg: TrainConfig, *, fresh: bool) -> _Plan:
    """Check the config and resolve it; the ImageNet weights (a fresh run of a pretrained encoder
    that does not fine-tune a bundle) are found, checked and converted before any data is read."""
    from geoseg.zooms import check_scales, parse_scales

    multiple = size_multiple_of(cfg)
    check_config(cfg, multiple)
    class_infos = with_thresholds(parse_classes(cfg.classes), cfg.threshold)
    zooms = parse_scales(cfg.scales, "--scales") or (1.0,)
    check_scales(zooms, cfg.scale_merge or "mean")
    class_weights = parse_class_weights(cfg.class_weights, len(class_infos))
    start = starting_bundle(cfg, [c.name for c in class_infos])
    pretrained = None
    if cfg.encoder != "none" and cfg.encoder_weights == "imagenet" and start is None and fresh:
        from geoseg.models.pretrained import imagenet_weights

        pretrained = imagenet_weights()
    return _Plan(cfg=cfg, class_infos=class_infos, class_weights=class_weights, zooms=zooms, multiple=multiple,
                 stride=cfg.chip_stride or max(multiple, cfg.chip_size // 2), start=start, pretrained=pretrained)


def _prepare_data(plan: _Plan) -> _Data:
    """Read the scenes at the run's GSD, cut them into training and validation areas, pick the
    training chips, build the validation batches and the input statistics, and the chip sampler."""
    from geoseg.io.scene import open_scene
    from geoseg.targets import TargetSets

    cfg, chip = plan.cfg, plan.chip
    sources, val_sources, weighting = training_sources(cfg)
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

    mean, std, lo, hi = input_stats(all_scenes, train_rects)
    value_range = input_value_range(all_scenes, train_rects)
    if cfg.encoder != "none":
        mean, std = encoder_stats(all_scenes[0].image.dtype, value_range, len(scenes[0].band_names))
    if plan.start:  # the weights were learnt on inputs normalised with the starting model's statistics
        mean, std = np.asarray(plan.start.mean), np.asarray(plan.start.std)
    steps = cfg.steps_per_epoch or max(1, len(windows) // cfg.batch_size)
    sampler = ChipSampler(all_scenes, train_rects, windows, chip=chip, stride=plan.stride, augment=cfg.augment,
                          lo=lo, hi=hi, scene_weights=scene_weights(weighting, windows, len(scenes)))
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
    model = build_network(cfg, len(data.band_names), plan.nclasses, data.mean, data.std, cfg.precision)
    if plan.start and fresh:
        load_start_weights(model, cfg)
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


def _restore(state: dict[str, Any], state_dir: RunState, model, averaged: Averaged | None, record: _Record,
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
    write_log(log_path, record.rows)
    log.info("resuming after epoch %d (best val IoU %.4f at epoch %d)", record.start_epoch, record.best,
             record.best_epoch)


def _run_epochs(plan: _Plan, data: _Data, model, schedule, loss_fn, record: _Record, state_dir: RunState,
                averaged: Averaged | None, log_path: Path, *, started: float, progress: Progress | None):
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
                val_loss, iou, group_iou = validate(model, loss_fn, data.val_batches, plan.nclasses, data.val_groups)
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
        write_log(log_path, record.rows)
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


def _train_steps(model, sampler: ChipSampler, cfg: TrainConfig, epoch: int, steps: int, averaged: Averaged | None,
                 step_times: list[float], progress: Progress | None) -> list[float]:
    """One epoch's training steps on the sampler's batches (drawn ahead by a thread); their losses."""
    losses = []
    batches = prefetched(sampler.epoch_batches(cfg.seed, epoch, steps, cfg.batch_size))
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
        return float(np.mean([miou(g) for g in group_ious]))
    return miou(iou)


def _epoch_row(plan: _Plan, data: _Data, epoch: int, losses: list[float], val_loss: float, iou: np.ndarray,
               group_iou: list[np.ndarray], score: float, lr: float, seconds: float) -> dict[str, Any]:
    """The epoch's row of ``MODEL.log.csv``."""
    row = {"epoch": epoch, "train_loss": round(float(np.mean(losses)), 6),
           "val_loss": round(val_loss, 6) if math.isfinite(val_loss) else ""}
    for name, v in zip(plan.class_names, iou):
        row[f"val_iou_{name}"] = round(float(v), 6) if math.isfinite(v) else ""
    row["val_miou"] = round(miou(iou), 6) if data.val_batches else ""
    if len(data.scored_groups) > 1:  # each dataset's own mean foreground IoU, and the score that picks the best
        for g in data.scored_groups:
            row[f"val_miou_{data.group_names[g]}"] = round(miou(group_iou[g]), 6)
        row["val_score"] = round(score, 6)
    row.update({"lr": f"{lr:.6g}", "seconds": round(seconds, 2)})
    return row


def _log_epoch(plan: _Plan, data: _Data, epoch: int, row: dict[str, Any], val_loss: float, iou: np.ndarray,
               group_iou: list[np.ndarray], seconds: float) -> None:
    scored = data.scored_groups
    per_group = "".join(f"; {data.group_names[g]} mIoU {miou(group_iou[g]):.3f}" for g in scored) \
        if len(scored) > 1 else ""
    scores = (f"val loss {val_loss:.4f}, val IoU " + " ".join(f"{n}={v:.3f}" for n, v in zip(plan.class_names, iou))
              + per_group) if data.val_batches else "no validation"
    log.info("epoch %d/%d: loss %.4f, %s, %.0f s", epoch, plan.cfg.epochs, row["train_loss"], scores, seconds)


def _write_bundle(plan: _Plan, data: _Data, state_dir: RunState, record: _Record, output: Path):
    """The best epoch's weights in a float32 network, saved as the bundle with its metadata.
    Returns (the network, the metadata, the bundle's sha256)."""
    from geoseg.models import BundleMeta, save_bundle

    cfg, class_names, gsd = plan.cfg, plan.class_names, data.gsd
    files = state_dir.read()["files"]
    final = build_network(cfg, len(data.band_names), plan.nclasses, data.mean, data.std, "float32")
    final.load_weights(state_dir.folder / files["best"])
    jitter = cfg.augment.scale_jitter
    description = cfg.description or (
        f"{arch_text(cfg)} trained by geoseg on {len(data.scenes)} scene(s) at {gsd:.3g} m "
        f"(scale jitter x{jitter:g})")
    if plan.start:
        description = f"{description.strip().rstrip('.')}; fine-tuned from {plan.start.name} ({Path(cfg.init_from).name})"
    ious = ", ".join(f"{n} {v:.3f}" for n, v in zip(class_names, record.best_iou) if math.isfinite(v))
    score_text = f"; validation IoU {ious} at epoch {record.best_epoch}" if data.val_batches else ""
    meta = BundleMeta(
        name=cfg.name or output.stem, classes=plan.class_infos, background=(0,), bands=tuple(data.band_names),
        mean=tuple(map(float, data.mean)), std=tuple(map(float, data.std)), architecture=cfg.arch,
        arch_config=arch_config(cfg, len(data.band_names), plan.nclasses), size_multiple=plan.multiple,
        tile_size=cfg.tile_size, overlap=cfg.overlap, gsd=gsd, gsd_range=(gsd / jitter, gsd * jitter),
        scales=plan.zooms, scale_merge=cfg.scale_merge or "mean", dtype=str(data.scenes[0].image.dtype),
        value_range=data.value_range,
        description=(description.strip().rstrip(".") + score_text).strip(),
    )
    return final, meta, save_bundle(final, meta, output)
