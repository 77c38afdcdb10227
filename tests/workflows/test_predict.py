"""predict end to end: the keystone (one-hot of a band comes back exactly), outputs, atomicity."""

from __future__ import annotations

import sqlite3
import threading

import numpy as np
import pyogrio
import pytest
import rasterio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geoseg.errors import InputError, OutputError
from geoseg.inference.options import PredictOptions
from geoseg.workflows.predict import predict
from tests.conftest import write_raster
from tests.testmodels import blocky_labels, numpy_bundle

DTYPES = ["uint8", "uint16", "int16", "float32"]


def run(tmp_path, labels, *, tile, overlap, batch, blend="cosine", nodata_mask=None, dtype="uint8", name="s",
        chunk_width=8192):
    scene = tmp_path / f"{name}.tif"
    kw = {}
    if nodata_mask is not None:
        kw["mask"] = ~nodata_mask
    write_raster(scene, labels.astype(dtype)[None], **kw)
    bundle = numpy_bundle(classes=4)
    out = tmp_path / f"{name}.gpkg"
    raster = tmp_path / f"{name}.tif".replace(".tif", "_classes.tif")
    result = predict(
        scene, out, raster_out=raster, bundle=bundle,
        options=PredictOptions(tile_size=tile, overlap=overlap, batch_size=batch, blend=blend, chunk_width=chunk_width),
    )
    with rasterio.open(raster) as ds:
        classes = ds.read(1)
    return result, classes, bundle


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    h=st.integers(1, 130), w=st.integers(1, 130), tile=st.sampled_from([8, 16, 24, 32, 48, 64]),
    overlap_frac=st.floats(0, 0.75), batch=st.integers(1, 6), blend=st.sampled_from(["cosine", "gaussian", "mean"]),
    dtype=st.sampled_from(DTYPES), holes=st.booleans(), seed=st.integers(0, 10_000),
    chunk_width=st.sampled_from([8192, 7, 40, 64]),
)
def test_keystone_onehot_band_comes_back_exactly(tmp_path_factory, h, w, tile, overlap_frac, batch, blend, dtype, holes,
                                                 seed, chunk_width):
    tmp_path = tmp_path_factory.mktemp("k")
    rng = np.random.default_rng(seed)
    labels = blocky_labels(h, w, 4, rng, block=int(rng.integers(1, 9)))
    nodata = None
    if holes:
        nodata = np.zeros((h, w), bool)
        r, c = rng.integers(0, h), rng.integers(0, w)
        nodata[r : r + int(rng.integers(1, 60)), c : c + int(rng.integers(1, 60))] = True
    overlap = min(int(tile * overlap_frac), tile - 1)
    result, classes, bundle = run(tmp_path, labels, tile=tile, overlap=overlap, batch=batch, blend=blend,
                                  nodata_mask=nodata, dtype=dtype, chunk_width=chunk_width)
    expected = labels.copy()
    if nodata is not None:
        expected[nodata] = 255
    np.testing.assert_array_equal(classes, expected)
    # one fixed input shape for every model call, whatever the scene
    assert len(bundle.model.shapes) <= 1
    assert result.tiles["total"] >= 1


def test_keystone_polygons_match_the_band(tmp_path):
    rng = np.random.default_rng(3)
    labels = blocky_labels(97, 131, 4, rng, block=9)
    result, classes, _ = run(tmp_path, labels, tile=32, overlap=8, batch=3)
    listed = pyogrio.list_layers(tmp_path / "s.gpkg")
    layers = [name for name, geom in listed if geom is not None]
    assert layers == ["class1", "class2", "class3"]
    assert {name for name, geom in listed if geom is None} == {"layer_styles", "geoseg_run"}
    for cid, name in enumerate(layers, start=1):
        df = pyogrio.read_dataframe(tmp_path / "s.gpkg", layer=name)
        assert (df["class_id"] == cid).all() and (df["class_name"] == name).all()
        # 0.5 m pixels: each pixel is 0.25 m²; the layer's area is its pixel count
        assert df["area_m2"].sum() == pytest.approx((labels == cid).sum() * 0.25)
        assert df.geometry.is_valid.all()
        assert df["score"].between(0.0, 1.0).all()
        assert df.crs.to_epsg() == 32633
    assert result.counts == {n: len(pyogrio.read_dataframe(tmp_path / "s.gpkg", layer=n)) for n in layers}


