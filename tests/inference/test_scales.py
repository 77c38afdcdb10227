"""Multi-scale inference (geoseg.scales): which zooms run, how they merge, and that the merged run is
exactly the merge of separate single-zoom runs, on the scene's own grid, nodata and AOI included."""

from __future__ import annotations

import dataclasses
import sqlite3

import numpy as np
import pytest
import rasterio
import shapely

from geoseg.errors import BundleError, InputError
from geoseg.models.bundle import BundleMeta
from geoseg.inference.options import PredictOptions
from geoseg.inference.scales import decide, merge_probs, scale_grids
from geoseg.workflows.predict import predict
from geoseg.io.scene import at_gsd, open_scene
from geoseg.zooms import parse_scales
from tests.conftest import write_raster
from tests.testmodels import blocky_labels, numpy_bundle

FINE = rasterio.transform.from_origin(500000, 5000000, 0.125, 0.125)


def test_max_takes_each_class_highest_probability_and_background_its_lowest():
    # two zooms, three classes (0: background), one pixel each
    stack = np.array([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7]], np.float32)[:, :, None, None]  # (zooms, classes, 1, 1)
    covered = np.ones((2, 1, 1), bool)
    merged = merge_probs(stack, covered, "max", background=(0,))[:, 0, 0]
    raw = np.array([0.1, 0.3, 0.7])  # background min, class 1 max, class 2 max
    np.testing.assert_allclose(merged, raw / raw.sum(), rtol=1e-6)
    np.testing.assert_allclose(merge_probs(stack, covered, "mean", (0,))[:, 0, 0], [0.35, 0.25, 0.4], rtol=1e-6)


def test_with_two_classes_max_is_the_highest_building_probability():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=(3, 5, 7)).astype(np.float32)  # building probability at three zooms
    stack = np.stack([1 - p, p], axis=1)
    merged = merge_probs(stack, np.ones((3, 5, 7), bool), "max", background=(0,))
    np.testing.assert_allclose(merged[1], p.max(axis=0), rtol=1e-6)
    np.testing.assert_allclose(merged.sum(axis=0), 1, rtol=1e-6)


def test_a_zoom_that_does_not_cover_a_pixel_takes_no_part_and_no_zoom_gives_zero():
    stack = np.zeros((2, 2, 1, 3), np.float32)
    stack[0, :, 0] = [[0.9, 0.9, 0.9], [0.1, 0.1, 0.1]]
    stack[1, :, 0] = [[0.3, 0.3, 0.3], [0.7, 0.7, 0.7]]
    covered = np.array([[[True, True, False]], [[True, False, False]]])
    for merge in ("max", "mean"):
        merged = merge_probs(stack, covered, merge, background=(0,))
        np.testing.assert_allclose(merged[:, 0, 1], [0.9, 0.1], rtol=1e-6)  # only zoom 0 covers it
        np.testing.assert_array_equal(merged[:, 0, 2], [0, 0])
    np.testing.assert_allclose(merge_probs(stack, covered, "mean", (0,))[:, 0, 0], [0.6, 0.4], rtol=1e-6)


def test_the_class_taken_from_merged_probabilities_follows_the_threshold():
    from geoseg.tiling.blend import decision_bias

    p = np.linspace(0.005, 0.995, 100, dtype=np.float32)[None]  # never on a threshold
    probs = np.stack([1 - p, p])
    np.testing.assert_array_equal(decide(probs, decision_bias([0.5, 0.3])), (p >= 0.3).astype(np.uint8))
    np.testing.assert_array_equal(decide(probs, None), (p > 0.5).astype(np.uint8))


def scene_at(tmp_path, gsd: float, *, name="s.tif", size=(64, 48)):
    path = write_raster(tmp_path / name, np.zeros((1, *size), np.uint8),
                        transform=rasterio.transform.from_origin(500000, 5000000, gsd, gsd))
    return open_scene(path)


