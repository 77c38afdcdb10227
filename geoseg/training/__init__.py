"""Training: fit a segmentation model on labelled scenes and save it as a geoseg bundle.

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

One module per step, imports pointing down this list: ``config`` (TrainConfig, Augment, Dataset,
TOML recipes, their checks), ``chips`` (scenes, areas, chip windows, augmentation, the sampler, input
statistics), ``losses``, ``network`` (the network built or fine-tuned), ``state`` (the resume state,
the log, the averaged weights, chip prefetching) and ``loop`` (the job, ``train``). The names below
are imported lazily, so ``import geoseg.training`` (and ``geoseg.training.config`` for the command
line's choice lists) costs no Keras, shapely or rasterio.
"""

from __future__ import annotations

import importlib

_NAMES = {
    "config": ("ARCHS", "LOSSES", "PRECISIONS", "VAL_AVERAGES", "Augment", "Dataset", "Progress", "TrainConfig",
               "TrainEvent", "TrainResult", "check_config", "log_path_for", "parse_class_weights", "parse_classes",
               "parse_loss", "read_config", "resume_dir_for", "training_sources",
               "with_thresholds"),
    "chips": ("ChipSampler", "Rect", "SceneData", "augment_batch", "chip_windows", "crop", "labelled_fraction",
              "load_scene", "resize_image", "resize_labels", "scene_weights", "split_scene", "validation_windows"),
    "losses": ("make_loss",),
    "network": ("architecture_of", "build_network", "starting_bundle"),
    "state": ("Averaged", "RunState", "resumed_config"),
    "loop": ("train", "validate"),
}
_WHERE = {name: module for module, names in _NAMES.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'geoseg.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"geoseg.training.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
