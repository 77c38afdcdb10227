"""polygonize, area_m2 and perimeter_m on tiny generated rasters in UTM, EPSG:4326 and EPSG:3857."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import shapely
from pyproj import CRS, Geod, Transformer
from rasterio.transform import from_origin

from geoseg.vector import polygons
from geoseg.errors import InputError
from geoseg.vector.measure import area_m2, perimeter_m
from geoseg.vector.polygons import polygonize

NAMES = ["background", "building", "road", "water"]
GEOD = Geod(ellps="WGS84")


def write_raster(path, array, *, crs="EPSG:32633", transform=None, nodata=255):
    transform = transform or from_origin(500_000, 4_000_000, 2.0, 2.0)
    with rasterio.open(
        path, "w", driver="GTiff", width=array.shape[1], height=array.shape[0], count=1,
        dtype=array.dtype.name, crs=crs, transform=transform, nodata=nodata,
        tiled=True, blockxsize=16, blockysize=16,
    ) as ds:
        ds.write(array, 1)
    return str(path)


def geodesic_area(geoms, crs) -> np.ndarray:
    to_ll = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    ll = shapely.transform(geoms, lambda xy: np.column_stack(to_ll.transform(xy[:, 0], xy[:, 1])))
    return np.array([abs(GEOD.geometry_area_perimeter(g)[0]) for g in ll])


def test_known_rectangles_give_exact_areas_in_utm(tmp_path):
    a = np.zeros((20, 30), dtype=np.uint8)
    a[2:6, 3:9] = 1  # 4 x 6 px of 2 m -> 96 m2, perimeter 40 m
    a[10:18, 10:20] = 3  # water 8 x 10 px with a 2 x 2 px road hole
    a[13:15, 14:16] = 2
    out = polygonize(write_raster(tmp_path / "c.tif", a), class_names=NAMES)

    assert list(out) == ["building", "road", "water"]
    b = out["building"]
    assert list(b.columns) == ["class_name", "class_id", "area_m2", "perimeter_m", "score", "geometry"]
    assert b.crs == CRS("EPSG:32633")
    assert len(b) == 1 and b.area_m2.iloc[0] == 96.0 and b.perimeter_m.iloc[0] == 40.0
    assert b.class_id.dtype == np.int32 and b.class_name.iloc[0] == "building"
    assert np.isnan(b.score.iloc[0])
    w = out["water"].iloc[0]
    assert w.area_m2 == (80 - 4) * 4.0
    assert w.perimeter_m == 2 * (16 + 20) + 4 * 4  # exterior + hole
    assert len(w.geometry.interiors) == 1
    assert out["road"].area_m2.tolist() == [16.0]


def test_geographic_raster_gives_geodesic_square_metres(tmp_path):
    deg = 0.3 / 111_320  # ~0.3 m pixels near the equator
    a = np.zeros((40, 50), dtype=np.uint8)
    a[5:35, 5:45] = 1
    a[10:12, 20:30] = 2
    path = write_raster(tmp_path / "c.tif", a, crs="EPSG:4326",
                        transform=from_origin(32.58, 0.31, deg, deg))
    out = polygonize(path, class_names=NAMES)
    for name in ("building", "road"):
        frame = out[name]
        truth = geodesic_area(frame.geometry.values, "EPSG:4326")
        np.testing.assert_allclose(frame.area_m2, truth, rtol=0.005)
        assert frame.area_m2.iloc[0] > 1.0  # square metres, not square degrees
    # 1200 px minus the 20 px road hole, ~0.09 m2 each
    assert out["building"].area_m2.iloc[0] == pytest.approx(1180 * 0.3 * 0.3 * 0.99997, rel=0.01)


@pytest.mark.parametrize("lat", [0.31, 60.0])
def test_web_mercator_areas_are_true_not_inflated(tmp_path, lat):
    x0, y0 = Transformer.from_crs(4326, 3857, always_xy=True).transform(32.58, lat)
    a = np.zeros((30, 30), dtype=np.uint8)
    a[5:25, 5:15] = 1  # 20 x 10 px of 0.5 m (planar, Web Mercator units)
    path = write_raster(tmp_path / "c.tif", a, crs="EPSG:3857",
                        transform=from_origin(x0, y0, 0.5, 0.5))
    frame = polygonize(path, class_names=NAMES)["building"]
    planar = 200 * 0.25
    truth = geodesic_area(frame.geometry.values, "EPSG:3857")
    np.testing.assert_allclose(frame.area_m2, truth, rtol=1e-4)
    assert frame.area_m2.iloc[0] == pytest.approx(planar * np.cos(np.radians(lat)) ** 2, rel=0.01)
    assert frame.perimeter_m.iloc[0] == pytest.approx(30 * np.cos(np.radians(lat)), rel=0.01)


def test_area_in_us_feet_crs():
    square = shapely.box(1_000_000, 200_000, 1_000_100, 200_100)  # 100 x 100 US ft
    np.testing.assert_allclose(area_m2([square], "EPSG:2263"), [929.0341], rtol=1e-6)
    np.testing.assert_allclose(perimeter_m([square], "EPSG:2263"), [121.92024], rtol=1e-6)
    assert area_m2([], "EPSG:4326").shape == (0,)
    with pytest.raises(InputError, match="CRS"):
        area_m2([square], None)


def test_diagonal_pixels_make_two_polygons(tmp_path):
    a = np.zeros((4, 4), dtype=np.uint8)
    a[1, 1] = a[2, 2] = 1
    frame = polygonize(write_raster(tmp_path / "c.tif", a), class_names=NAMES)["building"]
    assert len(frame) == 2
    assert frame.area_m2.tolist() == [4.0, 4.0]


def test_nodata_and_skipped_ids_never_become_polygons(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 4, (48, 40)).astype(np.uint8)
    a[:10, :] = 255
    a[20:30, 5:9] = 255
    out = polygonize(write_raster(tmp_path / "c.tif", a), class_names=NAMES, skip=(0, 2))
    assert list(out) == ["building", "water"]
    for cid, name in ((1, "building"), (3, "water")):
        frame = out[name]
        assert set(frame.class_id) == {cid}
        assert frame.area_m2.sum() == (a == cid).sum() * 4.0  # nodata never merged in


def test_all_geometries_valid_and_areas_partition_the_raster(tmp_path):
    rng = np.random.default_rng(7)
    a = rng.integers(0, 4, (64, 64)).astype(np.uint8)  # noisy: holes, pinches, touching rings
    out = polygonize(write_raster(tmp_path / "c.tif", a), class_names=NAMES, skip=())
    assert list(out) == NAMES
    for cid, name in enumerate(NAMES):
        geoms = out[name].geometry.values
        assert shapely.is_valid(geoms).all()
        assert set(shapely.get_type_id(geoms)) <= {3, 6}  # Polygon, MultiPolygon
        assert out[name].area_m2.sum() == pytest.approx((a == cid).sum() * 4.0)


def test_score_is_the_mean_over_each_polygon(tmp_path, monkeypatch):
    monkeypatch.setattr(polygons, "_STRIP_PIXELS", 7 * 37)  # strips of 7 rows cut polygons
    rng = np.random.default_rng(3)
    a = np.zeros((50, 37), dtype=np.uint8)
    blocks = [(1, slice(1, 20), slice(1, 10)), (1, slice(25, 49), slice(2, 6)),
              (3, slice(3, 45), slice(15, 35))]
    for cid, rows, cols in blocks:
        a[rows, cols] = cid
    a[10:20, 20:25] = 2  # a road island inside the water: water has a hole
    score = rng.integers(0, 65536, a.shape).astype(np.uint16)
    transform = from_origin(500_000, 4_000_000, 2.0, 2.0)
    class_path = write_raster(tmp_path / "c.tif", a, transform=transform)
    score_path = write_raster(tmp_path / "s.tif", score, transform=transform, nodata=None)
    rows_done = []
    out = polygonize(class_path, class_names=NAMES, score_path=score_path,
                     progress=rows_done.append)
    assert sum(rows_done) == 50 and len(rows_done) > 1

    building = out["building"].sort_values("area_m2", ascending=False)
    expected = [score[1:20, 1:10].mean() / 65535, score[25:49, 2:6].mean() / 65535]
    np.testing.assert_allclose(building.score, expected, rtol=1e-12)
    water = out["water"].score.iloc[0]
    assert water == pytest.approx(score[a == 3].mean() / 65535, rel=1e-12)
    assert out["road"].score.iloc[0] == pytest.approx(score[a == 2].mean() / 65535, rel=1e-12)


def test_score_raster_on_another_grid_is_refused(tmp_path):
    a = np.ones((8, 8), dtype=np.uint8)
    class_path = write_raster(tmp_path / "c.tif", a)
    score_path = write_raster(tmp_path / "s.tif", np.zeros((8, 9), np.uint16), nodata=None)
    with pytest.raises(InputError, match="grid"):
        polygonize(class_path, class_names=NAMES, score_path=score_path)


def test_min_area_per_class(tmp_path):
    a = np.zeros((20, 20), dtype=np.uint8)
    a[1:3, 1:3] = 1  # 16 m2
    a[5:10, 5:10] = 1  # 100 m2
    a[12:14, 12:14] = 3  # 16 m2
    path = write_raster(tmp_path / "c.tif", a)
    out = polygonize(path, class_names=NAMES, min_area_m2={"building": 20})
    assert out["building"].area_m2.tolist() == [100.0]
    assert out["water"].area_m2.tolist() == [16.0]
    out = polygonize(path, class_names=NAMES, min_area_m2=20)
    assert out["building"].area_m2.tolist() == [100.0] and len(out["water"]) == 0
    assert list(out["water"].columns) == ["class_name", "class_id", "area_m2", "perimeter_m",
                                          "score", "geometry"]
    assert out["water"].crs == CRS("EPSG:32633")
    with pytest.raises(InputError, match="forest"):
        polygonize(path, class_names=NAMES, min_area_m2={"forest": 1})


def test_unknown_class_id_is_an_input_error(tmp_path):
    a = np.full((4, 4), 7, dtype=np.uint8)
    with pytest.raises(InputError, match=r"\[7\]"):
        polygonize(write_raster(tmp_path / "c.tif", a), class_names=NAMES)


def test_non_uint8_class_raster_filters_nodata(tmp_path):
    a = np.full((6, 6), 1, dtype=np.int16)
    a[:3] = -1
    out = polygonize(write_raster(tmp_path / "c.tif", a, nodata=-1), class_names=NAMES)
    assert out["building"].area_m2.tolist() == [18 * 4.0]


def test_make_valid_keeps_polygonal_parts_only():
    bowtie = shapely.from_wkt("POLYGON ((0 0, 2 2, 2 0, 0 2, 0 0))")
    spike = shapely.from_wkt("POLYGON ((0 0, 1 1, 2 2, 0 0))")  # collapses to a line
    fixed = polygons._make_valid_polygonal(np.array([bowtie, shapely.box(0, 0, 1, 1), spike]))
    assert fixed[0].geom_type == "MultiPolygon" and fixed[0].area == pytest.approx(2.0)
    assert fixed[1].equals(shapely.box(0, 0, 1, 1))
    assert fixed[2] is None


# --- strips: the result does not depend on the strip height -----------------------------------


def canonical(layers) -> dict[str, list[tuple[bytes, float, float]]]:
    """Each class's polygons as sorted (normalized WKB, area, score), for exact comparison."""
    out = {}
    for name, frame in layers.items():
        geoms = shapely.normalize(shapely.simplify(frame.geometry.values, 0.0))
        out[name] = sorted(zip(shapely.to_wkb(geoms).tolist(), np.round(frame["area_m2"], 6).tolist(),
                               np.round(frame["score"].fillna(-1), 9).tolist()))
    return out


