"""Outputs appear whole or not at all.

Every output is first written under a temporary name in its own folder (``x.tmp-<pid>-<rand>.gpkg``,
keeping the extension so GDAL is happy), then all outputs are renamed together once everything has
been written. On any error, Ctrl-C or SIGTERM the temporary files are removed and earlier outputs are
left untouched. Sidecars (``.qml``, ``.aux.xml``) travel with their file.

Leftovers of a run killed with SIGKILL match ``*.tmp-<pid>-*``: no output name ever takes that form,
so they are ignored, and the next run that writes into the same folder removes those whose process
no longer exists (``clean_stale``).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from types import TracebackType

from geoseg.errors import OutputError

log = logging.getLogger(__name__)
SIDECARS = (".qml", ".aux.xml")
_TMP = re.compile(r"\.tmp-(\d+)-[0-9a-f]{6}(\.|$)")


def check_output(path: str | os.PathLike, *, overwrite: bool) -> Path:
    """Check that ``path`` can be written: it is not there (or overwrite) and its folder is writable."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"output {p} is a directory; give a file name such as {p / 'out.gpkg'}")
    if p.exists() and not overwrite:
        raise OutputError(f"output {p} already exists; pass --overwrite to replace it")
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"the folder {folder} of output {p.name} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"the folder {folder} is not writable; choose another output path")
    return p


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _sidecars(path: Path) -> list[Path]:
    """Files that belong to ``path``: ``x.aux.xml`` always; ``x.qml`` (QGIS's style) for rasters only,
    so a GeoPackage and a GeoTIFF that share a stem never claim the same style file."""
    sides = [Path(str(path) + SIDECARS[1])]
    if path.suffix.lower() in (".tif", ".tiff"):
        sides.append(path.with_suffix(SIDECARS[0]))
    return sides


class Staging:
    """Hands out temporary paths for outputs and renames them all on ``commit()``.

    Use as a context manager: leaving the block without ``commit()`` (an exception, Ctrl-C) removes
    every temporary file and folder it handed out.
    """

    def __init__(self, *, overwrite: bool = False) -> None:
        self.overwrite = overwrite
        self._tag = f"tmp-{os.getpid()}-{secrets.token_hex(3)}"
        self._files: list[tuple[Path, Path]] = []  # (temporary, final)
        self._scratch: list[Path] = []
        self._cleaned: set[Path] = set()

    def _clean(self, folder: Path) -> None:
        """Remove what killed runs left in ``folder`` (once per folder; never a live run's files)."""
        folder = folder.resolve()
        if folder not in self._cleaned:
            self._cleaned.add(folder)
            for p in clean_stale(folder):
                log.info("removed %s, left by a geoseg run that was killed", p.name)

    def output(self, final: str | os.PathLike) -> Path:
        """A temporary path beside ``final`` with the same extension, e.g. ``out.tmp-12-a1b2c3.gpkg``."""
        final = check_output(final, overwrite=self.overwrite)
        self._clean(final.parent)
        if any(f == final for _, f in self._files):
            raise OutputError(f"{final} is given for two outputs; give each output its own path")
        tmp = final.with_name(f"{final.stem}.{self._tag}{final.suffix}")
        self._files.append((tmp, final))
        return tmp

    def scratch(self, near: str | os.PathLike) -> Path:
        """A temporary folder beside ``near`` for intermediate files (removed in any case)."""
        folder = Path(near).parent
        self._clean(folder)
        path = folder / f".geoseg.{self._tag}.d"
        path.mkdir()
        self._scratch.append(path)
        return path

    def commit(self) -> None:
        """Rename every temporary output (and its sidecars) to its final name."""
        for tmp, final in self._files:
            if not tmp.exists():
                raise OutputError(f"internal error: {tmp} was never written")
        for tmp, final in self._files:
            for side_tmp, side_final in zip(_sidecars(tmp), _sidecars(final)):
                if side_tmp.exists():
                    os.replace(side_tmp, side_final)
                elif side_final.exists() and self.overwrite:
                    side_final.unlink()  # a stale sidecar would restyle the new file
            os.replace(tmp, final)
        self._files.clear()
        self.cleanup()

    def cleanup(self) -> None:
        for tmp, _ in self._files:
            for p in [tmp, *_sidecars(tmp)]:
                _remove(p)
        for p in self._scratch:
            _remove(p)
        self._files.clear()
        self._scratch.clear()

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.cleanup()


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs. A zombie (killed, not yet reaped by its parent, as a Dask
    worker killed under a supervisor can be for a while) is dead: it will never write again."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):  # no /proc (macOS): trust kill()
        return True


def clean_stale(folder: str | os.PathLike) -> list[Path]:
    """Remove temporary outputs left in ``folder`` by geoseg runs that were killed (SIGKILL)."""
    removed = []
    for p in Path(folder).iterdir():
        m = _TMP.search(p.name)
        if m and not _pid_alive(int(m.group(1))):
            _remove(p)
            removed.append(p)
    return removed
