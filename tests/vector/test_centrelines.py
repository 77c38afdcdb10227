"""Road centre-lines: topology of generated road grids, spurs, gaps, strips, true lengths, the road
measures, the vectorize layer, and the skeleton against SpaceNet's real centre-lines."""

from __future__ import annotations

import sqlite3
import xml.etree.ElementTree as ET

import geopandas as gpd
import numpy as np
import pytest
import rasterio.features
import shapely
from click.testing import CliRunner
from pyproj import Geod
from rasterio.transform import from_origin

from geoseg.vector.centrelines import CentrelineOptions, centrelines, road_metrics
from geoseg.vector.measure import line_length_m
from geoseg.errors import InputError
from tests.conftest import shared, write_raster

UTM = "EPSG:32633"
GRID = from_origin(500000, 5000000, 0.5, 0.5)  # 0.5 m pixels


def road_grid(size=400, rows=(80, 200, 320), cols=(80, 200, 320), width=8, frame=None) -> np.ndarray:
    """Straight roads ``width`` px wide across the whole raster; ``frame``: a ring road ``frame``
    px inside the border (the cross roads stop at it, making T-junctions)."""
    m = np.zeros((size, size), bool)
    lo, hi = (frame, size - frame) if frame else (0, size)
    h = width // 2
    for r in rows:
        m[r - h : r - h + width, lo:hi] = True
    for c in cols:
        m[lo:hi, c - h : c - h + width] = True
    if frame:
        for v in (frame, size - frame):
            m[v - h : v - h + width, frame - h : size - frame + width - h] = True
            m[frame - h : size - frame + width - h, v - h : v - h + width] = True
    return m


def degrees(lines: gpd.GeoDataFrame) -> np.ndarray:
    return np.bincount(np.concatenate([lines["node_from"], lines["node_to"]]))


def test_a_road_grid_is_one_network_with_a_junction_at_every_crossing():
    net = centrelines(road_grid(), GRID, UTM)
    deg = degrees(net.lines)
    assert net.lines["network"].nunique() == 1
    assert (deg == 4).sum() == 9 and (deg == 3).sum() == 0  # 3 x 3 crossings, nothing else
    assert (deg == 1).sum() == 12  # the roads' ends at the border
    # 6 roads of 200 m; each end stops up to a pixel or two short of the border
    assert net.lines["length_m"].sum() == pytest.approx(1200, rel=0.03)
    assert net.width_m == pytest.approx(4.0, rel=0.15)
    # the columns agree with the geometry: lines meet at shared, exact end points
    ends = np.concatenate([shapely.get_coordinates(shapely.get_point(net.lines.geometry.values, i)) for i in (0, -1)])
    nodes = np.concatenate([net.lines["node_from"], net.lines["node_to"]])
    assert len(np.unique(ends, axis=0)) == len(np.unique(nodes))
    assert (net.lines["degree_from"].to_numpy() == deg[net.lines["node_from"]]).all()


@pytest.mark.parametrize("width", [6, 7, 10])
def test_a_ring_road_gives_t_junctions_where_the_cross_roads_meet_it(width):
    net = centrelines(road_grid(rows=(150, 250), cols=(150, 250), width=width, frame=60), GRID, UTM)
    deg = degrees(net.lines)
    assert net.lines["network"].nunique() == 1
    assert (deg == 4).sum() == 4 and (deg == 3).sum() == 8 and (deg == 1).sum() == 0
    # 4 sides of 280 px and 4 inner roads of 280 px, in metres
    assert net.lines["length_m"].sum() == pytest.approx(8 * 280 * 0.5, rel=0.03)


def test_spurs_from_bumps_on_the_road_edges_are_pruned_and_a_lone_road_is_kept():
    m = road_grid(rows=(200,), cols=(), width=10)
    for c in range(30, 380, 40):  # bumps of 4-6 px on both edges
        m[191:195, c : c + 5] = True
        m[205:211, c + 12 : c + 16] = True
    m[50:54, 300:330] = True  # a short isolated road, shorter than the spur length: never removed
    net = centrelines(m, GRID, UTM)
    bare = centrelines(m, GRID, UTM, options=CentrelineOptions(spur_m=0))
    assert (degrees(bare.lines) >= 3).sum() >= 10  # the bumps do make whiskers
    deg = degrees(net.lines)
    assert (deg >= 3).sum() == 0 and len(net.lines) == 2 and net.lines["network"].nunique() == 2
    long = net.lines.geometry.values[np.argmax(net.lines["length_m"])]
    assert np.ptp(shapely.get_coordinates(long)[:, 1]) <= 0.5  # straight along the road's middle


def test_a_short_road_that_leaves_the_raster_is_not_a_spur():
    m = road_grid(rows=(390,), cols=(200,), width=8)  # the vertical road goes on ~6 px below the crossing
    deg = degrees(centrelines(m, GRID, UTM).lines)
    assert (deg == 4).sum() == 1 and (deg == 1).sum() == 4


