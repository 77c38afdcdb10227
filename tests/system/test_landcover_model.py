"""The bundled `landcover` model: listed, selected with --model landcover, its per-class defaults, and
still scoring on a held-out Dubai image (real data; skipped when absent)."""

from __future__ import annotations

import json

import numpy as np
import pyogrio
import pytest
import shapely
from click.testing import CliRunner

from geoseg.cli import cli
from geoseg.models.bundle import list_builtin, read_meta, resolve_model
from tests.conftest import REPO, write_raster

CLASSES = ["background", "building", "road", "water", "vegetation"]
DUBAI = REPO.parent / "geoseg-data" / "multiclass-dubai"
DUBAI_VALUES = "0=ignore,1=building,2=background,3=road,4=vegetation,5=water"
# Measured when the model was trained (2026-12-06, sha256 7ac1b37d...): building 0.335, road 0.485,
# water 0.895, vegetation 0.473; road completeness 0.557, correctness 0.590 at 3 m.
FLOORS = {"building": 0.30, "road": 0.44, "water": 0.85, "vegetation": 0.43}
ROAD_FLOORS = (0.52, 0.55)


def test_landcover_is_bundled_with_its_classes_and_scale():
    (entry,) = [e for e in list_builtin() if e["name"] == "landcover"]
    assert entry["classes"] == CLASSES and not entry["default"]
    assert entry["bands"] == ["red", "green", "blue"]
    assert entry["gsd"] == pytest.approx(1.0) and entry["gsd_range"] == pytest.approx([0.5, 2.0])
    assert resolve_model("landcover").name == "landcover.keras"
    assert resolve_model("landcover").stat().st_size < 10e6


def test_water_keeps_its_islands_and_drops_small_ponds():
    meta = read_meta(resolve_model("landcover"))
    c = {k.name: k for k in meta.classes}
    assert c["water"].min_area_m2 >= 100 > c["building"].min_area_m2  # a larger default minimum area
    assert c["water"].max_hole_m2 == 0  # holes are never filled: islands stay


def test_vectorized_water_keeps_an_island(tmp_path):
    """A lake with an island, through vectorize with the landcover classes and minimum areas: the
    island is a hole of the water polygon; a pond under water's minimum area is dropped."""
    ids = np.zeros((80, 80), np.uint8)  # 1 m pixels
    ids[10:70, 10:70] = 3  # a 60 m lake
    ids[30:45, 30:45] = 4  # a 15 m wooded island
    ids[74:79, 74:79] = 3  # a 25 m² pond
    from rasterio.transform import from_origin

    path = write_raster(tmp_path / "classes.tif", ids, transform=from_origin(500000, 5000000, 1, 1))
    meta = read_meta(resolve_model("landcover"))
    areas = ",".join(f"{k.name}={k.min_area_m2:g}" for k in meta.classes)
    out = tmp_path / "out.gpkg"
    run = CliRunner().invoke(cli, ["vectorize", str(path), "-o", str(out), "--classes", ",".join(CLASSES),
                                   "--min-area", areas, "--skip", "background"])
    assert run.exit_code == 0, run.output
    water = pyogrio.read_dataframe(out, layer="water")
    assert len(water) == 1
    (geom,) = water.geometry.values  # layers hold MultiPolygons
    (poly,) = shapely.get_parts(geom)
    assert len(poly.interiors) == 1 and shapely.Polygon(poly.interiors[0]).area == pytest.approx(225)
    assert poly.area == pytest.approx(3600 - 225)


@pytest.mark.slow
def test_held_out_dubai_image_still_scores(tmp_path):
    """Tile 2 image 5 (held out whole; every class present): per-class IoU and the road network, via the CLI."""
    image = DUBAI / "tile2" / "image_part_005.tif"
    if not image.exists():
        pytest.skip(f"{image} is missing: run python scripts/prepare_dubai.py (needs ../shared/data)")
    run = CliRunner().invoke(cli, ["evaluate", str(image), str(image.with_name("image_part_005_labels.tif")),
                                   "--model", "landcover", "--label-values", DUBAI_VALUES, "--json"])
    assert run.exit_code == 0, run.output
    doc = json.loads(run.stdout)
    iou = {n: doc["classes"][n]["iou"] for n in CLASSES}
    for name, floor in FLOORS.items():
        assert iou[name] > floor, (name, iou)
    assert doc["roads"]["buffer_m"] == 3.0
    assert doc["roads"]["completeness"] > ROAD_FLOORS[0] and doc["roads"]["correctness"] > ROAD_FLOORS[1]


@pytest.mark.slow
def test_predict_with_landcover_on_the_rotterdam_sample(tmp_path):
    """The README's landcover command: every class a layer, road centre-lines, on sample data."""
    out = tmp_path / "rotterdam.gpkg"
    run = CliRunner().invoke(cli, ["predict", str(REPO / "sample_data" / "rotterdam_sn6_rgb_1.tif"), "-o", str(out),
                                   "--model", "landcover", "--json"])
    assert run.exit_code == 0, run.output
    doc = json.loads(run.stdout)
    assert doc["model"]["name"] == "landcover"
    layers = {name for name, _ in pyogrio.list_layers(out)}
    assert {"building", "road", "vegetation", "road_centerline"} <= layers
    assert doc["counts"]["building"] > 5 and doc["counts"]["vegetation"] > 0
