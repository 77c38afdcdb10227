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


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same existing file: through symlinks and hard links (the same
    device and inode), not by their spelling."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except (OSError, ValueError):
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _is_local(path: str | os.PathLike) -> bool:
    """A path on the file system (not a GDAL virtual path such as /vsizip/... or a URL)."""
    text = os.fspath(path)
    return not (text.startswith("/vsi") or "://" in text)


def check_not_inputs(outputs: dict[str, str | os.PathLike | None], inputs: dict[str, str | os.PathLike | None]) -> None:
    """OutputError when an output is the same file as an input (``--raster-out scene.tif``), also
    through a symlink or a hard link, and also with --overwrite: an output never replaces an input.
    Both are dicts of what the user calls them (``"--raster-out"``, ``"SCENE"``) to paths (None: not given)."""
    for out_name, out in outputs.items():
        if out is None or not _is_local(out):
            continue
        for in_name, src in inputs.items():
            if src is None or not _is_local(src):
                continue
            if same_file(out, src) or Path(os.path.abspath(out)) == Path(os.path.abspath(src)):
                raise OutputError(f"{out_name} {out} is the input {in_name} ({src}); an output never replaces an "
                                  f"input, even with --overwrite: choose another output path")


class OutputLock:
    """One writer per output: a lock file beside each final path (``.NAME.geoseg-lock``, created
    exclusively, holding the writer's pid), taken before any work and removed when the run ends.
    A second run that wants the same path stops at once, naming the pid; a lock whose process is
    gone (killed with SIGKILL) is stale and is taken over."""

    def __init__(self, paths: list[str | os.PathLike | None]) -> None:
        self.files: list[Path] = []
        try:
            for p in sorted({Path(os.path.abspath(p)) for p in paths if p is not None and _is_local(p)}):
                self._take(p)
        except BaseException:
            self.release()
            raise

    @staticmethod
    def lock_path(path: Path) -> Path:
        return path.with_name(f".{path.name}.geoseg-lock")

    def _take(self, path: Path) -> None:
        lock = self.lock_path(path)
        for _ in range(3):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(lock.read_text().strip() or "0")
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _pid_alive(pid):
                    raise OutputError(f"{path} is being written by another geoseg run (pid {pid}); wait for it "
                                      f"to finish or choose another output path") from None
                lock.unlink(missing_ok=True)  # stale: its run is gone (or it is this process's own leftover)
                continue
            except OSError:
                return  # the folder is checked by check_output; a lock cannot be taken there: go on without
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.files.append(lock)
            return
        raise OutputError(f"could not take the lock {lock}; another geoseg run keeps writing there")

    def release(self) -> None:
        for lock in self.files:
            try:
                if lock.read_text().strip() == str(os.getpid()):
                    lock.unlink()
            except OSError:
                pass
        self.files.clear()

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def claim_outputs(outputs: dict[str, str | os.PathLike | None], *, inputs: dict[str, str | os.PathLike | None],
                  overwrite: bool) -> OutputLock:
    """Before any work: every output can be written (``check_output``), none is an input
    (``check_not_inputs``), and this run is its only writer (``OutputLock``; use the result as a
    context manager, or call ``release()``)."""
    check_not_inputs(outputs, inputs)
    for path in outputs.values():
        if path is not None:
            check_output(path, overwrite=overwrite)
    return OutputLock(list(outputs.values()))


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
        self._scratch.append(path)  # listed before it exists: an interrupt between the two leaves nothing
        path.mkdir()
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
    """Remove temporary outputs and output locks left in ``folder`` by geoseg runs that were killed
    (SIGKILL). A lock counts as stale only when it names a pid that is gone: an empty one may be a
    lock another run has just created and not yet written."""
    removed = []
    for p in Path(folder).iterdir():
        m = _TMP.search(p.name)
        if m and not _pid_alive(int(m.group(1))):
            _remove(p)
            removed.append(p)
        elif p.name.startswith(".") and p.name.endswith(".geoseg-lock"):
            try:
                pid = int(p.read_text().strip())
            except (OSError, ValueError):
                continue
            if pid != os.getpid() and not _pid_alive(pid):
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed
