"""Bad inputs, faults and interruptions: one line on stderr, the right exit code, and an output
folder left exactly as it was (no output, no temporary file), for every command that reads a scene.

The CLI runs in-process (click's runner) except where a real process is the point: signals, the
file-size limit that makes native writes fail, and the installed entry point's stderr.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from click.testing import CliRunner
from rasterio.transform import Affine, from_origin

from geoseg.cli import cli
from tests.conftest import REPO, write_raster
from tests.testmodels import keras_onehot_bundle, small_cnn_bundle

ORIGIN = (500000, 5000000)


# --- helpers -----------------------------------------------------------------------------------


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time (ns)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_error(result, *needles, code=1):
    """One ``Error:`` line on stderr naming every needle, the exit code, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle.lower() in errors[0].lower(), errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return {"gray": keras_onehot_bundle(folder / "gray.keras", classes=4, bands=1),
            "rgb": keras_onehot_bundle(folder / "rgb.keras", classes=4, bands=3),
            # standard Keras layers only: loads in a fresh process, where the test layer is unknown
            "cnn": small_cnn_bundle(folder / "cnn.keras", bands=1, classes=4)}


@pytest.fixture
def work(tmp_path):
    """A folder with a good 1-band scene (classes in blocks), its labels, and an output folder."""
    rng = np.random.default_rng(3)
    ids = np.kron(rng.integers(0, 4, size=(10, 12)), np.ones((9, 9), int)).astype("uint8")
    scene = write_raster(tmp_path / "scene.tif", ids[None])
    t = from_origin(*ORIGIN, 0.5, 0.5)
    (x0, y0), (x1, y1) = t * (10, 10), t * (40, 40)
    gpd.GeoDataFrame({"class": ["class1"]}, geometry=[shapely.box(x0, y1, x1, y0)], crs="EPSG:32633").to_file(
        tmp_path / "labels.gpkg")
    out = tmp_path / "out"
    out.mkdir()
    return tmp_path, scene, tmp_path / "labels.gpkg", out


def commands(scene, labels, out, model):
    """The same scene through every command that reads one."""
    return {
        "predict": ["predict", scene, "-o", out / "p.gpkg", "--model", model, "--raster-out", out / "p.tif"],
        "evaluate": ["evaluate", scene, labels, "--model", model],
        "train": ["train", "--images", scene, "--labels", labels, "-o", out / "m.keras", "--epochs", 1,
                  "--steps-per-epoch", 1, "--chip-size", 32, "--width", 4, "--depth", 1, "--classes",
                  "background,class1"],
    }


# --- input files --------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["predict", "evaluate", "train"])
@pytest.mark.parametrize("case", ["missing", "directory", "text", "empty", "truncated-header"])
def test_unreadable_scenes(work, models, command, case):
    folder, good, labels, out = work
    bad = {"missing": folder / "missing.tif", "directory": folder / "adir.tif", "text": folder / "notes.tif",
           "empty": folder / "empty.tif", "truncated-header": folder / "cut.tif"}[case]
    if case == "directory":
        bad.mkdir()
    elif case == "text":
        bad.write_text("this is not a raster\n")
    elif case == "empty":
        bad.write_bytes(b"")
    elif case == "truncated-header":
        bad.write_bytes(good.read_bytes()[:100])
    before = snapshot(folder)
    result = invoke(*commands(bad, labels, out, models["gray"])[command])
    assert_error(result, bad.name)
    assert snapshot(folder) == before


def corrupt_tail(good: Path, bad: Path) -> Path:
    """A GeoTIFF whose header and first blocks are intact but whose later blocks are garbage."""
    data = bytearray(good.read_bytes())
    cut = len(data) * 2 // 3
    data[cut:] = b"\xff" * (len(data) - cut)
    bad.write_bytes(bytes(data))
    return bad


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_a_corrupted_geotiff_that_fails_part_way_leaves_nothing(work, models, command):
    folder, good, labels, out = work
    big = np.random.default_rng(0).integers(0, 4, size=(1, 400, 400)).astype("uint8")
    good = write_raster(folder / "big.tif", big, compress="deflate")
    bad = corrupt_tail(good, folder / "bad.tif")
    with rasterio.open(bad) as ds:  # it opens: the damage shows only when reading
        assert ds.shape == (400, 400)
    before = snapshot(folder)
    result = invoke(*commands(bad, labels, out, models["gray"])[command], "--tile-size", 64, "--overlap", 16)
    assert_error(result, "bad.tif")
    assert snapshot(folder) == before


