"""Evaluation: metrics on hand-made arrays, streaming equals one-shot, objects, end to end, CLI."""

from __future__ import annotations

import json
import math

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geoseg.cli import cli
from geoseg.errors import InputError
from geoseg.metrics import BoundaryCounter, ConfusionMatrix, match_objects, strips
from geoseg.workflows.evaluate import evaluate, evaluate_classes
from geoseg.io.labels import IGNORE
from geoseg.inference.options import PredictOptions
from tests.conftest import shared, write_raster
from tests.testmodels import blocky_labels, keras_onehot_bundle, numpy_bundle

ORIGIN_X, ORIGIN_Y, PIXEL = 500000.0, 5000000.0, 0.5  # write_raster's default grid (EPSG:32633)


# --- pixel metrics ------------------------------------------------------------------------------


def test_confusion_matrix_metrics_on_a_hand_made_example():
    truth = np.array([[0, 0, 1, 1],
                      [0, 0, 1, 1],
                      [2, 2, 2, 2]])
    pred = np.array([[1, 1, 1, 1],
                     [0, 0, 1, 2],
                     [2, 2, 2, 0]])
    cm = ConfusionMatrix(3)
    cm.update(pred, truth)
    # class 0: TP 2, FP 1, FN 2; class 1: TP 3, FP 2, FN 1; class 2: TP 3, FP 1, FN 1
    np.testing.assert_allclose(cm.iou(), [2 / 5, 3 / 6, 3 / 5])
    np.testing.assert_allclose(cm.precision(), [2 / 3, 3 / 5, 3 / 4])
    np.testing.assert_allclose(cm.recall(), [2 / 4, 3 / 4, 3 / 4])
    np.testing.assert_allclose(cm.f1(), [4 / 7, 6 / 9, 6 / 8])
    assert cm.accuracy() == pytest.approx(8 / 12)


def test_confusion_matrix_ignores_255_in_truth_and_prediction():
    truth = np.array([1, 1, IGNORE, 0, 0])
    pred = np.array([1, IGNORE, 0, 0, 1])
    cm = ConfusionMatrix(2)
    cm.update(pred, truth)
    assert cm.matrix.tolist() == [[1, 1], [0, 1]]
    assert cm.accuracy() == pytest.approx(2 / 3)
    assert math.isnan(ConfusionMatrix(2).accuracy())


def _stream(pred, truth, *, rows, classes, tolerance):
    cm, bc = ConfusionMatrix(classes), BoundaryCounter(classes, tolerance)
    h = pred.shape[0]
    pad = lambda a: np.pad(a, ((bc.halo(), bc.halo()), (0, 0)), constant_values=IGNORE)  # noqa: E731
    p, t = pad(pred), pad(truth)
    for r0, r1, a, b in strips(h, rows, bc.halo()):
        sl = slice(a + bc.halo(), b + bc.halo())
        cm.update(pred[r0:r1], truth[r0:r1])
        bc.update(p[sl], t[sl], top=r0 - a, bottom=b - r1)
    return cm, bc


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 40), tolerance=st.integers(0, 4),
       h=st.integers(1, 37), w=st.integers(1, 23))
def test_streaming_over_strips_equals_one_shot(seed, rows, tolerance, h, w):
    rng = np.random.default_rng(seed)
    truth = blocky_labels(h, w, 3, rng, block=3).astype(np.uint8)
    pred = np.where(rng.random((h, w)) < 0.2, rng.integers(0, 3, (h, w)), truth).astype(np.uint8)
    truth[rng.random((h, w)) < 0.05] = IGNORE
    pred[rng.random((h, w)) < 0.05] = IGNORE
    whole_cm, whole_bc = _stream(pred, truth, rows=h, classes=3, tolerance=tolerance)
    cm, bc = _stream(pred, truth, rows=rows, classes=3, tolerance=tolerance)
    np.testing.assert_array_equal(cm.matrix, whole_cm.matrix)
    for name in ("pred_total", "pred_matched", "truth_total", "truth_matched"):
        np.testing.assert_array_equal(getattr(bc, name), getattr(whole_bc, name))


# --- boundary F1 --------------------------------------------------------------------------------


def _square(shift=0, size=40):
    m = np.zeros((size, size), dtype=np.uint8)
    m[10 + shift : 30 + shift, 10:30] = 1
    return m


def test_boundary_f1_is_one_for_identical_masks_and_not_fooled_by_strips():
    truth = _square()
    cm, bc = _stream(truth, truth, rows=7, classes=2, tolerance=2)
    np.testing.assert_allclose(bc.f1(), [1.0, 1.0])
    assert bc.truth_total[1] == 2 * 20 + 2 * 18  # the square's ring only: no boundaries at strip edges


