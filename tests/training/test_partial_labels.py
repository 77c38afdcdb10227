"""Partial labels (set-valued targets) and ignore labels: the loss, the label codes and the metrics."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from geoseg.errors import InputError
from geoseg.io.labels import IGNORE
from geoseg.targets import TargetSets, parse_class_set, parse_label_sets
from geoseg.training import (
    Dataset, TrainConfig, scene_weights, training_sources, validate, load_scene, make_loss, read_config,
)

CLASSES = ["background", "building", "road", "water", "vegetation"]


def _ce(y, logits):
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    keep = y != IGNORE
    return float(-np.take_along_axis(logp, np.where(keep, y, 0)[..., None], -1)[..., 0][keep].mean())


def _grad(loss, y, logits):
    import tensorflow as tf

    x = tf.Variable(logits)
    with tf.GradientTape() as tape:
        value = loss(tf.constant(y), x)
    return float(value), tape.gradient(value, x).numpy()


@pytest.fixture(scope="module")
def sets():
    t = TargetSets(CLASSES)
    t.code(parse_class_set("!building", CLASSES))  # code 5
    t.code(parse_class_set("road|water", CLASSES))  # code 6
    return t


def test_parse_class_sets():
    assert parse_class_set("building", CLASSES) == {1}
    assert parse_class_set("!building", CLASSES) == {0, 2, 3, 4}
    assert parse_class_set("road|3", CLASSES) == {2, 3}
    assert parse_class_set("!building|road", CLASSES) == {0, 3, 4}
    assert parse_class_set("ignore", CLASSES) == set()
    assert parse_label_sets("0=ignore,1=building,2-3=!building", CLASSES) == {
        0: frozenset(), 1: {1}, 2: {0, 2, 3, 4}, 3: {0, 2, 3, 4}}
    with pytest.raises(InputError, match="'forest' is not a class"):
        parse_class_set("!forest", CLASSES)
    with pytest.raises(InputError, match="VALUE=CLASS"):
        parse_label_sets("1:building", CLASSES)


def test_codes_and_matrix(sets):
    assert sets.code({2}) == 2 and sets.code(set()) == IGNORE
    assert sets.code({0, 2, 3, 4}) == 5 and sets.code({3, 2}) == 6
    m = sets.matrix()
    assert m.shape == (256, 5)
    assert m[5].tolist() == [1, 0, 1, 1, 1] and m[6].tolist() == [0, 0, 1, 1, 0]
    assert not m[IGNORE].any() and not m[7].any()
    codes = np.array([0, 1, 2, 5, 6, IGNORE], np.uint8)
    assert sets.single(codes).tolist() == [0, 1, 2, IGNORE, IGNORE, IGNORE]
    # a buildings-only dataset: class ids other than building become "not building"
    assert sets.restrict(np.array([0, 1, 3, IGNORE], np.uint8), ["building"]).tolist() == [5, 1, 5, IGNORE]
    assert sets.restrict(codes, []).tolist() == codes.tolist()


@pytest.mark.parametrize("spec", ["ce", "ce+dice", "focal"])
def test_single_class_sets_give_the_plain_loss(sets, spec):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 8, 8, 5)).astype(np.float32)
    y = rng.integers(0, 5, size=(2, 8, 8)).astype(np.int32)
    y[0, :2] = IGNORE
    plain = float(make_loss(spec, 5)(y, logits))
    with_sets = float(make_loss(spec, 5, target_sets=sets.matrix())(y, logits))
    assert with_sets == pytest.approx(plain, rel=1e-5)
    if spec == "ce":
        assert plain == pytest.approx(_ce(y, logits), rel=1e-5)


def test_ignored_pixels_have_no_gradient(sets):
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(1, 6, 6, 5)).astype(np.float32)
    y = rng.integers(0, 5, size=(1, 6, 6)).astype(np.int32)
    y[0, :3] = IGNORE
    loss = make_loss("ce+dice", 5, target_sets=sets.matrix())
    value, grad = _grad(loss, y, logits)
    assert np.isfinite(value)
    assert not grad[0, :3].any()  # ignored rows: exactly zero
    assert np.abs(grad[0, 3:]).sum() > 0
    # and the loss does not change whatever the ignored pixels predict
    other = logits.copy()
    other[0, :3] = rng.normal(size=(3, 6, 5)) * 10
    assert float(loss(y, other)) == pytest.approx(value, rel=1e-6)
    # a batch with nothing labelled gives 0 and no gradient
    value, grad = _grad(loss, np.full_like(y, IGNORE), logits)
    assert value == 0 and not grad.any()


@pytest.mark.parametrize("spec", ["ce", "ce+dice", "focal"])
def test_not_building_does_not_choose_another_class(sets, spec):
    """A "not building" pixel: the loss depends only on the building probability, not on how the
    rest is spread over background, road, water and vegetation."""
    loss = make_loss(spec, 5, target_sets=sets.matrix())
    y = np.full((1, 2, 2), 5, np.int32)  # every pixel "not building"
    y[0, 0, 0] = 1  # one building, so Dice has a positive too
    rng = np.random.default_rng(3)
    base = rng.normal(size=(1, 2, 2, 5)).astype(np.float32)
    values = []
    for _ in range(5):
        logits = base.copy()
        # respread the non-building probability of the partial pixels, keeping p(building) fixed
        p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        rest = rng.dirichlet(np.ones(4), size=(1, 2, 2)) * (1 - p[..., 1:2])
        q = np.concatenate([rest[..., :1], p[..., 1:2], rest[..., 1:]], axis=-1)
        q[0, 0, 0] = p[0, 0, 0]
        values.append(float(loss(y, np.log(q).astype(np.float32))))
    assert np.ptp(values) < 1e-4 * max(1.0, abs(values[0]))
    # the gradient on the other classes' logits is proportional to their probabilities: it only
    # moves mass away from building, never towards one class more than the spread already has
    _, grad = _grad(loss, y, base)
    p = np.exp(base) / np.exp(base).sum(-1, keepdims=True)
    g, q = grad[0, 1, 1, [0, 2, 3, 4]], p[0, 1, 1, [0, 2, 3, 4]]
    assert np.allclose(g / q, (g / q)[0], rtol=1e-3)
    assert grad[0, 1, 1, 1] > 0  # descending lowers the building logit


def test_partial_ce_is_minus_log_of_the_set_probability(sets):
    logits = np.log(np.array([[[[0.1, 0.5, 0.2, 0.15, 0.05]]]], np.float32))
    y = np.array([[[6]]], np.int32)  # road or water
    assert float(make_loss("ce", 5, target_sets=sets.matrix())(y, logits)) == pytest.approx(-np.log(0.35), rel=1e-5)
    y = np.array([[[5]]], np.int32)  # not building
    assert float(make_loss("ce", 5, target_sets=sets.matrix())(y, logits)) == pytest.approx(-np.log(0.5), rel=1e-5)


def test_metrics_ignore_ignore_and_partial_pixels(sets):
    class Fixed:
        def __init__(self, logits):
            self.logits = logits

        def predict_on_batch(self, x):
            return self.logits

    truth = np.array([[[0, 1, 2, IGNORE, 5, 6]]], np.int32)
    pred = np.array([[[0, 1, 2, 1, 1, 1]]])  # wrong only where the truth is ignored or partial
    logits = np.eye(5, dtype=np.float32)[pred]
    loss = make_loss("ce", 5, target_sets=sets.matrix())
    _, iou, _ = validate(Fixed(logits), loss, [(np.zeros((1, 1, 6, 3)), truth)], 5)
    assert iou[:3].tolist() == [1.0, 1.0, 1.0]
    assert np.isnan(iou[3]) and np.isnan(iou[4])


def _raster(path, array, count=1):
    profile = dict(driver="GTiff", height=array.shape[-2], width=array.shape[-1], count=count, dtype="uint8",
                   crs="EPSG:32640", transform=from_origin(300000, 2800000, 1, 1))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array if count > 1 else array[None])
    return str(path)


def test_load_scene_with_sets_and_labelled_classes(tmp_path):
    image = _raster(tmp_path / "a.tif", np.full((3, 8, 8), 100, np.uint8), count=3)
    mask = np.zeros((8, 8), np.uint8)
    mask[:2] = 1
    mask[2:4] = 2
    mask[4:6] = 3
    labels = _raster(tmp_path / "a_labels.tif", mask)
    sets = TargetSets(CLASSES)
    # values 0 unlabeled, 1 building, 2 "not building", 3 road or water
    s = load_scene(image, labels, class_names=CLASSES, label_values="0=ignore,1=building,2=!building,3=road|water",
                   targets=sets)
    assert s.labels[0, 0] == 1 and s.labels[7, 0] == IGNORE
    assert sets.sets[s.labels[2, 0]] == {0, 2, 3, 4} and sets.sets[s.labels[4, 0]] == {2, 3}
    # a buildings-only mask: 0 is "not building", not background
    s = load_scene(image, labels, class_names=CLASSES, label_values="0=background,1=building,2-3=ignore",
                   targets=sets, labelled_classes=["building"])
    assert s.labels[0, 0] == 1 and sets.sets[s.labels[7, 0]] == {0, 2, 3, 4} and s.labels[3, 0] == IGNORE


def test_datasets_in_a_config(tmp_path):
    (tmp_path / "run.toml").write_text('''
images = ["dubai.tif"]
labels = ["dubai_labels.tif"]
label_values = "0=ignore,1=building,2=background"
classes = ["background", "building", "road"]
sample_weights = [1]

[[datasets]]
name = "footprints"
images = ["oam.tif", "oam2.tif"]
labels = ["oam.gpkg", "oam2.gpkg"]
labelled_classes = ["building"]
weight = 0.5
''')
    flat = read_config(tmp_path / "run.toml")
    cfg = TrainConfig(**flat)
    (d,) = cfg.datasets
    assert d.images == (str(tmp_path / "oam.tif"), str(tmp_path / "oam2.tif")) and d.labelled_classes == ("building",)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # survives the resume state
    train, val, weights = training_sources(cfg)
    assert [t[0] for t in train] == [str(tmp_path / n) for n in ("dubai.tif", "oam.tif", "oam2.tif")]
    assert weights == [("image", 1.0), ("dataset", 1, 0.5), ("dataset", 1, 0.5)] and val == []
    # a dataset's share is drawn evenly over its chips: 1 chip in oam.tif, 3 in oam2.tif
    windows = [(0, 0, 0), (0, 0, 8), (1, 0, 0), (2, 0, 0), (2, 0, 8), (2, 8, 0)]
    assert scene_weights(weights, windows, 3) == [1.0, 0.125, 0.375]
    # without sample_weights the top-level images weigh 1 together beside weighted datasets
    _, _, weights = training_sources(TrainConfig(images=("a.tif",), labels=("a.tif",),
                                         datasets=(Dataset(images=("b",), labels=("c",), weight=0.25),)))
    assert weights == [("dataset", 0, 1.0), ("dataset", 1, 0.25)]
    with pytest.raises(InputError, match="give every"):
        training_sources(TrainConfig(images=("a.tif",), labels=("a.tif",), datasets=(
            Dataset(images=("b",), labels=("c",), weight=1), Dataset(images=("d",), labels=("e",)))))
    (tmp_path / "bad.toml").write_text('[[datasets]]\nimages = ["a.tif"]\nlabels = ["a.gpkg"]\nlabeled = ["building"]\n')
    with pytest.raises(InputError, match="unknown key"):
        read_config(tmp_path / "bad.toml")


def test_training_on_a_fully_labelled_and_a_buildings_only_dataset(tmp_path):
    """End to end through the CLI: a [[datasets]] table whose labels name only buildings."""
    import json

    import geopandas as gpd
    import shapely
    from click.testing import CliRunner

    from geoseg.cli import cli
    from geoseg.models.bundle import read_meta

    rng = np.random.default_rng(0)
    classes = rng.integers(1, 4, size=(8, 8)).repeat(8, 0).repeat(8, 1).astype(np.uint8)  # 64x64, values 1-3
    image = np.stack([classes * 60, 255 - classes * 60, np.full_like(classes, 90)])
    _raster(tmp_path / "full.tif", image, count=3)
    _raster(tmp_path / "full_labels.tif", classes)
    _raster(tmp_path / "fp.tif", image, count=3)
    gpd.GeoDataFrame({"class": ["building"]}, geometry=[shapely.box(300010, 2799950, 300030, 2799970)],
                     crs="EPSG:32640").to_file(tmp_path / "fp.gpkg")
    (tmp_path / "run.toml").write_text('''
images = ["full.tif"]
labels = ["full_labels.tif"]
val_images = ["full.tif"]
val_labels = ["full_labels.tif"]
label_values = "0=ignore,1=building,2=road,3=background"
classes = ["background", "building", "road"]
chip_size = 32
epochs = 2
steps_per_epoch = 2
batch_size = 2
width = 4
depth = 2

[[datasets]]
images = ["fp.tif"]
labels = ["fp.gpkg"]
labelled_classes = ["building"]
weight = 1
''')
    out = tmp_path / "m.keras"
    run = CliRunner().invoke(cli, ["train", "--config", str(tmp_path / "run.toml"), "-o", str(out), "--json"])
    assert run.exit_code == 0, run.output
    doc = json.loads(run.stdout)
    assert doc["classes"] == ["background", "building", "road"] and doc["chips"]["train"] > 0
    assert read_meta(out).class_names == ("background", "building", "road")
    # the buildings-only scene's labels: building, and "not building" (never background) elsewhere
    sets = TargetSets(["background", "building", "road"])
    s = load_scene(tmp_path / "fp.tif", tmp_path / "fp.gpkg", class_names=sets.class_names, targets=sets,
                   labelled_classes=["building"])
    values = set(np.unique(s.labels).tolist())
    assert values == {1, 3} and sets.sets[3] == {0, 2}


def test_cli_labelled_classes_are_checked(tmp_path):
    from click.testing import CliRunner

    from geoseg.cli import cli

    image = _raster(tmp_path / "a.tif", np.full((3, 40, 40), 90, np.uint8), count=3)
    run = CliRunner().invoke(cli, ["train", "--images", image, "--labels", image, "--classes", "background,building",
                                   "--labelled-classes", "forest", "-o", str(tmp_path / "m.keras")])
    assert run.exit_code == 1 and "'forest' is not a class" in run.stderr
