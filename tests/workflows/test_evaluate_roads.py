"""geoseg evaluate's road network scores: completeness, correctness and quality at a buffer, from the
labels' centre-lines or from their road pixels, on generated scenes with a model whose output is known."""

from __future__ import annotations

import dataclasses
import json

import geopandas as gpd
import numpy as np
import pytest
import shapely
from click.testing import CliRunner

from geoseg.cli import cli
from geoseg.errors import InputError
from geoseg.workflows.evaluate import evaluate
from geoseg.io.labels import IGNORE
from geoseg.models.bundle import Bundle, ClassInfo
from geoseg.inference.options import PredictOptions
from tests.conftest import write_raster
from tests.testmodels import keras_onehot_bundle, numpy_bundle

X0, Y0, PX = 500000.0, 5000000.0, 0.5  # write_raster's grid (EPSG:32633)
SIZE = 240  # 120 m
OPTIONS = PredictOptions(tile_size=64, overlap=16)


def _road_bundle() -> Bundle:
    b = numpy_bundle(3)
    classes = (ClassInfo("background", (0, 0, 0)), ClassInfo("road", (245, 130, 48)), ClassInfo("water", (0, 130, 200)))
    return dataclasses.replace(b, meta=dataclasses.replace(b.meta, classes=classes))


def _roads() -> np.ndarray:
    """A cross of two 6 m roads: rows 114-125 across, columns 54-65 down (class 1)."""
    a = np.zeros((SIZE, SIZE), np.uint8)
    a[114:126, :] = 1
    a[:, 54:66] = 1
    return a


def _line(*xy_px):
    return shapely.LineString([(X0 + c * PX, Y0 - r * PX) for r, c in xy_px])


HORIZONTAL = _line((120, 0), (120, SIZE))
VERTICAL = _line((0, 60), (SIZE, 60))


@pytest.fixture
def scene(tmp_path):
    return write_raster(tmp_path / "scene.tif", _roads())


def test_the_labels_own_road_pixels_give_a_perfect_network(scene, tmp_path):
    truth = write_raster(tmp_path / "truth.tif", _roads())
    result = evaluate(scene, truth, bundle=_road_bundle(), options=OPTIONS)
    r = result.roads
    assert r["reference"] == "mask" and r["buffer_m"] == 3.0
    assert r["completeness"] == pytest.approx(1.0, abs=0.01) and r["correctness"] == pytest.approx(1.0, abs=0.01)
    assert r["quality"] == pytest.approx(1.0, abs=0.02)
    assert 200 < r["reference_m"] < 250  # two 120 m roads, less the pruned ends
    json.dumps(result.to_dict(), allow_nan=False)


def test_reference_centre_lines_and_a_missing_road(scene, tmp_path):
    gpd.GeoDataFrame({"class": ["road", "road"]}, geometry=[HORIZONTAL, VERTICAL], crs="EPSG:32633") \
        .to_crs("EPSG:4326").to_file(tmp_path / "both.gpkg")
    result = evaluate(scene, tmp_path / "both.gpkg", bundle=_road_bundle(), options=OPTIONS, line_width_m=6)
    r = result.roads
    assert r["reference"] == "lines" and r["reference_lines"] == 2
    assert r["reference_m"] == pytest.approx(240, rel=0.01)  # measured in metres, though the labels are in degrees
    assert r["completeness"] > 0.95 and r["correctness"] > 0.95
    assert result.classes["road"].iou > 0.95  # the buffered lines score the pixels
    # the reference misses the vertical road: everything predicted there is wrong, nothing missed
    gpd.GeoDataFrame({"class": ["road", "water"]}, geometry=[HORIZONTAL, VERTICAL], crs="EPSG:32633") \
        .to_file(tmp_path / "one.gpkg")
    r = evaluate(scene, tmp_path / "one.gpkg", bundle=_road_bundle(), options=OPTIONS, line_width_m=6).roads
    assert r["reference_lines"] == 1 and r["completeness"] > 0.95
    # the predicted vertical road (~120 m, 3 m of it within the buffer on each side) is unmatched
    assert r["correctness"] == pytest.approx(126 / 240, abs=0.05)
    assert r["quality"] == pytest.approx(r["matched_predicted_m"] / (r["predicted_m"] + r["reference_m"] - r["matched_reference_m"]))
    # a tighter buffer cannot match more
    tight = evaluate(scene, tmp_path / "one.gpkg", bundle=_road_bundle(), options=OPTIONS, line_width_m=6,
                     road_buffer_m=1.0).roads
    assert tight["buffer_m"] == 1.0 and tight["matched_predicted_m"] <= r["matched_predicted_m"]


