"""Decision thresholds: --threshold, the bundle's per-class default, and every place a class is taken
from probabilities (predict's blend, change reading a probabilities raster, train storing it)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner

from geoseg.tiling.blend import decision_bias, resolve_thresholds
from geoseg.cli import cli
from geoseg.errors import InputError
from geoseg.models.bundle import Bundle, BundleError, BundleMeta, ClassInfo
from geoseg.inference.options import PredictOptions
from geoseg.workflows.predict import predict
from tests.conftest import write_raster
from tests.testmodels import onehot_meta


class NumpyRamp:
    """Logits (0, (x - 128) / 32) per pixel: the building probability rises smoothly with the band."""

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        z = (x[..., 0] - 128.0) / 32.0
        return np.stack([np.zeros_like(z), z], axis=-1).astype(np.float32)


def ramp_bundle(threshold: float = 0.5) -> Bundle:
    meta = onehot_meta(classes=2, tile_size=32, overlap=8)
    classes = (meta.classes[0], dataclasses.replace(meta.classes[1], threshold=threshold))
    return Bundle(path=None, meta=dataclasses.replace(meta, classes=classes), sha256="0" * 64, model=NumpyRamp())


def ramp_scene(path):
    values = np.arange(60 * 50, dtype=np.float64).reshape(60, 50) % 256
    return write_raster(path, values.astype("uint8")[None])


def run_ramp(tmp_path, bundle, **options):
    scene = ramp_scene(tmp_path / "s.tif")
    predict(scene, tmp_path / "o.gpkg", raster_out=tmp_path / "c.tif", probs_out=tmp_path / "p.tif", bundle=bundle,
            options=PredictOptions(**options))
    with rasterio.open(tmp_path / "c.tif") as c, rasterio.open(tmp_path / "p.tif") as p:
        return c.read(1), p.read(), p.tags()


@pytest.mark.parametrize("t", [0.2, 0.5, 0.73])
def test_two_class_bias_takes_the_class_exactly_where_its_probability_reaches_the_threshold(t):
    z = np.random.default_rng(0).normal(0, 3, (4000, 2)).astype(np.float32)
    p1 = 1 / (1 + np.exp(z[:, 0] - z[:, 1]))
    bias = decision_bias([0.5, t])
    taken = (z + (0 if bias is None else bias)).argmax(1)
    clear = np.abs(p1 - t) > 1e-5
    np.testing.assert_array_equal(taken[clear], (p1 >= t)[clear])


def test_no_bias_when_every_threshold_is_a_half():
    assert decision_bias([0.5, 0.5, 0.5]) is None


@pytest.mark.parametrize("how", ["option", "bundle"])
def test_predict_takes_building_where_its_probability_reaches_the_threshold(tmp_path, how):
    bundle = ramp_bundle(0.3 if how == "bundle" else 0.5)
    classes, probs, tags = run_ramp(tmp_path, bundle, threshold={"class1": 0.3} if how == "option" else None)
    p1 = probs[1]
    clear = np.abs(p1 - 0.3) > 1e-4
    np.testing.assert_array_equal(classes[clear], (p1 >= 0.3)[clear].astype(np.uint8))
    assert ((p1 >= 0.3) & (p1 < 0.5)).sum() > 100  # pixels the plain argmax would have left background
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)  # the probabilities are not biased
    assert tags["threshold"] == "background=0.5,class1=0.3"


def test_one_number_applies_to_every_class_but_background():
    assert resolve_thresholds(0.3, {"background": 0.5, "building": 0.5}, ["background"]) == \
        {"background": 0.5, "building": 0.3}


def test_change_decides_a_probabilities_raster_as_predict_did(tmp_path):
    from geoseg.workflows.change import Aligned, common_grid, detect_input

    classes, _, _ = run_ramp(tmp_path, ramp_bundle(0.3))
    date = detect_input(tmp_path / "p.tif", "AFTER")
    assert date.kind == "probs" and date.thresholds == (0.5, 0.3)
    with Aligned(date, common_grid(date, date)) as reader:
        taken, valid, _ = reader.read(0, classes.shape[0])
    assert valid.all()
    assert (taken == classes).mean() > 0.999  # float32 rounding at the threshold itself


@pytest.mark.parametrize("value, message", [
    ("roof=0.3", "--threshold names unknown class(es) roof"),
    ("building=1.2", "--threshold building=1.2: give a probability between 0 and 1"),
    ("0", "--threshold building=0: give a probability between 0 and 1"),
])
def test_bad_thresholds_end_in_one_line_before_any_work(tmp_path, value, message):
    scene = ramp_scene(tmp_path / "s.tif")
    out = tmp_path / "o.gpkg"
    result = CliRunner().invoke(cli, ["predict", str(scene), "-o", str(out), "--threshold", value])
    assert result.exit_code == 1 and message in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_bundle_keeps_a_threshold_and_refuses_one_outside_0_1():
    meta = ramp_bundle(0.3).meta
    d = meta.to_dict()
    assert d["classes"][1]["threshold"] == 0.3 and "threshold" not in d["classes"][0]
    assert BundleMeta.from_dict(d) == meta
    with pytest.raises(BundleError, match="threshold of class 'roof' must be between 0 and 1"):
        ClassInfo(name="roof", color=(1, 2, 3), threshold=1.0)


def test_train_stores_the_threshold_it_is_given():
    from geoseg.training import parse_classes, with_thresholds

    infos = with_thresholds(parse_classes("background,building"), "0.35")
    assert [c.threshold for c in infos] == [0.5, 0.35]
    with pytest.raises(InputError, match="unknown class"):
        with_thresholds(parse_classes("background,building"), "roof=0.3")


def test_a_batch_manifest_takes_a_threshold_like_the_command_line():
    from geoseg.batch import predict_options

    assert predict_options({"threshold": "building=0.3"})[0].threshold == {"building": 0.3}
    assert predict_options({"threshold": {"building": 0.4}})[0].threshold == {"building": 0.4}
    assert predict_options({"threshold": 0.35})[0].threshold == 0.35