def test_a_gap_cut_across_a_road_is_bridged_and_a_t_gap_reaches_the_crossing_road():
    m = road_grid(rows=(100, 300), cols=(), width=8)
    m[100:, 196:204] = True  # a road south from the top road, across the bottom one
    m[240:243, 196:204] = False  # a 3 px gap across the vertical road
    m[103:108, 196:204] = False  # the vertical road stops 1-4 px short of the top road
    net = centrelines(m, GRID, UTM)
    deg = degrees(net.lines)
    assert net.bridges == 2
    assert net.lines["network"].nunique() == 1
    assert (deg >= 3).sum() == 2  # a T at the top road (bridged) and a crossing at the bottom one
    unbridged = centrelines(m, GRID, UTM, options=CentrelineOptions(bridge_m=0))
    assert unbridged.lines["network"].nunique() == 3 and unbridged.bridges == 0  # top road, piece, the rest


def test_roads_that_point_elsewhere_are_not_bridged():
    m = np.zeros((200, 200), bool)
    m[96:104, 10:100] = True  # runs east and stops
    m[108:190, 104:112] = True  # starts 4 px below its end, running south: a corner, not a gap
    net = centrelines(m, GRID, UTM)
    assert net.bridges == 0 and net.lines["network"].nunique() == 2


@pytest.mark.parametrize("strip", [3, 17, 64, 150])
def test_strips_give_the_whole_mask_s_network(strip):
    rng = np.random.default_rng(4)
    m = road_grid(size=300, rows=(40, 150, 260), cols=(60, 230), width=9, frame=None)
    yy, xx = np.mgrid[:300, :300]
    m |= np.abs(yy - 0.8 * xx - 20) < 5  # a diagonal road
    m &= rng.random(m.shape) > 0.02  # pepper the mask with holes
    whole = centrelines(m, GRID, UTM)
    cut = centrelines(m, GRID, UTM, options=CentrelineOptions(strip_rows=strip, halo=8))
    assert len(cut.lines) == len(whole.lines)
    assert cut.summary()["junctions"] == whole.summary()["junctions"] and cut.summary()["ends"] == whole.summary()["ends"]
    assert cut.lines["length_m"].sum() == pytest.approx(whole.lines["length_m"].sum(), rel=0.005)


def test_lengths_are_metres_on_the_ellipsoid_for_a_geographic_grid():
    m = np.zeros((100, 1300), bool)
    m[46:54, :] = True
    grid = from_origin(-115.17, 36.24, 2.7e-6, 2.7e-6)  # SpaceNet Las Vegas: ~0.24 x 0.30 m pixels
    net = centrelines(m, grid, "EPSG:4326")
    (line,) = net.lines.geometry.values
    xy = shapely.get_coordinates(line)
    truth = Geod(ellps="WGS84").line_length(xy[:, 0], xy[:, 1])
    assert net.lines["length_m"].iloc[0] == pytest.approx(truth, rel=1e-9)
    assert 300 < truth < 320  # 1300 px of 2.7e-6 degrees of longitude at 36 N
    assert line_length_m([line], "EPSG:4326")[0] == pytest.approx(truth)


def test_road_metrics_by_length():
    ref = gpd.GeoSeries([shapely.LineString([(0, 0), (100, 0)]), shapely.LineString([(0, 50), (100, 50)])], crs=UTM)
    pred = gpd.GeoSeries([shapely.LineString([(0, 1), (100, 1)]),  # follows the first road, 1 m off
                          shapely.LineString([(0, 20), (30, 20)])], crs=UTM)  # nowhere near a road
    m = road_metrics(pred, ref, 3)
    assert m.completeness == pytest.approx(0.5)
    assert m.correctness == pytest.approx(100 / 130)
    assert m.quality == pytest.approx(100 / (130 + 100))
    assert road_metrics(ref, ref, 3).quality == pytest.approx(1)
    assert road_metrics(pred, ref, 0.5).completeness == pytest.approx(0)  # 1 m off is outside 0.5 m
    # a mask gives its centre-lines first
    mask = road_grid(rows=(200,), cols=(), width=8)
    line = gpd.GeoSeries([shapely.LineString([(500000, 4999900), (500200, 4999900)])], crs=UTM)
    got = road_metrics(mask, line, 3, transform=GRID, crs=UTM)
    assert got.completeness > 0.98 and got.correctness > 0.99
    with pytest.raises(InputError, match="transform"):
        road_metrics(mask, line, 3)
    with pytest.raises(InputError, match="buffer"):
        road_metrics(pred, ref, 0)


