"""``geoseg batch MANIFEST``: segment many scenes by area and date, then detect change between dates.

A manifest lists scenes by area and date (TOML, YAML, or a CSV of ``area,date,path``). Every scene
becomes a *predict job*; every pair of consecutive dates of an area a *change job* that compares the
two predict jobs' probability rasters. Outputs go to a fixed layout under the output root::

    ROOT/AREA/DATE/polygons.gpkg, classes.tif, probs.tif, job.json
    ROOT/AREA/changes/DATE1_DATE2/changes.gpkg, change.tif, job.json
    ROOT/report.json

A job's identity (its *key*) is a hash of what decides its outputs: the scene's content (sha256), the
model's sha256 and the options (for a change job, the keys of its two predict jobs and the change
options). ``job.json`` is written last, after the job's outputs were renamed into place together, so
a job is *current* when its ``job.json`` names the same key and every output it lists is there with
the recorded size and modification time. A rerun skips current jobs and redoes the others; a run
killed at any moment leaves only whole outputs (``geoseg.io.atomic``) and resumes where it stopped.

Jobs run in this process (``-j 1``), in N local processes (``-j N``) or on Dask distributed
(``--scheduler ADDRESS``, ``DASK_SCHEDULER_ADDRESS``, or ``--dask`` for a LocalCluster). Every
executor runs the same :func:`run_job`, which loads each model once per process and keeps it.
A job that fails is recorded with its error; the jobs that need it are *blocked*; the others go on.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import csv
import dataclasses
import datetime as dt
import fcntl
import glob
import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geoseg
from geoseg.io.atomic import clean_stale
from geoseg.errors import GeosegError, InputError, OutputError

log = logging.getLogger(__name__)

JOB_FORMAT = 2  # bump when a job's outputs change for the same inputs, so old outputs are redone (2: previews)
JOB_FILE = "job.json"
REPORT_FILE = "report.json"
STATE_DIR = ".geoseg-batch"
PREDICT_OUTPUTS = {"gpkg": "polygons.gpkg", "raster": "classes.tif", "probs": "probs.tif", "preview": "preview.png"}
CHANGE_OUTPUTS = {"gpkg": "changes.gpkg", "raster": "change.tif", "preview": "preview.png"}
# options that change only speed or memory, never the outputs: left out of a job's key
SPEED_ONLY = ("batch_size", "prefetch", "chunk_width")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TOP_KEYS = {"output", "model", "predict", "change", "scenes", "resources", "areas"}


@dataclass(frozen=True)
class Scene:
    area: str
    date: str
    path: Path


@dataclass
class Manifest:
    path: Path
    output: Path
    model: str | None = None
    predict: dict[str, Any] = field(default_factory=dict)
    change: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, float] | None = None  # Dask resources every predict job asks for
    scenes: list[Scene] = field(default_factory=list)
    aois: dict[str, Path] = field(default_factory=dict)  # area -> its --aoi polygons (``[areas.NAME] aoi``)


@dataclass
class Job:
    """One unit of work, plain data (it travels to worker processes)."""

    id: str  # "predict/AREA/DATE" or "change/AREA/DATE1_DATE2"
    kind: str  # "predict" | "change"
    area: str
    dates: tuple[str, ...]
    folder: str
    key: str = ""
    inputs: dict[str, str] = field(default_factory=dict)  # scene path, or the two probs rasters
    model: str | None = None  # bundle path (predict)
    options: dict[str, Any] = field(default_factory=dict)
    needs: tuple[str, ...] = ()  # ids of jobs that must finish first
    resources: dict[str, float] | None = None
    error: str | None = None  # set when the job cannot even be planned (e.g. a missing scene)

    @property
    def outputs(self) -> dict[str, str]:
        names = PREDICT_OUTPUTS if self.kind == "predict" else CHANGE_OUTPUTS
        return {k: str(Path(self.folder) / v) for k, v in names.items()}


# --------------------------------------------------------------------------- manifest


def _check_name(value: Any, what: str, where: str) -> str:
    text = str(value).strip()
    if not _NAME.match(text):
        raise InputError(f"{where}: {what} {value!r} must be letters, digits, '_', '-' or '.' (it names a folder)")
    return text


def _check_date(value: Any, where: str) -> str:
    text = value.isoformat() if isinstance(value, (dt.date, dt.datetime)) else str(value).strip()
    try:
        dt.date.fromisoformat(text)
    except ValueError:
        raise InputError(f"{where}: date {value!r} is not an ISO date; write it as YYYY-MM-DD") from None
    return text


def _read_table(path: Path) -> dict[str, Any]:
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".toml":
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InputError(f"manifest {path} is not valid TOML: {exc}") from None
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise InputError(f"manifest {path} is YAML, which needs PyYAML: pip install pyyaml (or use TOML)") from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InputError(f"manifest {path} is not valid YAML: {' '.join(str(exc).split())}") from None
        if not isinstance(doc, dict):
            raise InputError(f"manifest {path}: expected a mapping with a 'scenes' list at the top level")
        return doc
    if suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        header = set(rows[0]) if rows else set()
        if not {"area", "date", "path"} <= header:
            raise InputError(f"manifest {path}: a CSV manifest needs the header area,date,path (found {sorted(header)})")
        return {"scenes": rows}
    raise InputError(f"manifest {path}: use a .toml, .yaml/.yml or .csv file")


def load_manifest(path: str | os.PathLike, *, output: str | os.PathLike | None = None,
                  model: str | None = None) -> Manifest:
    """Read and check a manifest. Relative scene paths and ``output`` are taken from its folder;
    ``output``/``model`` given here (the command line) win over the manifest's."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest {path} does not exist; check the path")
    doc = _read_table(path)
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise InputError(f"manifest {path}: unknown key {sorted(unknown)[0]!r}; the keys are {', '.join(sorted(_TOP_KEYS))}")
    base = path.resolve().parent  # absolute paths: Dask workers may run in another folder
    out = output if output is not None else doc.get("output")
    if out is None:
        raise InputError(f"manifest {path} has no output folder: add output = \"DIR\" or pass -o DIR")
    rows = doc.get("scenes")
    if not isinstance(rows, list) or not rows:
        raise InputError(f"manifest {path} lists no scenes; add [[scenes]] entries with area, date and path")
    scenes: list[Scene] = []
    seen: set[tuple[str, str]] = set()
    for i, row in enumerate(rows, 1):
        where = f"manifest {path}, scene {i}"
        if not isinstance(row, Mapping) or not {"area", "date", "path"} <= set(row):
            raise InputError(f"{where}: each scene needs area, date and path")
        extra = set(row) - {"area", "date", "path"}
        if extra:
            raise InputError(f"{where}: unknown key {sorted(extra)[0]!r}; a scene has area, date and path")
        scene = Scene(_check_name(row["area"], "area", where), _check_date(row["date"], where),
                      base / str(row["path"]).strip())
        if (scene.area, scene.date) in seen:
            raise InputError(f"{where}: area {scene.area!r} has two scenes dated {scene.date}; keep one per date")
        seen.add((scene.area, scene.date))
        scenes.append(scene)
    for name in ("predict", "change", "resources"):
        if not isinstance(doc.get(name, {}), Mapping):
            raise InputError(f"manifest {path}: {name} must be a table of options")
    resources = doc.get("resources", {}).get("predict")
    aois = _area_aois(doc.get("areas", {}), path, base, {s.area for s in scenes})
    return Manifest(
        path=path, output=base / str(out) if output is None else Path(out).resolve(),
        model=model if model is not None else doc.get("model"),
        predict=dict(doc.get("predict", {})), change=dict(doc.get("change", {})),
        resources={str(k): float(v) for k, v in resources.items()} if resources else None,
        scenes=scenes, aois=aois,
    )


