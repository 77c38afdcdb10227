"""Hostile and careless input: an output never replaces an input (paths, symlinks, hard links, even
with --overwrite), one writer per output (a second run stops at once; a stale lock is taken over).
Each case: exit code, one ``Error:`` line, no traceback, nothing at the final path, the input's
bytes unchanged (sha256 before and after)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from tests.conftest import write_raster
from tests.system.test_faults import assert_error, invoke, models, run_geoseg, work  # noqa: F401  (fixtures)


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _link(kind: str, target: Path, link: Path) -> Path:
    if kind == "symlink":
        link.symlink_to(target)
    elif kind == "hardlink":
        os.link(target, link)
    elif kind == "relative":
        link = Path(os.path.relpath(target))  # the same file, spelled from the working folder
    else:
        link = target
    return link


@pytest.mark.parametrize("kind", ["same", "symlink", "hardlink", "relative"])
@pytest.mark.parametrize("option", ["--raster-out", "--probs-out"])
def test_predict_never_writes_over_its_scene(work, models, kind, option):
    folder, scene, _, out = work
    before = sha(scene)
    target = _link(kind, scene, folder / "alias.tif")
    result = invoke("predict", scene, "-o", out / "p.gpkg", "--model", models["gray"], option, target, "--overwrite")
    assert_error(result, "is the input SCENE", "even with --overwrite")
    assert sha(scene) == before and not (out / "p.gpkg").exists()


def test_predict_never_writes_over_its_area_or_model(work, models, tmp_path):
    folder, scene, labels, out = work
    model_copy = out / "model.gpkg"  # a model file with a polygon output's name
    model_copy.write_bytes(Path(models["gray"]).read_bytes())
    before = sha(labels)
    assert_error(invoke("predict", scene, "-o", labels, "--model", models["gray"], "--aoi", labels, "--overwrite"),
                 "is the input --aoi")
    assert sha(labels) == before
    assert_error(invoke("predict", scene, "-o", model_copy, "--model", model_copy, "--overwrite"), "is the input --model")


@pytest.mark.parametrize("kind", ["same", "symlink", "hardlink"])
def test_change_never_writes_over_either_date(work, models, kind):
    folder, scene, _, out = work
    ids = np.kron(np.random.default_rng(1).integers(0, 4, size=(10, 12)), np.ones((9, 9), int)).astype("uint8")
    after = write_raster(folder / "after.tif", ids[None], nodata=255)
    before_sha, after_sha = sha(scene), sha(after)
    for victim, name in ((scene, "BEFORE"), (after, "AFTER")):
        target = _link(kind, victim, folder / f"alias-{name}.tif")
        result = invoke("change", scene, after, "-o", out / "c.gpkg", "--model", models["gray"], "--raster-out", target,
                        "--overwrite")
        assert_error(result, f"is the input {name}")
        if target != victim:
            target.unlink()
    assert sha(scene) == before_sha and sha(after) == after_sha and not (out / "c.gpkg").exists()


def test_vectorize_never_writes_over_its_class_raster(work):
    folder, scene, _, out = work
    link = folder / "classes.gpkg"
    link.symlink_to(scene)  # a GeoPackage name that is the class raster
    before = sha(scene)
    assert_error(invoke("vectorize", scene, "-o", link, "--classes", "bg,a,b,c", "--overwrite"), "is the input CLASSES")
    assert sha(scene) == before


def test_batch_refuses_a_job_whose_output_is_a_scene(work, models, tmp_path):
    folder, scene, _, out = work
    runs = folder / "runs"
    (runs / "town" / "2024-01-01").mkdir(parents=True)
    inside = runs / "town" / "2024-01-01" / "classes.tif"  # the predict job's own class raster
    inside.write_bytes(scene.read_bytes())
    manifest = folder / "m.toml"
    manifest.write_text(f'output = "runs"\nmodel = "{models["cnn"]}"\n[[scenes]]\narea = "town"\ndate = 2024-01-01\n'
                        f'path = "{inside}"\n')
    before = sha(inside)
    result = invoke("batch", manifest)
    assert result.exit_code == 1 and "is the input scene" in result.output
    assert sha(inside) == before


# --- one writer per output -------------------------------------------------------------------


def _classes(folder: Path, size: int) -> Path:
    rng = np.random.default_rng(2)
    ids = np.kron(rng.integers(0, 3, size=(size // 8, size // 8)), np.ones((8, 8), int)).astype("uint8")
    return write_raster(folder / "classes.tif", ids[None], nodata=255, transform=from_origin(500000, 5000000, 0.5, 0.5))


def test_a_live_lock_stops_a_second_writer_and_a_stale_one_is_taken_over(work):
    folder, _, _, out = work
    classes = _classes(folder, 64)
    target = out / "v.gpkg"
    lock = out / ".v.gpkg.geoseg-lock"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(str(holder.pid))
        result = invoke("vectorize", classes, "-o", target, "--classes", "bg,a,b")
        assert_error(result, f"is being written by another geoseg run (pid {holder.pid})")
        assert not target.exists() and lock.read_text() == str(holder.pid)  # the other run's lock is left alone
    finally:
        holder.kill()
        holder.wait()
    result = invoke("vectorize", classes, "-o", target, "--classes", "bg,a,b")  # its process is gone: stale
    assert result.exit_code == 0, result.output
    assert target.is_file() and not lock.exists()  # and this run's own lock is gone once it is done


def test_two_runs_started_together_one_writes_the_other_stops_at_once(work):
    folder, _, _, out = work
    classes = _classes(folder, 4096)  # a few seconds of polygons
    target = out / "v.gpkg"
    lock = out / ".v.gpkg.geoseg-lock"
    first = run_geoseg("vectorize", classes, "-o", target, "--classes", "bg,a,b")
    try:
        deadline = time.monotonic() + 60
        while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lock.exists(), first.communicate()[1]
        t0 = time.monotonic()
        second = run_geoseg("vectorize", classes, "-o", target, "--classes", "bg,a,b", "--overwrite")
        _, err = second.communicate(timeout=60)
        assert second.returncode == 1 and f"another geoseg run (pid {first.pid})" in err, err
        assert time.monotonic() - t0 < 10  # at once: it did no work
        assert [line for line in err.splitlines() if line.startswith("Error:")] == [err.strip().splitlines()[-1]]
    finally:
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert target.is_file() and not lock.exists()


# --- errors that name the real cause ---------------------------------------------------------


def _vrt(folder: Path, source: Path, *, relative: bool) -> Path:
    import rasterio

    with rasterio.open(source) as ds:
        w, h, t = ds.width, ds.height, ds.transform
        crs = ds.crs.to_wkt()
    name = source.name if relative else str(source)
    vrt = folder / "mosaic.vrt"
    vrt.write_text(f"""<VRTDataset rasterXSize="{w}" rasterYSize="{h}">
  <SRS>{crs.replace('"', '&quot;')}</SRS>
  <GeoTransform>{t.c}, {t.a}, 0, {t.f}, 0, {t.e}</GeoTransform>
  <VRTRasterBand dataType="Byte" band="1">
    <SimpleSource>
      <SourceFilename relativeToVRT="{int(relative)}">{name}</SourceFilename>
      <SourceBand>1</SourceBand>
    </SimpleSource>
  </VRTRasterBand>
