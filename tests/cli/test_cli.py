"""The command-line contract: exit codes, one-line errors, --json on stdout, outputs that open."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import numpy as np
import pyogrio
import pytest
import rasterio
from click.testing import CliRunner

from geoseg.cli import cli
from tests.conftest import write_raster
from tests.testmodels import blocky_labels, keras_onehot_bundle


@pytest.fixture(scope="module")
def onehot_model(tmp_path_factory):
    return keras_onehot_bundle(tmp_path_factory.mktemp("model") / "onehot.keras")


@pytest.fixture
def scene(tmp_path):
    labels = blocky_labels(150, 170, 4, np.random.default_rng(5), block=11)
    write_raster(tmp_path / "scene.tif", labels.astype("uint8")[None])
    return tmp_path / "scene.tif", labels


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result


def assert_one_line_error(result, code, *needles):
    assert result.exit_code == code, result.output
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in err[0], err[0]


def test_predict_with_a_keras_bundle_reproduces_the_band_and_writes_styled_outputs(tmp_path, scene, onehot_model):
    path, labels = scene
    out, classes = tmp_path / "out.gpkg", tmp_path / "classes.tif"
    result = invoke("predict", path, "-o", out, "--model", onehot_model, "--raster-out", classes,
                    "--tile-size", 48, "--overlap", 12, "--batch-size", 3, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["model"]["name"] == "onehot" and len(doc["model"]["sha256"]) == 64
    # --precision auto (the default) says what it ran: bfloat16 on CPUs that have it, and the band
    # is still reproduced exactly
    from geoseg.models import resolve_precision

    assert doc["model"]["precision"] == resolve_precision("auto") != "auto"
    assert doc["outputs"] == {"gpkg": str(out), "raster": str(classes)}
    with rasterio.open(classes) as ds:
        np.testing.assert_array_equal(ds.read(1), labels)
        assert ds.nodata == 255
        assert ds.colormap(1)[1][:3] == (230, 25, 75)
        assert ds.tags()["model_sha256"] == doc["model"]["sha256"]
        assert ds.tags()["precision"] == doc["model"]["precision"]
    assert (tmp_path / "classes.qml").exists()
    info = pyogrio.read_info(out, layer="class1")
    assert info["crs"] == "EPSG:32633" and {"class_name", "class_id", "area_m2", "score"} <= set(info["fields"])
    con = sqlite3.connect(out)
    rows = con.execute("SELECT f_table_name, f_table_schema, f_geometry_column, useAsDefault FROM layer_styles").fetchall()
    con.close()
    assert sorted(r[0] for r in rows) == ["class1", "class2", "class3"]
    assert all(r[1] == "" and r[2] == info["geometry_name"] and r[3] for r in rows)


def test_bad_inputs_are_one_line_errors_with_exit_code_1(tmp_path, scene, onehot_model):
    path, _ = scene
    out = tmp_path / "o.gpkg"
    assert_one_line_error(invoke("predict", tmp_path / "missing.tif", "-o", out, "--model", onehot_model), 1, "no such file")
    assert_one_line_error(invoke("predict", path, "-o", out, "--model", onehot_model, "--overlap", 64, "--tile-size", 64), 1,
                          "--overlap")
    assert_one_line_error(invoke("predict", path, "-o", out, "--model", onehot_model, "--batch-size", 0), 1, "--batch-size")
    assert_one_line_error(invoke("predict", path, "-o", out, "--model", tmp_path / "nope.keras"), 1, "nope.keras")
    junk = tmp_path / "junk.keras"
    junk.write_bytes(b"not a zip")
    assert_one_line_error(invoke("predict", path, "-o", out, "--model", junk), 1, "junk.keras")
    nocrs = write_raster(tmp_path / "nocrs.tif", np.ones((1, 20, 20), np.uint8), crs=None)
    assert_one_line_error(invoke("predict", nocrs, "-o", out, "--model", onehot_model), 1, "--assume-crs")
    assert invoke("predict", nocrs, "-o", out, "--model", onehot_model, "--assume-crs", "EPSG:32633").exit_code == 0
    assert_one_line_error(invoke("predict", path, "-o", out, "--model", onehot_model), 1, "--overwrite")
    assert_one_line_error(invoke("predict", path, "-o", tmp_path / "nofolder" / "o.gpkg", "--model", onehot_model), 1,
                          "does not exist")
    assert_one_line_error(invoke("predict", path, "-o", tmp_path / "o.shp", "--model", onehot_model), 1, ".gpkg")
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_usage_errors_exit_2(scene):
    path, _ = scene
    assert invoke("predict", path).exit_code == 2  # no -o
    assert invoke("predict", path, "-o", "x.gpkg", "--blend", "nope").exit_code == 2


def test_verbose_shows_the_traceback(tmp_path):
    result = invoke("-v", "predict", tmp_path / "missing.tif", "-o", tmp_path / "o.gpkg")
    assert result.exit_code == 1 and "Traceback" in result.stderr and "Error: " in result.stderr


def test_verbose_and_quiet_work_after_the_command_too(tmp_path, scene):
    result = invoke("predict", tmp_path / "missing.tif", "-o", tmp_path / "o.gpkg", "-v")
    assert result.exit_code == 1 and "Traceback" in result.stderr and "Error: " in result.stderr
    assert invoke("predict", tmp_path / "missing.tif", "-o", tmp_path / "o.gpkg", "--verbose").stderr.count("Traceback") == 1
    path, _ = scene

    def run(*extra):  # a process of its own: logging is configured once per process
        return subprocess.run([sys.executable, "-m", "geoseg", "vectorize", str(path), "-o", str(tmp_path / "q.gpkg"),
                               "--classes", "bg,a,b,c", "--overwrite", *extra], capture_output=True, text=True)

    loud, quiet = run(), run("-q")
    assert loud.returncode == quiet.returncode == 0, quiet.stderr
    assert "INFO" in loud.stderr and "INFO" not in quiet.stderr
    # after "--" a value that looks like -v is an argument, not an option
    assert invoke("predict", "--", "-v").exit_code == 2


def test_models_json_lists_builtin_bundles():
    result = invoke("models", "--json")
    assert result.exit_code == 0
    assert isinstance(json.loads(result.stdout), list)


def test_help_is_instant_and_does_not_import_keras():
    code = "import sys; from geoseg.cli import cli; cli(['--help'], standalone_mode=False); print('keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


def test_real_entry_point_keeps_stderr_to_geoseg_lines(tmp_path):
    """The installed `geoseg` script: TensorFlow's native start-up chatter does not reach stderr."""
    import shutil

    from tests.testmodels import random_unet_bundle

    exe = shutil.which("geoseg") or str(__import__("pathlib").Path(sys.executable).with_name("geoseg"))
    model = random_unet_bundle(tmp_path / "u.keras", bands=1, classes=2, width=4, depth=2)
    scene = write_raster(tmp_path / "s.tif", np.random.default_rng(0).integers(0, 255, (1, 40, 50)).astype("uint8"))
    proc = subprocess.run([exe, "predict", str(scene), "-o", str(tmp_path / "o.gpkg"), "--model", str(model), "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["outputs"]["gpkg"].endswith("o.gpkg")
    for line in proc.stderr.splitlines():
        assert line.startswith(("INFO:", "WARNING:")), proc.stderr
    proc = subprocess.run([exe, "predict", str(tmp_path / "missing.tif"), "-o", str(tmp_path / "x.gpkg")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("Error: ")


def test_log_lines_lift_the_progress_bar_instead_of_gluing_onto_it(monkeypatch):
    import io
    import logging

    from tqdm import tqdm

    from geoseg.cli import BarSafeHandler

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    handler = BarSafeHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    record = logging.LogRecord("geoseg", logging.INFO, __file__, 1, "halfway there", None, None)
    with tqdm(total=10, desc="predict", file=term, leave=False) as bar:
        bar.update(3)
        bar.refresh()
        handler.emit(record)
        bar.update(1)
    text = term.getvalue()
    at = text.index("INFO: halfway there")
    assert text[at - 1] in "\r\n"  # the bar was cleared first: the line starts at the left margin
    assert text[at + len("INFO: halfway there")] == "\n"  # and ends on its own
    assert "predict" in text[at:]  # the bar is drawn again below it


def test_shell_completion_offers_the_built_in_model_names():
    env = {**os.environ, "_GEOSEG_COMPLETE": "bash_complete", "COMP_WORDS": "geoseg predict x.tif --model ", "COMP_CWORD": "4"}
    out = subprocess.run([sys.executable, "-c", "from geoseg.cli import main; main()"], env=env, capture_output=True,
                         text=True).stdout.split()
    assert {"plain,buildings", "plain,landcover"} <= set(out) and "file," in out  # names, then files
    env.update(COMP_WORDS="geoseg evaluate s.tif l.gpkg -m la", COMP_CWORD="5")
    out = subprocess.run([sys.executable, "-c", "from geoseg.cli import main; main()"], env=env, capture_output=True,
                         text=True).stdout.split()
    assert "plain,landcover" in out and "plain,buildings" not in out
