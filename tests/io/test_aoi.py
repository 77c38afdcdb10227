"""predict --aoi: only the area of interest is written, exactly as a run over the whole scene has it."""

from __future__ import annotations

import math
import warnings

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from click.testing import CliRunner
from rasterio.features import rasterize
from rasterio.warp import transform_geom

from geoseg.cli import cli
from geoseg.errors import InputError
from geoseg.inference.options import PredictOptions
from geoseg.workflows.predict import predict
from geoseg.io.scene import SceneReader, crop, open_scene
from geoseg.tiling.tiles import plan_tiles
from tests.conftest import shared, write_raster
from tests.testmodels import blocky_labels, numpy_bundle


class Smooth:
    """Logits that depend on where a pixel sits in its tile and on its neighbours: a crop blends
    like the whole scene only if it runs the same tiles over the same pixels."""

    def predict_on_batch(self, x):
        i = np.linspace(-1, 1, x.shape[1], dtype=np.float32)
        ramp = (i[:, None] + i[None, :])[None, ..., None]
        b = x[..., :1] / 3.0
        near = np.roll(b, 3, axis=1) + np.roll(b, -2, axis=2)  # the model looks past each pixel
        return np.concatenate([b + ramp, 1 - b - ramp + 0.3 * near, ramp * 0.3 + 0.2 * near, near - 0.5], axis=-1)


def smooth_bundle():
    bundle = numpy_bundle(classes=4)
    object.__setattr__(bundle, "model", Smooth())
    return bundle


def write_area(path, polygons, crs="EPSG:4326", scene_crs="EPSG:32633"):
    """Polygons given in the scene's CRS, written in ``crs``."""
    geoms = [shapely.geometry.shape(transform_geom(scene_crs, crs, shapely.geometry.mapping(p))) for p in polygons]
    gpd.GeoDataFrame({"name": [f"area{i}" for i in range(len(geoms))]}, geometry=geoms, crs=crs).to_file(path)
    return path


@pytest.fixture
def scene(tmp_path):
    labels = blocky_labels(140, 170, 4, np.random.default_rng(8), block=7)
    path = write_raster(tmp_path / "scene.tif", labels.astype("uint8")[None])  # 0.5 m pixels from (500000, 5000000)
    return path, labels


def run(scene, out, *, aoi=None, bundle=None, **opts):
    bundle = bundle or smooth_bundle()
    result = predict(scene, out.with_suffix(".gpkg"), raster_out=out.with_suffix(".tif"), probs_out=out.with_name(out.stem + "_p.tif"),
                     bundle=bundle, aoi=aoi, options=PredictOptions(tile_size=32, overlap=8, **opts))
    with rasterio.open(out.with_suffix(".tif")) as ds, rasterio.open(out.with_name(out.stem + "_p.tif")) as p:
        return result, ds.read(1), p.read(), ds.transform


def test_a_crop_reads_the_parents_real_pixels_past_its_edge(scene):
    path, labels = scene
    info = open_scene(path)
    part = crop(info, 10, 30, 5, 45)
    assert (part.width, part.height) == (40, 20)
    assert part.transform == info.transform * rasterio.Affine.translation(5, 10)
    with SceneReader(part) as reader:
        data, valid = reader.read(-3, 23, -2, 42)
        np.testing.assert_array_equal(data[..., 0], labels[7:33, 3:47])
        assert valid.all()  # context: real pixels of the parent
        own = reader.area(-3, 23, -2, 42)
        assert own.sum() == 20 * 40 and own[3:23, 2:42].all()
        assert reader.read_valid(-3, 23, -2, 42).sum() == 20 * 40
    twice = crop(part, 5, 10, 10, 20)  # a crop of a crop reads from the first grid
    assert twice.parent is info and (twice.row_off, twice.col_off) == (15, 15)


