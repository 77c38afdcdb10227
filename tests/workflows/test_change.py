"""geoseg change: two dates on one grid, class transitions, change polygons.

A constructed case with a known answer (buildings added and removed, AFTER reprojected, shifted and
resampled), every kind of input (scenes through a model, predict's class and probability rasters,
mixed), the error contract through the CLI, and the real NAIP dates (alignment and end to end).
"""

from __future__ import annotations

import json
import sqlite3
import time
import xml.etree.ElementTree as ET

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from click.testing import CliRunner
from pyproj import Transformer
from rasterio.features import rasterize
from rasterio.transform import from_origin

from geoseg.workflows.change import (
    CODE_NODATA, ChangeOptions, Aligned, common_grid, compare, detect_input, transition_table, transitions,
)
from geoseg.workflows.change import change as run_change
from geoseg.cli import cli
from geoseg.errors import InputError
from geoseg.io.outputs import read_run_metadata
from tests.conftest import shared, write_raster
from tests.system.test_faults import assert_error, snapshot
from tests.testmodels import keras_onehot_bundle, numpy_bundle

UTM = "EPSG:32633"
X0, Y0 = 500000.0, 5000120.0  # about 45° N


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def probs_raster(path, p_fg: np.ndarray, *, crs=UTM, transform, names=("background", "building")):
    """A --probs-out-like raster: float32 bands p_<class> (two classes: p_fg and 1 - p_fg)."""
    data = np.stack([1 - p_fg, p_fg]).astype(np.float32)
    write_raster(path, data, crs=crs, transform=transform)
    with rasterio.open(path, "r+") as ds:
        for i, name in enumerate(names, start=1):
            ds.set_band_description(i, f"p_{name}")
    return path


def class_raster(path, ids: np.ndarray, names, *, crs=UTM, transform=None, nodata=255):
    """A --raster-out-like raster: uint8 class ids with a class_names tag (names=None: no tag)."""
    write_raster(path, ids.astype(np.uint8)[None], crs=crs, transform=transform, nodata=nodata)
    if names is not None:
        with rasterio.open(path, "r+") as ds:
            ds.update_tags(class_names=",".join(names))
    return path


# --- 1. a constructed case with a known answer ----------------------------------------------------


