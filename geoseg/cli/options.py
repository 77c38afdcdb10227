"""Options shared by several commands, defined once, and the error handling of every command."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click

from geoseg.tiling.blend import WINDOWS
from geoseg.errors import GeosegError
from geoseg.inference.options import STRETCHES, TTA
from geoseg.models.bundle import PRECISIONS
from geoseg.zooms import MERGES

# Keep TensorFlow's C++ start-up chatter off stderr unless the user asks for it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def fail(message: str, *, verbose: bool) -> None:
    """Print one line ``Error: ...`` (plus the traceback with -v) and exit 1."""
    if verbose:
        traceback.print_exc(file=sys.stderr)
    first = " ".join(str(message).split()) or "unknown error"
    click.echo(f"Error: {first}", err=True)
    sys.exit(1)


_LOUDNESS = re.compile(r"^(-v+|-q+|--verbose|--quiet)$")


class GeosegGroup(click.Group):
    """Runs commands so that errors end as one line on stderr with exit code 1, and takes ``-v`` /
    ``-q`` after the command too (``geoseg predict scene.tif -o out.gpkg -v``), as users type them."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        args = list(args)
        command = next((i for i, a in enumerate(args) if a in self.commands), None)
        if command is not None:
            head, tail = args[: command + 1], args[command + 1:]
            end = tail.index("--") if "--" in tail else len(tail)
            moved = [a for a in tail[:end] if _LOUDNESS.match(a)]
            if moved:
                kept = [a for a in tail[:end] if not _LOUDNESS.match(a)] + tail[end:]
                args = head[:command] + moved + head[command:] + kept
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except GeosegError as exc:
            fail(str(exc), verbose=bool((ctx.obj or {}).get("verbose")))
        except KeyboardInterrupt:
            click.echo("Error: interrupted; temporary files were removed and earlier outputs left as they were", err=True)
            sys.exit(interrupt_code())
        except MemoryError:
            fail("out of memory; lower --batch-size or --tile-size", verbose=bool((ctx.obj or {}).get("verbose")))
        except OSError as exc:
            fail(f"{exc.strerror or exc} ({exc.filename or 'file system'})"
                 + ("; free some disk space" if getattr(exc, "errno", None) == 28 else ""),
                 verbose=bool((ctx.obj or {}).get("verbose")))
        except Exception as exc:  # a bug: still one line unless -v
            fail(f"unexpected {type(exc).__name__}: {exc} (rerun with -v for the traceback and report it)",
                 verbose=bool((ctx.obj or {}).get("verbose")))


def output_option(**kw: Any) -> Callable:
    return click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), **kw)


