"""Quick looks (geoseg.preview, predict --preview, change --preview): the classes over the scene,
background left out, a legend and a scale bar, at most 2048 px, streaming on a huge scene."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner
from PIL import Image
from rasterio.transform import from_origin

from geoseg.cli import cli
from geoseg.errors import InputError
from geoseg.preview import preview_shape, write_preview
from tests.conftest import REPO, write_raster
from tests.testmodels import COLORS, keras_onehot_bundle

T = from_origin(500000, 5000000, 0.5, 0.5)


def _scene_and_classes(tmp_path, size=(300, 400)):
    h, w = size
    gray = np.tile(np.linspace(20, 220, w, dtype=np.float32), (h, 1))  # a left-to-right ramp
    scene = write_raster(tmp_path / "scene.tif", np.repeat(gray[None], 3, axis=0).astype("uint8"), transform=T)
    ids = np.zeros((h, w), np.uint8)
    ids[50:150, 60:200] = 1
    ids[200:260, 250:380] = 2
    ids[:10, :10] = 255  # nodata
    classes = write_raster(tmp_path / "classes.tif", ids[None], transform=T, nodata=255)
    return scene, classes, ids


def test_preview_shape_shrinks_the_long_side_and_never_enlarges():
    assert preview_shape(30000, 10000) == (2048, 683)
    assert preview_shape(900, 900) == (900, 900)
    assert preview_shape(5000, 100, 1000) == (1000, 20)
    with pytest.raises(InputError):
        preview_shape(10, 10, 4)


def test_classes_are_drawn_over_the_scene_and_background_is_not(tmp_path):
    scene, classes, ids = _scene_and_classes(tmp_path)
    png = tmp_path / "p.png"
    info = write_preview(png, scene, classes, class_names=["background", "building", "road"],
                         colors=[(0, 0, 0), (230, 25, 75), (245, 130, 48)])
    assert info["legend"] == ["building", "road"] and (info["width"], info["height"]) == (400, 300)
    assert info["metres_per_pixel"] == pytest.approx(0.5, rel=0.01)
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    # background: the scene itself, gray (the ramp stretched), untinted
    bg = img[120:140, 220:240]
    assert (np.ptp(bg, axis=-1) <= 1).all()
    # inside a class: tinted by its colour (half opacity), its edge in the full colour
    inside = img[100, 150]
    assert inside[0] > inside[1] + 40 and inside[0] > inside[2] + 20
    assert tuple(img[50, 150]) == (230, 25, 75)
    assert tuple(img[230, 250]) == (245, 130, 48)
    # the legend box (top left) and the scale bar (bottom right) are drawn
    legend, bar = img[5:40, 5:60], img[-40:, -200:]
    assert (legend > 200).all(axis=-1).mean() > 0.5 and (legend < 40).all(axis=-1).any()  # white box, black text
    assert (bar == 0).all(axis=-1).sum() > 100  # a black bar


def test_hidden_ids_and_bad_names(tmp_path):
    scene, classes, _ = _scene_and_classes(tmp_path)
    info = write_preview(tmp_path / "p.png", scene, classes, class_names=["a", "b", "c"],
                         colors=[(0, 0, 0), (1, 2, 3), (4, 5, 6)], hidden={0, 1})
    assert info["legend"] == ["c"]
    with pytest.raises(InputError, match="PNG"):
        write_preview(tmp_path / "p.jpg", scene, classes, class_names=["a", "b", "c"], colors=[(0, 0, 0)] * 3)


def test_predict_preview_from_the_cli(tmp_path):
    model = keras_onehot_bundle(tmp_path / "onehot.keras", classes=3)
    labels = np.zeros((200, 200), np.float32)  # the legend sits top left: classes away from it
    labels[70:120, 30:120] = 1
    labels[130:180, 100:190] = 2
    scene = write_raster(tmp_path / "scene.tif", labels, transform=T)
    png = tmp_path / "look.png"
    result = CliRunner().invoke(cli, ["predict", str(scene), "-o", str(tmp_path / "o.gpkg"), "-m", str(model),
                                      "--preview", str(png), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["outputs"]["preview"] == str(png)
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert img.shape == (200, 200, 3)
    assert tuple(img[70, 70]) == COLORS[1] and tuple(img[130, 150]) == COLORS[2]  # the edges, full colour
    # a name that is not .png is refused before any work, and nothing is written
    bad = CliRunner().invoke(cli, ["predict", str(scene), "-o", str(tmp_path / "b.gpkg"), "-m", str(model),
                                   "--preview", str(tmp_path / "look.jpg")])
    assert bad.exit_code == 1 and "PNG" in bad.stderr and not (tmp_path / "b.gpkg").exists()


def test_change_preview_shows_what_appeared_and_disappeared(tmp_path):
    from geoseg.workflows.change import CHANGE_COLORS, APPEARED, DISAPPEARED

    ids0 = np.zeros((120, 160), np.uint8)
    ids0[60:100, 10:60] = 1  # disappears
    ids1 = np.zeros((120, 160), np.uint8)
    ids1[60:110, 90:150] = 1  # appears (away from the legend, top left)
    before = write_raster(tmp_path / "b.tif", ids0[None], transform=T, nodata=255)
    after = write_raster(tmp_path / "a.tif", ids1[None], transform=T, nodata=255)
    for path in (before, after):
        with rasterio.open(path, "r+") as ds:
            ds.update_tags(class_names="background,building")
    png = tmp_path / "change.png"
    result = CliRunner().invoke(cli, ["change", str(before), str(after), "-o", str(tmp_path / "c.gpkg"),
                                      "--preview", str(png), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert tuple(img[60, 120]) == tuple(CHANGE_COLORS[APPEARED])
    assert tuple(img[80, 10]) == tuple(CHANGE_COLORS[DISAPPEARED])


@pytest.mark.slow
def test_the_preview_of_a_huge_scene_keeps_memory_flat(tmp_path):
    """A 32768 x 32768 scene (sparse, so the test file is small): the preview costs about the
    picture's memory, not the scene's (1 GiB as uint8, 4 GiB as float32)."""
    code = f"""
        import resource, numpy as np, rasterio
        from rasterio.transform import from_origin
        from rasterio.windows import Window
        from geoseg.preview import write_preview
        n, d = 32768, {str(tmp_path)!r}
        prof = dict(driver="GTiff", width=n, height=n, count=1, dtype="uint8", crs="EPSG:32633",
                    transform=from_origin(500000, 5000000, 0.5, 0.5), tiled=True, blockxsize=512, blockysize=512,
                    compress="deflate", sparse_ok=True)
        with rasterio.open(d + "/scene.tif", "w", **prof) as ds:
            ds.write(np.full((1, 512, 512), 200, np.uint8), window=Window(n // 2, n // 2, 512, 512))
        with rasterio.open(d + "/cls.tif", "w", nodata=255, **prof) as ds:
            ds.write(np.ones((1, 512, 512), np.uint8), window=Window(n // 2, n // 2, 512, 512))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        info = write_preview(d + "/p.png", d + "/scene.tif", d + "/cls.tif", class_names=["bg", "b"],
                             colors=[(0, 0, 0), (255, 0, 0)])
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        print(info["width"], info["height"], info["legend"], grown)
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=REPO,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    width, height, legend, grown = out.stdout.split(maxsplit=3)
    assert (width, height) == ("2048", "2048") and "b" in legend
    assert float(grown) < 500, f"the preview grew the process by {grown} MB"