@pytest.mark.parametrize("scene_gsd, zooms, expected", [
    (0.075, (1, 2), [(1, 0.3), (2, 0.15)]),  # drone imagery: the model's 0.3 m and 0.15 m
    (0.075, (1, 2, 0.5), [(1, 0.3), (0.5, 0.6), (2, 0.15)]),  # a coarser zoom always runs
    (0.2, (1, 2), [(1, 0.3), (2, 0.2)]),  # no finer than the scene's own pixels
    (0.28, (1, 2), [(1, 0.3)]),  # its own pixels are not 10 % finer than 0.3 m: left out
    (1.0, (1, 2), [(1, 0.3)]),  # 1 m satellite imagery already upsampled to 0.3 m: zoom 1 only
    (0.075, (1, 2, 2.1), [(1, 0.3), (2, 0.15)]),  # 0.143 m is within 10 % of zoom 2's grid
])
def test_which_zooms_run_and_at_what_pixel_size(tmp_path, scene_gsd, zooms, expected):
    info = scene_at(tmp_path, scene_gsd)
    work = at_gsd(info, 0.3)
    grids = scale_grids(info, work, zooms, quiet=True)
    assert [(z, round(g.gsd, 3)) for z, g in grids] == expected  # (gsd: true ground distance, UTM scale factor)
    assert grids[0][1] is work
    for _, g in grids:  # every grid covers the scene's extent exactly
        assert rasterio.transform.array_bounds(g.height, g.width, g.transform) == pytest.approx(
            rasterio.transform.array_bounds(info.height, info.width, info.transform))


def test_a_zoom_at_the_scenes_own_pixels_reads_the_scene_as_it_is(tmp_path):
    info = scene_at(tmp_path, 0.2)
    grids = scale_grids(info, at_gsd(info, 0.3), (1, 2), quiet=True)
    assert grids[1][1] is info


@pytest.mark.parametrize("text, message", [
    ("2", "include 1"), ("1,0", "positive"), ("1,-2", "positive"), ("1,1", "each zoom once"), ("1,x", "comma"),
    ("1,nan", "positive"),
])
def test_bad_zooms_are_refused_with_what_to_give(text, message):
    with pytest.raises(InputError, match=message):
        parse_scales(text)


def test_zooms_in_a_bundle_round_trip_and_bad_ones_are_refused():
    meta = numpy_bundle(gsd=0.3).meta
    zoomed = dataclasses.replace(meta, scales=[1, 2], scale_merge="max")
    assert zoomed.scales == (1.0, 2.0)
    assert BundleMeta.from_dict(zoomed.to_dict()) == zoomed
    assert BundleMeta.from_dict({k: v for k, v in meta.to_dict().items() if k not in ("scales", "scale_merge")}).scales == (1.0,)
    with pytest.raises(BundleError, match="include 1"):
        dataclasses.replace(meta, scales=(2.0,))
    with pytest.raises(BundleError, match="scale-merge"):
        dataclasses.replace(meta, scale_merge="median")


def run(tmp_path, scene, name, bundle, **options):
    out = tmp_path / f"{name}.gpkg"
    result = predict(scene, out, raster_out=tmp_path / f"{name}_c.tif", probs_out=tmp_path / f"{name}_p.tif",
                     bundle=bundle, options=PredictOptions(tile_size=32, overlap=8, **options))
    with rasterio.open(tmp_path / f"{name}_c.tif") as c, rasterio.open(tmp_path / f"{name}_p.tif") as p:
        assert c.transform == p.transform and c.crs == p.crs
        return result, c.read(1), p.read(), c.transform


@pytest.fixture
def fine_scene(tmp_path):
    """Drone-like: 0.125 m pixels, blocks of 4 classes, a nodata hole; the model works at 0.5 m."""
    labels = blocky_labels(200, 168, 4, np.random.default_rng(5), block=24)
    hole = np.zeros(labels.shape, bool)
    hole[20:70, 100:150] = True
    path = write_raster(tmp_path / "fine.tif", labels.astype("uint8")[None], transform=FINE, mask=~hole)
    return path, labels, hole