overwrite_option = click.option("--overwrite", is_flag=True, help="Replace outputs that already exist.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def complete_model(ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
    """Shell completion of --model: the built-in model names, then .keras files (no Keras import)."""
    from click.shell_completion import CompletionItem

    from geoseg.models.bundle import list_builtin

    names = [CompletionItem(e["name"], help=", ".join(e["classes"][1:])) for e in list_builtin()
             if e["name"].startswith(incomplete)]
    return names + [CompletionItem(incomplete, type="file")]


model_option = click.option(
    "-m", "--model", default=None, metavar="NAME|PATH", shell_complete=complete_model,
    help="A built-in model name (see `geoseg models`) or a .keras bundle. Default: buildings.",
)


def aoi_option(what: str):
    """``--aoi FILE``: work only inside its polygons (``geoseg.io.aoi``); ``what`` says what that means here."""
    return click.option(
        "--aoi", type=click.Path(dir_okay=False), default=None, metavar="FILE",
        help=f"Only inside the polygons of FILE (GeoPackage: its first layer; GeoJSON, shapefile; any CRS): "
             f"{what}; the pixels around still serve as the model's context.",
    )


def parse_bands(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        bands = tuple(int(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError:
        raise click.BadParameter(f"{value!r}: give 1-based band numbers separated by commas, e.g. 3,2,1")
    if not bands or min(bands) < 1:
        raise click.BadParameter(f"{value!r}: band numbers start at 1, e.g. 1,2,3")
    return bands




_INFERENCE = [
    click.option("--tile-size", type=int, default=None, help="Model window in pixels. Default: the model's."),
    click.option("--overlap", type=int, default=None, help="Pixels shared by neighbouring tiles. Default: the model's."),
    click.option("--batch-size", type=int, default=2, show_default=True,
                 help="Tiles per model call. On a CPU larger batches cost memory without gaining speed; "
                      "on a GPU try 8-32."),
    click.option("--blend", type=click.Choice(WINDOWS), default="cosine", show_default=True,
                 help="Weight window for overlapping tiles."),
    click.option("--precision", type=click.Choice(PRECISIONS),
                 default="auto", show_default=True,
                 help="Number format of the model's layers (the logits stay float32). auto: mixed_bfloat16 "
                      "on CPUs with bfloat16 instructions (AMX or AVX512-BF16; 1.3-1.6x faster, same IoU), "
                      "else float32. mixed_float16 is for GPUs."),
    click.option("--gsd", default="auto", show_default=True, metavar="auto|native|METRES",
                 help="Ground sample distance the model runs at: auto resamples scenes outside the model's "
                      "training range to its GSD (outputs stay on the scene's grid); native never resamples "
                      "(more than 4x outside the model's range it needs --force)."),
    click.option("--force", is_flag=True,
                 help="Run --gsd native on a scene whose pixels are more than 4x outside the model's GSD range "
                      "(objects then look many times smaller or larger than the model learned them)."),
    click.option("--stretch", type=click.Choice(STRETCHES), default="auto", show_default=True,
                 help="auto: when the scene's data type differs from the model's training imagery (e.g. "
                      "uint16 satellite data, uint8 model), map its 2-98 % value range onto the model's."),
    click.option("--bands", callback=parse_bands, default=None, metavar="I,J,K",
                 help="Scene bands to feed the model, 1-based, in the model's order (e.g. 3,2,1)."),
    click.option("--assume-crs", default=None, metavar="CRS", help="CRS to use when the scene has none (e.g. EPSG:32633)."),
    click.option("--tta", type=click.Choice(list(TTA)), default="none", show_default=True,
                 help="Test-time augmentation: average the logits of flipped (4 passes) or flipped and "
                      "turned (d4, 8 passes) tiles; costs that many times the model time."),
    click.option("--scales", default=None, metavar="1,ZOOM,...",
                 help="Multi-scale inference: also run the model at these zooms of the grid it runs on (2: "
                      "pixels half as large, objects twice as big) and merge the probabilities on the scene's "
                      "grid. A zoom never reads finer than the scene's own pixels (left out when it would). "
                      "Each zoom z runs z² times the tiles. Default: the model's (`geoseg models`), else 1."),
    click.option("--scale-merge", type=click.Choice(MERGES), default=None,
                 help="How --scales merges the zooms: max (each class but background takes its highest "
                      "probability: found at any zoom counts) or mean. Default: the model's, else mean."),
    click.option("--threshold", default=None, metavar="P|CLASS=P,...",
                 help="Decision threshold, one value for every class but background or per class: with two "
                      "classes a pixel is building where its probability is at least P (0.3 finds more, 0.7 "
                      "fewer); with more, the class wins against another where its probability is at least "
                      "P/(1-P) times the other's. Default: the model's (`geoseg models`), else 0.5, the most "
                      "probable class. The probabilities written are unchanged."),
]
_INFERENCE_KEYS = ("tile_size", "overlap", "batch_size", "blend", "precision", "gsd", "stretch", "bands", "assume_crs",
                   "tta", "scale_merge", "force")


def inference_options(f: Callable) -> Callable:
    """The options of every command that runs a model over a scene (predict, evaluate)."""
    for option in reversed(_INFERENCE):
        f = option(f)
    return f


def pop_predict_options(kwargs: dict[str, Any], **extra: Any) -> Any:
    """Take the ``inference_options`` (and ``cleanup_options`` where the command has them) out of a
    command's keyword arguments as PredictOptions, parsed as batch manifests and the Python API are
    (``inference.options.options_from``); ``extra``: other options' values, as given."""
    from geoseg.inference.options import options_from

    keys = (*_INFERENCE_KEYS, "threshold", "scales", *(k for k in _CLEANUP_KEYS if k in kwargs))
    return options_from({**{k: kwargs.pop(k) for k in keys}, **extra})


_CENTERLINES = [
    click.option("--centerlines/--no-centerlines", "centerlines", default=None,
                 help="Also write a road_centerline line layer: the road class's skeleton as a network "
                      "(spurs pruned, junctions kept, small gaps bridged, length_m). Default: on when a "
                      "class is named road (or --centerline-class)."),
    click.option("--centerline-class", default="road", show_default=True, metavar="NAME",
                 help="The class whose centre-lines are drawn."),
    click.option("--spur-m", type=float, default=None, metavar="M",
                 help="Prune dead-end branches shorter than this many metres. Default: twice the road "
                      "width measured on the mask."),
    click.option("--bridge-m", type=float, default=None, metavar="M",
                 help="Join a road end to a road or end up to this many metres away when it points at it. "
                      "Default: twice the road width measured on the mask; 0: never."),
]


def centerline_options(f: Callable) -> Callable:
    """The road centre-line options of predict and vectorize."""
    for option in reversed(_CENTERLINES):
        f = option(f)
    return f


def pop_centerline_options(kwargs: dict[str, Any]) -> tuple[bool | None, Any]:
    """Take the ``centerline_options`` out of a command's keyword arguments: (on/off/None, CentrelineOptions)."""
    from geoseg.vector.centrelines import CentrelineOptions

    options = CentrelineOptions(class_name=kwargs.pop("centerline_class"), spur_m=kwargs.pop("spur_m"),
                                bridge_m=kwargs.pop("bridge_m"))
    return kwargs.pop("centerlines"), options


_CLEANUP = [
    click.option("--sieve", "sieve_m2", default=None, metavar="M2|CLASS=M2,...",
                 help="Before polygonizing, merge regions smaller than this many m² into the neighbouring class "
                      "they share the longest border with (no gaps where speckles were): one value, or per class "
                      "(building=2,background=4). Default: the model's per-class values, else off."),
    click.option("--max-hole", "max_hole_m2", default=None, metavar="M2|CLASS=M2,...",
                 help="Fill holes smaller than this many m² inside a class's polygons; the hole's pixels become "
                      "that class (the polygons inside it go, so nothing overlaps). Default: the model's, else off."),
    click.option("--simplify", "simplify_m", default=None, metavar="M|CLASS=M,...",
                 help="Simplify outlines with a tolerance in metres, all classes together so that neighbouring "
                      "polygons keep sharing their edges (no gaps, no overlaps). Default: the model's, else 0 "
                      "(the exact pixel outline)."),
]


def cleanup_options(f: Callable) -> Callable:
    """The polygon clean-up options of predict and vectorize (``geoseg.vector.cleanup``)."""
    for option in reversed(_CLEANUP):
        f = option(f)
    return f


def pop_cleanup_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Take the ``cleanup_options`` out of a command's keyword arguments, parsed: one float for all
    classes, ``{class: value}``, or None (the defaults)."""
    from geoseg.vector.cleanup import SETTINGS, parse_per_class

    return {key: parse_per_class(kwargs.pop(key), option, "M" if unit == "m" else "M2")
            for key, (option, unit) in SETTINGS.items()}


_CLEANUP_KEYS = ("sieve_m2", "max_hole_m2", "simplify_m")  # geoseg.vector.cleanup.SETTINGS, without importing it


_SIGNAL = {"code": 130}


def note_sigterm() -> None:
    """Remember that the interrupt was SIGTERM: the run then ends with 143 (128 + 15), not 130."""
    _SIGNAL["code"] = 143


def interrupt_code() -> int:
    """The exit status of an interrupted run: 130 after Ctrl-C (SIGINT), 143 after SIGTERM."""
    return _SIGNAL["code"]


def echo_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, default=str))


def progress_bar(total: int, desc: str, *, quiet: bool, unit: str = "tile") -> Any:
    """A tqdm bar on stderr that is hidden when stderr is not a terminal (or with -q)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False,
                disable=quiet or not sys.stderr.isatty(), dynamic_ncols=True)


class StageBars:
    """Progress callback for the library: one bar per stage, opened on its first report.

    ``bars(done, total)`` reports the default stage; ``bars(stage, done, total)`` a named one (a
    new stage closes the previous bar). Use as a context manager so bars close on errors too.
    """

    def __init__(self, default: str, *, quiet: bool, units: dict[str, str] | None = None) -> None:
        self.default, self.quiet, self.units = default, quiet, units or {}
        self._bars: dict[str, Any] = {}

    def __call__(self, *args: Any) -> None:
        stage, done, total = args if len(args) == 3 else (self.default, *args)
        bar = self._bars.get(stage)
        if bar is None:
            self.close()
            bar = self._bars[stage] = progress_bar(total, stage, quiet=self.quiet, unit=self.units.get(stage, "tile"))
        bar.update(done - bar.n)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()

    def __enter__(self) -> "StageBars":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def logger() -> logging.Logger:
    return logging.getLogger("geoseg")
