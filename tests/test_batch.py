"""geoseg batch: manifests, job identity, skipping current work, resuming after SIGKILL, Dask clusters.

The scenes are the three NAIP dates of ../shared/data (different grids) plus generated ones; the
model is a small seeded CNN, so every run gives the same outputs and runs take seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
from click.testing import CliRunner
from rasterio.transform import from_origin

from geoseg.batch import load_manifest, plan, run_batch
from geoseg.cli import cli
from geoseg.errors import InputError
from tests.conftest import SHARED_DATA, write_raster
from tests.testmodels import small_cnn_bundle

NAIP = SHARED_DATA / "naip-multidate"
NAIP_DATES = {"2009-08-18": "m_4709963_se_14_1_20090818.tif", "2015-09-26": "m_4709963_se_14_1_20150926.tif",
              "2020-08-31": "m_4709963_se_14_1_20200831.tif"}
GEOSEG = [sys.executable, "-m", "geoseg"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return small_cnn_bundle(tmp_path_factory.mktemp("model") / "cnn.keras", bands=3, classes=3,
                            mean=[120, 120, 120], std=[40, 40, 40], seed=3)


def generated_scene(path: Path, seed: int) -> Path:
    """A smooth 4-band uint8 scene (like NAIP's RGBN) with a few bright blocks."""
    rng = np.random.default_rng(seed)
    data = np.full((4, 320, 288), 90, np.uint8)
    for _ in range(12):
        r, c = rng.integers(0, 280, 2)
        data[:, r:r + rng.integers(10, 40), c:c + rng.integers(10, 40)] = rng.integers(140, 250)
    return write_raster(path, data, crs="EPSG:32614", transform=from_origin(600000, 5200000, 2.0, 2.0))


def write_manifest(folder: Path, model: Path, *, naip: bool = True, extra: str = "", out: str = "out") -> Path:
    """A TOML manifest: area `town` (two generated dates) and, when present, area `naip` (three real dates)."""
    scenes = folder / "scenes"
    scenes.mkdir(exist_ok=True)
    rows = []
    for i, date in enumerate(("2021-05-01", "2022-05-01")):
        generated_scene(scenes / f"town_{date}.tif", seed=i)
        rows.append(("town", date, f"scenes/town_{date}.tif"))
    if naip:
        if not NAIP.is_dir():
            pytest.skip(f"real data {NAIP} is not present (../shared/data beside the repository)")
        rows += [("naip", d, str(NAIP / f)) for d, f in NAIP_DATES.items()]
    text = f'output = "{out}"\nmodel = "{model}"\n{extra}\n[predict]\nbands = [1, 2, 3]\ngsd = "native"\n\n'
    text += "".join(f'[[scenes]]\narea = "{a}"\ndate = "{d}"\npath = "{p}"\n\n' for a, d, p in rows)
    path = folder / "scenes.toml"
    path.write_text(text)
    return path


def outputs_of(root: Path) -> dict[str, object]:
    """Every output's content (not its bytes: the run time is in the metadata), by relative path."""
    content: dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.suffix == ".tif":
            with rasterio.open(p) as ds:
                content[rel] = (ds.crs.to_string(), tuple(ds.transform), ds.read())
        elif p.suffix == ".gpkg":
            layers = {}
            for name, geometry in pyogrio.list_layers(p):
                if not geometry:  # geoseg_run and layer_styles: the run time differs
                    continue
                frame = pyogrio.read_dataframe(p, layer=name)
                layers[name] = (frame.drop(columns="geometry").to_dict("list"), frame.geometry.to_wkb().tolist())
            content[rel] = layers
        elif p.name == "job.json":
            content[rel] = json.loads(p.read_text())["key"]
    return content


def assert_same_outputs(a: Path, b: Path) -> None:
    ca, cb = outputs_of(a), outputs_of(b)
    assert sorted(ca) == sorted(cb)
    for rel in ca:
        if isinstance(ca[rel], tuple) and len(ca[rel]) == 3 and isinstance(ca[rel][2], np.ndarray):
            assert ca[rel][:2] == cb[rel][:2], rel
            np.testing.assert_array_equal(ca[rel][2], cb[rel][2], err_msg=rel)
        else:
            assert ca[rel] == cb[rel], rel


def no_temporary_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp-" in p.name or p.name.startswith(".geoseg.tmp")]


# --------------------------------------------------------------------------- manifests


def test_manifest_formats_agree(tmp_path, model):
    toml = write_manifest(tmp_path, model, naip=False)
    yaml_path = tmp_path / "scenes.yaml"
    yaml_path.write_text(f"output: out\nmodel: {model}\npredict:\n  bands: [1, 2, 3]\n  gsd: native\nscenes:\n"
                         "  - {area: town, date: 2021-05-01, path: scenes/town_2021-05-01.tif}\n"
                         "  - {area: town, date: 2022-05-01, path: scenes/town_2022-05-01.tif}\n")
    csv_path = tmp_path / "scenes.csv"
    csv_path.write_text("area,date,path\ntown,2021-05-01,scenes/town_2021-05-01.tif\n"
                        "town,2022-05-01,scenes/town_2022-05-01.tif\n")
    a, b = load_manifest(toml), load_manifest(yaml_path)
    c = load_manifest(csv_path, output=tmp_path / "out", model=str(model))
    assert a.scenes == b.scenes == c.scenes
    assert a.output == b.output == c.output == tmp_path / "out"
    assert a.predict == b.predict == {"bands": [1, 2, 3], "gsd": "native"}
    keys = [[j.key for j in plan(m)] for m in (a, b)]
    assert keys[0] == keys[1] and len(keys[0]) == 3 and all(keys[0])  # two predict jobs and one change job


@pytest.mark.parametrize("text, message", [
    ('output = "o"\n[[scenes]]\narea = "a"\ndate = "2021-01-01"\n', "each scene needs area, date and path"),
    ('output = "o"\n[[scenes]]\narea = "a b"\ndate = "2021-01-01"\npath = "x.tif"\n', "area 'a b' must be"),
    ('output = "o"\n[[scenes]]\narea = "a"\ndate = "May 2021"\npath = "x.tif"\n', "write it as YYYY-MM-DD"),
    ('output = "o"\n[[scenes]]\narea = "a"\ndate = 2021-01-01\npath = "x.tif"\n'
     '[[scenes]]\narea = "a"\ndate = 2021-01-01\npath = "y.tif"\n', "two scenes dated 2021-01-01"),
    ('outptu = "o"\n', "unknown key 'outptu'"),
    ('[[scenes]]\narea = "a"\ndate = 2021-01-01\npath = "x.tif"\n', "no output folder"),
    ('output = "o"\n', "lists no scenes"),
    ('output = "o\n', "is not valid TOML"),
    ('output = "o"\n[predict]\ntile_sise = 3\n[[scenes]]\narea = "a"\ndate = 2021-01-01\npath = "x.tif"\n',
     "option 'tile_sise' is unknown"),
])
def test_bad_manifest_is_one_line_error(tmp_path, model, text, message):
    path = tmp_path / "m.toml"
    path.write_text(text)
    result = invoke("batch", path, "-m", model)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "o").exists()