def test_column_chunks_blend_exactly_like_the_whole_scene(tmp_path):
    """Real blending (overlapping, non-constant logits) is identical with and without column chunks."""
    rng = np.random.default_rng(11)
    scene = write_raster(tmp_path / "s.tif", rng.integers(0, 255, (1, 90, 300)).astype("uint8"))

    class Smooth:  # logits vary inside each tile, so blending weights matter
        def predict_on_batch(self, x):
            i = np.linspace(-1, 1, x.shape[1], dtype=np.float32)
            ramp = (i[:, None] + i[None, :])[None, ..., None]
            b = x[..., :1] / 255.0
            return np.concatenate([b + ramp, 1 - b - ramp, ramp * 0.3 + 0 * b], axis=-1)

    outs = {}
    for cw in (8192, 100, 33):
        bundle = numpy_bundle(classes=3)
        object.__setattr__(bundle, "model", Smooth())
        predict(scene, tmp_path / f"{cw}.gpkg", raster_out=tmp_path / f"{cw}.tif", probs_out=tmp_path / f"p{cw}.tif",
                bundle=bundle, options=PredictOptions(tile_size=32, overlap=12, chunk_width=cw))
        with rasterio.open(tmp_path / f"{cw}.tif") as a, rasterio.open(tmp_path / f"p{cw}.tif") as p:
            outs[cw] = (a.read(1), p.read())
    for cw in (100, 33):
        np.testing.assert_array_equal(outs[cw][0], outs[8192][0])
        np.testing.assert_allclose(outs[cw][1], outs[8192][1], atol=1e-6)


def test_all_nodata_scene_gives_empty_layers_and_skips_every_tile(tmp_path, caplog):
    labels = np.ones((50, 60), int) * 2
    result, classes, bundle = run(tmp_path, labels, tile=16, overlap=4, batch=2, nodata_mask=np.ones((50, 60), bool))
    assert (classes == 255).all()
    assert result.tiles["skipped"] == result.tiles["total"] and bundle.model.calls == 0
    assert all(n == 0 for n in result.counts.values())
    assert "no valid pixels" in caplog.text


def test_scene_smaller_than_a_tile(tmp_path):
    labels = blocky_labels(5, 3, 3, np.random.default_rng(0), block=2)
    result, classes, _ = run(tmp_path, labels, tile=64, overlap=16, batch=4)
    np.testing.assert_array_equal(classes, labels)
    assert result.tiles["total"] == 1


def test_outputs_are_atomic_and_existing_outputs_need_overwrite(tmp_path):
    labels = blocky_labels(40, 40, 3, np.random.default_rng(0))
    run(tmp_path, labels, tile=16, overlap=4, batch=2)
    before = (tmp_path / "s.gpkg").read_bytes()
    with pytest.raises(OutputError, match="--overwrite"):
        run(tmp_path, labels, tile=16, overlap=4, batch=2)
    assert (tmp_path / "s.gpkg").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.gpkg", "s.tif", "s_classes.qml", "s_classes.tif"]


class Exploding:
    """A model that fails on its third call, as a crash or Ctrl-C would."""

    def __init__(self, exc):
        self.exc, self.calls = exc, 0

    def predict_on_batch(self, x):
        self.calls += 1
        if self.calls == 3:
            raise self.exc
        return np.zeros(x.shape[:3] + (4,), np.float32)


@pytest.mark.parametrize("polygonize", ["after", "live"])
@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("boom")])
def test_failure_mid_run_leaves_no_partial_output_and_keeps_earlier_output(tmp_path, exc, polygonize):
    scene = write_raster(tmp_path / "scene.tif", np.ones((1, 80, 80), np.uint8))
    out = tmp_path / "out.gpkg"
    out.write_bytes(b"earlier output")
    bundle = numpy_bundle()
    object.__setattr__(bundle, "model", Exploding(exc))
    with pytest.raises(type(exc)):
        predict(scene, out, raster_out=tmp_path / "c.tif", bundle=bundle, overwrite=True,
                options=PredictOptions(tile_size=16, overlap=4, batch_size=2, polygonize=polygonize))
    assert out.read_bytes() == b"earlier output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gpkg", "scene.tif"]