</VRTDataset>
""")
    return vrt


@pytest.mark.parametrize("relative", [True, False])
def test_a_vrt_whose_source_is_missing_names_the_source(work, models, relative):
    folder, scene, _, out = work
    source = folder / "tile_07.tif"
    source.write_bytes(scene.read_bytes())
    vrt = _vrt(folder, source, relative=relative)
    ok = invoke("predict", vrt, "-o", out / "ok.gpkg", "--model", models["gray"])
    assert ok.exit_code == 0, ok.output  # the VRT itself is fine
    source.unlink()
    error = assert_error(invoke("predict", vrt, "-o", out / "p.gpkg", "--model", models["gray"]),
                         "is a VRT whose source file", "tile_07.tif", "does not exist")
    assert "corrupted" not in error and not (out / "p.gpkg").exists()


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_gcp_georeferencing_is_named_with_the_fix(work, models):
    import rasterio
    from rasterio.control import GroundControlPoint

    folder, scene, _, out = work
    with rasterio.open(scene) as ds:
        data, h, w = ds.read(), ds.height, ds.width
    gcp = folder / "gcps.tif"
    with rasterio.open(gcp, "w", driver="GTiff", width=w, height=h, count=1, dtype="uint8") as ds:
        ds.write(data)
        ds.gcps = ([GroundControlPoint(0, 0, 500000, 5000000), GroundControlPoint(0, w, 500000 + w / 2, 5000000),
                    GroundControlPoint(h, 0, 500000, 5000000 - h / 2)], rasterio.crs.CRS.from_epsg(32633))
    error = assert_error(invoke("predict", gcp, "-o", out / "p.gpkg", "--model", models["gray"]),
                         "ground control points", "gdalwarp")
    assert "no CRS" not in error and "EPSG:32633" in error


def test_gdal_virtual_paths_reach_gdal_untouched(work, models):
    import zipfile

    folder, scene, _, out = work
    archive = folder / "delivery.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(scene, "imagery/scene.tif")
    inside = f"/vsizip/{archive}/imagery/scene.tif"
    result = invoke("predict", inside, "-o", out / "z.gpkg", "--model", models["gray"])
    assert result.exit_code == 0, result.output
    assert (out / "z.gpkg").is_file()
    assert_error(invoke("predict", f"/vsizip/{archive}/imagery/other.tif", "-o", out / "y.gpkg", "--model",
                        models["gray"]), "could not be opened by GDAL", "inside the archive")
    # a URL keeps its "//" (no network here: GDAL's own error comes back, naming the URL)
    assert_error(invoke("predict", "https://example.invalid/scene.tif", "-o", out / "u.gpkg", "--model",
                        models["gray"]), "https://example.invalid/scene.tif")


# --- mistakes are found before the model loads ------------------------------------------------


def _cli_without_keras(*args) -> tuple[int, str, bool]:
    """Run the CLI in a fresh process; (exit code, stderr, whether Keras or TensorFlow was imported)."""
    code = ("import sys\nfrom geoseg.cli import main\ntry:\n    main()\nexcept SystemExit as e:\n"
            "    code = e.code\nloaded = any(m.split('.')[0] in ('keras', 'tensorflow') for m in sys.modules)\n"
            "sys.stdout.write(f'{code} {loaded}')\n")
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    rc, loaded = proc.stdout.split()
    return int(rc), proc.stderr, loaded == "True"


@pytest.mark.parametrize("case", ["two-bands", "threshold", "tile-size", "overlap", "bands-index", "classes"])
def test_mistakes_are_reported_before_the_model_loads(work, case):
    folder, scene, labels, out = work
    two = write_raster(folder / "two.tif", np.zeros((2, 64, 64), np.uint8))
    three = write_raster(folder / "three.tif", np.zeros((3, 600, 600), np.uint8))
    args = {
        "two-bands": ["predict", two, "-o", out / "p.gpkg"],  # the default model: red, green, blue
        "threshold": ["predict", three, "-o", out / "p.gpkg", "--threshold", "2.0"],
        "tile-size": ["predict", three, "-o", out / "p.gpkg", "--tile-size", "100"],
        "overlap": ["predict", three, "-o", out / "p.gpkg", "--overlap", "512", "--tile-size", "512"],
        "bands-index": ["predict", three, "-o", out / "p.gpkg", "--bands", "1,2,5"],
        "classes": ["evaluate", two, labels],
    }[case]
    rc, err, loaded = _cli_without_keras(*args)
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert rc == 1 and len(errors) == 1, err
    assert not loaded, f"Keras was imported before the error: {errors[0]}"
    assert "WARNING" not in err and "Traceback" not in err  # one line: no noise about temporary files
    assert not list(out.iterdir())


# --- a model far from its ground sample distance ------------------------------------------------


def test_native_gsd_far_from_the_model_needs_force(work):
    folder, _, _, out = work
    coarse = write_raster(folder / "naip_like.tif", np.zeros((3, 200, 200), np.uint8),
                          transform=from_origin(500000, 5000000, 5.0, 5.0))  # 5 m, the 0.3 m buildings model
    rc, err, loaded = _cli_without_keras("predict", coarse, "-o", out / "p.gpkg", "--gsd", "native")
    assert rc == 1 and not loaded and "--force" in err and "5 m pixels" in err and "smaller" in err, err
    assert not list(out.iterdir())
    rc, err, _ = _cli_without_keras("change", coarse, coarse, "-o", out / "c.gpkg", "--gsd", "native")
    assert rc == 1 and "--force" in err, err


def test_force_runs_it_with_a_warning_and_auto_warns_when_far(caplog):
    import dataclasses

    from geoseg.inference.grids import working_grid
    from geoseg.io.scene import SceneInfo
    from tests.testmodels import test_meta

    meta = test_meta("m", classes=2, bands=3, gsd=0.3, gsd_range=(0.18, 0.51))
    info = SceneInfo(path="far.tif", width=100, height=100, crs=rasterio.crs.CRS.from_epsg(32633),
                     transform=from_origin(500000, 5000000, 2.5, 2.5), bands=(1, 2, 3), band_names=("r", "g", "b"),
                     dtype="uint8", nodata=None, mask_kind="none", alpha_band=None, gsd=2.5)
    with caplog.at_level("WARNING"):
        assert working_grid(info, meta, "native", force=True) is info
    assert "--force" in caplog.text and "5x outside" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # 2.2 m: 4.3x outside, 7.3x upsampled (8x is refused)
        grid = working_grid(dataclasses.replace(info, gsd=2.2, transform=from_origin(500000, 5000000, 2.2, 2.2)),
                            meta, "auto")
    assert grid.gsd == pytest.approx(0.3, rel=0.01) and "coarser than the model's range" in caplog.text
    near = dataclasses.replace(info, gsd=0.8, transform=from_origin(500000, 5000000, 0.8, 0.8))
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert working_grid(near, meta, "native") is near  # 1.6x outside: runs, no warning
    assert not caplog.text


# --- lying headers: refused at once; a real huge sparse scene runs with a progress bar ----------------


def _patch_size(src: Path, dst: Path, width: int, height: int) -> Path:
    """A copy of a classic little-endian TIFF whose ImageWidth/ImageLength claim ``width`` x ``height``."""
    import struct

    data = bytearray(src.read_bytes())
    assert data[:4] == b"II*\x00"
    ifd = struct.unpack("<I", data[4:8])[0]
    for i in range(struct.unpack("<H", data[ifd:ifd + 2])[0]):
        at = ifd + 2 + 12 * i
        tag = struct.unpack("<H", data[at:at + 2])[0]
        if tag in (256, 257):
            struct.pack_into("<HHII", data, at, tag, 4, 1, width if tag == 256 else height)  # as a LONG
    dst.write_bytes(bytes(data))
    return dst


def _gray_scene(folder: Path, name: str, **profile) -> Path:
    values = np.random.default_rng(5).integers(0, 255, size=(1, 256, 256)).astype("uint8")
    return write_raster(folder / name, values, **profile)


def _lying_commands(bad: Path, good: Path, labels: Path, out: Path, model: Path) -> dict[str, list]:
    return {
        "predict": ["predict", bad, "-o", out / "p.gpkg", "--model", model, "--raster-out", out / "p.tif"],
        "evaluate": ["evaluate", bad, labels, "--model", model],
        "change": ["change", good, bad, "-o", out / "c.gpkg", "--model", model],
        "train": ["train", "--images", bad, "--labels", labels, "-o", out / "m.keras", "--epochs", 1,
                  "--steps-per-epoch", 1, "--chip-size", 32, "--width", 4, "--depth", 1, "--classes",
                  "background,class1"],
    }


@pytest.mark.parametrize("command", ["predict", "evaluate", "change", "train"])
@pytest.mark.parametrize("layout", ["strips", "tiles"])
def test_a_header_claiming_a_huge_raster_is_refused_as_damaged(work, models, command, layout):
    folder, _, labels, out = work
    profile = {"blockxsize": 128, "blockysize": 128} if layout == "tiles" else {"tiled": False}
    good = _gray_scene(folder, "good.tif", **profile)
    bad = _patch_size(good, folder / "patched.tif", 2_000_000, 2_000_000)
    with rasterio.open(bad) as ds:  # GDAL itself opens it without complaint
        assert ds.shape == (2_000_000, 2_000_000)
    before = sha(bad)
    error = assert_error(invoke(*_lying_commands(bad, good, labels, out, models["gray"])[command]),
                         "patched.tif is damaged", "2,000,000 x 2,000,000 px", f"holds the position of only")
    assert layout in error
    assert sha(bad) == before and list(out.iterdir()) == []


@pytest.mark.parametrize("command", ["predict", "evaluate"])
@pytest.mark.parametrize("layout", ["strips", "tiles"])
def test_a_file_cut_short_is_refused_before_any_work(work, models, command, layout):
    folder, _, labels, out = work
    profile = {"blockxsize": 128, "blockysize": 128} if layout == "tiles" else {"tiled": False}
    good = _gray_scene(folder, "good.tif", **profile)
    cut = folder / "cut.tif"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size - 5000])  # the header is whole, the last blocks are not
    with rasterio.open(cut) as ds:
        assert ds.shape == (256, 256)
    before = sha(cut)
    assert_error(invoke(*_lying_commands(cut, good, labels, out, models["gray"])[command]), "cut.tif is damaged",
                 "past the end of the", "truncated")
    assert sha(cut) == before and list(out.iterdir()) == []


def test_the_header_check_passes_real_layouts(tmp_path):
    """Band-interleaved tiles, compressed strips, one strip, BigTIFF and a sparse file are all fine."""
    from geoseg.io.tiffheader import check_tiff

    values = np.random.default_rng(6).integers(0, 255, size=(3, 300, 400)).astype("uint8")
    for i, profile in enumerate([
        {"interleave": "band", "blockxsize": 128, "blockysize": 128, "compress": "deflate"},
        {"tiled": False, "compress": "lzw"}, {"tiled": False, "blockysize": 300}, {"BIGTIFF": "YES"},
    ]):
        check_tiff(write_raster(tmp_path / f"l{i}.tif", values, **profile))
    sparse = tmp_path / "sparse.tif"
    with rasterio.open(sparse, "w", driver="GTiff", width=40_000, height=30_000, count=1, dtype="uint8",
                       tiled=True, blockxsize=256, blockysize=256, sparse_ok=True, crs="EPSG:32633",
                       transform=from_origin(500000, 5000000, 0.5, 0.5)) as ds:
        ds.write(np.ones((1, 256, 256), np.uint8), window=((256, 512), (0, 256)))
    assert sparse.stat().st_size < 1_000_000  # 1.2 GB of pixels declared
    check_tiff(sparse)


def _in_a_terminal(args: list, until, timeout: float = 240.0) -> tuple[subprocess.Popen, str, object]:
    """Start geoseg with stderr on a pseudo-terminal (120 columns), read until ``until(text)`` is true."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    def as_in_a_terminal() -> None:
        # a shell gives the program it runs in the foreground Ctrl-C's default action; a test run
        # started in the background (`pytest &`, a CI job) ignores SIGINT, and its children would too
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen([sys.executable, "-m", "geoseg", *map(str, args)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=slave, cwd=Path(__file__).resolve().parents[2],
                            preexec_fn=as_in_a_terminal)
    os.close(slave)
    text = ""

    def read(seconds: float, stop=None) -> str:
        nonlocal text
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    text += os.read(master, 65536).decode(errors="replace")
                except OSError:
                    break
            elif proc.poll() is not None:
                break
            if stop is not None and stop(text):
                break
        return text

    read(timeout, until)
    return proc, text, read


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_huge_sparse_bigtiff_runs_with_a_progress_bar_and_stops_on_a_signal(work, models, sig, code):
    import re

    folder, _, _, out = work
    scene = folder / "huge.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=1_000_000, height=1_000_000, count=1, dtype="uint8",
                       tiled=True, blockxsize=512, blockysize=512, sparse_ok=True, BIGTIFF="YES", crs="EPSG:32633",
                       transform=from_origin(500000, 5000000, 0.5, 0.5)) as ds:
        ds.write(np.ones((1, 512, 512), np.uint8), window=((0, 512), (0, 512)))
    before = sha(scene)
    bar = re.compile(r"predict:\s+0%[^\r\n]*\| *(\d+)/(\d+) \[[0-9:]+<([0-9:]+)")  # done/total [elapsed<ETA]
    proc, text, read = _in_a_terminal(["predict", scene, "-o", out / "huge.gpkg", "--model", models["cnn"],
                                       "--raster-out", out / "huge.tif", "--tile-size", 256, "--overlap", 32],
                                      lambda t: len(bar.findall(t)) >= 3)
    found = bar.findall(text)
    assert len(found) >= 3, f"no progress bar with a total and an ETA:\n{text[-2000:]}"
    done, total, eta = found[-1]
    assert int(total) > 15_000_000 and int(done) > 0 and eta.count(":") >= 1  # 1,000,000² px in tiles of 256
    proc.send_signal(sig)
    t0 = time.monotonic()
    text = read(60)
    proc.wait(timeout=60)
    assert proc.returncode == code, text[-2000:]
    assert time.monotonic() - t0 < 20  # on a busy 2-core machine; about 1 s when idle
    assert "Error: interrupted" in text and "Traceback" not in text
    assert list(out.iterdir()) == [] and sha(scene) == before