@pytest.mark.parametrize("polygonize", ["after", "live"])
def test_aoi_output_is_the_whole_scene_run_inside_the_area_and_nodata_outside(scene, tmp_path, polygonize):
    path, labels = scene
    x0, y0 = 500000, 5000000  # the scene's top-left corner; 0.5 m pixels
    area = shapely.Polygon([(x0 + 12.3, y0 - 8.1), (x0 + 60.7, y0 - 20.2), (x0 + 30.2, y0 - 55.6)])
    area_path = write_area(tmp_path / "area.geojson", [area])  # in EPSG:4326, reprojected by predict
    whole, full_cls, full_p, full_t = run(path, tmp_path / "whole")
    part, cls, probs, t = run(path, tmp_path / "part", aoi=area_path, polygonize=polygonize)

    # the outputs cover the area's bounding box, on the scene's own pixel grid
    r0, c0 = round((full_t.f - t.f) / 0.5), round((t.c - full_t.c) / 0.5)
    assert t == full_t * rasterio.Affine.translation(c0, r0)
    assert (r0, c0, part.height, part.width) == (16, 24, 96, 98) and cls.shape == (96, 98)
    # written where a pixel's centre is inside the area (the area back in the scene's CRS), nodata elsewhere
    back = shapely.geometry.shape(transform_geom("EPSG:4326", "EPSG:32633", gpd.read_file(area_path).geometry[0]))
    inside = rasterize([(back, 1)], out_shape=cls.shape, transform=t).astype(bool)
    np.testing.assert_array_equal(cls != 255, inside)
    # ... with the very classes and probabilities of the run over the whole scene
    window = (slice(r0, r0 + cls.shape[0]), slice(c0, c0 + cls.shape[1]))
    np.testing.assert_array_equal(cls[inside], full_cls[window][inside])
    np.testing.assert_allclose(probs[:, inside], full_p[:, window[0], window[1]][:, inside], atol=1e-6)
    assert (probs[:, ~inside] == 0).all()
    # tiles outside the area never reach the model
    assert part.tiles["skipped"] > 0 and part.tiles["run"] <= whole.tiles["run"] / 2
    assert part.aoi == str(area_path)
    # polygons stay inside the area (to the pixel: their edges follow pixel edges)
    polygons = [pyogrio.read_dataframe(tmp_path / "part.gpkg", layer=n).geometry for n in ("class1", "class2", "class3")]
    assert sum(map(len, polygons)) > 10
    for geoms in polygons:
        assert shapely.union_all(geoms.values).difference(back.buffer(0.5)).area == pytest.approx(0)
    from geoseg.io.outputs import read_run_metadata

    assert read_run_metadata(tmp_path / "part.gpkg")["aoi"].endswith("area.geojson")


def test_two_neighbouring_areas_meet_without_a_seam(scene, tmp_path):
    path, _ = scene
    x0, y0 = 500000, 5000000
    left = shapely.box(x0 + 5, y0 - 60, x0 + 41.3, y0 - 3)
    right = shapely.box(x0 + 41.3, y0 - 60, x0 + 80, y0 - 3)
    _, full_cls, _, full_t = run(path, tmp_path / "whole")
    joined = np.full_like(full_cls, 255)
    for name, box in (("left", left), ("right", right)):
        _, cls, _, t = run(path, tmp_path / name, aoi=write_area(tmp_path / f"{name}_area.gpkg", [box], crs="EPSG:32633"))
        r0, c0 = round((full_t.f - t.f) / 0.5), round((t.c - full_t.c) / 0.5)
        view = joined[r0 : r0 + cls.shape[0], c0 : c0 + cls.shape[1]]
        assert not ((view != 255) & (cls != 255)).any()  # no pixel written twice
        view[cls != 255] = cls[cls != 255]
    both = joined != 255
    assert both.sum() == round((80 - 5) / 0.5) * round((60 - 3) / 0.5)  # no pixel lost on the shared edge
    np.testing.assert_array_equal(joined[both], full_cls[both])


def test_aoi_on_a_scene_read_resampled_matches_the_whole_scene_run(tmp_path):
    labels = blocky_labels(256, 192, 4, np.random.default_rng(2), block=32)
    transform = rasterio.transform.from_origin(500000, 5000000, 0.125, 0.125)
    path = write_raster(tmp_path / "fine.tif", labels.astype("uint8")[None], transform=transform)
    area = shapely.Point(500000 + 12, 5000000 - 15).buffer(7)
    area_path = write_area(tmp_path / "a.gpkg", [area])
    bundle = numpy_bundle(gsd=0.5, gsd_range=(0.4, 0.6))
    _, full_cls, full_p, _ = run(path, tmp_path / "whole", bundle=bundle)
    part, cls, probs, t = run(path, tmp_path / "part", aoi=area_path, bundle=numpy_bundle(gsd=0.5, gsd_range=(0.4, 0.6)))
    r0, c0 = round((5000000 - t.f) / 0.125), round((t.c - 500000) / 0.125)
    inside = cls != 255
    assert inside.sum() == pytest.approx(np.pi * 7**2 / 0.125**2, rel=0.01)  # every fine pixel of the circle
    window = (slice(r0, r0 + cls.shape[0]), slice(c0, c0 + cls.shape[1]))
    np.testing.assert_array_equal(cls[inside], full_cls[window][inside])
    np.testing.assert_allclose(probs[:, inside], full_p[:, window[0], window[1]][:, inside], atol=1e-6)
    assert (part.width, part.height) == (112, 112)  # the circle's 14 m box at 0.125 m


