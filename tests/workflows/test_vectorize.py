"""geoseg vectorize: predict's polygon step on its own; strips equal the whole raster on real masks."""

from __future__ import annotations

import json
import sqlite3

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from click.testing import CliRunner

from geoseg.cli import cli
from geoseg.io.outputs import read_run_metadata
from geoseg.vector.polygons import polygonize
from geoseg.models.bundle import file_sha256
from tests.conftest import shared, write_raster
from tests.system.test_faults import assert_error


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def normalized(frame) -> list[bytes]:
    return sorted(shapely.to_wkb(shapely.normalize(frame.geometry.values)).tolist())


def test_vectorizing_predict_s_class_raster_gives_predict_s_polygons(tmp_path):
    from tests.testmodels import keras_onehot_bundle, blocky_labels

    model = keras_onehot_bundle(tmp_path / "m.keras")
    labels = blocky_labels(90, 110, 4, np.random.default_rng(2), block=7)
    scene = write_raster(tmp_path / "s.tif", labels.astype("uint8")[None])
    assert invoke("predict", scene, "-o", tmp_path / "p.gpkg", "--raster-out", tmp_path / "c.tif", "--model", model,
                  "--min-area", "class2=5").exit_code == 0
    result = invoke("vectorize", tmp_path / "c.tif", "-o", tmp_path / "v.gpkg", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["class_names"] == ["background", "class1", "class2", "class3"]
    for layer in ("class1", "class2", "class3"):
        a = gpd.read_file(tmp_path / "p.gpkg", layer=layer)
        b = gpd.read_file(tmp_path / "v.gpkg", layer=layer)
        assert normalized(a) == normalized(b) and len(b) == doc["counts"][layer]
        assert np.allclose(a["area_m2"].sort_values(), b["area_m2"].sort_values())
    assert (gpd.read_file(tmp_path / "v.gpkg", layer="class2")["area_m2"] >= 5).all()  # predict's min area, from the tags
    meta = read_run_metadata(tmp_path / "v.gpkg")
    assert meta["command"] == "vectorize" and meta["source_sha256"] == file_sha256(tmp_path / "c.tif")
    with sqlite3.connect(tmp_path / "v.gpkg") as db:
        styled = sorted(r[0] for r in db.execute("SELECT f_table_name FROM layer_styles"))
    assert styled == ["class1", "class2", "class3"]


def test_plain_masks_get_names_from_classes_and_skip_and_min_area_per_class(tmp_path):
    a = np.zeros((40, 40), np.uint8)
    a[2:10, 2:10] = 1  # 8x8 px of 0.5 m = 16 m2
    a[20:22, 20:22] = 1  # 1 m2
    a[30:38, 5:35] = 2
    path = write_raster(tmp_path / "m.tif", a[None])
    out = tmp_path / "o.gpkg"
    assert invoke("vectorize", path, "-o", out).exit_code == 0
    assert sorted(gpd.list_layers(out)["name"])[:2] == ["class1", "class2"]
    assert invoke("vectorize", path, "-o", out, "--overwrite", "--classes", "bg,house,road", "--skip", "bg,road",
                  "--min-area", "house=2").exit_code == 0
    names = set(gpd.list_layers(out)["name"])
    assert "house" in names and "road" not in names
    assert len(gpd.read_file(out, layer="house")) == 1


def test_vectorize_errors(tmp_path):
    out = tmp_path / "o.gpkg"
    two = write_raster(tmp_path / "two.tif", np.zeros((2, 20, 20), np.uint8))
    assert_error(invoke("vectorize", two, "-o", out), "one band")
    floats = write_raster(tmp_path / "f.tif", np.zeros((1, 20, 20), np.float32))
    assert_error(invoke("vectorize", floats, "-o", out), "integer class ids")
    good = write_raster(tmp_path / "g.tif", np.ones((1, 20, 20), np.uint8))
    assert_error(invoke("vectorize", good, "-o", out, "--skip", "tree"), "tree")
    assert_error(invoke("vectorize", good, "-o", out, "--min-area", "tree=3"), "tree")
    assert_error(invoke("vectorize", good, "-o", tmp_path / "o.shp"), ".gpkg")
    nocrs = write_raster(tmp_path / "n.tif", np.ones((1, 20, 20), np.uint8), crs=None)
    assert_error(invoke("vectorize", nocrs, "-o", out), "no CRS")
    assert_error(invoke("vectorize", tmp_path / "missing.tif", "-o", out), "missing.tif")
    assert not out.exists()
    assert invoke("vectorize", good, "-o", out).exit_code == 0
    assert_error(invoke("vectorize", good, "-o", out), "--overwrite")


@pytest.mark.parametrize("strip", [1, 37, 256])
def test_strips_equal_the_whole_raster_on_a_real_building_mask(strip):
    """Kampala block 1's OSM building mask (1024 x 1024, 7.5 cm): hundreds of footprints that cross
    strip lines, some touching each other; any strip height gives the same polygons and areas."""
    mask = shared("buildings-oam-train", "mosaics", "2-kampala_ug", "kampala_ug_block1_z21_mask.tif")
    with rasterio.open(mask) as ds:
        height = ds.height
    whole = polygonize(str(mask), class_names=["background", "building"], strip_rows=height)["building"]
    cut = polygonize(str(mask), class_names=["background", "building"], strip_rows=strip)["building"]
    assert len(whole) > 50
    assert normalized(cut) == normalized(whole)
    assert np.allclose(np.sort(cut["area_m2"]), np.sort(whole["area_m2"]))
    # equal normalized geometries: no polygon is split, and no vertex was left on a strip line