def test_band_mismatch_names_bands_and_gray_is_repeated(tmp_path, caplog):
    scene = write_raster(tmp_path / "rgbn.tif", np.ones((4, 20, 20), np.uint8), photometric="MINISBLACK")
    with pytest.raises(InputError, match="--bands"):
        predict(scene, tmp_path / "o.gpkg", bundle=numpy_bundle(bands=3))
    gray = write_raster(tmp_path / "gray.tif", np.full((1, 20, 20), 2, np.uint8))
    predict(gray, tmp_path / "g.gpkg", raster_out=tmp_path / "g.tif", bundle=numpy_bundle(bands=3))
    assert "repeating it" in caplog.text
    with rasterio.open(tmp_path / "g.tif") as ds:
        assert (ds.read(1) == 2).all()
    predict(scene, tmp_path / "b.gpkg", bundle=numpy_bundle(bands=3), options=PredictOptions(bands=(3, 2, 1)))


def test_probabilities_output_sums_to_one(tmp_path):
    labels = blocky_labels(30, 45, 3, np.random.default_rng(1))
    scene = write_raster(tmp_path / "s.tif", labels.astype("uint8")[None])
    predict(scene, tmp_path / "o.gpkg", probs_out=tmp_path / "p.tif", bundle=numpy_bundle(classes=3),
            options=PredictOptions(tile_size=16, overlap=4))
    with rasterio.open(tmp_path / "p.tif") as ds:
        p = ds.read()
        assert ds.count == 3 and ds.descriptions == ("p_background", "p_class1", "p_class2")
    np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(p.argmax(0), labels)


def test_scene_finer_than_the_model_is_read_at_the_models_gsd_and_written_on_its_own_grid(tmp_path):
    labels = blocky_labels(256, 192, 4, np.random.default_rng(2), block=32)
    transform = rasterio.transform.from_origin(500000, 5000000, 0.125, 0.125)
    scene = write_raster(tmp_path / "fine.tif", labels.astype("uint8")[None], transform=transform)
    bundle = numpy_bundle(gsd=0.5, gsd_range=(0.4, 0.6))
    result = predict(scene, tmp_path / "o.gpkg", raster_out=tmp_path / "c.tif", bundle=bundle,
                     options=PredictOptions(tile_size=32, overlap=8))
    assert result.tiles["total"] == 6  # 64 x 48 px at 0.5 m (3 x 2 tiles) instead of 256 x 192 at 0.125 m
    with rasterio.open(tmp_path / "c.tif") as ds:
        assert ds.shape == (256, 192) and ds.transform == transform
        classes = ds.read(1)
    # nearest-neighbour back onto the fine grid: only pixels near block edges may differ
    assert (classes == labels).mean() > 0.9
    # --gsd native runs on the scene as it is: exact again
    predict(scene, tmp_path / "n.gpkg", raster_out=tmp_path / "n.tif", bundle=bundle,
            options=PredictOptions(tile_size=32, overlap=8, gsd="native"))
    with rasterio.open(tmp_path / "n.tif") as ds:
        np.testing.assert_array_equal(ds.read(1), labels)


def test_far_coarser_scene_is_refused_rather_than_upsampled(tmp_path):
    transform = rasterio.transform.from_origin(500000, 5000000, 10.0, 10.0)
    scene = write_raster(tmp_path / "s2.tif", np.ones((1, 50, 50), np.uint8), transform=transform)
    with pytest.raises(InputError, match="--gsd native"):
        predict(scene, tmp_path / "o.gpkg", bundle=numpy_bundle(gsd=0.3, gsd_range=(0.2, 0.5)))
    assert list(tmp_path.iterdir()) == [scene]


def test_uint16_scene_on_a_uint8_model_is_stretched_onto_its_value_range(tmp_path):
    labels = blocky_labels(60, 70, 4, np.random.default_rng(4), block=10)
    # 11-bit style data: class k stored as 400 + 100 k; the uint8 model saw class k as value k
    scene = write_raster(tmp_path / "u16.tif", (400 + 100 * labels).astype("uint16")[None])
    meta_kw = dict(classes=4)
    bundle = numpy_bundle(**meta_kw)
    object.__setattr__(bundle, "meta", __import__("dataclasses").replace(bundle.meta, dtype="uint8", value_range=(0.0, 3.0)))
    predict(scene, tmp_path / "o.gpkg", raster_out=tmp_path / "c.tif", bundle=bundle,
            options=PredictOptions(tile_size=32, overlap=8))
    with rasterio.open(tmp_path / "c.tif") as ds:
        assert (ds.read(1) == labels).mean() > 0.99
    predict(scene, tmp_path / "n.gpkg", raster_out=tmp_path / "n.tif", bundle=bundle,
            options=PredictOptions(tile_size=32, overlap=8, stretch="none"))
    with rasterio.open(tmp_path / "n.tif") as ds:
        assert (ds.read(1) == 3).all()  # raw values 400+ clip to the last class