def reference(array: np.ndarray, transform, nodata, skip) -> dict[int, list[bytes]]:
    """The usual way: rasterio.features.shapes on the whole array, kept classes only."""
    mask = (array != nodata) & ~np.isin(array, list(skip))
    out: dict[int, list[bytes]] = {}
    for geom, value in rasterio.features.shapes(array, mask=mask, connectivity=4, transform=transform):
        g = shapely.normalize(shapely.simplify(shapely.make_valid(shapely.geometry.shape(geom)), 0.0))
        out.setdefault(int(value), []).append(shapely.to_wkb(g))
    return {k: sorted(v) for k, v in out.items()}


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
import rasterio.features  # noqa: E402
import shapely.geometry  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), classes=st.integers(2, 4), block=st.integers(1, 6),
       nodata_frac=st.sampled_from([0.0, 0.1]), seed=st.integers(0, 10**6), strip=st.integers(1, 41))
def test_strips_give_the_whole_raster_polygons(tmp_path_factory, h, w, classes, block, nodata_frac, seed, strip):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, classes, size=(-(-h // block), -(-w // block)))
    array = np.kron(small, np.ones((block, block), int))[:h, :w].astype(np.uint8)
    array[rng.random((h, w)) < nodata_frac] = 255
    scores = rng.integers(0, 65535, size=(h, w)).astype(np.uint16)
    folder = tmp_path_factory.mktemp("strips")
    path = write_raster(folder / "c.tif", array)
    score_path = write_raster(folder / "s.tif", scores, nodata=None)
    kw = dict(class_names=NAMES[:classes], score_path=score_path)
    whole = canonical(polygonize(path, strip_rows=h, **kw))
    cut = canonical(polygonize(path, strip_rows=strip, **kw))
    assert cut == whole
    # and both are what GDAL gives for the whole array at once
    ref = reference(array, from_origin(500_000, 4_000_000, 2.0, 2.0), 255, skip={0})
    assert {NAMES[k]: v for k, v in ref.items()} == {k: [g for g, _, _ in v] for k, v in whole.items() if v}


def test_a_region_cut_by_many_strips_is_one_polygon_with_its_hole_and_exact_score(tmp_path):
    a = np.zeros((30, 20), np.uint8)
    a[2:28, 2:18] = 1
    a[10:20, 8:12] = 0  # a hole spanning several strips
    a[5:25, 14:16] = 2  # a second hole, of another class
    scores = np.full(a.shape, 1000, np.uint16)
    scores[a == 1] = np.arange((a == 1).sum()) % 7 * 10000
    path = write_raster(tmp_path / "c.tif", a)
    spath = write_raster(tmp_path / "s.tif", scores, nodata=None)
    frame = polygonize(path, class_names=NAMES[:3], score_path=spath, strip_rows=3)["building"]
    assert len(frame) == 1
    geom = frame.geometry.iloc[0]
    assert geom.geom_type == "Polygon" and len(geom.interiors) == 2
    assert frame["area_m2"].iloc[0] == pytest.approx(((a == 1).sum()) * 4.0)
    assert frame["score"].iloc[0] == pytest.approx(scores[a == 1].mean() / 65535)
    # no vertex left on a strip line along a straight edge: the outline is a plain rectangle
    assert len(geom.exterior.coords) == 5


def test_diagonal_neighbours_across_a_strip_line_stay_apart(tmp_path):
    a = np.zeros((4, 4), np.uint8)
    a[1, 1] = 1
    a[2, 2] = 1  # touches the first only at a corner: two regions under 4-connectivity
    path = write_raster(tmp_path / "c.tif", a)
    for strip in (1, 2, 4):
        assert len(polygonize(path, class_names=NAMES, strip_rows=strip)["building"]) == 2


def test_iter_polygons_streams_batches_before_the_end(tmp_path):
    a = np.zeros((64, 16), np.uint8)
    a[1:3, 1:3] = 1
    a[60:62, 1:3] = 1
    path = write_raster(tmp_path / "c.tif", a)
    rows_seen = []
    batches = polygons.iter_polygons(path, class_names=NAMES, strip_rows=8, progress=rows_seen.append)
    first = next(batches)
    assert len(first.geoms) == 1 and sum(rows_seen) == 8  # the first building leaves with the first strip
    rest = list(batches)
    assert sum(len(b.geoms) for b in rest) == 1 and sum(rows_seen) == 64