@pytest.mark.parametrize("merge", ["mean", "max"])
def test_a_multi_scale_run_is_the_merge_of_single_zoom_runs_on_the_scenes_grid(tmp_path, fine_scene, merge):
    path, labels, hole = fine_scene
    bundle = numpy_bundle(gsd=0.5, gsd_range=(0.4, 0.6))
    result, cls, probs, transform = run(tmp_path, path, "ms", bundle, scales=(1.0, 2.0), scale_merge=merge)
    assert transform == FINE and cls.shape == labels.shape
    _, _, p1, _ = run(tmp_path, path, "z1", bundle, gsd="0.5")
    _, _, p2, _ = run(tmp_path, path, "z2", bundle, gsd="0.25")
    both = np.stack([p1, p2])
    covered = both.sum(axis=1) > 0
    expected = merge_probs(both, covered, merge, background=(0,))
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    # the scene's nodata stays nodata; everything else gets a class, the most probable one here
    assert (cls[hole] == 255).all() and (probs[:, hole] == 0).all()
    assert (cls[~hole] != 255).all()
    np.testing.assert_array_equal(cls[~hole], probs.argmax(axis=0)[~hole])
    assert (cls[~hole] == labels[~hole]).mean() > 0.9
    # 50 x 42 px at 0.5 m (2 x 2 tiles) and 100 x 84 px at 0.25 m (4 x 4 tiles)
    assert result.tiles["scales"] == [1.0, 2.0] and result.tiles["total"] == 4 + 16


def test_the_run_records_its_zooms_and_the_models_default_zooms_apply(tmp_path, fine_scene):
    path, _, _ = fine_scene
    bundle = numpy_bundle(gsd=0.5, gsd_range=(0.4, 0.6))
    bundle = dataclasses.replace(bundle, meta=dataclasses.replace(bundle.meta, scales=(1.0, 2.0), scale_merge="max"))
    result, _, probs, _ = run(tmp_path, path, "d", bundle)
    _, _, given, _ = run(tmp_path, path, "g", numpy_bundle(gsd=0.5, gsd_range=(0.4, 0.6)), scales=(1.0, 2.0),
                         scale_merge="max")
    np.testing.assert_array_equal(probs, given)
    with sqlite3.connect(tmp_path / "d.gpkg") as db:
        meta = dict(db.execute("SELECT key, value FROM geoseg_run").fetchall())
    assert meta["scales"] == "1,2" and meta["scale_merge"] == "max"
    # --scales 1 turns the model's zooms off: the plain single-zoom run
    one, _, p_one, _ = run(tmp_path, path, "o", bundle, scales=(1.0,))
    _, _, plain, _ = run(tmp_path, path, "p", numpy_bundle(gsd=0.5, gsd_range=(0.4, 0.6)))
    np.testing.assert_array_equal(p_one, plain)
    assert one.tiles["total"] == 4


def test_zooms_inside_an_aoi_match_the_whole_scene_run(tmp_path, fine_scene):
    import geopandas as gpd

    path, _, _ = fine_scene
    area = shapely.Point(500000 + 9, 5000000 - 12).buffer(5)
    gpd.GeoDataFrame(geometry=[area], crs="EPSG:32633").to_file(tmp_path / "a.gpkg")
    bundle = numpy_bundle(gsd=0.5, gsd_range=(0.4, 0.6))
    _, full_cls, full_p, _ = run(tmp_path, path, "whole", bundle, scales=(1.0, 2.0))
    predict(path, tmp_path / "part.gpkg", raster_out=tmp_path / "part_c.tif", probs_out=tmp_path / "part_p.tif",
            bundle=bundle, aoi=tmp_path / "a.gpkg", options=PredictOptions(tile_size=32, overlap=8, scales=(1.0, 2.0)))
    with rasterio.open(tmp_path / "part_c.tif") as c, rasterio.open(tmp_path / "part_p.tif") as p:
        cls, probs, t = c.read(1), p.read(), c.transform
    r0, c0 = round((5000000 - t.f) / 0.125), round((t.c - 500000) / 0.125)
    inside = cls != 255
    assert inside.sum() == pytest.approx(np.pi * 5**2 / 0.125**2, rel=0.01)
    window = (slice(r0, r0 + cls.shape[0]), slice(c0, c0 + cls.shape[1]))
    np.testing.assert_array_equal(cls[inside], full_cls[window][inside])
    np.testing.assert_allclose(probs[:, inside], full_p[:, window[0], window[1]][:, inside], atol=1e-5)