def test_boundary_f1_drops_only_beyond_the_tolerance():
    truth = _square()
    _, within = _stream(_square(shift=2), truth, rows=40, classes=2, tolerance=2)
    np.testing.assert_allclose(within.f1(), [1.0, 1.0])
    _, beyond = _stream(_square(shift=4), truth, rows=40, classes=2, tolerance=2)
    # of the 76 ring pixels, 40 lie within 2 px of the other ring: the sides where they overlap
    # (17 rows each) and 3 pixels at each end of the inner edge row; the outer edge row none
    assert beyond.f1()[1] == pytest.approx(40 / 76)
    assert beyond.precision()[1] == beyond.recall()[1] == pytest.approx(40 / 76)
    _, split = _stream(_square(shift=4), truth, rows=3, classes=2, tolerance=2)
    np.testing.assert_array_equal(split.f1(), beyond.f1())


def test_boundary_f1_nan_without_boundaries_and_zero_when_one_side_has_none():
    empty = np.zeros((10, 10), dtype=np.uint8)
    _, bc = _stream(empty, empty, rows=10, classes=2, tolerance=2)
    assert np.isnan(bc.f1()).all()
    truth = np.zeros((10, 10), dtype=np.uint8)
    truth[3:6, 3:6] = 1
    _, bc = _stream(empty, truth, rows=10, classes=2, tolerance=2)
    assert bc.f1()[1] == 0.0


# --- object F1 ----------------------------------------------------------------------------------


def test_object_matching_exact_split_missed_and_extra():
    truth = shapely.box([0, 10, 20, 30], 0, [5, 15, 25, 35], 5)  # four 5x5 squares
    pred = np.array([
        shapely.box(0, 0, 5, 5),  # exact match of truth 0
        shapely.box(10, 0, 13, 5), shapely.box(13, 0, 15, 5),  # truth 1 split 60/40: one match, one FP
        shapely.box(20, 0, 22, 5),  # truth 2 covered at 40 %: no match (FP), truth 2 missed
        shapely.box(100, 0, 105, 5),  # extra
    ])
    m = match_objects(pred, truth, iou_threshold=0.5)
    assert (m.tp, m.fp, m.fn) == (2, 3, 2)
    assert sorted(map(tuple, m.pairs.tolist())) == [(0, 0), (1, 1)]
    np.testing.assert_allclose(sorted(m.iou), [0.6, 1.0])
    none = match_objects(np.empty(0, dtype=object), truth)
    assert (none.tp, none.fp, none.fn) == (0, 0, 4)
    with pytest.raises(InputError):
        match_objects(pred, truth, iou_threshold=0)


def test_object_matching_is_one_to_one_greedy_by_iou():
    truth = np.array([shapely.box(0, 0, 10, 10)])
    pred = np.array([shapely.box(0, 0, 10, 8), shapely.box(0, 0, 10, 9)])
    m = match_objects(pred, truth, iou_threshold=0.5)
    assert m.pairs.tolist() == [[1, 0]] and (m.fp, m.fn) == (1, 0)


# --- end to end ---------------------------------------------------------------------------------


@pytest.fixture
def blocky_scene(tmp_path):
    labels = blocky_labels(90, 110, 4, np.random.default_rng(3), block=9).astype(np.uint8)
    scene = write_raster(tmp_path / "scene.tif", labels)
    return scene, labels


def test_evaluate_with_a_known_prediction_gives_iou_one(blocky_scene, tmp_path):
    scene, labels = blocky_scene
    truth = write_raster(tmp_path / "truth.tif", labels)
    calls = []
    result = evaluate(scene, truth, bundle=numpy_bundle(4), options=PredictOptions(tile_size=32, overlap=8),
                      progress=lambda *a: calls.append(a))
    for s in result.classes.values():
        assert (s.iou, s.f1, s.precision, s.recall, s.boundary_f1) == (1.0, 1.0, 1.0, 1.0, 1.0)
    for name in ("class1", "class2", "class3"):
        s = result.classes[name]
        assert s.objects_tp == s.objects_true == s.objects_predicted > 0 and s.object_f1 == 1.0
    assert result.classes["background"].objects_tp is None
    assert result.accuracy == 1.0 and result.mean_iou == 1.0 and result.object_f1 == 1.0
    assert result.pixels_scored == labels.size and result.model["name"] == "onehot"
    assert {c[0] for c in calls} == {"predict", "score"} and calls[-1] == ("score", 90, 90)
    doc = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert doc["classes"]["class1"]["iou"] == 1.0


