"""geoseg train: chips held out by area, augmentation, losses that ignore 255, a tiny U-Net that
learns, bundles that load and predict, the CSV log, resume, config files and one-line errors."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import shapely
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.transform import from_origin

from geoseg.errors import GeosegError, InputError
from geoseg.io.labels import IGNORE
from geoseg.training import (
    Augment,
    ChipSampler,
    Rect,
    SceneData,
    TrainConfig,
    augment_batch,
    chip_windows,
    labelled_fraction,
    log_path_for,
    make_loss,
    parse_classes,
    parse_loss,
    read_config,
    resize_image,
    resume_dir_for,
    split_scene,
    train,
    validation_windows,
)
from tests.conftest import REPO, write_raster

keras = pytest.importorskip("keras")
ORIGIN = (500000, 5000000)
TINY = dict(width=8, depth=2, chip_size=32, batch_size=8, lr=0.01, seed=3)


def make_scene(folder, name, seed, *, size=192, n=30, crs="EPSG:32633", offset=(0, 0)):
    """A uint8 RGB scene of dark noise with bright rectangles (buildings) and their polygons."""
    rng = np.random.default_rng(seed)
    img = rng.integers(30, 90, size=(3, size, size)).astype("uint8")
    t = from_origin(ORIGIN[0] + offset[0], ORIGIN[1] + offset[1], 0.5, 0.5)
    boxes = []
    for _ in range(n):
        h, w = rng.integers(6, 18, 2)
        r, c = rng.integers(0, size - 18, 2)
        img[:, r : r + h, c : c + w] = rng.integers(170, 230)
        (x0, y0), (x1, y1) = t * (c, r), t * (c + w, r + h)
        boxes.append(shapely.box(x0, y1, x1, y0))
    write_raster(folder / f"{name}.tif", img, transform=t)
    gpd.GeoDataFrame({"class": ["building"] * n}, geometry=boxes, crs="EPSG:32633").to_crs(crs).to_file(folder / f"{name}.gpkg")
    return folder / f"{name}.tif", folder / f"{name}.gpkg"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scenes")
    a = make_scene(folder, "a", 0)
    b = make_scene(folder, "b", 1, crs="EPSG:4326")  # labels in another CRS: reprojected
    return folder, [a, b]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    _, scenes = data
    out = tmp_path_factory.mktemp("model") / "tiny.keras"
    cfg = TrainConfig(images=[str(s[0]) for s in scenes], labels=[str(s[1]) for s in scenes], epochs=6,
                      steps_per_epoch=40, **TINY)
    events = []
    result = train(cfg, out, progress=events.append)
    return out, result, events


# --- learning, bundle, log ---------------------------------------------------------------------


def test_a_tiny_unet_learns_and_the_best_epoch_becomes_a_bundle_that_predicts(trained, data, tmp_path):
    out, result, events = trained
    assert result.val_iou["building"] > 0.6  # chance (everything "building") is about 0.1
    assert result.best_val_miou == result.val_iou["building"]
    assert result.stopped == "completed" and result.epochs_run == 6 and result.resumed_from == 0
    assert [e.epoch for e in events if e.kind == "epoch"] == [1, 2, 3, 4, 5, 6]
    assert sum(e.kind == "step" for e in events) == 6 * 40
    assert not resume_dir_for(out).exists()  # removed once the bundle is written

    from geoseg.models import load_bundle
    from geoseg.inference.options import PredictOptions
    from geoseg.inference.segment import segment
    from geoseg.io.scene import open_scene

    bundle = load_bundle(out)
    meta = bundle.meta
    assert meta.class_names == ("background", "building") and meta.colors[1] == (230, 25, 75)
    assert meta.bands == ("red", "green", "blue") and meta.size_multiple == 4
    assert meta.gsd == pytest.approx(0.5, rel=0.01) and meta.gsd_range == pytest.approx((meta.gsd / 1.6, meta.gsd * 1.6))
    assert 30 < meta.mean[0] < 120 and meta.std[0] > 10  # statistics of the training pixels
    assert (meta.tile_size, meta.overlap) == (512, 128)
    assert result.sha256 == bundle.sha256

    folder, scenes = data
    info = open_scene(scenes[0][0])
    seg = segment(info, bundle, tmp_path, options=PredictOptions(tile_size=64, overlap=16))
    import rasterio

    from geoseg.io.labels import LabelReader

    with rasterio.open(seg.class_path) as ds:
        pred = ds.read(1)
    truth = LabelReader(scenes[0][1], info, class_names=meta.class_names).read(0, info.height, 0, info.width)
    inter = ((pred == 1) & (truth == 1)).sum()
    union = ((pred == 1) | (truth == 1)).sum()
    assert inter / union > 0.6


def test_the_csv_log_has_one_row_per_epoch(trained):
    out, result, _ = trained
    with open(log_path_for(out)) as f:
        rows = list(csv.DictReader(f))
    assert log_path_for(out).name == "tiny.log.csv" and result.log == str(log_path_for(out))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert set(rows[0]) == {"epoch", "train_loss", "val_loss", "val_iou_background", "val_iou_building", "val_miou",
                            "lr", "seconds"}
    best = max(rows, key=lambda r: float(r["val_miou"]))
    assert int(best["epoch"]) == result.best_epoch
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert float(rows[-1]["lr"]) < float(rows[1]["lr"])  # cosine decay


def _rows(path):
    with open(path) as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def _interrupt_in_epoch_3(cfg, out):
    """Ctrl-C during epoch 3: the state of epoch 2 stays beside ``out``."""

    def interrupt(event):
        if event.epoch == 3 and event.kind == "step":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, progress=interrupt)


def test_resume_continues_from_the_saved_epoch_and_matches_an_uninterrupted_run(data, tmp_path):
    from geoseg.models import load_bundle

    _, scenes = data
    cfg = TrainConfig(images=[str(scenes[0][0])], labels=[str(scenes[0][1])], epochs=3, steps_per_epoch=5, **TINY)
    reference = train(cfg, tmp_path / "ref.keras")

    out = tmp_path / "run.keras"

    _interrupt_in_epoch_3(cfg, out)
    assert not out.exists()  # no half-written bundle
    state = json.loads((resume_dir_for(out) / "state.json").read_text())
    assert state["epoch"] == 2 and len(_rows(log_path_for(out))) == 2
    with pytest.raises(GeosegError, match="--resume"):
        train(cfg, out)  # a fresh start would clobber the state

    result = invoke("train", "--resume", "-o", out, "--json")  # the settings come from the saved state
    assert result.exit_code == 0, result.output
    resumed = json.loads(result.stdout)
    assert resumed["resumed_from"] == 2 and resumed["epochs_run"] == 3 and not resume_dir_for(out).exists()
    assert _rows(log_path_for(out)) == _rows(reference.log)
    a, b = load_bundle(out).model, load_bundle(tmp_path / "ref.keras").model
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="no saved state"):
        train(cfg, out, resume=True)


def test_a_run_stopped_by_its_time_budget_keeps_its_state_and_resumes_with_a_larger_one(data, tmp_path):
    from geoseg.models import load_bundle

    _, scenes = data
    cfg = TrainConfig(images=[str(scenes[0][0])], labels=[str(scenes[0][1])], epochs=3, steps_per_epoch=5, **TINY)
    reference = train(cfg, tmp_path / "ref.keras")

    out = tmp_path / "run.keras"
    stopped = train(dataclasses.replace(cfg, max_minutes=1e-6), out)  # every epoch overruns this budget
    assert stopped.stopped == "time_budget" and stopped.epochs_run == 1
    assert out.exists() and resume_dir_for(out).exists()  # the best epoch so far, and the state to go on
    assert json.loads((resume_dir_for(out) / "state.json").read_text())["epoch"] == 1

    resumed = train(dataclasses.replace(cfg, max_minutes=60), out, resume=True)
    assert resumed.stopped == "completed" and resumed.resumed_from == 1 and resumed.epochs_run == 3
    assert not resume_dir_for(out).exists()
    assert _rows(log_path_for(out)) == _rows(reference.log)
    a, b = load_bundle(out).model, load_bundle(tmp_path / "ref.keras").model
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)


def test_ema_averages_the_weights_and_swaps_them_in_only_while_applied():
    from geoseg.training import Averaged

    class Var:
        def __init__(self, value):
            self.value = np.array(value, np.float32)

        def assign(self, value):
            self.value = np.array(value, np.float32)

        def numpy(self):
            return self.value

    class Model:
        trainable_variables = [Var([0.0, 0.0]), Var([[10.0]])]

    model, avg = Model(), Averaged(0.5)
    avg.update(model)  # the first update copies the weights: a fine-tuning run averages from its start
    for step in (1, 2):
        model.trainable_variables[0].assign([4.0 * step, 0.0])
        avg.update(model)
    np.testing.assert_allclose(avg.values[0], [0.5 * (0.5 * 0 + 0.5 * 4) + 0.5 * 8, 0])  # 5
    with avg.applied(model):
        np.testing.assert_allclose(model.trainable_variables[0].value, [5.0, 0.0])
        np.testing.assert_allclose(model.trainable_variables[1].value, [[10.0]])
    np.testing.assert_allclose(model.trainable_variables[0].value, [8.0, 0.0])  # the raw weights are back


def test_resume_with_ema_matches_an_uninterrupted_run_and_saves_the_averaged_weights(data, tmp_path):
    from geoseg.models import load_bundle

    _, scenes = data
    cfg = TrainConfig(images=[str(scenes[0][0])], labels=[str(scenes[0][1])], epochs=3, steps_per_epoch=5,
                      ema=0.9, patience=0, **TINY)
    reference = train(cfg, tmp_path / "ref.keras")
    raw = train(dataclasses.replace(cfg, ema=0.0), tmp_path / "raw.keras")
    out = tmp_path / "run.keras"

    _interrupt_in_epoch_3(cfg, out)
    assert any(p.name.endswith(".ema.npz") for p in resume_dir_for(out).iterdir())
    resumed = train(cfg, out, resume=True)
    assert resumed.resumed_from == 2 and _rows(resumed.log) == _rows(reference.log)
    a, b = load_bundle(out).model, load_bundle(tmp_path / "ref.keras").model
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)
    # the same steps without averaging end on other weights: the bundle holds the average
    c = load_bundle(tmp_path / "raw.keras").model
    assert any(not np.allclose(wa, wc, atol=1e-6) for wa, wc in zip(a.get_weights(), c.get_weights()))


def test_val_average_datasets_scores_each_dataset_on_its_own_and_picks_by_their_mean(data, tmp_path):
    folder, scenes = data
    c = make_scene(folder, "c", 7, size=96, n=4)  # a small validation scene with few buildings
    d = make_scene(folder, "d", 8, size=96, n=12)
    cfg = TrainConfig(images=[str(scenes[0][0])], labels=[str(scenes[0][1])], val_images=[str(c[0])],
                      val_labels=[str(c[1])], epochs=3, steps_per_epoch=5, val_average="datasets", patience=0,
                      datasets=({"images": [str(scenes[1][0])], "labels": [str(scenes[1][1])], "val_images": [str(d[0])],
                                 "val_labels": [str(d[1])], "name": "other"},), **TINY)
    result = train(cfg, tmp_path / "m.keras")
    with open(result.log) as f:
        rows = list(csv.DictReader(f))
    assert {"val_miou_top-level", "val_miou_other", "val_score", "val_miou"} <= set(rows[0])
    for r in rows:
        assert float(r["val_score"]) == pytest.approx((float(r["val_miou_top-level"]) + float(r["val_miou_other"])) / 2,
                                                      abs=2e-6)
    best = max(rows, key=lambda r: float(r["val_score"]))
    assert int(best["epoch"]) == result.best_epoch
    assert result.best_val_miou == pytest.approx(float(best["val_score"]), abs=1e-6)
    with pytest.raises(InputError, match="--val-average"):
        train(dataclasses.replace(cfg, val_average="scenes"), tmp_path / "n.keras")
    with pytest.raises(InputError, match="--ema"):
        train(dataclasses.replace(cfg, ema=1.0), tmp_path / "n.keras")


def test_without_validation_the_last_epoch_is_kept_and_the_log_says_so(data, tmp_path, caplog):
    _, scenes = data
    cfg = TrainConfig(images=[str(scenes[0][0])], labels=[str(scenes[0][1])], epochs=2, steps_per_epoch=3,
                      val_fraction=0, ema=0.9, **TINY)
    with caplog.at_level("INFO", logger="geoseg"):
        result = train(cfg, tmp_path / "m.keras")
    assert result.best_epoch == 2 and result.best_val_miou is None and result.pixels["val"] == 0
    assert "no validation pixels" in caplog.text
    epoch_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(epoch_lines) == 2 and all("no validation" in m and "nan" not in m for m in epoch_lines)
    rows = _rows(result.log)
    assert [r["val_miou"] for r in rows] == ["", ""]


def test_init_from_fine_tunes_a_bundle_from_its_weights_and_normalisation(trained, data, tmp_path):
    start, result, _ = trained
    _, scenes = data
    from geoseg.models import load_bundle

    # one step at a learning rate too small to learn anything: the score is the starting model's
    cfg = TrainConfig(images=[str(scenes[1][0])], labels=[str(scenes[1][1])], val_images=[str(scenes[0][0])],
                      val_labels=[str(scenes[0][1])], epochs=1, steps_per_epoch=1, warmup_steps=0,
                      **{**TINY, "lr": 1e-9}, init_from=str(start))
    tuned = train(cfg, tmp_path / "tuned.keras")
    assert tuned.val_iou["building"] > 0.6
    scratch = train(dataclasses.replace(cfg, init_from=None), tmp_path / "scratch.keras")
    assert scratch.val_iou["building"] < 0.4
    a, b = load_bundle(start), load_bundle(tmp_path / "tuned.keras")
    assert b.meta.mean == a.meta.mean and b.meta.std == a.meta.std  # not this run's (other scene) statistics
    assert b.meta.gsd == a.meta.gsd and "fine-tuned from tiny (tiny.keras)" in b.meta.description
    for wa, wb in zip(a.model.trainable_weights, b.model.trainable_weights):  # batch-norm statistics move
        np.testing.assert_allclose(np.asarray(wa), np.asarray(wb), atol=1e-6)

    out = tmp_path / "m.keras"
    common = ("train", "--images", scenes[1][0], "--labels", scenes[1][1], "-o", out, "--chip-size", 32, "--init-from")
    assert_one_line_error(invoke(*common, start, "--width", 16, "--depth", 2), "--width 8 (not 16)")
    assert_one_line_error(invoke(*common, start, "--width", 8, "--depth", 2, "--classes", "background,road"),
                          "--classes background,building (not background,road)")
    assert_one_line_error(invoke(*common, tmp_path / "nothing.keras"), "--init-from", "no such model")
    assert_one_line_error(invoke(*common, start, "--width", 8, "--depth", 2, "--bands", "1,2"), "3 band(s)", "--bands")
    # without --width/--depth the starting model's are taken: the run gets as far as the bands check
    assert_one_line_error(invoke(*common, start, "--bands", "1,2"), "3 band(s)", "--bands")
    assert not out.exists()


def test_init_from_takes_a_built_in_name_in_a_config_and_on_the_command_line(tmp_path):
    from geoseg.training import starting_bundle

    (tmp_path / "a.toml").write_text('init_from = "buildings"\n')
    (tmp_path / "b.toml").write_text('init_from = "models/b.keras"\n')
    assert read_config(tmp_path / "a.toml")["init_from"] == "buildings"  # a name, not a path beside the config
    assert read_config(tmp_path / "b.toml")["init_from"] == str(tmp_path / "models" / "b.keras")
    from geoseg.training import architecture_of

    arch = architecture_of("buildings")  # what the CLI fills in when only --init-from is given
    assert arch == {"arch": "unet", "encoder": "efficientnet-lite0"}
    cfg = TrainConfig(images=["a.tif"], labels=["a.gpkg"], init_from="buildings", **arch)
    assert starting_bundle(cfg, ["background", "building"]).name == "buildings"
    with pytest.raises(InputError, match="--classes background,building"):
        starting_bundle(cfg, ["background", "building", "road"])
    # a network given explicitly that differs is named, without geoseg's own encoder's options
    with pytest.raises(InputError, match=r"needs --encoder efficientnet-lite0 \(not none\)$"):
        starting_bundle(TrainConfig(images=["a.tif"], labels=["a.gpkg"], init_from="buildings"),
                         ["background", "building"])


# --- splitting by area ---------------------------------------------------------------------------


def _overlap_gap(a, b):
    """Distance in pixels between two rectangles (0 when they touch or overlap)."""
    dr = max(a[0] - b[1], b[0] - a[1], 0)
    dc = max(a[2] - b[3], b[2] - a[3], 0)
    return max(dr, dc)


@settings(max_examples=60, deadline=None)
@given(h=st.integers(8, 400), w=st.integers(8, 400), frac=st.sampled_from([0.1, 0.2, 0.35, 0.5]),
       chip=st.sampled_from([16, 32, 64]), scale=st.floats(1 / 1.8, 1.8), shift=st.tuples(st.floats(-40, 40), st.floats(-40, 40)))
def test_training_chips_never_reach_the_validation_area_or_its_gap(h, w, frac, chip, scale, shift):
    train_rects, val_rects = split_scene(0, h, w, val_fraction=frac, gap=chip)
    if not val_rects:
        assert train_rects == [Rect(0, 0, h, 0, w)] and (max(h, w) - max(1, round(max(h, w) * frac)) - chip) < chip
        return
    (t,), (v,) = train_rects, val_rects
    assert v.height * v.width > 0
    scene = SceneData("s", np.zeros((h, w, 1), np.uint8), np.zeros((h, w), np.uint8), ("b",), 1.0)
    stride = chip // 2
    windows = [win for r in train_rects for win in chip_windows(r, (h, w), chip=chip, stride=stride)]
    sampler = ChipSampler([scene], train_rects, windows, chip=chip, stride=stride, augment=Augment(), lo=np.zeros(1), hi=np.ones(1))
    vbox = (v.r0, v.r1, v.c0, v.c1)
    for win in windows:
        _, r, c = win
        assert _overlap_gap((r, r + chip, c, c + chip), vbox) >= chip
        _, r0, c0, k = sampler.crop_window(win, scale, shift)  # scale-jittered crops too
        assert _overlap_gap((r0, r0 + k, c0, c0 + k), vbox) >= chip
    # validation windows score every validation pixel exactly once
    counts = np.zeros((h + 2 * chip, w + 2 * chip), int)
    for _, r, c in validation_windows(v, chip=chip):
        r1, c1 = min(r + chip, v.r1), min(c + chip, v.c1)
        counts[r:r1, c:c1] += 1
    assert counts[v.r0 : v.r1, v.c0 : v.c1].min() == 1 and counts.sum() == v.height * v.width


def test_chip_windows_cover_the_area_with_overlap_and_skip_unlabelled_chips():
    windows = chip_windows(Rect(0, 0, 100, 0, 70), (100, 70), chip=32, stride=16)
    rows = sorted({r for _, r, _ in windows})
    assert rows[0] == 0 and rows[-1] == 100 - 32 and all(b - a <= 16 for a, b in zip(rows, rows[1:]))
    labels = np.zeros((100, 70), np.uint8)
    labels[:50] = IGNORE
    frac = labelled_fraction(labels, [(0, 0), (50, 0), (34, 0)], 32)
    np.testing.assert_allclose(frac, [0.0, 1.0, 16 / 32])
    # a scene smaller than a chip still gives one (padded) chip
    assert chip_windows(Rect(0, 0, 20, 0, 20), (20, 20), chip=32, stride=16) == [(0, -6, -6)]


# --- augmentation ----------------------------------------------------------------------------------


def test_augmentation_keeps_labels_aligned_and_is_seeded():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=(16, 24, 24)).astype(np.uint8)
    x = np.repeat(y[..., None].astype(np.float32), 3, axis=-1) * 50 + 10
    geometric = Augment(brightness=0, contrast=0, grayscale=0, blur=0)
    xa, ya = augment_batch(x.copy(), y.copy(), np.random.default_rng(1), geometric, lo=np.zeros(3), hi=np.full(3, 255.0))
    np.testing.assert_array_equal((xa[..., 0] - 10) / 50, ya)  # labels follow flips and turns
    assert not np.array_equal(ya, y)
    full = Augment(grayscale=1.0)
    a1 = augment_batch(x.copy(), y.copy(), np.random.default_rng(5), full, lo=np.zeros(3), hi=np.full(3, 255.0))
    a2 = augment_batch(x.copy(), y.copy(), np.random.default_rng(5), full, lo=np.zeros(3), hi=np.full(3, 255.0))
    np.testing.assert_array_equal(a1[0], a2[0])
    assert np.ptp(a1[0], axis=-1).max() == 0  # grayscale: every band equal
    assert a1[0].min() >= 0 and a1[0].max() <= 255


def test_band_gain_tints_each_chip_by_its_own_per_band_factors():
    x = np.full((64, 8, 8, 3), 100.0, np.float32)
    y = np.zeros((64, 8, 8), np.uint8)
    gain = Augment(flips=False, brightness=0, contrast=0, grayscale=0, blur=0, band_gain=0.2)
    xa, _ = augment_batch(x.copy(), y, np.random.default_rng(2), gain, lo=np.zeros(3), hi=np.full(3, 255.0))
    factors = xa[:, 0, 0, :] / 100
    assert factors.min() >= 0.8 - 1e-6 and factors.max() <= 1.2 + 1e-6
    assert np.ptp(xa, axis=(1, 2)).max() == 0  # one factor per chip and band, not per pixel
    assert np.ptp(factors, axis=1).mean() > 0.1  # the bands of a chip get different factors: a colour cast
    off = Augment(flips=False, brightness=0, contrast=0, grayscale=0, blur=0)
    np.testing.assert_array_equal(augment_batch(x.copy(), y, np.random.default_rng(2), off, lo=np.zeros(3),
                                                hi=np.full(3, 255.0))[0], x)
    with pytest.raises(InputError, match="--band-gain"):
        Augment(band_gain=1.5)


def test_sample_weights_set_each_scene_s_share_of_the_chips():
    big = SceneData("big", np.zeros((256, 256, 3), np.uint8), np.zeros((256, 256), np.uint8), ("r", "g", "b"), 1.0)
    small = SceneData("small", np.full((64, 64, 3), 200, np.uint8), np.ones((64, 64), np.uint8), ("r", "g", "b"), 1.0)
    rects = [Rect(0, 0, 256, 0, 256), Rect(1, 0, 64, 0, 64)]
    windows = [w for r in rects for w in chip_windows(r, (r.r1, r.c1), chip=32, stride=16)]
    plain = Augment(flips=False, scale_jitter=1.0, brightness=0, contrast=0, grayscale=0, blur=0)

    def share_of_small(weights):
        sampler = ChipSampler([big, small], rects, windows, chip=32, stride=16, augment=plain,
                              lo=np.zeros(3), hi=np.full(3, 255.0), scene_weights=weights)
        ys = np.concatenate([y for _, y in sampler.epoch_batches(seed=1, epoch=0, steps=50, batch_size=8)])
        return (ys == 1).all(axis=(1, 2)).mean()

    assert share_of_small(None) < 0.1  # by area: 9 of 234 candidate chips
    assert share_of_small([1, 1]) == pytest.approx(0.5, abs=0.1)
    assert share_of_small([3, 1]) == pytest.approx(0.25, abs=0.08)


def test_resize_keeps_constants_and_averages_when_shrinking():
    img = np.full((40, 40, 2), 7.0, np.float32)
    np.testing.assert_allclose(resize_image(img, 25, 25), 7.0, rtol=1e-6)
    np.testing.assert_allclose(resize_image(img, 64, 64), 7.0, rtol=1e-6)
    stripes = np.zeros((40, 40, 1), np.float32)
    stripes[:, ::2] = 1.0
    half = resize_image(stripes, 40, 20)
    assert np.abs(half - 0.5).max() < 0.3  # averaged, not aliased to all 0 or all 1


# --- losses ---------------------------------------------------------------------------------------


def _loss(spec, y, logits, weights=None):
    return float(make_loss(spec, logits.shape[-1], weights)(np.asarray(y), np.asarray(logits, np.float32)))


def test_losses_on_hand_made_examples():
    y = np.array([[[0, 1]]])  # (1, 1, 2)
    flat = np.zeros((1, 1, 2, 2))
    assert _loss("ce", y, flat) == pytest.approx(math.log(2))
    assert _loss("focal", y, flat) == pytest.approx(0.25 * math.log(2))  # (1 - 0.5)^2 * log 2
    # dice: p = 0.5 everywhere; per class inter 0.5, sums 1 + 1 -> (1 + 1) / (2 + 1)
    assert _loss("dice", y, flat) == pytest.approx(1 - 2 / 3)
    sure = np.array([[[[9.0, -9.0], [-9.0, 9.0]]]])
    assert _loss("ce", y, sure) < 1e-6 and _loss("dice", y, sure) < 1e-4
    assert _loss("ce+dice", y, flat) == pytest.approx(math.log(2) + 1 / 3)
    assert _loss("0.5*ce+2*dice", y, flat) == pytest.approx(0.5 * math.log(2) + 2 / 3)
    # class weights: the weighted mean of per-pixel CE
    logits = np.array([[[[0.0, 0.0], [2.0, 0.0]]]])  # pixel 1 (class 1): ce = log(1 + e^2)
    ce1 = math.log(1 + math.e**2)
    assert _loss("ce", y, logits, (1.0, 3.0)) == pytest.approx((math.log(2) + 3 * ce1) / 4)
    with pytest.raises(InputError, match="--loss"):
        parse_loss("ce+lovasz")
    assert parse_loss("0.5*focal+dice") == ((0.5, "focal"), (1.0, "dice"))


@pytest.mark.parametrize("spec", ["ce", "dice", "focal", "ce+dice"])
def test_ignored_pixels_add_nothing_to_the_loss_or_its_gradient(spec):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    logits = tf.Variable(rng.normal(size=(2, 8, 8, 3)).astype(np.float32))
    loss = make_loss(spec, 3)
    with tf.GradientTape() as tape:
        value = loss(np.full((2, 8, 8), IGNORE, np.uint8), logits)
    grad = tape.gradient(value, logits)
    assert float(value) == 0.0 and (grad is None or float(tf.reduce_max(tf.abs(grad))) == 0.0)
    # half ignored: the loss is that of the labelled half, whatever the logits are at ignored pixels
    y = rng.integers(0, 3, size=(2, 8, 8)).astype(np.uint8)
    y_half = y.copy()
    y_half[:, 4:] = IGNORE
    other = logits.numpy().copy()
    other[:, 4:] = rng.normal(size=other[:, 4:].shape) * 10
    a = float(loss(y_half, logits.numpy()))
    assert a == pytest.approx(float(loss(y_half, other)), rel=1e-6)
    assert a == pytest.approx(float(loss(y[:, :4], logits.numpy()[:, :4])), rel=1e-6)


# --- settings, config, CLI ------------------------------------------------------------------------


def test_parse_classes_colours_and_areas():
    classes = parse_classes("background,building:#00ff00:4,road")
    assert [c.name for c in classes] == ["background", "building", "road"]
    assert classes[1].color == (0, 255, 0) and classes[1].min_area_m2 == 4
    assert classes[2].color == (60, 180, 75)
    for bad in ("building", "a,b:#zz0000", "a,a"):
        with pytest.raises(InputError, match="--classes"):
            parse_classes(bad)


def invoke(*args):
    from geoseg.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, *needles):
    assert result.exit_code == 1, result.output
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: "), result.stderr
    for needle in needles:
        assert needle in err[0], err[0]


def test_config_file_with_relative_paths_and_cli_overrides(data, tmp_path):
    folder, scenes = data
    runs = tmp_path / "runs"
    runs.mkdir()
    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    import os

    rel = lambda p: os.path.relpath(p, cfg_dir)  # noqa: E731
    (cfg_dir / "tiny.toml").write_text(
        f'output = "../runs/from_config.keras"\n'
        f'images = ["{rel(scenes[0][0])}"]\nlabels = ["{rel(scenes[0][1])}"]\n'
        f'val_images = ["{rel(scenes[1][0])}"]\nval-labels = ["{rel(scenes[1][1])}"]\n'
        f'classes = ["background", "building:#ff0000"]\nchip-size = 32\nwidth = 4\ndepth = 2\n'
        f'epochs = 5\nsteps_per_epoch = 2\nscales = [1, 2]\nscale-merge = "max"\n[augment]\ngrayscale = 0.5\n'
    )
    values = read_config(cfg_dir / "tiny.toml")
    assert len(values["images"]) == 1 and os.path.samefile(values["images"][0], scenes[0][0])
    assert values["grayscale"] == 0.5 and values["chip_size"] == 32

    out = runs / "override.keras"
    result = invoke("train", "--config", cfg_dir / "tiny.toml", "--epochs", 1, "-o", out, "--precision", "mixed_bfloat16",
                    "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["epochs_run"] == 1 and doc["output"] == str(out) and out.exists()
    assert doc["chips"]["val"] == 36 and doc["pixels"]["val"] == 192 * 192  # the whole validation scene
    assert not (runs / "from_config.keras").exists()
    from geoseg.models import load_bundle

    bundle = load_bundle(out)
    assert bundle.meta.colors[1] == (255, 0, 0) and bundle.meta.arch_config["width"] == 4
    assert bundle.meta.scales == (1.0, 2.0) and bundle.meta.scale_merge == "max"  # predict's default zooms
    assert {layer.dtype_policy.name for layer in bundle.model.layers} == {"float32"}  # saved for any precision

    (cfg_dir / "bad.toml").write_text('imagez = ["a.tif"]\n')
    assert_one_line_error(invoke("train", "--config", cfg_dir / "bad.toml"), "imagez")


def test_mask_raster_labels_give_the_same_classes_as_vectors(data, tmp_path):
    from geoseg.io.scene import open_scene
    from geoseg.training import load_scene

    _, ((image, vector), _) = data
    names = ("background", "building")
    from_vectors = load_scene(image, vector, class_names=names)
    info = open_scene(image)
    write_raster(tmp_path / "mask.tif", (from_vectors.labels * 255).astype("uint8"), transform=info.transform)
    from_mask = load_scene(image, tmp_path / "mask.tif", class_names=names)
    np.testing.assert_array_equal(from_mask.labels, from_vectors.labels)
    assert 0.05 < (from_mask.labels == 1).mean() < 0.5
    coarse = load_scene(image, vector, class_names=names, gsd=1.0)  # read at another GSD
    assert coarse.shape == (96, 96) and coarse.gsd == 1.0


def test_images_take_several_values_after_one_option(data, tmp_path):
    _, (a, b) = data
    result = invoke("train", "--images", a[0], b[0], "--labels", a[1], "-o", tmp_path / "m.keras")
    assert_one_line_error(result, "2 --images but 1 --labels")


def test_user_errors_are_one_line_with_exit_code_1(data, tmp_path):
    folder, (a, b) = data
    out = tmp_path / "m.keras"
    far = make_scene(tmp_path, "far", 2, size=64, n=3, offset=(50000, 0))
    assert_one_line_error(invoke("train", "--images", a[0], "--labels", far[1], "-o", out), "do not overlap")
    assert_one_line_error(invoke("train", "--images", a[0], "--labels", a[1], "-o", out, "--chip-size", 100), "--chip-size 100",
                          "multiple of 16")
    assert_one_line_error(invoke("train", "--images", a[0], "--labels", a[1], "-o", out, "--classes", "background,road"),
                          "not classes")
    assert_one_line_error(invoke("train", "--images", a[0], "--labels", a[1], "-o", tmp_path / "m.h5"), ".keras")
    assert_one_line_error(invoke("train", "--images", a[0], "--labels", a[1]), "-o")
    assert_one_line_error(invoke("train", "--images", a[0], "--labels", a[1], "-o", out, "--chip-size", 512,
                                 "--val-fraction", 0), "no training chips")
    assert_one_line_error(invoke("train", "--images", a[0], "--labels", a[1], "-o", out, "--chip-size", 256),
                          "--val-fraction")
    assert_one_line_error(invoke("train", "--images", a[0], "--labels", a[1], "-o", out, "--sample-weights", "1,2"),
                          "one weight per training image")
    assert_one_line_error(invoke("train", "--images", a[0], "--labels", a[1], "-o", out, "--label-values", "1=tree"),
                          "'tree' is not a class")
    assert_one_line_error(invoke("train", "--images", a[0], "--labels", a[1], "-o", out, "--scales", "2"),
                          "--scales 2: include 1")
    assert not out.exists()


RECIPES = sorted((REPO / "recipes").rglob("*.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_committed_recipe_is_a_valid_config(path):
    """The recipes the model cards cite: each parses into a training config, its outputs are outside
    the package (only a shipped recipe writes a bundled model, its own), and its data paths point
    into ../shared/data or the prepared ../geoseg-data beside the repository."""
    from geoseg.training import read_config

    cfg = TrainConfig.from_dict(read_config(path))
    assert cfg.epochs > 0 and cfg.gsd and cfg.images and len(cfg.images) == len(cfg.labels)
    output = Path(read_config(path)["output"]).resolve()
    bundled = REPO / "geoseg" / "models" / "bundled"
    if output.is_relative_to(bundled):
        assert path.parent.name == "shipped" and output.stem == path.stem, f"{path.name} writes {output}"
    beside = REPO.parent  # where ../shared and ../geoseg-data are (links are not followed: CI links ../shared)
    data = [Path(p) for d in (cfg.images, cfg.labels, cfg.val_images, cfg.val_labels) for p in d]
    data += [Path(p) for ds in cfg.datasets for p in (*ds.images, *ds.labels)]
    for p in data:
        p = Path(os.path.normpath(p))
        assert p.is_relative_to(beside / "shared" / "data") or p.is_relative_to(beside / "geoseg-data"), \
            f"{path.name}: {p} is not in ../shared/data or ../geoseg-data"


def test_each_shipped_model_has_its_recipe():
    """recipes/shipped/NAME.toml rebuilds geoseg/models/bundled/NAME.keras (earlier stages beside it)."""
    bundled = {p.stem for p in (REPO / "geoseg" / "models" / "bundled").glob("*.keras")}
    assert bundled <= {p.stem for p in (REPO / "recipes" / "shipped").glob("*.toml")}


# --- the satellite look (geoseg.augment) ------------------------------------------------------------


def test_oblique_views_move_labels_with_the_pixels_and_ignore_what_leaves_the_chip():
    rng = np.random.default_rng(0)
    y = np.zeros((16, 64, 64), np.uint8)
    for i in range(16):
        r, c = rng.integers(8, 40, 2)
        y[i, r:r + 16, c:c + 12] = 1
    x = np.repeat(y[..., None].astype(np.float32), 3, axis=-1) * 200 + 20
    view = Augment(flips=False, brightness=0, contrast=0, grayscale=0, blur=0, off_nadir=1.0, off_nadir_shear=0.3)
    xa, ya = augment_batch(x.copy(), y.copy(), np.random.default_rng(1), view, lo=np.zeros(3), hi=np.full(3, 255.0))
    assert not np.array_equal(ya, y)  # the buildings moved
    known = ya != IGNORE
    bright = xa[..., 0] > 120
    assert (bright[known] == (ya[known] == 1)).mean() > 0.97  # the labels moved with them (edges interpolate)
    assert (ya == IGNORE).any() and (ya[known] <= 1).all()  # corners the view leaves are ignored, no new ids


def test_a_coarser_sensor_blurs_adds_noise_and_keeps_the_chip_s_size_range_and_seed():
    y = np.zeros((4, 96, 96), np.uint8)
    x = np.zeros((4, 96, 96, 3), np.float32)
    x[:, :, 48:] = 200.0  # a sharp edge
    sensor = Augment(flips=False, brightness=0, contrast=0, grayscale=0, blur=0, sensor=1.0, sensor_factor=4.0)
    a, _ = augment_batch(x.copy(), y.copy(), np.random.default_rng(3), sensor, lo=np.zeros(3), hi=np.full(3, 255.0))
    b, _ = augment_batch(x.copy(), y.copy(), np.random.default_rng(3), sensor, lo=np.zeros(3), hi=np.full(3, 255.0))
    np.testing.assert_array_equal(a, b)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 255
    edge = np.abs(np.diff(a[:, 48, :, 0], axis=-1)).max(axis=-1)
    assert (edge < 150).all()  # the step of 200 is spread over several pixels
    assert np.abs(a[:, 10:80, 5:35] - 0).std() > 0.1  # noise in the flat dark part
    with pytest.raises(InputError, match="--sensor-factor"):
        Augment(sensor_factor=1.0)
    with pytest.raises(InputError, match="--haze"):
        Augment(haze=1.5)


def test_haze_lifts_dark_pixels_and_pan_vegetation_makes_green_bright():
    x = np.zeros((8, 16, 16, 3), np.float32)
    x[:, :8] = (40, 120, 30)  # vegetation
    x[:, 8:] = (90, 90, 90)  # a gray roof of about the same luminance
    y = np.zeros((8, 16, 16), np.uint8)
    hazy = Augment(flips=False, brightness=0, contrast=0, grayscale=0, blur=0, haze=1.0)
    h, _ = augment_batch(x.copy(), y, np.random.default_rng(0), hazy, lo=np.zeros(3), hi=np.full(3, 255.0))
    assert (h[:, 8:, :, 0] > 90).all() and (h <= 255).all()
    pan = Augment(flips=False, brightness=0, contrast=0, grayscale=1.0, blur=0, pan_vegetation=1.0)
    p, _ = augment_batch(x.copy(), y, np.random.default_rng(0), pan, lo=np.zeros(3), hi=np.full(3, 255.0))
    assert np.ptp(p, axis=-1).max() == 0  # one band repeated
    assert (p[:, :8, :, 0] > p[:, 8:, :, 0].max()).all()  # canopy brighter than the roof, unlike luminance
    plain = Augment(flips=False, brightness=0, contrast=0, grayscale=1.0, blur=0)
    g, _ = augment_batch(x.copy(), y, np.random.default_rng(0), plain, lo=np.zeros(3), hi=np.full(3, 255.0))
    assert not (g[:, :8, :, 0] > g[:, 8:, :, 0].max()).all()