def test_no_crs_names_assume_crs_which_then_works(work, models):
    folder, _, _, out = work
    nocrs = write_raster(folder / "nocrs.tif", np.ones((1, 40, 40), np.uint8), crs=None)
    assert_error(invoke("predict", nocrs, "-o", out / "a.gpkg", "--model", models["gray"]), "--assume-crs")
    assert list(out.iterdir()) == []
    assert invoke("predict", nocrs, "-o", out / "a.gpkg", "--model", models["gray"], "--assume-crs", "EPSG:32633").exit_code == 0


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_no_georeference_names_assume_crs_which_then_works_in_pixel_coordinates(work, models):
    folder, _, _, out = work
    bare = folder / "bare.tif"
    with rasterio.open(bare, "w", driver="GTiff", width=40, height=40, count=1, dtype="uint8") as ds:
        ds.write(np.ones((1, 40, 40), np.uint8))
    assert_error(invoke("predict", bare, "-o", out / "a.gpkg", "--model", models["gray"]), "no georeference", "--assume-crs")
    assert list(out.iterdir()) == []
    result = invoke("predict", bare, "-o", out / "a.gpkg", "--model", models["gray"], "--assume-crs", "EPSG:32633")
    assert result.exit_code == 0, result.output  # polygons in pixel coordinates


def test_rotated_geotransform_is_refused_with_a_fix(work, models):
    folder, _, _, out = work
    rotated = write_raster(folder / "rot.tif", np.ones((1, 40, 40), np.uint8),
                           transform=Affine(0.5, 0.1, ORIGIN[0], 0.1, -0.5, ORIGIN[1]))
    assert_error(invoke("predict", rotated, "-o", out / "a.gpkg", "--model", models["gray"]), "rotated", "gdalwarp")
    assert list(out.iterdir()) == []


# --- bands and data types -------------------------------------------------------------------------


def test_band_counts_the_model_does_not_expect(work, models):
    folder, _, _, out = work
    two = write_raster(folder / "two.tif", np.ones((2, 40, 40), np.uint8))
    assert_error(invoke("predict", two, "-o", out / "a.gpkg", "--model", models["rgb"]), "--bands")
    five = write_raster(folder / "five.tif", np.ones((5, 40, 40), np.uint8))  # (4 uint8 bands read as RGBA)
    assert_error(invoke("predict", five, "-o", out / "a.gpkg", "--model", models["rgb"]), "--bands")
    assert_error(invoke("predict", five, "-o", out / "a.gpkg", "--model", models["rgb"], "--bands", "1,2,7"), "7")
    assert list(out.iterdir()) == []
    assert invoke("predict", five, "-o", out / "a.gpkg", "--model", models["rgb"], "--bands", "3,2,1").exit_code == 0


