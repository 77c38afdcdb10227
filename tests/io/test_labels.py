"""Labels on a scene's grid: vectors in another CRS, rasters that cover only part of the scene."""

import geopandas as gpd
import numpy as np
import pytest
from rasterio.transform import from_origin
from shapely.geometry import LineString, box

from geoseg.errors import InputError
from geoseg.io.labels import IGNORE, LabelReader
from geoseg.io.scene import open_scene
from tests.conftest import shared, write_raster


@pytest.fixture
def scene(tmp_path):
    # 40 x 30 px of 0.5 m in UTM 33N
    return open_scene(write_raster(tmp_path / "s.tif", np.ones((1, 30, 40), np.uint8)))


def test_raster_labels_outside_their_extent_are_ignored(tmp_path, scene):
    shifted = write_raster(tmp_path / "l.tif", np.ones((1, 30, 40), np.uint8), transform=from_origin(500005, 5000000, 0.5, 0.5))
    ids = LabelReader(shifted, scene, class_names=["background", "building"]).read(0, 30, 0, 40)
    assert (ids[:, :10] == IGNORE).all() and (ids[:, 10:] == 1).all()


def test_vector_labels_in_another_crs_are_reprojected(tmp_path, scene):
    # a 5 m x 5 m square at pixel rows 4..14, cols 6..16, written in EPSG:4326
    square = gpd.GeoSeries([box(500003, 4999993, 500008, 4999998)], crs="EPSG:32633").to_crs("EPSG:4326")
    gpd.GeoDataFrame({"class": ["building"]}, geometry=square).to_file(tmp_path / "b.gpkg")
    ids = LabelReader(tmp_path / "b.gpkg", scene, class_names=["background", "building"]).read(0, 30, 0, 40)
    assert ids[4:14, 6:16].mean() > 0.95 and ids.sum() == pytest.approx(100, abs=6)


def test_lines_need_a_width_and_are_buffered(tmp_path, scene):
    line = gpd.GeoDataFrame({"class": ["road"]}, geometry=[LineString([(500000, 4999990), (500020, 4999990)])], crs="EPSG:32633")
    line.to_file(tmp_path / "r.gpkg")
    with pytest.raises(InputError, match="--line-width"):
        LabelReader(tmp_path / "r.gpkg", scene, class_names=["background", "road"])
    ids = LabelReader(tmp_path / "r.gpkg", scene, class_names=["background", "road"], line_width_m=2.0).read(0, 30, 0, 40)
    assert (ids[18:22] == 1).all() and ids.sum() == 4 * 40


def test_label_errors(tmp_path, scene):
    far = gpd.GeoDataFrame({"class": ["building"]}, geometry=[box(0, 0, 1, 1)], crs="EPSG:32633")
    far.to_file(tmp_path / "far.gpkg")
    with pytest.raises(InputError, match="do not overlap"):
        LabelReader(tmp_path / "far.gpkg", scene, class_names=["background", "building"])
    nocrs = gpd.GeoDataFrame({"class": ["building"]}, geometry=[box(500000, 4999990, 500005, 4999995)])
    nocrs.to_file(tmp_path / "nocrs.shp")  # a shapefile without .prj (GeoJSON is always EPSG:4326)
    with pytest.raises(InputError, match="no CRS"):
        LabelReader(tmp_path / "nocrs.shp", scene, class_names=["background", "building"])
    odd = gpd.GeoDataFrame({"class": ["tree"]}, geometry=[box(500000, 4999990, 500005, 4999995)], crs="EPSG:32633")
    odd.to_file(tmp_path / "odd.gpkg")
    with pytest.raises(InputError, match="tree"):
        LabelReader(tmp_path / "odd.gpkg", scene, class_names=["background", "building"])


def test_real_vector_and_mask_labels_agree():
    base = shared("buildings-oam-train", "mosaics", "2-kampala_ug")
    info = open_scene(base / "kampala_ug_block1_z21_rgb.tif")
    names = ["background", "building"]
    v = LabelReader(base / "kampala_ug_block1_z21_buildings.gpkg", info, class_names=names).read(0, info.height, 0, info.width)
    m = LabelReader(base / "kampala_ug_block1_z21_mask.tif", info, class_names=names).read(0, info.height, 0, info.width)
    assert (v == m).mean() > 0.999


def test_label_values_map_raster_values_to_classes_or_ignore(tmp_path, scene):
    from geoseg.io.labels import parse_label_values

    names = ["background", "building", "road"]
    assert parse_label_values("0=ignore, 1=building, 2-5=background, 6=2", names) == {
        0: IGNORE, 1: 1, 2: 0, 3: 0, 4: 0, 5: 0, 6: 2}
    assert parse_label_values({"7": "Road"}, names) == {7: 2}
    assert parse_label_values(None, names) is None
    for bad, match in [("1", "VALUE=CLASS"), ("x=road", "VALUE=CLASS"), ("300=road", "0-255"),
                       ("5-2=road", "0-255"), ("1=tree", "'tree' is not a class"), ("1=3", "not a class")]:
        with pytest.raises(InputError, match=match):
            parse_label_values(bad, names)
    # a Dubai-style index mask: 0 unlabeled, 1 building, 2-5 other classes
    values = np.tile(np.arange(6, dtype=np.uint8), (30, 7))[:, :40]
    path = write_raster(tmp_path / "idx.tif", values[None])
    ids = LabelReader(path, scene, class_names=["background", "building"],
                      value_map=parse_label_values("0=ignore,1=building,2-5=background", ["background", "building"])
                      ).read(0, 30, 0, 40)
    expected = np.where(values == 0, IGNORE, (values == 1).astype(np.uint8))
    np.testing.assert_array_equal(ids, expected)