def test_label_class_scores_lines_without_a_class_attribute(scene, tmp_path):
    """SpaceNet road labels have no class column; with several foreground classes --label-class
    says what they are, with no editing of the file."""
    gpd.GeoDataFrame({"road_type": [5, 5]}, geometry=[HORIZONTAL, VERTICAL], crs="EPSG:32633") \
        .to_file(tmp_path / "spacenet.geojson")
    with pytest.raises(InputError, match="--label-class"):  # road or water? the error says how to say
        evaluate(scene, tmp_path / "spacenet.geojson", bundle=_road_bundle(), options=OPTIONS, line_width_m=6)
    result = evaluate(scene, tmp_path / "spacenet.geojson", bundle=_road_bundle(), options=OPTIONS, line_width_m=6,
                      label_class="road")
    assert result.classes["road"].iou > 0.95 and result.roads["reference_lines"] == 2
    assert result.roads["completeness"] > 0.95
    water = evaluate(scene, tmp_path / "spacenet.geojson", bundle=_road_bundle(), options=OPTIONS, line_width_m=6,
                     label_class="Water")  # any case
    assert water.classes["road"].iou == 0 and water.roads["reference"] == "mask"  # no road lines: the mask's
    with pytest.raises(InputError, match="--label-class 'river' is not a class"):
        evaluate(scene, tmp_path / "spacenet.geojson", bundle=_road_bundle(), options=OPTIONS, line_width_m=6,
                 label_class="river")


def test_ignored_pixels_count_neither_way(scene, tmp_path):
    truth = _roads()
    truth[:, 40:80] = IGNORE  # the vertical road is unlabelled
    truth[114:126, 40:80] = IGNORE
    path = write_raster(tmp_path / "truth.tif", truth)
    r = evaluate(scene, path, bundle=_road_bundle(), options=OPTIONS).roads
    assert r["correctness"] > 0.95 and r["completeness"] > 0.95
    assert r["predicted_m"] < 220  # the vertical road left the predicted network too
    # without the ignore, the same prediction against labels without the vertical road is wrong there
    truth = _roads()
    truth[:, 54:66] = 0
    truth[114:126, 54:66] = 1
    r = evaluate(scene, write_raster(tmp_path / "t2.tif", truth), bundle=_road_bundle(), options=OPTIONS).roads
    assert r["correctness"] < 0.7


def test_off_without_a_road_class_or_at_zero(scene, tmp_path):
    truth = write_raster(tmp_path / "truth.tif", _roads())
    assert evaluate(scene, truth, bundle=numpy_bundle(3), options=OPTIONS).roads is None
    assert evaluate(scene, truth, bundle=_road_bundle(), options=OPTIONS, road_buffer_m=0).roads is None
    with pytest.raises(InputError, match="no class named 'road'"):
        evaluate(scene, truth, bundle=numpy_bundle(3), options=OPTIONS, road_buffer_m=3)
    # another class can be the road class
    r = evaluate(scene, truth, bundle=numpy_bundle(3), options=OPTIONS, road_class_name="class1").roads
    assert r["completeness"] > 0.95


def test_cli_prints_and_returns_the_road_scores(scene, tmp_path):
    truth = write_raster(tmp_path / "truth.tif", _roads())
    model = keras_onehot_bundle(tmp_path / "onehot.keras", classes=3)
    run = CliRunner().invoke(cli, ["evaluate", str(scene), str(truth), "--model", str(model), "--road-class", "class1",
                                   "--road-buffer", "2", "--tile-size", "64", "--overlap", "16", "--json"])
    assert run.exit_code == 0, run.output
    doc = json.loads(run.stdout)
    assert doc["roads"]["buffer_m"] == 2.0 and doc["roads"]["completeness"] > 0.95
    run = CliRunner().invoke(cli, ["evaluate", str(scene), str(truth), "--model", str(model), "--road-class", "class1",
                                   "--tile-size", "64", "--overlap", "16"])
    assert run.exit_code == 0, run.output
    line = next(x for x in run.stdout.splitlines() if x.startswith("road network"))
    assert "completeness 1.000" in line and "buffer 3 m" in line
    run = CliRunner().invoke(cli, ["evaluate", str(scene), str(truth), "--model", str(model), "--road-buffer", "3"])
    assert run.exit_code == 1 and "no class named 'road'" in run.stderr