def test_missing_manifest_and_bad_csv(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_manifest(tmp_path / "nope.toml")
    bad = tmp_path / "m.csv"
    bad.write_text("place,when,file\na,2021-01-01,x.tif\n")
    with pytest.raises(InputError, match="header area,date,path"):
        load_manifest(bad, output=tmp_path / "o")


# --------------------------------------------------------------------------- running, skipping, failing


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model) -> Path:
    """One uninterrupted run of the full manifest (generated and NAIP scenes) in this process."""
    folder = tmp_path_factory.mktemp("reference")
    report = run_batch(load_manifest(write_manifest(folder, model)))
    assert report.ok, report.jobs
    return folder / "out"


def test_batch_runs_every_job_and_lays_out_outputs(reference):
    report = json.loads((reference / "report.json").read_text())
    assert report["counts"] == {"done": 8} and report["ok"]  # 5 predict jobs, 2 + 1 change jobs
    for area, dates in (("town", ["2021-05-01", "2022-05-01"]), ("naip", list(NAIP_DATES))):
        for date in dates:
            assert {p.name for p in (reference / area / date).iterdir()} >= {
                "polygons.gpkg", "classes.tif", "classes.qml", "probs.tif", "job.json"}
        for a, b in zip(dates, dates[1:]):
            folder = reference / area / "changes" / f"{a}_{b}"
            assert (folder / "changes.gpkg").is_file() and (folder / "change.tif").is_file()
    # the NAIP dates keep their own grids: 2009 has 724 rows, 2015 and 2020 723
    with rasterio.open(reference / "naip" / "2009-08-18" / "classes.tif") as a, \
            rasterio.open(reference / "naip" / "2020-08-31" / "classes.tif") as b:
        assert a.height == 724 and b.height == 723 and a.transform != b.transform
    # one process ran everything and loaded the model once
    assert {j.get("model_loads") for j in report["jobs"]} == {1}
    assert not no_temporary_files(reference)