def test_cli_refuses_zooms_without_1_in_one_line(tmp_path, fine_scene):
    from click.testing import CliRunner

    from geoseg.cli import cli

    path, _, _ = fine_scene
    res = CliRunner().invoke(cli, ["predict", str(path), "-o", str(tmp_path / "o.gpkg"), "--scales", "2,3"])
    assert res.exit_code == 1, res.output
    assert res.output.strip().splitlines() == ["Error: --scales 2,3: include 1 (the grid the model runs on), e.g. 1,2"]
    assert not (tmp_path / "o.gpkg").exists()


def test_change_segments_both_dates_at_the_models_zooms_and_records_them(tmp_path, fine_scene):
    from geoseg.workflows.change import change
    from geoseg.io.outputs import read_run_metadata

    path, _, _ = fine_scene
    bundle = numpy_bundle(gsd=0.5, gsd_range=(0.4, 0.6))
    bundle = dataclasses.replace(bundle, meta=dataclasses.replace(bundle.meta, scales=(1.0, 2.0), scale_merge="max"))
    result = change(path, path, tmp_path / "c.gpkg", bundle=bundle)
    assert result.model["scales"] == "1,2" and result.model["scale_merge"] == "max"
    assert all(sum(c.values()) == 0 for c in result.counts.values())  # the same scene twice: no change
    tags = read_run_metadata(tmp_path / "c.gpkg")
    assert tags["scales"] == "1,2" and tags["scale_merge"] == "max"


def test_evaluate_scores_the_merged_classes_and_names_the_zooms(tmp_path, fine_scene):
    from geoseg.workflows.evaluate import evaluate

    path, labels, hole = fine_scene
    truth = write_raster(tmp_path / "truth.tif", labels.astype("uint8")[None], transform=FINE)
    bundle = numpy_bundle(gsd=0.5, gsd_range=(0.4, 0.6))
    _, cls, _, _ = run(tmp_path, path, "ms", bundle, scales=(1.0, 2.0))
    result = evaluate(path, truth, bundle=bundle, options=PredictOptions(tile_size=32, overlap=8, scales=(1.0, 2.0)),
                      label_values="0=background,1=class1,2=class2,3=class3", objects=False)
    assert result.model["scales"] == "1,2"
    valid = ~hole
    expected = ((cls == 1) & (labels == 1) & valid).sum() / (((cls == 1) | (labels == 1)) & valid).sum()
    assert result.classes["class1"].iou == pytest.approx(expected, abs=1e-9)


def test_change_records_the_zooms_each_date_ran_not_the_models(tmp_path, fine_scene):
    from geoseg.workflows.change import change
    from geoseg.io.outputs import read_run_metadata

    path, labels, _ = fine_scene
    coarse = write_raster(tmp_path / "coarse.tif", labels[::4, ::4].astype("uint8")[None],
                          transform=rasterio.transform.from_origin(500000, 5000000, 0.5, 0.5))
    bundle = numpy_bundle(gsd=0.5, gsd_range=(0.4, 0.6))
    bundle = dataclasses.replace(bundle, meta=dataclasses.replace(bundle.meta, scales=(1.0, 2.0), scale_merge="max"))
    # at the model's own 0.5 m, zoom 2 would read finer than the pixels: both dates run zoom 1 only
    result = change(coarse, coarse, tmp_path / "c.gpkg", bundle=bundle)
    assert result.model["scales"] == "1" and "scale_merge" not in result.model
    tags = read_run_metadata(tmp_path / "c.gpkg")
    assert tags["scales"] == "1" and "scale_merge" not in tags
    # a drone date and a 0.5 m date: each is named with its own zooms
    result = change(path, coarse, tmp_path / "m.gpkg", bundle=bundle)
    assert result.model["scales"] == "before 1,2; after 1" and result.model["scale_merge"] == "max"