def test_vectorize_writes_a_styled_centre_line_layer(tmp_path):
    from geoseg.cli import cli

    classes = np.zeros((300, 300), np.uint8)
    classes[road_grid(size=300, rows=(100, 200), cols=(150,), width=8)] = 2
    classes[20:40, 20:40] = 1
    path = write_raster(tmp_path / "c.tif", classes[None])
    out = tmp_path / "o.gpkg"
    result = CliRunner().invoke(cli, ["vectorize", str(path), "-o", str(out), "--classes", "bg,building,road",
                                      "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = gpd.read_file(out, layer="road_centerline")
    assert set(lines.geom_type) == {"LineString"} and (lines["length_m"] > 0).all()
    assert (degrees(lines) == 4).sum() == 2 and (lines["class_name"] == "road").all()
    with sqlite3.connect(out) as db:
        styles = dict(db.execute("SELECT f_table_name, styleQML FROM layer_styles").fetchall())
        contents = {r[0] for r in db.execute("SELECT table_name FROM gpkg_contents")}
    assert "road_centerline" in contents and "SimpleLine" in styles["road_centerline"]
    def colours(qml):  # the colours a style draws with
        return {o.get("value").rsplit(",", 1)[0] for o in ET.fromstring(qml).iter("Option")
                if o.get("name") in ("color", "line_color")}

    # the lines are not drawn in the road polygons' colour, so they show on them
    assert colours(styles["road_centerline"]).isdisjoint(colours(styles["road"]))
    assert sorted(styles) == ["building", "road", "road_centerline"]
    assert CliRunner().invoke(cli, ["vectorize", str(path), "-o", str(out), "--classes", "bg,building,road",
                                    "--overwrite", "--no-centerlines"]).exit_code == 0
    assert "road_centerline" not in set(gpd.list_layers(out)["name"])
    bad = CliRunner().invoke(cli, ["vectorize", str(path), "-o", str(tmp_path / "x.gpkg"), "--centerlines"])
    assert bad.exit_code == 1 and "road" in bad.output


def test_the_skeleton_of_spacenet_roads_follows_their_centre_lines():
    """SpaceNet 3 Las Vegas chip 0 (1300 x 1300 px, 0.3 m, EPSG:4326): its labelled centre-lines
    buffered into an 8 m road mask; the centre-lines of that mask are within 3 m of the labels."""
    folder = shared("spacenet", "vegas_sn3_roads_rgb")
    with rasterio.open(folder / "RGB-PanSharpen_AOI_2_Vegas_img0.tif") as ds:
        transform, crs, shape = ds.transform, ds.crs, (ds.height, ds.width)
    ref = gpd.read_file(folder / "AOI_2_Vegas_img0_roads.geojson").to_crs(crs)
    utm = ref.estimate_utm_crs()
    roads = ref.to_crs(utm).buffer(4.0).to_crs(crs)
    mask = rasterio.features.rasterize(roads.values, out_shape=shape, transform=transform).astype(bool)
    net = centrelines(mask, transform, crs)
    m = road_metrics(net.lines, ref, 3.0)
    assert m.completeness > 0.9 and m.correctness > 0.9, m  # measured: 0.96 and 0.975
    # as many junctions as the labels have (53 where their lines meet), within 15 %
    noded = shapely.get_parts(shapely.line_merge(shapely.union_all(ref.geometry.values)))
    ends = np.concatenate([shapely.get_coordinates(shapely.get_point(noded, i)) for i in (0, -1)])
    _, count = np.unique(ends, axis=0, return_counts=True)
    assert abs((degrees(net.lines) >= 3).sum() - (count >= 3).sum()) <= 0.15 * (count >= 3).sum()
    assert net.lines["network"].nunique() == 1


def test_predict_writes_centre_lines_for_a_class_the_caller_names(tmp_path):
    from geoseg.cli import cli
    from tests.testmodels import keras_onehot_bundle

    model = keras_onehot_bundle(tmp_path / "m.keras")  # classes background, class1, class2, class3
    labels = np.zeros((256, 256), np.uint8)
    labels[road_grid(size=256, rows=(60, 180), cols=(128,), width=8)] = 2
    scene = write_raster(tmp_path / "s.tif", labels[None])
    out = tmp_path / "p.gpkg"
    result = CliRunner().invoke(cli, ["predict", str(scene), "-o", str(out), "--model", str(model), "--json",
                                      "--centerlines", "--centerline-class", "class2", "--spur-m", "3"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    import json

    doc = json.loads(result.stdout)
    assert doc["centerlines"]["junctions"] == 2 and doc["centerlines"]["spur_m"] == 3
    lines = gpd.read_file(out, layer="road_centerline")
    assert (lines["class_name"] == "class2").all() and len(lines) == doc["centerlines"]["lines"]
    assert lines["length_m"].sum() == pytest.approx(doc["centerlines"]["length_m"])
    # no class named road: predict writes no centre-lines unless asked
    again = CliRunner().invoke(cli, ["predict", str(scene), "-o", str(out), "--model", str(model), "--overwrite"])
    assert again.exit_code == 0 and "road_centerline" not in set(gpd.list_layers(out)["name"])