def test_one_band_on_an_rgb_model_runs_with_a_warning(work, models, caplog):
    _, scene, _, out = work
    with caplog.at_level(logging.WARNING, logger="geoseg"):
        result = invoke("predict", scene, "-o", out / "a.gpkg", "--model", models["rgb"])
    assert result.exit_code == 0, result.output
    assert any("repeat" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("dtype", ["uint16", "int16", "float32"])
def test_other_data_types_run(work, models, dtype):
    folder, _, _, out = work
    values = np.random.default_rng(1).integers(0, 3000, size=(1, 40, 40)).astype(dtype)
    path = write_raster(folder / f"{dtype}.tif", values)
    result = invoke("predict", path, "-o", out / "a.gpkg", "--model", models["gray"], "--raster-out", out / "a.tif")
    assert result.exit_code == 0, result.output


def test_complex_data_is_refused(work, models):
    folder, _, _, out = work
    path = write_raster(folder / "c.tif", (np.ones((1, 40, 40)) * (1 + 1j)).astype("complex64"))
    assert_error(invoke("predict", path, "-o", out / "a.gpkg", "--model", models["gray"]), "complex")
    assert list(out.iterdir()) == []


def test_nan_and_infinity_are_nodata(work, models):
    folder, _, _, out = work
    values = np.ones((1, 40, 40), np.float32) * 2
    values[0, :10] = np.nan
    values[0, 10:20] = np.inf
    values[0, 20:30] = -np.inf
    path = write_raster(folder / "nan.tif", values)
    assert invoke("predict", path, "-o", out / "a.gpkg", "--model", models["gray"], "--raster-out", out / "a.tif").exit_code == 0
    with rasterio.open(out / "a.tif") as ds:
        classes = ds.read(1)
        assert (classes[:30] == ds.nodata).all() and (classes[30:] == 2).all()


def test_a_scene_smaller_than_one_tile_works(work, models):
    folder, _, _, out = work
    tiny = write_raster(folder / "tiny.tif", np.full((1, 5, 7), 3, np.uint8), tiled=False)
    assert invoke("predict", tiny, "-o", out / "a.gpkg", "--model", models["gray"], "--raster-out", out / "a.tif").exit_code == 0
    with rasterio.open(out / "a.tif") as ds:
        assert ds.shape == (5, 7) and (ds.read(1) == 3).all()


def test_an_all_nodata_scene_gives_empty_layers_and_a_warning(work, models, caplog):
    folder, _, _, out = work
    empty = write_raster(folder / "nodata.tif", np.zeros((1, 40, 40), np.uint8), nodata=0)
    with caplog.at_level(logging.WARNING, logger="geoseg"):
        result = invoke("predict", empty, "-o", out / "a.gpkg", "--model", models["gray"])
    assert result.exit_code == 0, result.output
    assert any("no valid pixels" in r.getMessage() for r in caplog.records)
    layers = [n for n in pyogrio.list_layers(out / "a.gpkg")[:, 0].tolist() if n.startswith("class")]
    assert layers == ["class1", "class2", "class3"] and all(pyogrio.read_info(out / "a.gpkg", layer=name)["features"] == 0 for name in layers)


# --- labels -----------------------------------------------------------------------------------------


def write_labels(path, geoms, crs="EPSG:32633", classes=None):
    gdf = gpd.GeoDataFrame({"class": classes or ["class1"] * len(geoms)}, geometry=geoms, crs=crs)
    gdf.to_file(path)
    return path


@pytest.mark.parametrize("command", ["evaluate", "train"])
def test_label_errors(work, models, command):
    folder, scene, _, out = work
    inside = shapely.box(ORIGIN[0] + 5, ORIGIN[1] - 20, ORIGIN[0] + 20, ORIGIN[1] - 5)
    nocrs = folder / "nocrs.shp"
    gpd.GeoDataFrame({"class": ["class1"]}, geometry=[inside]).to_file(nocrs)
    far = write_labels(folder / "far.gpkg", [shapely.box(0, 0, 10, 10)])
    before = snapshot(folder)
    for labels, needle in ((nocrs, "no CRS"), (far, "do not overlap"), (folder / "none.gpkg", "no such file")):
        args = commands(scene, labels, out, models["gray"])[command]
        assert_error(invoke(*args), needle)
    assert snapshot(folder) == before


def test_labels_in_another_crs_are_reprojected_and_invalid_ones_repaired(work, models, caplog):
    folder, scene, _, _ = work
    t = from_origin(*ORIGIN, 0.5, 0.5)
    (x0, y0), (x1, y1) = t * (9, 9), t * (27, 27)
    bowtie = shapely.Polygon([(x0, y0), (x1, y1), (x1, y0), (x0, y1)])  # self-intersecting
    assert not bowtie.is_valid
    labels = gpd.GeoDataFrame({"class": ["class1", "class1"]}, geometry=[bowtie, shapely.box(x0, y1, x1, y0)],
                              crs="EPSG:32633").to_crs("EPSG:4326")
    labels.to_file(folder / "wgs84.gpkg")
    with caplog.at_level(logging.INFO, logger="geoseg"):
        result = invoke("evaluate", scene, folder / "wgs84.gpkg", "--model", models["gray"], "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["classes"]["class1"]["iou"] is not None
    assert any("repaired 1 invalid" in r.getMessage() for r in caplog.records)


# --- outputs ------------------------------------------------------------------------------------


def test_an_existing_output_needs_overwrite_and_is_left_alone(work, models):
    _, scene, _, out = work
    assert invoke("predict", scene, "-o", out / "a.gpkg", "--model", models["gray"]).exit_code == 0
    before = snapshot(out)
    assert_error(invoke("predict", scene, "-o", out / "a.gpkg", "--model", models["gray"]), "--overwrite")
    assert snapshot(out) == before
    assert invoke("predict", scene, "-o", out / "a.gpkg", "--model", models["gray"], "--overwrite").exit_code == 0


def test_output_folders_that_do_not_exist_or_cannot_be_written(work, models, monkeypatch):
    folder, scene, _, out = work
    assert_error(invoke("predict", scene, "-o", folder / "nope" / "a.gpkg", "--model", models["gray"]), "does not exist")
    assert_error(invoke("predict", scene, "-o", out, "--model", models["gray"]), "directory", code=2)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == out else real_access(p, mode, *a, **k))
    assert_error(invoke("predict", scene, "-o", out / "a.gpkg", "--model", models["gray"]), "not writable")
    assert list(out.iterdir()) == []


def test_a_full_disk_part_way_is_a_clean_error(work, models, monkeypatch):
    """ENOSPC raised by the writer of the class raster after a few strips."""
    from geoseg.io import outputs

    folder, scene, _, out = work
    write = outputs.TiledTiffWriter.write
    calls = {"n": 0}

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(28, "No space left on device", str(self.path))
        return write(self, *args, **kwargs)

    monkeypatch.setattr(outputs.TiledTiffWriter, "write", failing)
    before = snapshot(folder)
    result = invoke("predict", scene, "-o", out / "a.gpkg", "--model", models["gray"], "--tile-size", 32, "--overlap", 8)
    assert_error(result, "No space left on device", "free some disk space")
    assert snapshot(folder) == before


def run_geoseg(*args, limit_bytes: int | None = None, **kwargs) -> subprocess.Popen:
    """The installed entry point in a real process (``geoseg.cli:main``), with Ctrl-C handled as in
    a terminal even when the tests run in the background (a shell's ``cmd &`` ignores SIGINT, and
    the child would inherit that)."""
    def limit():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if limit_bytes is not None:
            import resource

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", "from geoseg.cli import main; main()", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=limit, **kwargs)


def test_a_file_size_limit_hit_by_gdal_itself_is_a_clean_error(work, models):
    """A real write failure inside GDAL (the process may not write files over 200 kB)."""
    folder, _, _, out = work
    values = np.random.default_rng(2).integers(0, 4, size=(1, 600, 600)).astype("uint8")
    scene = write_raster(folder / "noise.tif", values)  # incompressible classes: the COG passes 200 kB
    before = snapshot(folder)
    proc = run_geoseg("predict", scene, "-o", out / "a.gpkg", "--model", models["cnn"], "--raster-out", out / "a.tif",
                      "--probs-out", out / "p.tif", limit_bytes=200_000)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert "not written completely" in lines[0] and "disk" in lines[0], err
    assert snapshot(folder) == before


# --- models and options ----------------------------------------------------------------------------


def test_bad_model_files(work, models):
    import zipfile

    folder, scene, _, out = work
    junk = folder / "junk.keras"
    junk.write_bytes(b"not a zip at all")
    newer = folder / "newer.keras"
    with zipfile.ZipFile(models["gray"]) as src, zipfile.ZipFile(newer, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "geoseg.json":
                meta = json.loads(data)
                meta["format_version"] = 99
                data = json.dumps(meta).encode()
            dst.writestr(item, data)
    cut = folder / "cut.keras"
    cut.write_bytes(models["gray"].read_bytes()[:-200])
    for model, needle in ((junk, "junk.keras"), (newer, "newer"), (cut, "cut.keras"), (folder / "none.keras", "none.keras")):
        assert_error(invoke("predict", scene, "-o", out / "a.gpkg", "--model", model), needle)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("args, needle", [
    (["--overlap", 64, "--tile-size", 64], "--overlap"),
    (["--overlap", -1], "--overlap"),
    (["--tile-size", 0], "--tile-size"),
    (["--batch-size", 0], "--batch-size"),
    (["--min-area", "tree=4"], "tree"),
    (["--min-area", "-3"], "--min-area"),
    (["--min-area", "big"], "--min-area"),
    (["--gsd", "fast"], "--gsd"),
    (["--assume-crs", "EPSG:99999"], "EPSG:99999"),
    (["--regularize"], "needs a class named building"),
])
def test_nonsensical_options(work, models, args, needle):
    _, scene, _, out = work
    assert_error(invoke("predict", scene, "-o", out / "a.gpkg", "--model", models["gray"], *args), needle)
    assert list(out.iterdir()) == []


def test_usage_errors_exit_2(work):
    _, scene, _, out = work
    assert invoke("predict", scene).exit_code == 2
    assert invoke("predict", scene, "-o", out / "a.gpkg", "--blend", "nope").exit_code == 2
    assert invoke("predict", scene, "-o", out / "a.gpkg", "--bands", "0").exit_code == 2
    assert invoke("nonsense").exit_code == 2


# --- interruptions: real signals to a real process ---------------------------------------------------


def slow_scene(folder: Path) -> Path:
    values = np.random.default_rng(4).integers(0, 4, size=(1, 3000, 3000)).astype("uint8")
    return write_raster(folder / "slow.tif", values, blockxsize=256, blockysize=256)


def wait_for_temporaries(folder: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(".tmp-" in p.name for p in folder.iterdir()):
            time.sleep(0.5)  # well inside the run
            return
        if proc.poll() is not None:
            raise AssertionError(f"geoseg ended before writing anything: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError("no temporary output appeared")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_remove_temporaries_and_keep_earlier_outputs(work, models, sig, code):
    folder, _, _, out = work
    scene = slow_scene(folder)
    earlier = out / "a.gpkg"
    earlier.write_bytes(b"an earlier output")
    before = snapshot(out)
    proc = run_geoseg("predict", scene, "-o", earlier, "--model", models["cnn"], "--raster-out", out / "a.tif",
                      "--tile-size", 64, "--overlap", 16, "--batch-size", 1, "--overwrite")
    wait_for_temporaries(out, proc)
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # a hang (a lock left held by the interrupt, say)
        proc.kill()
        _, err = proc.communicate(timeout=60)
        raise AssertionError(f"no exit 120 s after signal {sig!r}:\n{err[-3000:]}") from None
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1].startswith("Error: interrupted"), err
    assert "Traceback" not in err
    assert snapshot(out) == before


def test_after_sigkill_leftovers_are_ignored_and_cleaned_by_the_next_run(work, models):
    folder, _, _, out = work
    scene = slow_scene(folder)
    proc = run_geoseg("predict", scene, "-o", out / "a.gpkg", "--model", models["cnn"], "--raster-out", out / "a.tif",
                      "--tile-size", 64, "--overlap", 16, "--batch-size", 1)
    wait_for_temporaries(out, proc)
    proc.kill()
    proc.communicate(timeout=60)
    left = [p.name for p in out.iterdir()]
    # never under an output's name: temporaries and the run's output locks only
    assert left and all(".tmp-" in name or name.endswith(".geoseg-lock") for name in left), left
    assert any(".tmp-" in name for name in left)
    small = write_raster(folder / "small.tif", np.ones((1, 40, 40), np.uint8))
    result = invoke("predict", small, "-o", out / "a.gpkg", "--model", models["cnn"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["a.gpkg"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_during_training_keeps_the_last_epoch_and_resumes(work, models, sig):
    folder, scene, labels, out = work
    args = ["train", "--images", scene, "--labels", labels, "-o", out / "m.keras", "--epochs", 200, "--steps-per-epoch", 2,
            "--chip-size", 32, "--width", 4, "--depth", 1, "--classes", "background,class1", "--val-fraction", 0.3]
    proc = run_geoseg(*args)
    state = out / "m.resume" / "state.json"
    deadline = time.monotonic() + 180
    while not state.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert state.exists(), proc.communicate()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == (130 if sig == signal.SIGINT else 143), err
    assert "--resume" in err.strip().splitlines()[-1]
    assert not (out / "m.keras").exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    result = invoke(*args, "--resume", "--epochs", 2)
    assert result.exit_code == 0, result.output
    assert (out / "m.keras").exists() and not (out / "m.resume").exists()


def test_a_zombie_process_counts_as_dead(tmp_path):
    """A killed writer that its parent has not reaped yet must not keep its temporary files alive."""
    from geoseg.io.atomic import _pid_alive, clean_stale

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f"out.tmp-{child.pid}-abcdef.gpkg").write_bytes(b"partial")
        assert _pid_alive(child.pid) and clean_stale(tmp_path) == []
        child.kill()
        time.sleep(0.5)  # dead, not reaped: a zombie
        assert not _pid_alive(child.pid)
        assert [p.name for p in clean_stale(tmp_path)] == [f"out.tmp-{child.pid}-abcdef.gpkg"]
    finally:
        child.kill()
        child.wait()