@pytest.mark.parametrize("case, message", [
    ("elsewhere", "does not overlap scene.tif"),
    ("lines", "holds no polygons (LineString)"),
    ("no_crs", "has no CRS"),
    ("missing", "no such file"),
    ("not_vectors", "cannot be read as vectors"),
    ("tiny", "covers no pixel centre"),
])
def test_bad_areas_fail_before_the_model_with_one_line(scene, tmp_path, case, message):
    path, _ = scene
    x0, y0 = 500000, 5000000
    area = tmp_path / "area.gpkg"
    if case == "elsewhere":
        write_area(area, [shapely.box(x0 + 500, y0 - 60, x0 + 580, y0 - 3)])
    elif case == "lines":
        gpd.GeoDataFrame(geometry=[shapely.LineString([(x0, y0 - 5), (x0 + 20, y0 - 30)])], crs="EPSG:32633").to_file(area)
    elif case == "no_crs":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # pyogrio warns that the file will have no CRS
            gpd.GeoDataFrame(geometry=[shapely.box(x0 + 5, y0 - 60, x0 + 41, y0 - 3)]).to_file(area)
    elif case == "not_vectors":
        area.write_text("not a GeoPackage")
    elif case == "tiny":  # inside one pixel, away from its centre
        write_area(area, [shapely.box(x0 + 10.01, y0 - 10.2, x0 + 10.2, y0 - 10.01)], crs="EPSG:32633")
    calls = []
    bundle = numpy_bundle(classes=4)
    object.__setattr__(bundle.model, "predict_on_batch", lambda x: calls.append(x) or np.zeros(x.shape[:3] + (4,)))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        predict(path, tmp_path / "o.gpkg", raster_out=tmp_path / "o_classes.tif", bundle=bundle, aoi=area)
    assert not calls and sorted(p.name for p in tmp_path.iterdir()) == before
    result = CliRunner().invoke(cli, ["predict", str(path), "-o", str(tmp_path / "o.gpkg"), "--aoi", str(area)])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


def test_tiles_of_a_window_are_the_scenes_tiles_that_touch_it():
    whole = plan_tiles(300, 200, tile_size=64, overlap=16)
    part = plan_tiles(300, 200, tile_size=64, overlap=16, window=(70, 150, 30, 199))
    touching = [t for t in whole if t.row < 150 and t.row + 64 > 70 and t.col < 199 and t.col + 64 > 30]
    assert [(t.row - 70, t.col - 30) for t in touching] == [(t.row, t.col) for t in part]
    # the clipped cores still partition the window
    owner = np.zeros((80, 169), int)
    for t in part:
        r0, r1, c0, c1 = t.core
        owner[r0:r1, c0:c1] += 1
    assert (owner == 1).all()