def _area_aois(table: Any, path: Path, base: Path, areas: set[str]) -> dict[str, Path]:
    """``[areas.NAME]`` tables: ``aoi = "FILE"``, the polygons an area's jobs work inside."""
    if not isinstance(table, Mapping):
        raise InputError(f"manifest {path}: areas must be a table of [areas.NAME] tables")
    aois = {}
    for name, entry in table.items():
        where = f"manifest {path}, [areas.{name}]"
        if name not in areas:
            raise InputError(f"{where}: no scene has area {name!r}; fix the name or add its scenes")
        if not isinstance(entry, Mapping) or set(entry) != {"aoi"}:
            raise InputError(f"{where}: an area has one key, aoi = \"FILE\" (its polygons)")
        aoi = base / str(entry["aoi"]).strip()
        if not aoi.is_file():
            raise InputError(f"{where}: aoi {aoi} does not exist; fix the path")
        aois[name] = aoi
    return aois


# --------------------------------------------------------------------------- options


def predict_options(table: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """PredictOptions and the predict() keywords (regularize) from a manifest's ``[predict]`` table
    (keys and values as ``geoseg predict``'s options: ``inference.options.options_from``)."""
    from geoseg.inference.options import options_from

    kw = dict(table)
    extra = {"regularize": bool(kw.pop("regularize", False))}
    return options_from(kw, where="[predict] "), extra


def change_options(table: Mapping[str, Any]) -> Any:
    """ChangeOptions from a manifest's ``[change]`` table (keys as the ``geoseg change`` options)."""
    from geoseg.workflows.change import ChangeOptions

    fields = {f.name for f in dataclasses.fields(ChangeOptions)}
    kw = {k.replace("-", "_"): v for k, v in table.items()}
    unknown = set(kw) - fields
    if unknown:
        raise InputError(f"[change] option {sorted(unknown)[0]!r} is unknown; the options are {', '.join(sorted(fields))}")
    try:
        return ChangeOptions(**kw)
    except (TypeError, ValueError) as exc:
        raise InputError(f"[change]: {exc}") from None


def _canonical(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def job_key(doc: Mapping[str, Any]) -> str:
    text = json.dumps(_canonical({"format": JOB_FORMAT, **doc}), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# --------------------------------------------------------------------------- hashing scenes


class HashCache:
    """sha256 of scene files, remembered by (path, size, mtime) in ROOT/.geoseg-batch/hashes.json so that
    a cron run over unchanged scenes does not read them all again."""

    def __init__(self, root: Path) -> None:
        self.path = root / STATE_DIR / "hashes.json"
        try:
            self.entries: dict[str, dict[str, Any]] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}

    def sha256(self, path: Path) -> str:
        from geoseg.models.bundle import file_sha256

        st = path.stat()
        name = str(path.resolve())
        hit = self.entries.get(name)
        if hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
            return hit["sha256"]
        digest = file_sha256(path)
        self.entries[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        return digest

    def save(self) -> None:
        _write_json(self.path, self.entries)


def _write_json(path: Path, doc: Any) -> None:
    """Write JSON atomically (a reader sees the old file or the new one, never half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}-{secrets.token_hex(3)}{path.suffix}")  # see atomic.clean_stale
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- planning


def plan(manifest: Manifest, *, hashes: HashCache | None = None) -> list[Job]:
    """Every job of the manifest, predict jobs first, each with its key and output folder."""
    from geoseg.models.bundle import file_sha256, read_meta, resolve_model

    root = manifest.output
    options, extra = predict_options(manifest.predict)
    dates_per_area = collections.Counter(s.area for s in manifest.scenes)
    # only areas with two dates or more have change jobs, and need the change options
    copts = change_options(manifest.change) if max(dates_per_area.values()) > 1 else None
    model_path = resolve_model(manifest.model)
    read_meta(model_path)  # a bad model fails the whole run now, not every job later
    model_sha = file_sha256(model_path)
    popts = {k: v for k, v in dataclasses.asdict(options).items() if k not in SPEED_ONLY}
    hashes = hashes or HashCache(root)

    def scene_hash(scene: Scene) -> str | Exception:
        try:
            if not scene.path.is_file():
                raise InputError(f"scene {scene.path} does not exist; fix the path in the manifest")
            return hashes.sha256(scene.path)
        except (OSError, InputError) as exc:
            return exc

    with cf.ThreadPoolExecutor(4) as pool:  # reading is I/O bound and hashlib releases the GIL
        digests = list(pool.map(scene_hash, manifest.scenes))
    jobs: list[Job] = []
    by_area: dict[str, list[Job]] = {}
    # an area's polygons are part of its jobs' identity: editing them redoes the area
    aoi_sha = {area: _aoi_digest(p, hashes) for area, p in manifest.aois.items()}
    for scene, digest in zip(manifest.scenes, digests):
        aoi = {"aoi": str(manifest.aois[scene.area])} if scene.area in manifest.aois else {}
        job = Job(id=f"predict/{scene.area}/{scene.date}", kind="predict", area=scene.area, dates=(scene.date,),
                  folder=str(root / scene.area / scene.date), inputs={"scene": str(scene.path), **aoi},
                  model=str(model_path), options={"predict": _canonical(options), **extra},
                  resources=manifest.resources)
        if isinstance(digest, Exception):
            job.error = " ".join(str(digest).split())
        else:
            job.key = job_key({"kind": "predict", "scene_sha256": digest, "model_sha256": model_sha,
                               "options": popts, **extra,
                               **({"aoi_sha256": aoi_sha[scene.area]} if aoi else {})})
        jobs.append(job)
        by_area.setdefault(scene.area, []).append(job)
    for area, series in by_area.items():
        series.sort(key=lambda j: j.dates[0])
        for a, b in zip(series, series[1:]):
            pair = f"{a.dates[0]}_{b.dates[0]}"
            jobs.append(Job(
                id=f"change/{area}/{pair}", kind="change", area=area, dates=(a.dates[0], b.dates[0]),
                folder=str(root / area / "changes" / pair),
                inputs={"before": a.outputs["probs"], "after": b.outputs["probs"],
                        **({"aoi": a.inputs["aoi"]} if "aoi" in a.inputs else {})},
                options={"change": _canonical(copts)}, needs=(a.id, b.id),
                key=job_key({"kind": "change", "before": a.key, "after": b.key, "options": _canonical(copts)}),
            ))
    # an output of one job must never be a scene or an area of the manifest (or the model)
    from geoseg.io.atomic import check_not_inputs

    sources = {f"scene {s.path}": s.path for s in manifest.scenes}
    sources.update({f"area {a}": p for a, p in manifest.aois.items()})
    sources["the model"] = model_path
    for job in jobs:
        if job.error:
            continue
        try:
            check_not_inputs({f"the {k} output of {job.id}": p for k, p in job.outputs.items()}, sources)
        except OutputError as exc:
            job.error = str(exc)
    hashes.save()
    return jobs


# --------------------------------------------------------------------------- running one job


def _aoi_digest(path: Path, hashes: HashCache) -> str:
    """The sha256 of an area's polygons; a shapefile's with its .dbf, .prj, ... beside it."""
    parts = [path] if path.suffix.lower() != ".shp" else sorted(
        p for p in path.parent.glob(f"{glob.escape(path.stem)}.*") if p.suffix.lower() in _SHAPEFILE_PARTS)
    if len(parts) == 1:
        return hashes.sha256(path)
    return hashlib.sha256("".join(hashes.sha256(p) for p in parts).encode()).hexdigest()


_SHAPEFILE_PARTS = {".shp", ".shx", ".dbf", ".prj", ".cpg"}


def _stat(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def is_current(job: Job) -> bool:
    """True when the job's outputs are complete and were made from the same inputs and options."""
    try:
        record = json.loads((Path(job.folder) / JOB_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not job.key or record.get("key") != job.key:
        return False
    outputs = record.get("outputs", {})
    for path in job.outputs.values():
        p = Path(path)
        entry = outputs.get(p.name)
        try:
            if entry is None or {k: entry.get(k) for k in ("size", "mtime_ns")} != _stat(p):
                return False
        except OSError:
            return False
    return True


_BUNDLES: dict[tuple[str, str], Any] = {}  # (model path, precision) -> loaded bundle, per process


def _bundle(path: str, precision: str) -> Any:
    """The model, loaded once per process (a Dask worker or a -j process keeps it between jobs)."""
    from geoseg.models.bundle import load_bundle

    key = (path, precision)
    if key not in _BUNDLES:
        _BUNDLES[key] = load_bundle(path, precision=precision)
    return _BUNDLES[key]


def _run_predict(job: Job) -> dict[str, Any]:
    from geoseg.inference.options import PredictOptions
    from geoseg.workflows.predict import predict

    kw = dict(job.options["predict"])
    if kw.get("bands") is not None:
        kw["bands"] = tuple(kw["bands"])
    options = PredictOptions(**kw)
    out = job.outputs
    result = predict(job.inputs["scene"], out["gpkg"], raster_out=out["raster"], probs_out=out["probs"],
                     preview=out["preview"], options=options, overwrite=True, bundle=_bundle(job.model, options.precision),
                     regularize=bool(job.options.get("regularize")), aoi=job.inputs.get("aoi"))
    return {"counts": result.counts, "area_m2": result.area_m2, "timings_s": result.timings_s}


def _run_change(job: Job) -> dict[str, Any]:
    from geoseg.workflows.change import ChangeOptions, change

    out = job.outputs
    result = change(job.inputs["before"], job.inputs["after"], out["gpkg"], raster_out=out["raster"],
                    preview=out["preview"], options=ChangeOptions(**job.options["change"]), overwrite=True, aoi=job.inputs.get("aoi"))
    return result.to_dict()


def run_job(job: Job) -> dict[str, Any]:
    """Run one job unless it is already current; never raises for a failure of the job itself.

    Returns ``{"id", "status": "done"|"current"|"failed", "seconds", "error", "result"}``. The
    outputs are committed together by the job's own command; ``job.json`` is written after them.
    """
    from geoseg.models.bundle import file_sha256

    t0 = time.perf_counter()
    status: dict[str, Any] = {"id": job.id, "status": "failed", "seconds": 0.0, "error": None, "result": None,
                              "host": os.uname().nodename, "pid": os.getpid()}
    try:
        if job.error:
            raise InputError(job.error)
        if is_current(job):
            status["status"] = "current"
            return status
        folder = Path(job.folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / JOB_FILE).unlink(missing_ok=True)  # the outputs are about to change
        result = _run_predict(job) if job.kind == "predict" else _run_change(job)
        record = {
            "key": job.key, "kind": job.kind, "id": job.id, "area": job.area, "dates": list(job.dates),
            "inputs": job.inputs, "model": job.model, "options": job.options,
            "geoseg_version": geoseg.__version__,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.perf_counter() - t0, 3),
            "outputs": {Path(p).name: {**_stat(Path(p)), "sha256": file_sha256(p)} for p in job.outputs.values()},
            "result": result,
            # who made it, for the report of a run whose worker died after writing this file
            "worker": {"host": status["host"], "pid": status["pid"], "model_loads": len(_BUNDLES)},
        }
        _write_json(folder / JOB_FILE, record)
        status.update(status="done", result=result)
        status["model_loads"] = len(_BUNDLES)  # models this process has loaded so far (once per model)
    except Exception as exc:  # one failing job must not stop the others: record it
        text = " ".join(str(exc).split())
        status["error"] = text if isinstance(exc, GeosegError) else f"{type(exc).__name__}: {text}"
        log.debug("job %s failed", job.id, exc_info=True)
    finally:
        status["seconds"] = round(time.perf_counter() - t0, 3)
    return status


# --------------------------------------------------------------------------- executors


class InlineExecutor:
    """Runs each job in this process when it is submitted (``-j 1``): the simplest to debug."""

    name = "local"
    workers = 1

    def submit(self, job: Job) -> cf.Future:
        future: cf.Future = cf.Future()
        future.set_result(run_job(job))
        return future

    def wait(self, futures: Iterable[cf.Future]) -> set[cf.Future]:
        return {f for f in futures if f.done()}

    def close(self) -> None:
        pass


def model_threads(workers: int) -> int:
    """Threads each of ``workers`` local processes gives the model: the cores shared out, so that
    N TensorFlow thread pools do not fight over the same cores."""
    return max(1, (os.cpu_count() or 1) // workers)


def _init_process(threads: int) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(threads))  # read when TensorFlow starts
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")


class ProcessExecutor:
    """``-j N`` local worker processes (spawned: TensorFlow does not survive fork)."""

    name = "local"

    def __init__(self, workers: int) -> None:
        import multiprocessing

        self.workers = workers
        self.pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                           initializer=_init_process, initargs=(model_threads(workers),))

    def submit(self, job: Job) -> cf.Future:
        return self.pool.submit(run_job, job)

    def wait(self, futures: Iterable[cf.Future]) -> set[cf.Future]:
        done, _ = cf.wait(list(futures), return_when=cf.FIRST_COMPLETED)
        return set(done)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class DaskExecutor:
    """Jobs as Dask tasks: an existing cluster at ``address``, else a LocalCluster of ``workers`` processes.

    Task keys are the jobs' keys (a hash of scene, model and options), so two submissions of the same
    job share one result and a different job never picks up another's. Predict jobs ask for the
    manifest's resources (or ``GPU=1`` when some worker declares a GPU); before submitting, every job's
    resources are checked against the workers, because Dask would otherwise wait for ever.
    """

    name = "dask"

    def __init__(self, address: str | None, workers: int, *, connect_timeout: float = 60.0) -> None:
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise InputError("Dask is not installed: pip install 'geoseg[dask]' (or dask[distributed])") from None
        if logging.getLogger().getEffectiveLevel() > logging.DEBUG:  # importing distributed set its own levels
            for name in ("distributed", "tornado", "bokeh"):
                logging.getLogger(name).setLevel(logging.WARNING)
        self.cluster = None
        try:
            if address:
                self.client = Client(address, timeout=connect_timeout)
            else:
                threads = str(model_threads(workers))
                self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                            dashboard_address=None,
                                            env={"TF_NUM_INTRAOP_THREADS": os.environ.get("TF_NUM_INTRAOP_THREADS", threads)})
                self.client = Client(self.cluster)
        except (OSError, TimeoutError) as exc:
            raise InputError(f"cannot reach the Dask scheduler at {address}: {' '.join(str(exc).split())}; "
                             "check the address and that `dask scheduler` is running") from None
        self.address = address or self.cluster.scheduler_address
        try:
            self.client.wait_for_workers(1, timeout=connect_timeout)
        except TimeoutError:
            self.close()
            raise InputError(f"no Dask worker joined the scheduler at {self.address} within {connect_timeout:g} s; "
                             "start some with `dask worker ADDRESS`") from None
        self.workers = len(self.client.scheduler_info()["workers"])

    def worker_resources(self) -> list[dict[str, float]]:
        return [dict(w.get("resources") or {}) for w in self.client.scheduler_info()["workers"].values()]

    def predict_resources(self, requested: dict[str, float] | None) -> dict[str, float] | None:
        """What predict jobs ask for: the manifest's resources, else GPU=1 when a worker has a GPU."""
        if requested:
            return requested
        if any(r.get("GPU", 0) >= 1 for r in self.worker_resources()):
            return {"GPU": 1.0}
        return None

    def check(self, jobs: Iterable[Job]) -> None:
        """Fail now, not never: every job's resources must be offered by at least one worker."""
        offered = self.worker_resources()
        for job in jobs:
            if job.resources and not any(all(r.get(k, 0) >= v for k, v in job.resources.items()) for r in offered):
                need = ",".join(f"{k}={v:g}" for k, v in job.resources.items())
                raise InputError(f"no worker of the Dask cluster at {self.address} offers {need}, which {job.id} "
                                 f"needs; start workers with `dask worker {self.address} --resources {need}` "
                                 "or remove [resources] from the manifest")

    def submit(self, job: Job) -> Any:
        # the job's id keeps two areas that list the same file apart; its key keeps reruns with other
        # inputs or options apart (Dask returns the first result for a key it already holds)
        return self.client.submit(run_job, job, key=f"geoseg-{job.id.replace('/', '-')}-{job.key}",
                                  resources=job.resources)

    def wait(self, futures: Iterable[Any]) -> set[Any]:
        from distributed import wait

        done, _ = wait(list(futures), return_when="FIRST_COMPLETED")
        return set(done)

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def make_executor(*, jobs: int = 1, scheduler: str | None = None, dask: bool = False) -> Any:
    address = scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS")
    if address or dask:
        return DaskExecutor(address, jobs)
    return InlineExecutor() if jobs <= 1 else ProcessExecutor(jobs)


# --------------------------------------------------------------------------- the run


class RunLock:
    """One batch run per output root at a time (cron runs that overlap); released when the process dies."""

    def __init__(self, root: Path) -> None:
        (root / STATE_DIR).mkdir(parents=True, exist_ok=True)
        self.path = root / STATE_DIR / "lock"
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            other = self.file.read().strip() or "?"
            self.file.close()
            raise OutputError(f"another geoseg batch (pid {other}) is writing to {root}; wait for it to finish "
                              "or give this run another output folder") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()

    def release(self) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


@dataclass
class BatchReport:
    manifest: str
    output: str
    executor: str
    workers: int
    started: str
    finished: str = ""
    seconds: float = 0.0
    jobs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for j in self.jobs:
            out[j["status"]] = out.get(j["status"], 0) + 1
        return out

    @property
    def ok(self) -> bool:
        return all(j["status"] in ("done", "current", "planned") for j in self.jobs)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "counts": self.counts, "ok": self.ok}


def _write_reports(report_file: Path, report: BatchReport) -> None:
    """``report.json`` and, beside it, the page ``report.html`` (``geoseg.report``)."""
    from geoseg.report import write_report_html

    doc = report.to_dict()
    _write_json(report_file, doc)
    write_report_html(report_file.with_suffix(".html"), doc)


def _made_by_this_run(job: Job, status: dict[str, Any]) -> dict[str, Any]:
    """The status of a job that was not current when it was submitted but came back current: a
    worker finished it and died before reporting, and the retry found its outputs. This run made
    them: it is ``done``, by the worker its ``job.json`` names."""
    try:
        record = json.loads((Path(job.folder) / JOB_FILE).read_text())
    except (OSError, ValueError):
        return status
    return {**status, **record.get("worker", {}), "status": "done", "seconds": record.get("seconds"),
            "result": record.get("result")}


def _entry(job: Job, outcome: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    """A job's line in the report: what it is, where its outputs go, and how it ended (``outcome``)."""
    entry = {"id": job.id, "kind": job.kind, "area": job.area, "dates": list(job.dates), "key": job.key,
             "outputs": job.outputs, "status": "pending", "seconds": None, "error": None}
    if outcome:
        entry.update({k: outcome.get(k) for k in ("status", "seconds", "error")})
        if outcome.get("pid"):
            entry["worker"] = f"{outcome.get('host')}:{outcome.get('pid')}"
            entry["model_loads"] = outcome.get("model_loads")
    entry.update(kw)
    return entry


def run_batch(
    manifest: Manifest,
    *,
    jobs: int = 1,
    scheduler: str | None = None,
    dask: bool = False,
    dry_run: bool = False,
    report_path: str | os.PathLike | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_job: Callable[[dict[str, Any]], None] | None = None,
) -> BatchReport:
    """Plan the manifest's jobs and run those that are not current. The report (also written to
    ``ROOT/report.json`` after every finished job) has each job's status, timing and error."""
    root = manifest.output
    if root.exists() and not root.is_dir():
        raise OutputError(f"output {root} is a file; give a folder for the batch outputs")
    if not root.parent.is_dir():
        raise OutputError(f"the folder {root.parent} of the batch output {root.name} does not exist; create it first")
    t0 = time.perf_counter()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    planned = plan(manifest)  # checks the options and the model before anything is created
    if dry_run:
        report = BatchReport(str(manifest.path), str(root), "dry-run", 0, started)
        for job in planned:
            status = "failed" if job.error else ("current" if is_current(job) else "planned")
            report.jobs.append(_entry(job, status=status, error=job.error))
        return report

    root.mkdir(exist_ok=True)
    lock = RunLock(root)
    for job in planned:  # what killed runs (or killed workers) of this batch left behind
        if Path(job.folder).is_dir():
            clean_stale(job.folder)
    for folder in (root, root / STATE_DIR):
        clean_stale(folder)
    executor = None
    try:
        executor = make_executor(jobs=jobs, scheduler=scheduler, dask=dask)
        if isinstance(executor, DaskExecutor):
            need = executor.predict_resources(manifest.resources)
            for job in planned:
                if job.kind == "predict":
                    job.resources = need
            executor.check(planned)
        report = BatchReport(str(manifest.path), str(root), executor.name, executor.workers, started)
        report_file = Path(report_path) if report_path else root / REPORT_FILE
        _run_jobs(planned, executor, report, report_file, t0, progress, on_job)
        report.finished = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        report.seconds = round(time.perf_counter() - t0, 3)
        _write_reports(report_file, report)
        return report
    finally:
        if executor is not None:
            executor.close()
        lock.release()


def _run_jobs(
    planned: list[Job],
    executor: Any,
    report: BatchReport,
    report_file: Path,
    t0: float,
    progress: Callable[[int, int], None] | None,
    on_job: Callable[[dict[str, Any]], None] | None,
) -> None:
    """Submit each job once what it needs is done (block it when that failed), settle each as it
    ends, in submission order, and rewrite the report after every one."""
    entries = {job.id: _entry(job) for job in planned}
    report.jobs = list(entries.values())
    waiting = list(planned)
    running: dict[Any, Job] = {}
    finished = 0

    def settle(job: Job, status: dict[str, Any]) -> None:
        nonlocal finished
        entries[job.id].update(_entry(job, status))
        finished += 1
        if progress:
            progress(finished, len(planned))
        if on_job:
            on_job(entries[job.id])
        report.seconds = round(time.perf_counter() - t0, 3)
        _write_reports(report_file, report)

    while waiting or running:
        for job in list(waiting):
            states = [entries[n]["status"] for n in job.needs]
            if any(s in ("failed", "blocked") for s in states):
                waiting.remove(job)
                failed = [n for n in job.needs if entries[n]["status"] in ("failed", "blocked")]
                settle(job, {"status": "blocked", "seconds": 0.0, "error": f"needs {', '.join(failed)}, which failed"})
            elif all(s in ("done", "current") for s in states):
                waiting.remove(job)
                if not job.error and is_current(job):  # nothing to do: no need to ship it to a worker
                    settle(job, {"status": "current", "seconds": 0.0, "error": None})
                else:
                    running[executor.submit(job)] = job
        if not running:
            continue
        done = executor.wait(running)
        for future in [f for f in running if f in done]:  # in the order they were submitted
            job = running.pop(future)
            try:
                status = future.result()
            except Exception as exc:  # the worker died (KilledWorker, BrokenProcessPool) or the task was lost
                status = {"status": "failed", "seconds": None,
                          "error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"}
            if status["status"] == "current":
                status = _made_by_this_run(job, status)
            settle(job, status)
            if status["status"] == "failed":
                log.error("%s failed: %s", job.id, status["error"])
