"""The ``geoseg`` command line: one thin module per command, shared options in ``options.py``.

Each command parses options, calls one library function and reports. Errors the user can fix
(``GeosegError``) become one line ``Error: ...`` on stderr and exit code 1; ``-v`` adds the traceback.
Keras is never imported here, so ``geoseg --help`` is instant.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import click

from geoseg import __version__
from geoseg.cli.options import GeosegGroup


@click.group(cls=GeosegGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="geoseg")
@click.option("-v", "--verbose", count=True, help="More logging; -v also shows tracebacks of errors.")
@click.option("-q", "--quiet", count=True, help="Less logging: warnings and errors only (-qq: errors only).")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: int) -> None:
    """Segment large satellite and drone GeoTIFFs into seamless class rasters and styled GeoPackages.

    \b
    geoseg predict scene.tif -o buildings.gpkg
    """
    level = logging.INFO - 10 * verbose + 10 * quiet
    handler = BarSafeHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logging.basicConfig(level=max(logging.DEBUG, min(level, logging.ERROR)), handlers=[handler])
    if verbose < 2:
        for noisy in ("rasterio", "fiona", "pyogrio", "tensorflow", "absl", "numexpr", "distributed", "tornado", "bokeh"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
    ctx.obj["quiet"] = quiet


class BarSafeHandler(logging.StreamHandler):
    """Writes log records to stderr through ``tqdm.write``, which lifts any progress bar off the
    line first and redraws it after, so a log line never lands glued onto a bar."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise
            self.handleError(record)


def _register() -> None:
    from geoseg.cli import batch, change, evaluate, models, predict, train, vectorize

    cli.add_command(predict.predict)
    cli.add_command(train.train)
    cli.add_command(evaluate.evaluate)
    cli.add_command(vectorize.vectorize)
    cli.add_command(models.models)
    cli.add_command(change.change)
    cli.add_command(batch.batch)


_register()


def _sigterm(signum: int, frame: object) -> None:
    from geoseg.cli.options import note_sigterm

    note_sigterm()
    raise KeyboardInterrupt


def _silence_native_stderr() -> None:
    """Keep TensorFlow's C++ start-up chatter (oneDNN, CUDA probing) off the terminal.

    Those lines are written straight to file descriptor 2 and ignore TF_CPP_MIN_LOG_LEVEL, so fd 2
    is pointed at /dev/null while Python's own stderr (logs, errors, progress bars) moves to a copy of
    the real one. Set GEOSEG_NATIVE_LOGS=1 to see the native messages.
    """
    if os.environ.get("GEOSEG_NATIVE_LOGS") == "1":
        return
    try:
        sys.stderr.flush()
        real = os.dup(2)
        sys.stderr = os.fdopen(real, "w", buffering=1, encoding=sys.stderr.encoding or "utf-8", errors="replace")
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real stderr (embedded, closed): leave it
        pass


def main() -> None:
    """Entry point: SIGTERM behaves like Ctrl-C, so temporary files are removed either way."""
    signal.signal(signal.SIGTERM, _sigterm)
    _silence_native_stderr()
    try:
        cli(prog_name="geoseg")
    except SystemExit as exc:
        if exc.code in (130, 143):
            # interrupted: temporary files are already gone; skip the interpreter's teardown of a loaded
            # TensorFlow (seconds on a busy machine), so that the run ends as soon as it is clean
            sys.stdout.flush()
            sys.stderr.flush()
            logging.shutdown()
            os._exit(exc.code)
        raise