def test_aoi_on_a_real_drone_block_with_the_default_model(tmp_path):
    """Real imagery (7.5 cm, read at the model's 0.3 m), the bundled model, an area in another CRS."""
    scene = shared("buildings-oam-train", "mosaics", "2-kampala_ug", "kampala_ug_block1_z21_rgb.tif")
    with rasterio.open(scene) as ds:
        b = ds.bounds
        cx, cy = (b.left + b.right) / 2, (b.bottom + b.top) / 2
        diamond = shapely.Polygon([(cx - 30, cy), (cx, cy + 25), (cx + 30, cy), (cx, cy - 25)])
        crs = ds.crs.to_string()
    area = write_area(tmp_path / "area.geojson", [diamond], scene_crs=crs)
    for name, aoi in (("whole", None), ("part", area)):
        result = CliRunner().invoke(cli, ["predict", str(scene), "-o", str(tmp_path / f"{name}.gpkg"), "--raster-out",
                                          str(tmp_path / f"{name}.tif")] + (["--aoi", str(aoi)] if aoi else []))
        assert result.exit_code == 0, result.output
    with rasterio.open(tmp_path / "whole.tif") as w, rasterio.open(tmp_path / "part.tif") as p:
        window = rasterio.windows.from_bounds(*p.bounds, w.transform).round_offsets().round_lengths()
        full, cls = w.read(1, window=window), p.read(1)
    inside = cls != 255
    assert 0.4 < inside.mean() < 0.6  # a diamond fills half its box
    assert (cls[inside] == 1).mean() > 0.2  # Kampala block 1 is dense: buildings inside the area
    np.testing.assert_array_equal(cls[inside], full[inside])


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
@pytest.mark.parametrize("georeferenced", [True, False])
def test_evaluate_scores_only_inside_the_area(scene, tmp_path, georeferenced):
    """Labels complete only inside an area (as OpenStreetMap often is): outside it they are wrong."""
    from geoseg.workflows.evaluate import evaluate

    path, labels = scene
    x0, y0 = 500000, 5000000
    box = shapely.box(x0 + 10, y0 - 50, x0 + 45, y0 - 12)  # pixels: rows 24-100, columns 20-90
    truth = np.where(np.arange(170)[None, :] % 2 == 0, 3, labels).astype("uint8")  # half the columns wrong
    truth[24:100, 20:90] = labels[24:100, 20:90]
    kw = {} if georeferenced else {"crs": None, "transform": rasterio.Affine.identity()}
    labels_path = write_raster(tmp_path / "truth.tif", truth[None], **kw)
    area = write_area(tmp_path / "area.geojson", [box])
    opts = PredictOptions(tile_size=32, overlap=8)
    whole = evaluate(path, labels_path, bundle=numpy_bundle(classes=4), options=opts, road_buffer_m=0)
    part = evaluate(path, labels_path, bundle=numpy_bundle(classes=4), options=opts, road_buffer_m=0, aoi=area)
    assert whole.mean_iou < 0.9
    assert part.pixels_scored == 76 * 70 and part.mean_iou == pytest.approx(1.0) and part.accuracy == 1.0
    assert all(s.object_f1 in (None, 1.0) or math.isnan(s.object_f1) for s in part.classes.values())


def test_reference_road_lines_are_clipped_to_the_area(scene, tmp_path):
    from geoseg.io.aoi import restrict
    from geoseg.workflows.evaluate import reference_road_lines

    path, _ = scene
    x0, y0 = 500000, 5000000
    lines = tmp_path / "roads.gpkg"
    gpd.GeoDataFrame({"class": ["road", "road"]}, geometry=[
        shapely.LineString([(x0 + 1, y0 - 30), (x0 + 84, y0 - 30)]),  # 83 m across the scene
        shapely.LineString([(x0 + 70, y0 - 2), (x0 + 70, y0 - 68)]),  # outside the area
    ], crs="EPSG:32633").to_file(lines)
    info = restrict(open_scene(path), write_area(tmp_path / "area.gpkg", [shapely.box(x0 + 10, y0 - 50, x0 + 45, y0 - 12)]))
    got = reference_road_lines(lines, info, class_names=["background", "road"], road_id=1)
    assert got.length.sum() == pytest.approx(35, abs=1e-6)


