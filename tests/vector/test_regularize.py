"""Building regularisation: right angles along each building's orientation, with a safe fallback."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
import shapely.affinity
import shapely.geometry
from click.testing import CliRunner
from rasterio.features import rasterize, shapes
from rasterio.transform import from_origin

from geoseg.cli import cli
from geoseg.vector.regularize import dominant_angle, regularize
from tests.conftest import write_raster
from tests.system.test_faults import assert_error

PIXEL = 0.25
GRID = from_origin(0, 40, PIXEL, PIXEL)


def mask_outline(shape) -> shapely.Polygon:
    """The polygon a segmentation mask of ``shape`` gives: its pixel staircase."""
    m = rasterize([(shape, 1)], out_shape=(160, 160), transform=GRID, dtype="uint8")
    return [shapely.geometry.shape(g) for g, v in shapes(m, mask=m > 0, transform=GRID) if v == 1][0]


def iou(a, b) -> float:
    return shapely.intersection(a, b).area / shapely.union(a, b).area


@pytest.mark.parametrize("angle", [0, 15, 27, 45, 63, 80])
def test_turned_rectangles_come_back_square_and_in_place(angle):
    truth = shapely.affinity.rotate(shapely.box(10, 10, 30, 22), angle)
    outline = mask_outline(truth)
    r = regularize(np.array([outline], dtype=object), pixel=PIXEL)
    assert r.regularized[0] == 1
    assert iou(r.geoms[0], truth) > 0.94
    assert r.vertices[0] <= 15 < len(outline.exterior.coords) or r.vertices[0] == 5  # a few steps may remain
    assert r.iou[0] == pytest.approx(iou(r.geoms[0], outline))
    assert abs(dominant_angle(outline, PIXEL) - angle % 90) < 2 or abs(dominant_angle(outline, PIXEL) - angle % 90) > 88


def test_an_l_shaped_building_keeps_its_shape_with_right_angles():
    truth = shapely.affinity.rotate(shapely.Polygon([(8, 8), (30, 8), (30, 16), (16, 16), (16, 30), (8, 30)]), 30,
                                    origin=(19, 19))
    r = regularize(np.array([mask_outline(truth)], dtype=object), pixel=PIXEL)
    assert r.regularized[0] == 1 and iou(r.geoms[0], truth) > 0.93
    assert r.vertices[0] <= 20  # 7 for a perfect L; the mask outline has 353


def test_shapes_the_grid_cannot_follow_fall_back_to_their_outline():
    triangle = shapely.Polygon([(8, 8), (32, 8), (20, 30)])  # no right angles to find
    outline = mask_outline(triangle)
    r = regularize(np.array([outline], dtype=object), pixel=PIXEL)
    assert r.regularized[0] == 0
    assert r.geoms[0].is_valid and r.iou[0] > 0.9
    assert r.vertices[0] < shapely.get_num_coordinates(outline)  # simplified by half a pixel


def test_regularize_through_vectorize_and_its_errors(tmp_path):
    a = np.zeros((120, 120), np.uint8)
    a[10:40, 10:60] = 1
    a[70:110, 20:50] = 1
    path = write_raster(tmp_path / "c.tif", a[None])
    out = tmp_path / "o.gpkg"
    result = CliRunner().invoke(cli, ["vectorize", str(path), "-o", str(out), "--classes", "background,building",
                                      "--regularize"])
    assert result.exit_code == 0, result.output
    import geopandas as gpd

    frame = gpd.read_file(out, layer="building")
    assert {"reg_iou", "vertices", "regularized"} <= set(frame.columns)
    assert (frame["vertices"] == 5).all() and (frame["reg_iou"] > 0.99).all()
    assert_error(CliRunner().invoke(cli, ["vectorize", str(path), "-o", str(tmp_path / "p.gpkg"), "--classes",
                                          "background,road", "--regularize"]), "needs a class named building")