def test_rerun_skips_current_jobs_and_redoes_changed_ones(tmp_path, model):
    manifest = write_manifest(tmp_path, model, naip=False)
    first = run_batch(load_manifest(manifest))
    assert first.counts == {"done": 3}
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*.gpkg")}
    again = run_batch(load_manifest(manifest))
    assert again.counts == {"current": 3}
    assert stamps == {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*.gpkg")}

    # new content for the second date: its predict job and the change job are redone, the first date is not
    generated_scene(tmp_path / "scenes" / "town_2022-05-01.tif", seed=7)
    third = run_batch(load_manifest(manifest))
    status = {j["id"]: j["status"] for j in third.jobs}
    assert status == {"predict/town/2021-05-01": "current", "predict/town/2022-05-01": "done",
                      "change/town/2021-05-01_2022-05-01": "done"}

    # a damaged output (truncated by hand) is noticed and redone
    gpkg = tmp_path / "out" / "town" / "2021-05-01" / "polygons.gpkg"
    gpkg.write_bytes(gpkg.read_bytes()[:1000])
    fourth = run_batch(load_manifest(manifest))
    assert {j["id"]: j["status"] for j in fourth.jobs}["predict/town/2021-05-01"] == "done"
    assert pyogrio.list_layers(gpkg).size

    # other options give other keys: everything is redone
    text = manifest.read_text().replace('gsd = "native"', 'gsd = "native"\ntile_size = 256')
    manifest.write_text(text)
    dry = invoke("batch", manifest, "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    assert {j["status"] for j in json.loads(dry.output)["jobs"]} == {"planned"}


def test_a_job_made_by_a_worker_that_died_before_reporting_counts_as_done(tmp_path, model, monkeypatch):
    """A Dask worker finishes a job (job.json written) and is killed before it reports; the retry on
    another worker finds the outputs current. The run made them: the report says done, by the first."""
    import geoseg.batch as batch

    real = batch.run_job

    def finished_then_retried(job):
        real(job)  # the first try: outputs and job.json written, then the worker dies
        return {"id": job.id, "status": "current", "seconds": 0.0, "error": None, "result": None,
                "host": "other", "pid": 1}  # what the retry on another worker reports

    monkeypatch.setattr(batch, "run_job", finished_then_retried)
    report = run_batch(load_manifest(write_manifest(tmp_path, model, naip=False)))
    assert report.counts == {"done": 3}
    assert all(j["worker"] == f"{os.uname().nodename}:{os.getpid()}" and j["model_loads"] == 1
               for j in report.jobs if j["kind"] == "predict")


def test_a_failing_job_does_not_stop_the_others(tmp_path, model):
    manifest = write_manifest(tmp_path, model, naip=False)
    text = manifest.read_text() + '[[scenes]]\narea = "town"\ndate = "2023-05-01"\npath = "scenes/missing.tif"\n'
    text += '[[scenes]]\narea = "broken"\ndate = "2023-05-01"\npath = "scenes/broken.tif"\n'
    (tmp_path / "scenes" / "broken.tif").write_bytes(b"II*\x00" + b"\x00" * 200)  # a truncated TIFF
    manifest.write_text(text)
    result = invoke("batch", manifest, "--report", tmp_path / "r.json")
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "3 of 6 jobs did not finish" in errors[0], result.output
    report = json.loads((tmp_path / "r.json").read_text())
    status = {j["id"]: (j["status"], j["error"]) for j in report["jobs"]}
    assert status["predict/town/2021-05-01"][0] == status["predict/town/2022-05-01"][0] == "done"
    assert status["change/town/2021-05-01_2022-05-01"][0] == "done"
    assert status["predict/town/2023-05-01"][0] == "failed" and "missing.tif does not exist" in status["predict/town/2023-05-01"][1]
    assert status["change/town/2022-05-01_2023-05-01"] == ("blocked", "needs predict/town/2023-05-01, which failed")
    assert status["predict/broken/2023-05-01"][0] == "failed" and "broken.tif" in status["predict/broken/2023-05-01"][1]
    assert not (tmp_path / "out" / "broken" / "2023-05-01" / "polygons.gpkg").exists()
    assert not report["ok"]


def test_one_run_per_output_folder(tmp_path, model):
    from geoseg.batch import RunLock

    manifest = write_manifest(tmp_path, model, naip=False)
    (tmp_path / "out").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from geoseg.batch import RunLock; lock = RunLock(Path(sys.argv[1])); print('locked', flush=True); "
                               "time.sleep(60)", str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = invoke("batch", manifest)
        assert result.exit_code == 1 and f"another geoseg batch (pid {holder.pid})" in result.output
    finally:
        holder.kill()
        holder.wait()
    RunLock(tmp_path / "out").release()  # the lock died with its process


# --------------------------------------------------------------------------- killed runs


def wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def finished_jobs(root: Path) -> list[Path]:
    return sorted(root.rglob("job.json"))


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_resumes(tmp_path, model, reference):
    manifest = write_manifest(tmp_path, model)
    root = tmp_path / "out"
    run = subprocess.Popen([*GEOSEG, "batch", str(manifest)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: len(finished_jobs(root)) >= 2 or run.poll() is not None, 240, "two finished jobs")
        assert run.poll() is None, run.stderr.read().decode()
        os.kill(run.pid, signal.SIGKILL)
    finally:
        run.kill()
        run.wait()
    before = {p: p.stat().st_mtime_ns for p in finished_jobs(root)}
    assert 2 <= len(before) < 8
    # nothing half-written under an output name: every gpkg/tif there opens
    for p in [*root.rglob("*.gpkg"), *root.rglob("*.tif")]:
        if not any(".tmp-" in part for part in p.relative_to(root).parts):
            assert rasterio.open(p) if p.suffix == ".tif" else pyogrio.list_layers(p).size

    rerun = subprocess.run([*GEOSEG, "batch", str(manifest), "--json"], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout)
    status = {j["id"]: j["status"] for j in report["jobs"]}
    redone = {str(Path(j["outputs"]["gpkg"]).parent / "job.json") for j in report["jobs"] if j["status"] == "done"}
    assert not redone & {str(p) for p in before}, "a finished job was redone"
    assert list(status.values()).count("current") == len(before)
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert not no_temporary_files(root)
    assert_same_outputs(root, reference)


# --------------------------------------------------------------------------- Dask


class Cluster:
    """`dask scheduler` and two `dask worker` processes on loopback, as a user would start them."""

    def __init__(self, folder: Path, workers: int = 2) -> None:
        self.file = folder / "scheduler.json"
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
        dask = [str(Path(sys.executable).with_name("dask"))]
        self.procs = [subprocess.Popen([*dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                        "--scheduler-file", str(self.file)], env=env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
        wait_for(self.file.exists, 60, "the Dask scheduler")
        time.sleep(0.5)
        self.address = json.loads(self.file.read_text())["address"]
        self.workers = [subprocess.Popen([*dask, "worker", self.address, "--nthreads", "1", "--no-nanny",
                                          "--no-dashboard", "--host", "127.0.0.1"], env=env,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                        for _ in range(workers)]
        self.procs += self.workers
        from distributed import Client

        with Client(self.address, timeout=30) as client:
            client.wait_for_workers(workers, timeout=60)

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture
def cluster(tmp_path):
    pytest.importorskip("distributed", reason="Dask distributed is not installed (pip install -e '.[test]')")
    c = Cluster(tmp_path)
    yield c
    c.close()


@pytest.mark.slow
def test_dask_cluster_survives_a_killed_worker(tmp_path, model, reference, cluster):
    manifest = write_manifest(tmp_path, model)
    root = tmp_path / "out"
    run = subprocess.Popen([*GEOSEG, "batch", str(manifest), "--scheduler", cluster.address, "--json"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(finished_jobs(root)) >= 1 or run.poll() is not None, 240, "a finished job")
    os.kill(cluster.workers[0].pid, signal.SIGKILL)  # a worker dies mid-run; its jobs move to the other
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, err
    report = json.loads(out)
    assert report["executor"] == "dask" and report["counts"] == {"done": 8}
    workers = {j["worker"] for j in report["jobs"]}
    assert len(workers) >= 1
    # each worker process loaded the model once, however many jobs it ran
    assert {j.get("model_loads") for j in report["jobs"] if j["kind"] == "predict"} == {1}
    assert not no_temporary_files(root)
    assert_same_outputs(root, reference)

    # a rerun on the cluster finds everything current
    again = subprocess.run([*GEOSEG, "batch", str(manifest), "--json"], capture_output=True, text=True,
                           env={**os.environ, "DASK_SCHEDULER_ADDRESS": cluster.address})
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["counts"] == {"current": 8}


@pytest.mark.slow
def test_dask_refuses_jobs_no_worker_can_run(tmp_path, model, cluster):
    manifest = write_manifest(tmp_path, model, naip=False, extra="[resources]\npredict = { GPU = 1 }\n")
    t0 = time.monotonic()
    result = invoke("batch", manifest, "--scheduler", cluster.address)
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "offers GPU=1" in errors[0] and "--resources GPU=1" in errors[0], result.output
    assert time.monotonic() - t0 < 60
    assert not list((tmp_path / "out").rglob("*.gpkg"))


@pytest.mark.slow
def test_sigterm_stops_cleanly_and_the_rerun_finishes(tmp_path, model):
    manifest = write_manifest(tmp_path, model, naip=False)
    root = tmp_path / "out"
    run = subprocess.Popen([*GEOSEG, "batch", str(manifest)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
    wait_for(lambda: len(finished_jobs(root)) >= 1 or run.poll() is not None, 240, "a finished job")
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    if run.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived")
    assert run.returncode == 143, err  # 128 + SIGTERM
    assert [line for line in err.splitlines() if line.startswith("Error:")] == [
        "Error: interrupted; temporary files were removed and earlier outputs left as they were"]
    assert not no_temporary_files(root)
    rerun = subprocess.run([*GEOSEG, "batch", str(manifest), "--json"], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "current" in json.loads(rerun.stdout)["counts"]