def test_change_reports_only_inside_the_area_what_the_whole_run_reports(tmp_path):
    """Class rasters of two dates: inside the area the codes equal those of a run without it."""
    from geoseg.workflows.change import CODE_NODATA
    from geoseg.workflows.change import change as run_change

    rng = np.random.default_rng(3)
    before = blocky_labels(120, 140, 3, rng, block=6)
    after = np.where(blocky_labels(120, 140, 2, rng, block=9) == 1, (before + 1) % 3, before)  # a third changes
    names = ("background", "building", "road")
    paths = []
    for name, ids in (("before", before), ("after", after)):
        p = write_raster(tmp_path / f"{name}.tif", ids.astype("uint8")[None], nodata=255)
        with rasterio.open(p, "r+") as ds:
            ds.update_tags(class_names=",".join(names))
        paths.append(p)
    x0, y0 = 500000, 5000000
    area = shapely.Polygon([(x0 + 8, y0 - 6), (x0 + 52, y0 - 14), (x0 + 40, y0 - 50), (x0 + 12, y0 - 40)])
    area_path = write_area(tmp_path / "area.geojson", [area])
    whole = run_change(*paths, tmp_path / "whole.gpkg", raster_out=tmp_path / "whole.tif")
    part = run_change(*paths, tmp_path / "part.gpkg", raster_out=tmp_path / "part.tif", aoi=area_path)
    with rasterio.open(tmp_path / "whole.tif") as w, rasterio.open(tmp_path / "part.tif") as p:
        window = rasterio.windows.from_bounds(*p.bounds, w.transform).round_offsets().round_lengths()
        full, codes, t = w.read(1, window=window), p.read(1), p.transform
    back = shapely.geometry.shape(transform_geom("EPSG:4326", "EPSG:32633", gpd.read_file(area_path).geometry[0]))
    inside = rasterize([(back, 1)], out_shape=codes.shape, transform=t).astype(bool)
    np.testing.assert_array_equal(codes != CODE_NODATA, inside)
    np.testing.assert_array_equal(codes[inside], full[inside])  # the tolerance saw the same neighbours
    assert part.pixels["compared"] == inside.sum() < whole.pixels["compared"] / 2
    assert 0 < part.pixels["changed"] == int(((codes != 0) & inside).sum())
    assert part.aoi == str(area_path)
    assert sum(part.gained_m2.values()) < sum(whole.gained_m2.values())


def test_change_of_two_scenes_segments_only_the_area(tmp_path):
    from geoseg.workflows.change import change as run_change

    rng = np.random.default_rng(4)
    scenes = []
    for name in ("before", "after"):
        ids = blocky_labels(200, 260, 4, rng, block=8)
        scenes.append(write_raster(tmp_path / f"{name}.tif", ids.astype("uint8")[None]))
    x0, y0 = 500000, 5000000
    area_path = write_area(tmp_path / "area.gpkg", [shapely.box(x0 + 5, y0 - 20, x0 + 25, y0 - 5)])
    calls = []

    class Counting(type(numpy_bundle().model)):
        def predict_on_batch(self, x):
            calls.append(len(x))
            return super().predict_on_batch(x)

    bundle = numpy_bundle(classes=4)
    object.__setattr__(bundle, "model", Counting(4))
    whole = run_change(*scenes, tmp_path / "whole.gpkg", bundle=bundle,
                       predict_options=PredictOptions(tile_size=32, overlap=8))
    n_whole, calls[:] = len(calls), []
    part = run_change(*scenes, tmp_path / "part.gpkg", bundle=bundle, aoi=area_path,
                      predict_options=PredictOptions(tile_size=32, overlap=8))
    assert len(calls) < n_whole / 4  # only the tiles under the area (and its rim)
    assert part.pixels["compared"] == 40 * 30 and whole.pixels["compared"] == 200 * 260
    result = CliRunner().invoke(cli, ["change", *map(str, scenes), "-o", str(tmp_path / "x.gpkg"), "--aoi",
                                      str(write_area(tmp_path / "far.gpkg", [shapely.box(x0 + 900, y0 - 20, x0 + 925, y0 - 5)]))])
    assert result.exit_code == 1 and "does not overlap" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_batch_areas_work_inside_their_polygons_and_rerun_when_those_change(tmp_path, monkeypatch):
    from geoseg import batch
    from geoseg.batch import load_manifest, plan, run_batch

    monkeypatch.setattr(batch, "_BUNDLES", {})  # this test's model stays out of the process-wide cache
    from tests.test_batch import write_manifest
    from tests.testmodels import small_cnn_bundle

    model = small_cnn_bundle(tmp_path / "cnn.keras", bands=3, classes=3, mean=[120] * 3, std=[40] * 3, seed=3)
    area = write_area(tmp_path / "town.gpkg", [shapely.box(600100, 5199600, 600300, 5199900)],
                      crs="EPSG:32614", scene_crs="EPSG:32614")
    manifest = write_manifest(tmp_path, model, naip=False, extra='[areas.town]\naoi = "town.gpkg"\n')
    loaded = load_manifest(manifest)
    assert loaded.aois == {"town": area}
    report = run_batch(loaded)
    assert report.ok and report.counts["done"] == 3
    out = tmp_path / "out" / "town"
    for date in ("2021-05-01", "2022-05-01"):
        with rasterio.open(out / date / "classes.tif") as ds:
            assert (ds.width, ds.height) == (100, 150) and ds.transform.c == 600100 and ds.transform.f == 5199900
    with rasterio.open(out / "changes" / "2021-05-01_2022-05-01" / "change.tif") as ds:
        codes = ds.read(1)
        left, bottom, right, top = ds.bounds
    assert 600100 - 10 <= left and right <= 600300 + 10 and 5199600 - 10 <= bottom and top <= 5199900 + 10
    assert (codes != 255).sum() == 100 * 150
    # unchanged: every job is current; moved polygons: every job of the area runs again
    assert run_batch(load_manifest(manifest)).counts["current"] == 3
    keys = [j.key for j in plan(load_manifest(manifest))]
    write_area(area, [shapely.box(600100, 5199600, 600310, 5199900)], crs="EPSG:32614", scene_crs="EPSG:32614")
    assert all(a != b for a, b in zip(keys, [j.key for j in plan(load_manifest(manifest))]))