def test_evaluate_with_changed_labels_gives_the_exact_iou(blocky_scene, tmp_path):
    scene, labels = blocky_scene
    truth = labels.copy()
    rows, cols = np.nonzero(labels == 1)
    truth[rows[:7], cols[:7]] = 2  # 7 pixels of class 1 labelled as class 2
    truth[0, :5] = IGNORE  # and a few unlabelled pixels, left out
    n1, n2 = int((labels == 1).sum()), int((labels == 2).sum())
    ignored = labels[0, :5]
    n1 -= int((ignored == 1).sum())
    n2 -= int((ignored == 2).sum())
    path = write_raster(tmp_path / "truth.tif", truth)
    result = evaluate(scene, path, bundle=numpy_bundle(4), options=PredictOptions(tile_size=32, overlap=8))
    c1, c2 = result.classes["class1"], result.classes["class2"]
    assert c1.iou == pytest.approx((n1 - 7) / n1)
    assert c1.precision == pytest.approx((n1 - 7) / n1) and c1.recall == 1.0
    assert c2.iou == pytest.approx(n2 / (n2 + 7)) and c2.precision == 1.0
    assert result.pixels_ignored == 5 and result.pixels_scored == labels.size - 5
    assert result.accuracy == pytest.approx(1 - 7 / (labels.size - 5))


def test_vector_labels_in_another_crs_are_reprojected(tmp_path):
    band = np.zeros((80, 100), dtype=np.uint8)
    boxes = [(5, 5, 25, 20), (40, 10, 70, 30), (20, 50, 35, 75), (60, 45, 90, 70)]  # col0, row0, col1, row1
    for c0, r0, c1, r1 in boxes:
        band[r0:r1, c0:c1] = 1
    scene = write_raster(tmp_path / "scene.tif", band)
    geoms = [shapely.box(ORIGIN_X + c0 * PIXEL, ORIGIN_Y - r1 * PIXEL, ORIGIN_X + c1 * PIXEL, ORIGIN_Y - r0 * PIXEL)
             for c0, r0, c1, r1 in boxes]
    gdf = gpd.GeoDataFrame({"kind": ["class1"] * 4}, geometry=geoms, crs="EPSG:32633").to_crs("EPSG:4326")
    gdf.to_file(tmp_path / "labels.gpkg")
    result = evaluate(scene, tmp_path / "labels.gpkg", bundle=numpy_bundle(2), class_field="kind",
                      options=PredictOptions(tile_size=32, overlap=8))
    s = result.classes["class1"]
    assert s.iou == 1.0 and s.boundary_f1 == 1.0
    assert (s.objects_true, s.objects_tp, s.objects_fp, s.objects_fn) == (4, 4, 0, 0)


def test_objects_on_unscored_pixels_are_left_out(tmp_path):
    band = np.zeros((60, 80), dtype=np.uint8)
    for c0, r0, c1, r1 in [(5, 5, 20, 20), (30, 5, 50, 20), (5, 35, 20, 50), (50, 35, 70, 55)]:
        band[r0:r1, c0:c1] = 1
    valid = np.ones(band.shape, dtype=bool)
    valid[30:, 45:] = False  # the scene's nodata covers the last building
    scene = write_raster(tmp_path / "scene.tif", band, mask=valid)
    truth = band.copy()
    truth[:25, 25:] = IGNORE  # the second building is unlabelled (nodata: in a 0/255 mask 255 is foreground)
    labels = write_raster(tmp_path / "truth.tif", truth, nodata=IGNORE)
    result = evaluate(scene, labels, bundle=numpy_bundle(2), options=PredictOptions(tile_size=32, overlap=8))
    s = result.classes["class1"]
    assert s.iou == 1.0 and result.pixels_ignored == (~valid).sum() + 25 * 55
    assert (s.objects_true, s.objects_predicted, s.objects_tp) == (2, 2, 2)


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_a_scene_in_pixel_coordinates_with_assume_crs(tmp_path):
    labels = blocky_labels(50, 60, 4, np.random.default_rng(1), block=7).astype(np.uint8)
    paths = []
    for name in ("scene.tif", "truth.tif"):  # no CRS, no geotransform: the label raster is used as is
        with rasterio.open(tmp_path / name, "w", driver="GTiff", width=60, height=50, count=1, dtype="uint8") as ds:
            ds.write(labels, 1)
        paths.append(tmp_path / name)
    result = evaluate(*paths, bundle=numpy_bundle(4),
                      options=PredictOptions(assume_crs="EPSG:32633", tile_size=32, overlap=8))
    assert result.mean_iou == 1.0 and result.object_f1 == 1.0