def test_outputs_sharing_a_stem_keep_the_raster_style(tmp_path):
    labels = blocky_labels(30, 30, 3, np.random.default_rng(0))
    scene = write_raster(tmp_path / "in.tif", labels.astype("uint8")[None])
    for overwrite in (False, True):
        predict(scene, tmp_path / "out.gpkg", raster_out=tmp_path / "out.tif", bundle=numpy_bundle(),
                overwrite=overwrite, options=PredictOptions(tile_size=16, overlap=4))
        assert (tmp_path / "out.qml").exists()


class Lopsided:
    """Logits that depend on where a pixel sits in the tile (not flip/turn equivariant)."""

    def predict_on_batch(self, x):
        b, h, w, _ = x.shape
        rows = np.broadcast_to(np.linspace(0, 1, h)[None, :, None], (b, h, w))
        cols = np.broadcast_to(np.linspace(0, 2, w)[None, None, :], (b, h, w))
        return np.stack([rows, cols, x[..., 0] / 100.0], axis=-1).astype(np.float32)


def test_tta_averages_the_logits_of_flipped_and_turned_tiles():
    from geoseg.inference.engine import forward

    x = np.random.default_rng(0).uniform(0, 100, size=(2, 8, 8, 1)).astype(np.float32)
    model = Lopsided()
    plain = forward(model, x)
    flips = forward(model, x, "flips")
    d4 = forward(model, x, "d4")
    rows, cols = np.linspace(0, 1, 8), np.linspace(0, 2, 8)
    # the position terms average out to their mirror-symmetric means; the equivariant term is unchanged
    np.testing.assert_allclose(flips[..., 2], plain[..., 2], rtol=1e-6)
    np.testing.assert_allclose(d4[..., 2], plain[..., 2], rtol=1e-6)
    np.testing.assert_allclose(flips[0, :, 0, 0], np.full(8, rows.mean()), atol=1e-6)
    np.testing.assert_allclose(flips[0, 0, :, 1], np.full(8, cols.mean()), atol=1e-6)
    np.testing.assert_allclose(d4[0, ..., 0], d4[0, ..., 1] / 2, atol=1e-6)  # turns mix rows and columns


@pytest.mark.parametrize("tta", ["flips", "d4"])
def test_tta_keeps_an_equivariant_model_exact_through_predict(tmp_path, tta):
    labels = blocky_labels(70, 90, 4, np.random.default_rng(1), block=5)
    scene = write_raster(tmp_path / "s.tif", labels.astype("uint8")[None])
    predict(scene, tmp_path / "o.gpkg", raster_out=tmp_path / "c.tif", bundle=numpy_bundle(),
            options=PredictOptions(tile_size=32, overlap=8, tta=tta))
    with rasterio.open(tmp_path / "c.tif") as ds:
        np.testing.assert_array_equal(ds.read(1), labels)
    with pytest.raises(InputError, match="--tta"):
        predict(scene, tmp_path / "p.gpkg", bundle=numpy_bundle(), options=PredictOptions(tta="many"))