@pytest.mark.parametrize("extra, message", [
    ('[areas.village]\naoi = "town.gpkg"\n', "no scene has area 'village'"),
    ('[areas.town]\naoi = "missing.gpkg"\n', "does not exist"),
    ('[areas.town]\npolygons = "town.gpkg"\n', "an area has one key, aoi"),
])
def test_batch_area_mistakes_are_one_line_errors(tmp_path, extra, message):
    from geoseg.batch import load_manifest
    from tests.test_batch import write_manifest

    write_area(tmp_path / "town.gpkg", [shapely.box(600100, 5199600, 600300, 5199900)], crs="EPSG:32614",
               scene_crs="EPSG:32614")
    with pytest.raises(InputError, match=message):
        load_manifest(write_manifest(tmp_path, tmp_path / "model.keras", naip=False, extra=extra))


def test_training_counts_labels_only_inside_the_area(tmp_path):
    """A config's aoi (relative to it, another CRS) and a dataset's own: outside, labels are ignored."""
    import json
    import os

    from geoseg.training import load_scene, read_config
    from tests.training.test_training import ORIGIN, make_scene

    a = make_scene(tmp_path, "a", 0, size=96)
    b = make_scene(tmp_path, "b", 1, size=96)
    x0, y0 = ORIGIN
    half = write_area(tmp_path / "half.geojson", [shapely.box(x0, y0 - 48, x0 + 24, y0)])  # the left half
    quarter = write_area(tmp_path / "quarter.gpkg", [shapely.box(x0, y0 - 24, x0 + 24, y0)], crs="EPSG:32633")
    scene = load_scene(*a, class_names=["background", "building"], aoi=half)
    assert (scene.labels[:, :48] != 255).all() and (scene.labels[:, 48:] == 255).all()
    assert scene.image[:, 48:].any()  # the pixels outside stay, as context

    folder = tmp_path / "cfg"
    folder.mkdir()
    rel = lambda p: os.path.relpath(p, folder)  # noqa: E731
    (folder / "run.toml").write_text(
        f'output = "m.keras"\nimages = ["{rel(a[0])}"]\nlabels = ["{rel(a[1])}"]\naoi = "{rel(half)}"\n'
        f'val_fraction = 0\nchip_size = 32\nchip_stride = 16\nmin_labelled = 0.5\nwidth = 4\ndepth = 2\nepochs = 1\n'
        f'steps_per_epoch = 1\n[[datasets]]\nimages = ["{rel(b[0])}"]\nlabels = ["{rel(b[1])}"]\naoi = "{rel(quarter)}"\n')
    assert os.path.samefile(read_config(folder / "run.toml")["aoi"], half)
    result = CliRunner().invoke(cli, ["train", "--config", str(folder / "run.toml"), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["pixels"]["train"] == 96 * 48 + 48 * 48  # a: its left half; b: its top-left quarter
    # chips (32 px, stride 16: starts 0-64) need half their pixels labelled: on a, the 5 rows of chips
    # starting in columns 0, 16, 32; on b, the 3 x 3 starting in rows and columns 0-32, less (32, 32)
    assert doc["chips"]["train"] == 5 * 3 + 3 * 3 - 1

    far = write_area(tmp_path / "far.geojson", [shapely.box(x0 + 900, y0 - 48, x0 + 924, y0)])
    result = CliRunner().invoke(cli, ["train", "--images", str(a[0]), "--labels", str(a[1]), "--aoi", str(far),
                                      "-o", str(tmp_path / "x.keras"), "--epochs", "1"])
    assert result.exit_code == 1 and "inside --aoi far.geojson" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