def test_evaluate_classes_scores_an_existing_raster_and_rejects_unknown_ids(blocky_scene, tmp_path):
    scene, labels = blocky_scene
    names = ["background", "class1", "class2", "class3"]
    result = evaluate_classes(scene, scene, class_names=names, strip_rows=7)
    assert result.mean_iou == 1.0 and result.model is None
    noisy = labels.copy()
    noisy[np.random.default_rng(0).random(labels.shape) < 0.05] = 2
    noisy_path = write_raster(tmp_path / "noisy.tif", noisy)
    docs = [evaluate_classes(noisy_path, scene, class_names=names, strip_rows=rows).to_dict()
            for rows in (None, 5, 13)]
    for doc in docs:
        doc.pop("timings_s")
    assert docs[0] == docs[1] == docs[2] and docs[0]["mean_iou"] < 1
    bad = write_raster(tmp_path / "bad.tif", np.where(labels == 3, 9, labels).astype(np.uint8))
    with pytest.raises(InputError, match="class id"):
        evaluate_classes(bad, scene, class_names=names)


# --- command line -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onehot_model(tmp_path_factory):
    return keras_onehot_bundle(tmp_path_factory.mktemp("model") / "onehot.keras")


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_cli_json_and_table(blocky_scene, tmp_path, onehot_model):
    scene, labels = blocky_scene
    truth = write_raster(tmp_path / "truth.tif", labels)
    result = invoke("evaluate", scene, truth, "--model", onehot_model, "--tile-size", 48, "--overlap", 8, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["mean_iou"] == 1.0 and doc["classes"]["class2"]["iou"] == 1.0
    assert len(doc["model"]["sha256"]) == 64 and doc["scene"] == str(scene)
    result = invoke("evaluate", scene, truth, "--model", onehot_model, "--boundary-tolerance", 1)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.splitlines()[0].split()[:3] == ["class", "IoU", "F1"]
    assert any(line.startswith("class3") and "1.000" in line for line in out.splitlines())
    assert "mean IoU" in out and "onehot" in out and "tolerance 1 px" in out


def _one_line_error(result, *needles):
    assert result.exit_code == 1, result.output
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: "), result.stderr
    for needle in needles:
        assert needle in err[0], err[0]


def test_cli_errors_are_one_line(blocky_scene, tmp_path, onehot_model):
    scene, _ = blocky_scene
    box = shapely.box(ORIGIN_X, ORIGIN_Y - 10, ORIGIN_X + 10, ORIGIN_Y)
    with pytest.warns(UserWarning, match="crs"):
        gpd.GeoDataFrame({"class": ["class1"]}, geometry=[box]).to_file(tmp_path / "nocrs.gpkg")
    _one_line_error(invoke("evaluate", scene, tmp_path / "nocrs.gpkg", "--model", onehot_model), "no CRS")
    far = gpd.GeoDataFrame({"class": ["class1"]}, geometry=[shapely.box(0, 0, 10, 10)], crs="EPSG:32633")
    far.to_file(tmp_path / "far.gpkg")
    _one_line_error(invoke("evaluate", scene, tmp_path / "far.gpkg", "--model", onehot_model), "do not overlap")
    odd = gpd.GeoDataFrame({"class": ["tree"]}, geometry=[box], crs="EPSG:32633")
    odd.to_file(tmp_path / "odd.gpkg")
    _one_line_error(invoke("evaluate", scene, tmp_path / "odd.gpkg", "--model", onehot_model), "tree")
    _one_line_error(invoke("evaluate", scene, tmp_path / "missing.gpkg", "--model", onehot_model), "no such file")
    # nodata set: LabelReader's WarpedVRT reads a label raster without nodata or mask as 0 outside it
    elsewhere = write_raster(tmp_path / "elsewhere.tif", np.ones((20, 20), dtype=np.uint8), nodata=255,
                             transform=rasterio.transform.from_origin(600000, 5000000, 0.5, 0.5))
    _one_line_error(invoke("evaluate", scene, elsewhere, "--model", onehot_model), "do not overlap")


# --- real data ----------------------------------------------------------------------------------


def test_kampala_mask_scored_against_its_own_polygons():
    folder = shared("buildings-oam-train", "mosaics", "2-kampala_ug")
    result = evaluate_classes(folder / "kampala_ug_block1_z21_mask.tif", folder / "kampala_ug_block1_z21_buildings.gpkg",
                              class_names=["background", "building"])
    building = result.classes["building"]
    assert building.iou > 0.999 and result.accuracy > 0.999 and building.boundary_f1 > 0.999
    # touching buildings are one polygon in the mask, several in the GeoPackage
    assert building.objects_true == 98 and building.object_f1 > 0.9