def test_an_error_while_blending_in_the_background_reaches_the_caller(tmp_path, monkeypatch):
    from geoseg.tiling import blend

    def broken(self, *args, **kwargs):
        raise OutputError("blending failed on purpose")

    monkeypatch.setattr(blend.StripAccumulator, "add", broken)
    scene = write_raster(tmp_path / "s.tif", np.ones((1, 80, 80), np.uint8))
    with pytest.raises(OutputError, match="on purpose"):
        predict(scene, tmp_path / "o.gpkg", bundle=numpy_bundle(), options=PredictOptions(tile_size=32, overlap=8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tif"]


# --- polygonizing beside the model (LiveRows) -------------------------------------------------


def _layers(path):
    import shapely

    out = {}
    for name, geom in pyogrio.list_layers(path):
        if geom is None:
            continue
        df = pyogrio.read_dataframe(path, layer=name)
        order = np.lexsort((df["area_m2"].round(6), df.geometry.centroid.y.round(6), df.geometry.centroid.x.round(6)))
        df = df.iloc[order].reset_index(drop=True)
        out[name] = (shapely.normalize(df.geometry.values), df.drop(columns="geometry"))
    return out


@pytest.mark.parametrize("clean", [{}, {"sieve_m2": 2.0, "max_hole_m2": 3.0, "simplify_m": 0.6}])
def test_polygons_made_beside_the_model_equal_those_made_from_the_class_raster(tmp_path, monkeypatch, clean):
    """One column chunk: strips go to the polygonizer as the blender finishes them. Small strips
    (the polygonizer's and the blender's) and a held-row limit below one strip exercise the
    hand-over; the result must be what the class raster gives after the model."""
    from geoseg.vector import polygons
    from geoseg.inference import live as live_module
    from geoseg.inference.segment import streams_rows
    from geoseg.io.scene import open_scene

    monkeypatch.setattr(polygons, "_STRIP_PIXELS", 131 * 6)
    monkeypatch.setattr(live_module.LiveRows.__init__, "__kwdefaults__", {"max_rows": 3})
    rng = np.random.default_rng(5)
    labels = blocky_labels(97, 131, 4, rng, block=5)
    labels[rng.random(labels.shape) < 0.01] = 2  # speckles for the sieve
    scene = write_raster(tmp_path / "s.tif", labels.astype("uint8")[None])
    results = {}
    for cw in (8192, 40):  # 8192: live (one chunk); 40: from the class raster
        results[cw] = predict(scene, tmp_path / f"{cw}.gpkg", bundle=numpy_bundle(classes=4),
                              options=PredictOptions(tile_size=32, overlap=8, chunk_width=cw, polygonize="live", **clean))
    assert streams_rows(open_scene(scene), numpy_bundle(classes=4).meta, PredictOptions(chunk_width=8192))
    live, after = _layers(tmp_path / "8192.gpkg"), _layers(tmp_path / "40.gpkg")
    assert live.keys() == after.keys() == {"class1", "class2", "class3"}
    for name in live:
        assert len(live[name][0]) == len(after[name][0]) > 0
        assert all(a.equals_exact(b, 1e-9) for a, b in zip(live[name][0], after[name][0]))
        pd_testing = pytest.importorskip("pandas.testing")
        pd_testing.assert_frame_equal(live[name][1], after[name][1])
    assert results[8192].counts == results[40].counts


def test_live_rows_hand_over_every_row_once_without_waiting_on_each_other():
    import threading

    from geoseg.inference.live import LiveRows

    h, w = 50, 7
    info = type("Info", (), {"path": "x", "height": h, "width": w, "crs": None, "transform": None})()
    live = LiveRows(info, max_rows=2)  # fewer rows than one read asks for
    cls = np.arange(h * w, dtype=np.int64).reshape(h, w) % 251
    score = cls.astype(np.uint16) * 3

    def writer():
        for r in range(0, h, 3):
            live.add(r, cls[r:r + 3].astype(np.uint8), score[r:r + 3])

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    got_c, got_s, r = [], [], 0
    while r < h:
        r1 = min(h, r + 5)
        got_c.append(live._read(0, r, r1))
        got_s.append(live._read(1, r, r1))
        r = r1
    t.join(timeout=10)
    assert not t.is_alive()
    np.testing.assert_array_equal(np.concatenate(got_c), cls.astype(np.uint8))
    np.testing.assert_array_equal(np.concatenate(got_s), score)
    assert live._strips == [] or all(s[0] + len(s[1]) > h - 3 for s in live._strips)


def test_a_polygonizing_error_stops_the_model_and_reaches_the_caller(tmp_path, monkeypatch):
    from geoseg.vector import polygons

    calls = []
    failed = threading.Event()

    class Counting:
        def predict_on_batch(self, x):
            calls.append(len(x))
            if len(calls) == 40:  # rows enough to polygonize are out: on a loaded CPU, let that thread run
                failed.wait(timeout=30)
            return np.zeros(x.shape[:3] + (4,), np.float32)

    def broken(*args, **kwargs):
        failed.set()
        raise OutputError("polygonizing failed on purpose")

    monkeypatch.setattr(polygons, "_STRIP_PIXELS", 64 * 8)
    monkeypatch.setattr(polygons, "_trace", broken)
    scene = write_raster(tmp_path / "s.tif", np.ones((1, 2000, 64), np.uint8))
    bundle = numpy_bundle()
    object.__setattr__(bundle, "model", Counting())
    with pytest.raises(OutputError, match="on purpose"):
        predict(scene, tmp_path / "o.gpkg", raster_out=tmp_path / "c.tif", bundle=bundle,
                options=PredictOptions(tile_size=32, overlap=8, batch_size=1, polygonize="live"))
    from geoseg.tiling.tiles import plan_tiles

    assert sum(calls) < len(plan_tiles(2000, 64, tile_size=32, overlap=8)) / 2  # the model stopped early
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tif"]