def town(seed: int = 1):
    """12 building footprints (10-16 m sides) in cells of 40 m, in UTM 33N."""
    rng = np.random.default_rng(seed)
    boxes = []
    for r in range(3):
        for c in range(4):
            cx, cy = X0 + 20 + 40 * c + rng.uniform(-3, 3), Y0 - 20 - 40 * r + rng.uniform(-3, 3)
            w, h = rng.uniform(10, 16), rng.uniform(10, 16)
            boxes.append(shapely.box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
    return boxes


BEFORE_IDS, REMOVED, ADDED = list(range(9)), [2, 5], [9, 10]
AFTER_IDS = [i for i in BEFORE_IDS if i not in REMOVED] + ADDED
SHIFT = (1.5, -2.0)  # metres: AFTER is misregistered by 2.5 m


def render(path, boxes, ids, *, crs, res, extent, shift=(0.0, 0.0), p=(0.04, 0.92)):
    """Probabilities of the buildings ``ids`` (moved by ``shift`` metres in UTM) on a grid in ``crs``
    with pixels of ``res`` (x, y) CRS units covering ``extent`` (a UTM rectangle)."""
    to_crs = Transformer.from_crs(UTM, crs, always_xy=True)

    def moved(g):
        g = shapely.affinity.translate(g, *shift)
        return shapely.transform(g, lambda xy: np.column_stack(to_crs.transform(xy[:, 0], xy[:, 1])))

    left, bottom, right, top = moved(shapely.box(*extent)).bounds
    transform = from_origin(left, top, *res)
    shape = (round((top - bottom) / res[1]), round((right - left) / res[0]))
    mask = rasterize([(moved(boxes[i]), 1) for i in ids], out_shape=shape, transform=transform)
    return probs_raster(path, np.where(mask, p[1], p[0]), crs=crs, transform=transform)


@pytest.fixture(scope="module")
def two_dates(tmp_path_factory):
    """BEFORE: probabilities in UTM 33N at 0.5 m. AFTER: buildings 2 and 5 demolished, 9 and 10 new,
    everything shifted by 2.5 m, rendered in Web Mercator at 0.8 m (0.57 m on the ground) over a
    slightly different extent."""
    folder = tmp_path_factory.mktemp("dates")
    boxes = town()
    before = render(folder / "before.tif", boxes, BEFORE_IDS, crs=UTM, res=(0.5, 0.5), extent=(X0, Y0 - 120, X0 + 160, Y0))
    after = render(folder / "after.tif", boxes, AFTER_IDS, crs="EPSG:3857", res=(0.8, 0.8), shift=SHIFT,
                   extent=(X0 + 5, Y0 - 125, X0 + 170, Y0 + 10), p=(0.06, 0.9))
    return before, after, boxes


def test_added_and_removed_buildings_give_one_polygon_each_and_shifted_ones_none(two_dates, tmp_path):
    before, after, boxes = two_dates
    out = tmp_path / "changes.gpkg"
    result = run_change(before, after, out, options=ChangeOptions(min_area=0))  # only the tolerance at work
    layer = gpd.read_file(out, layer="building_change")
    assert layer.crs == UTM and shapely.is_valid(layer.geometry.values).all()
    assert result.tolerance_m == 3.0 and result.kinds == {"before": "probs", "after": "probs"}
    assert result.grid["pixel_m"][0] == pytest.approx(0.5, rel=1e-3)  # the finer resolution: BEFORE's
    appeared, gone = layer[layer.change == "appeared"], layer[layer.change == "disappeared"]
    assert (appeared.from_class == "background").all() and (appeared.to_class == "building").all()
    assert (gone.from_class == "building").all() and (gone.to_class == "background").all()
    for ids, polys, shift in ((ADDED, appeared, SHIFT), (REMOVED, gone, (0, 0))):
        for i in ids:
            hits = polys[polys.intersects(boxes[i])]
            assert len(hits) == 1, (i, len(hits))
            # true footprint area within 5 % (pixels of 0.5 and 0.57 m on a 10-16 m building)
            assert hits.area_m2.iloc[0] == pytest.approx(boxes[i].area, rel=0.05)
            where = shapely.affinity.translate(boxes[i], *shift)  # new ones are where AFTER shows them
            assert hits.geometry.iloc[0].intersection(where).area > 0.9 * boxes[i].area
    assert len(layer) == len(ADDED) + len(REMOVED)  # the shifted, unchanged buildings gave nothing
    assert appeared.confidence.between(0.85, 0.92).all() and gone.confidence.between(0.85, 0.92).all()
    assert result.gained_m2["building"] == pytest.approx(sum(boxes[i].area for i in ADDED), rel=0.05)
    assert result.lost_m2["building"] == pytest.approx(sum(boxes[i].area for i in REMOVED), rel=0.05)
    assert result.counts == {"building": {"appeared": 2, "disappeared": 2}}
    assert result.pixels["suppressed_by_tolerance"] > 1000


def test_without_tolerance_the_shift_leaves_slivers_along_every_building(two_dates, tmp_path):
    before, after, boxes = two_dates
    result = run_change(before, after, tmp_path / "c.gpkg", options=ChangeOptions(min_area=0, tolerance=0))
    layer = gpd.read_file(tmp_path / "c.gpkg", layer="building_change")
    unchanged = [boxes[i] for i in BEFORE_IDS if i not in REMOVED]
    touched = sum(bool(layer.intersects(b.buffer(1)).any()) for b in unchanged)
    assert touched == len(unchanged) and result.pixels["suppressed_by_tolerance"] == 0


def test_strips_of_a_few_rows_give_the_same_change_as_one_strip(two_dates, tmp_path, monkeypatch):
    """The tolerance looks across strip lines (a halo of rows), so the strip height changes nothing."""
    import geoseg.workflows.change as mod

    before, after, _ = two_dates
    run_change(before, after, tmp_path / "a.gpkg", raster_out=tmp_path / "a.tif")
    monkeypatch.setattr(mod, "_STRIP_PIXELS", 7 * 300)  # 16 rows (the least) per strip
    run_change(before, after, tmp_path / "b.gpkg", raster_out=tmp_path / "b.tif")
    with rasterio.open(tmp_path / "a.tif") as a, rasterio.open(tmp_path / "b.tif") as b:
        np.testing.assert_array_equal(a.read(1), b.read(1))
    a, b = (gpd.read_file(tmp_path / f"{n}.gpkg", layer="building_change") for n in "ab")
    assert len(a) == len(b) == 4 and np.allclose(np.sort(a.area_m2), np.sort(b.area_m2))


def test_change_raster_gpkg_styles_and_run_table(two_dates, tmp_path):
    before, after, _ = two_dates
    out, raster = tmp_path / "c.gpkg", tmp_path / "c.tif"
    run_change(before, after, out, raster_out=raster, options=ChangeOptions(margin=0.5))
    with rasterio.open(raster) as ds:
        codes = ds.read(1)
        assert ds.crs == UTM and ds.nodata == CODE_NODATA and ds.dtypes[0] == "uint8"
        assert ds.tags()["change_codes"] == "0=no_change,1=background_to_building,2=building_to_background"
        assert ds.colormap(1)[1][:3] != ds.colormap(1)[2][:3]
    assert set(np.unique(codes)) == {0, 1, 2, CODE_NODATA}
    # AFTER's footprint, a Web Mercator rectangle, is not quite a UTM rectangle: slivers of nodata
    assert (codes[:, 0] == CODE_NODATA).any() and (codes[3:-3, 3:-3] != CODE_NODATA).all()
    labels = [e.get("label") for e in ET.parse(raster.with_suffix(".qml")).iter("paletteEntry")]
    assert labels == ["no change", "background → building", "building → background"]
    alphas = [e.get("alpha") for e in ET.parse(raster.with_suffix(".qml")).iter("paletteEntry")]
    assert alphas[0] == "0" and all(int(v) > 0 for v in alphas[1:])  # "no change" transparent: the scene shows
    with sqlite3.connect(out) as db:
        (table, column, qml), = db.execute("SELECT f_table_name, f_geometry_column, styleQML FROM layer_styles")
    renderer = ET.fromstring(qml).find("renderer-v2")
    assert (table, column) == ("building_change", "geom") and renderer.get("attr") == "change"
    assert [c.get("value") for c in renderer.iter("category")] == ["appeared", "disappeared"]
    meta = read_run_metadata(out)
    assert meta["command"] == "change" and meta["before_kind"] == meta["after_kind"] == "probs"
    assert len(meta["before_sha256"]) == 64 and meta["margin"] == "0.5" and "model_sha256" not in meta
    # the change raster is a class raster of transitions: geoseg vectorize reads it as one
    assert invoke("vectorize", raster, "-o", tmp_path / "v.gpkg").exit_code == 0
    assert len(gpd.read_file(tmp_path / "v.gpkg", layer="background_to_building")) == 2


def test_a_geographic_before_gives_polygons_in_degrees_with_true_areas(tmp_path):
    """BEFORE in lon/lat (pixels of about 0.5 m), AFTER in UTM at 0.6 m shifted by 2 m: the change
    is in EPSG:4326, its areas in true m², and the tolerance (metres) still absorbs the shift."""
    boxes = town()
    before = render(tmp_path / "b.tif", boxes, BEFORE_IDS, crs="EPSG:4326", res=(6.4e-6, 4.5e-6),
                    extent=(X0, Y0 - 120, X0 + 160, Y0))
    after = render(tmp_path / "a.tif", boxes, AFTER_IDS, crs=UTM, res=(0.6, 0.6), shift=(1.2, -1.6),
                   extent=(X0, Y0 - 120, X0 + 160, Y0))
    seen = []
    result = run_change(before, after, tmp_path / "c.gpkg", options=ChangeOptions(min_area=0),
                        progress=lambda stage, done, total: seen.append((stage, done, total)))
    layer = gpd.read_file(tmp_path / "c.gpkg", layer="building_change")
    assert layer.crs == "EPSG:4326" and len(layer) == len(ADDED) + len(REMOVED)
    assert result.grid["pixel_m"][0] == pytest.approx(0.5, rel=0.02)
    utm = layer.to_crs(UTM)
    for i in ADDED + REMOVED:
        hit = layer[utm.intersects(boxes[i].buffer(3))]
        assert len(hit) == 1 and hit.area_m2.iloc[0] == pytest.approx(boxes[i].area, rel=0.06), i
    assert {s for s, _, _ in seen} == {"compare", "polygonize"}
    assert [d == t for s, d, t in seen if s == "compare"][-1]


def test_an_interrupted_run_leaves_nothing_behind(two_dates, tmp_path, monkeypatch):
    import geoseg.workflows.change as mod

    before, after, _ = two_dates
    calls = []

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return compare(*args, **kw)

    monkeypatch.setattr(mod, "_STRIP_PIXELS", 7 * 300)
    monkeypatch.setattr(mod, "compare", interrupted)
    (tmp_path / "out").mkdir()
    with pytest.raises(KeyboardInterrupt):
        run_change(before, after, tmp_path / "out" / "c.gpkg", raster_out=tmp_path / "out" / "c.tif")
    assert len(calls) == 3 and list((tmp_path / "out").iterdir()) == []


@pytest.mark.slow
def test_change_outputs_open_styled_in_qgis(two_dates, tmp_path):
    """Real QGIS (optional, as in test_qgis.py) loads the layer's style by `change` and the change
    raster's named palette."""
    from tests.system.test_qgis import qgis_python, run_check

    python = qgis_python()
    before, after, _ = two_dates
    out, raster = tmp_path / "c.gpkg", tmp_path / "c.tif"
    run_change(before, after, out, raster_out=raster)
    got = run_check(python, out, "--layers", "building_change", "--raster", raster)
    layer = got["layers"]["building_change"]
    assert layer["valid"] and layer["features"] == 4 and layer["renderer"] == "categorizedSymbol"
    assert layer["attribute"] == "change"
    assert [(c["value"], c["color"]) for c in layer["categories"]] == [("appeared", "#1a9850"), ("disappeared", "#d73027")]
    assert [e["label"] for e in got["raster"]["palette"]] == ["no change", "background → building", "building → background"]


# --- the pixel rules -------------------------------------------------------------------------------


def test_margin_and_tolerance_rules_on_pixels():
    cls_b = np.array([[0, 0, 1, 0, 0, 0, 0]])
    cls_a = np.array([[0, 1, 1, 1, 0, 0, 1]])
    valid = np.ones(cls_b.shape, bool)
    # tolerance 1 px: pixels 1 and 3 are building next to a building of BEFORE, and background lies
    # next to them on AFTER: a shift explains them; pixel 6 is a building far from any: new
    out = compare(cls_b, cls_a, valid, None, None, n_classes=2, tolerance_m=1.0)
    assert out.codes.tolist() == [[0, 0, 0, 0, 0, 0, 1]] and out.by_tolerance == 2 and out.confidence is None
    out = compare(cls_b, cls_a, valid, None, None, n_classes=2, tolerance_m=0)
    assert out.codes.tolist() == [[0, 1, 0, 1, 0, 0, 1]]
    # margin: p_before(background) - p_before(building) and p_after(building) - p_after(background)
    pb = np.array([[0.9, 0.55, 0.2, 0.9, 0.9, 0.9, 0.9]])
    pa = np.array([[0.1, 0.9, 0.9, 0.9, 0.1, 0.1, 0.62]])
    probs_b, probs_a = np.stack([1 - pb, pb]), np.stack([1 - pa, pa])
    cls_b, cls_a = np.array([[0, 1, 0, 0, 0, 0, 0]]), np.array([[0, 1, 1, 1, 0, 0, 1]])
    out = compare(cls_b, cls_a, valid, probs_b, probs_a, n_classes=2, margin=0.5)
    # pixel 2: BEFORE's building p 0.2 -> background beats it by 0.6; AFTER building by 0.8: counts.
    # pixel 3: BEFORE building p 0.9 (its class is background only in cls_b): fails. pixel 6: 0.24 < 0.5
    assert out.codes.tolist() == [[0, 0, 1, 0, 0, 0, 0]] and out.by_margin == 2
    assert out.confidence[0, 2] == round(min(0.8, 0.9) * 65535)
    # a date given as a class raster: probability 1 for its class, 0 for the others; it always
    # passes the margin, and the confidence rests on the other date
    out = compare(cls_b, cls_a, valid, None, probs_a, n_classes=2, margin=0.5)
    assert out.codes.tolist() == [[0, 0, 1, 1, 0, 0, 0]] and out.by_margin == 1
    assert out.confidence[0, 2] == out.confidence[0, 3] == round(0.9 * 65535)
    valid[0, 2] = False
    assert compare(cls_b, cls_a, valid, None, None, n_classes=2).codes[0, 2] == CODE_NODATA


def test_transition_codes_are_unique_and_fit_uint8():
    for n in (2, 3, 16):
        table = transition_table(n)
        off = table[~np.eye(n, dtype=bool)]
        assert sorted(off.tolist()) == list(range(1, n * (n - 1) + 1)) and (np.diag(table) == 0).all()
        assert all(table[i, j] == k for k, (i, j) in enumerate(transitions(n)) if k)
    with pytest.raises(InputError, match="at most 16"):
        transition_table(17)


def test_common_grid_is_the_overlap_at_the_finer_resolution_in_before_s_crs(tmp_path):
    ids = np.zeros((100, 100), np.uint8)
    b = class_raster(tmp_path / "b.tif", ids, ["bg", "x"], transform=from_origin(X0, Y0, 2, 2))
    a = class_raster(tmp_path / "a.tif", ids, ["bg", "x"], transform=from_origin(X0 + 51, Y0 - 30, 0.75, 0.75))
    grid = common_grid(detect_input(b, "BEFORE"), detect_input(a, "AFTER"))
    assert (grid.transform.a, grid.transform.e) == (0.75, -0.75)
    left, top = grid.transform.c, grid.transform.f
    assert (left, top) == (X0 + 51, Y0 - 30)  # on BEFORE's pixel lines (2 m) only when they fall there
    assert left + grid.width * 0.75 == pytest.approx(X0 + 126, abs=0.75)
    assert top - grid.height * 0.75 == pytest.approx(Y0 - 105, abs=0.75)


# --- 2. every kind of input -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def onehot_model(tmp_path_factory):
    return keras_onehot_bundle(tmp_path_factory.mktemp("model") / "onehot.keras", classes=4, bands=1)


def scene_pair():
    """Scenes whose single band holds class ids (the one-hot test model maps them to themselves)."""
    before = np.zeros((96, 128), np.uint8)
    before[8:30, 8:40] = 1
    before[50:80, 10:30] = 2
    before[10:35, 70:100] = 3
    before[60:85, 90:120] = 1
    after = before.copy()
    after[8:30, 8:40] = 0  # class1 demolished
    after[50:80, 10:30] = 1  # class2 -> class1
    after[55:75, 50:72] = 3  # new class3
    return before, after


def test_scenes_class_rasters_probability_rasters_and_mixes_agree(tmp_path, onehot_model):
    b, a = scene_pair()
    scenes = {"before": write_raster(tmp_path / "before.tif", b[None]), "after": write_raster(tmp_path / "after.tif", a[None])}
    made = {}
    for when, scene in scenes.items():
        r = invoke("predict", scene, "-o", tmp_path / f"{when}.gpkg", "--model", onehot_model,
                   "--raster-out", tmp_path / f"{when}_classes.tif", "--probs-out", tmp_path / f"{when}_probs.tif")
        assert r.exit_code == 0, r.output
        made[when] = {"scene": scene, "classes": tmp_path / f"{when}_classes.tif", "probs": tmp_path / f"{when}_probs.tif"}
    combos = [("scene", "scene"), ("classes", "classes"), ("probs", "probs"), ("classes", "probs"),
              ("scene", "classes"), ("probs", "scene")]
    rasters, layers = {}, {}
    # --margin 0.5 keeps every change: 0.95 against 0.02 on a model's date, 1 against 0 on a class raster
    for kb, ka in combos:
        name = f"{kb}-{ka}"
        r = invoke("change", made["before"][kb], made["after"][ka], "-o", tmp_path / f"{name}.gpkg", "--model",
                   onehot_model, "--raster-out", tmp_path / f"{name}.tif", "--json", "--margin", "0.5")
        assert r.exit_code == 0, r.output
        doc = json.loads(r.stdout)
        assert doc["kinds"] == {"before": kb, "after": ka}
        assert (doc["model"] is not None) == ("scene" in (kb, ka))
        with rasterio.open(tmp_path / f"{name}.tif") as ds:
            rasters[name] = ds.read(1)
        layers[name] = {n: gpd.read_file(tmp_path / f"{name}.gpkg", layer=f"{n}_change") for n in ("class1", "class2", "class3")}
        conf = layers[name]["class1"].confidence
        if kb == ka == "classes":
            assert conf.isna().all()
        else:  # softmax of the one-hot logits x 4: e^4 / (e^4 + 3)
            assert np.allclose(conf, np.exp(4) / (np.exp(4) + 3), atol=1e-3)
        if ka == "scene":
            assert read_run_metadata(tmp_path / f"{name}.gpkg")["model_sha256"] == doc["model"]["sha256"]
    first = rasters["scene-scene"]
    for name, codes in rasters.items():
        np.testing.assert_array_equal(codes, first, err_msg=name)
    table = transition_table(4)
    expected = np.where(b != a, table[b, a], 0)
    np.testing.assert_array_equal(first, expected)
    c1 = layers["classes-classes"]["class1"]
    assert sorted(zip(c1.change, c1.from_class, c1.to_class)) == [
        ("appeared", "class2", "class1"), ("disappeared", "class1", "background")]
    assert c1.area_m2.sort_values().tolist() == [150.0, 176.0]  # 20 x 30 and 22 x 32 px of 0.5 m
    c2, c3 = layers["classes-classes"]["class2"], layers["classes-classes"]["class3"]
    assert c2.change.tolist() == ["disappeared"] and c2.to_class.tolist() == ["class1"]
    assert c3.change.tolist() == ["appeared"] and c3.area_m2.tolist() == [110.0]


def test_a_bundle_loaded_once_and_a_class_raster_without_tags(tmp_path):
    """The library takes an already-loaded bundle (what batch workers pass); a plain integer raster
    without tags is a class raster once --classes names its ids."""
    b, a = scene_pair()
    scene = write_raster(tmp_path / "s.tif", np.where(b == 3, 200, b).astype(np.uint8)[None])  # imagery: > 3
    plain = class_raster(tmp_path / "plain.tif", a, None, nodata=None)
    names = ("background", "class1", "class2", "class3")
    result = run_change(scene, plain, tmp_path / "c.gpkg", bundle=numpy_bundle(4), options=ChangeOptions(classes=names))
    assert result.kinds == {"before": "scene", "after": "classes"} and result.model["name"] == "onehot"
    assert result.counts["class3"] == {"appeared": 1, "disappeared": 0}
    assert detect_input(plain, "AFTER").kind == "scene"  # without --classes it would be imagery


def test_outside_a_class_raster_without_nodata_is_not_class_zero(tmp_path):
    ids = np.ones((40, 40), np.uint8)
    b = class_raster(tmp_path / "b.tif", ids, ["bg", "x"], nodata=None, transform=from_origin(X0, Y0, 1, 1))
    a = class_raster(tmp_path / "a.tif", ids, ["bg", "x"], nodata=None, transform=from_origin(X0 + 10.5, Y0, 1, 1))
    before, after = detect_input(b, "BEFORE"), detect_input(a, "AFTER")
    grid = common_grid(before, after)
    with Aligned(before, grid) as rb, Aligned(after, grid) as ra:
        cls, valid, _ = ra.read(0, grid.height)
        assert valid.all() and (cls == 1).all() and grid.width == 30


# --- 3. errors through the CLI ---------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path):
    ids = np.zeros((60, 60), np.uint8)
    ids[10:30, 10:30] = 1
    class_raster(tmp_path / "b.tif", ids, ["background", "building"])
    class_raster(tmp_path / "a.tif", ids[::-1].copy(), ["background", "building"])
    class_raster(tmp_path / "road.tif", ids, ["background", "road"])
    class_raster(tmp_path / "far.tif", ids, ["background", "building"], transform=from_origin(X0 + 5000, Y0, 0.5, 0.5))
    bad = ids.copy()
    bad[50:, 50:] = 5  # an id without a name, found only while comparing (outputs already staged)
    class_raster(tmp_path / "bad.tif", bad, ["background", "building"])
    (tmp_path / "out").mkdir()
    return tmp_path


@pytest.mark.parametrize("args, needles", [
    (["far.tif"], ["do not overlap"]),
    (["road.tif"], ["background,road", "--classes"]),
    (["a.tif", "--margin", "1.5"], ["--margin"]),
    (["a.tif", "--margin", "-0.1"], ["--margin"]),
    (["a.tif", "--tolerance", "-2"], ["--tolerance"]),
    (["a.tif", "--min-area", "-5"], ["--min-area"]),
    (["a.tif", "--min-area", "nan"], ["--min-area"]),
    (["missing.tif"], ["missing.tif"]),
    (["bad.tif", "--raster-out", "out/c.tif"], ["class id(s) [5]", "--classes"]),
    (["a.tif", "--classes", "x,,y"], ["--classes"]),
    (["a.tif", "--raster-out", "out/c.png"], [".tif"]),
])
def test_errors_are_one_line_and_leave_nothing(folder, args, needles):
    before = snapshot(folder)
    first, *rest = args
    result = invoke("change", folder / "b.tif", folder / first, "-o", folder / "out" / "c.gpkg",
                    *[folder / a if a.startswith("out/") else a for a in rest])
    assert_error(result, *needles)
    assert snapshot(folder) == before


def test_existing_outputs_need_overwrite(folder):
    out = folder / "out" / "c.gpkg"
    assert invoke("change", folder / "b.tif", folder / "a.tif", "-o", out, "--raster-out", out.with_suffix(".tif")).exit_code == 0
    kept = snapshot(folder)
    assert_error(invoke("change", folder / "b.tif", folder / "a.tif", "-o", out), "--overwrite")
    assert_error(invoke("change", folder / "b.tif", folder / "a.tif", "-o", folder / "out" / "d.gpkg",
                        "--raster-out", out.with_suffix(".tif")), "already exists")
    assert snapshot(folder) == kept
    result = invoke("change", folder / "b.tif", folder / "a.tif", "-o", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert "building" in result.stdout and "gained" in result.stdout


# --- 4. real data: three NAIP dates (4 bands, EPSG:26914, 5 m, grids offset by 1-3 m) ---------------

NAIP = "naip-multidate"
NAIP_CLASSES = "background,vegetation,water"


def ndvi_classes(image, out):
    """A class raster from a scene: vegetation where NDVI > 0.25, water where NDVI < -0.3."""
    with rasterio.open(image) as ds:
        bands = ds.read()
        red, nir = bands[0].astype(np.float32), bands[3].astype(np.float32)
        valid = (bands != ds.nodata).any(0) if ds.nodata is not None else np.ones(red.shape, bool)
        profile = dict(crs=ds.crs, transform=ds.transform)
    ndvi = (nir - red) / np.maximum(nir + red, 1)
    ids = np.where(ndvi > 0.25, 1, np.where(ndvi < -0.3, 2, 0))
    ids[~valid] = 255
    return class_raster(out, ids, NAIP_CLASSES.split(","), **profile)


def warped_copy(image, out, *, crs, res, shift):
    """``image`` reprojected to ``crs`` at ``res`` (bilinear), its georeference then moved by ``shift``
    metres: the same date, misregistered, on another grid."""
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    with rasterio.open(image) as ds:
        t, w, h = calculate_default_transform(ds.crs, crs, ds.width, ds.height, *ds.bounds, resolution=res)
        data = np.zeros((ds.count, h, w), np.uint8)
        reproject(ds.read(), data, src_transform=ds.transform, src_crs=ds.crs, src_nodata=0, dst_transform=t,
                  dst_crs=crs, dst_nodata=0, resampling=Resampling.bilinear)
    moved = rasterio.Affine(t.a, 0, t.c + shift[0], 0, t.e, t.f + shift[1])
    return write_raster(out, data, crs=crs, transform=moved, nodata=0)


def test_naip_date_against_itself_misregistered_on_another_grid_is_almost_no_change(tmp_path):
    image = shared(NAIP, "m_4709963_se_14_1_20090818.tif")
    before = ndvi_classes(image, tmp_path / "2009.tif")
    copy = warped_copy(image, tmp_path / "2009_utm15.tif", crs="EPSG:32615", res=6.0, shift=(2.5, -2.0))
    after = ndvi_classes(copy, tmp_path / "2009_utm15_classes.tif")
    strict = run_change(before, after, tmp_path / "strict.gpkg", options=ChangeOptions(tolerance=0, min_area=0))
    result = run_change(before, after, tmp_path / "c.gpkg")
    compared_m2 = result.pixels["compared"] * 25
    assert result.crs == "EPSG:26914" and result.tolerance_m == pytest.approx(7.5, rel=1e-3)
    assert result.pixels["compared"] > 0.95 * 934 * 723
    # without the tolerance, resampling and the 3 m shift flip ~5 % of the pixels; with it, almost none
    assert strict.pixels["changed"] > 0.03 * result.pixels["compared"]
    assert result.pixels["changed"] < 0.01 * result.pixels["compared"]
    changed_m2 = sum(result.gained_m2.values()) + sum(result.lost_m2.values())
    assert changed_m2 < 0.001 * compared_m2, result.to_dict()


@pytest.mark.slow
def test_naip_2009_against_2020_end_to_end(tmp_path):
    images = [shared(NAIP, f"m_4709963_se_14_1_{d}.tif") for d in ("20090818", "20200831")]
    before, after = (ndvi_classes(p, tmp_path / f"{p.stem}_classes.tif") for p in images)
    out, raster = tmp_path / "c.gpkg", tmp_path / "c.tif"
    t0 = time.perf_counter()
    result = invoke("change", before, after, "-o", out, "--raster-out", raster, "--min-area", "200", "--json")
    seconds = time.perf_counter() - t0
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["class_names"] == NAIP_CLASSES.split(",") and doc["crs"] == "EPSG:26914"
    for name in ("vegetation", "water"):
        layer = gpd.read_file(out, layer=f"{name}_change")
        assert layer.crs == "EPSG:26914" and shapely.is_valid(layer.geometry.values).all()
        assert (layer.area_m2 >= 200).all()
        assert np.allclose(layer.area_m2, layer.area, rtol=1e-9)  # UTM: planar m² are true m²
        for change, total in (("appeared", doc["gained_m2"][name]), ("disappeared", doc["lost_m2"][name])):
            assert layer[layer.change == change].area_m2.sum() == pytest.approx(total, rel=1e-6)
    assert sum(doc["gained_m2"].values()) > 0 and sum(doc["lost_m2"].values()) > 0
    with rasterio.open(raster) as ds:
        assert ds.crs == "EPSG:26914" and ds.res == (5.0, 5.0) and ds.overviews(1)
    print(f"NAIP 2009 vs 2020: {seconds:.2f} s, gained {doc['gained_m2']}, lost {doc['lost_m2']}")
