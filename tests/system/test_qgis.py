"""The outputs open styled in real QGIS (optional: skips when no Python with QGIS's bindings is found).

Debian: ``apt install qgis python3-qgis`` gives ``/usr/bin/python3`` the bindings; set
``GEOSEG_QGIS_PYTHON`` to use another interpreter. ``tests/qgis_check.py`` does the QGIS side.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pyogrio
import pytest
from click.testing import CliRunner
from rasterio.transform import from_origin

from geoseg.cli import cli
from tests.conftest import REPO, write_raster
from tests.testmodels import COLORS, keras_onehot_bundle

CHECK = REPO / "tests" / "qgis_check.py"


def qgis_python() -> str:
    python = os.environ.get("GEOSEG_QGIS_PYTHON", "/usr/bin/python3")
    try:
        ok = subprocess.run([python, "-c", "import qgis.core"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        pytest.skip(f"no QGIS Python bindings for {python} (apt install qgis python3-qgis, or set GEOSEG_QGIS_PYTHON)")
    return python


def run_check(python: str, *args) -> dict:
    proc = subprocess.run([python, str(CHECK), *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def over_white(color, alpha=153 / 255) -> np.ndarray:
    """A fill colour drawn at the style's 60 % opacity over a white background."""
    return np.round(np.array(color) * alpha + 255 * (1 - alpha))


@pytest.mark.slow
def test_predict_outputs_open_styled_in_qgis(tmp_path):
    python = qgis_python()
    model = keras_onehot_bundle(tmp_path / "onehot.keras", classes=4)
    labels = np.zeros((192, 256), np.float32)  # three classes in blocks, on background
    labels[20:80, 20:100] = 1
    labels[100:170, 30:90] = 2
    labels[40:160, 140:230] = 3
    scene = write_raster(tmp_path / "scene.tif", labels, crs="EPSG:32633",
                         transform=from_origin(500000, 5000000, 0.5, 0.5))
    gpkg, raster = tmp_path / "out.gpkg", tmp_path / "classes.tif"
    result = CliRunner().invoke(cli, ["predict", str(scene), "-o", str(gpkg), "--raster-out", str(raster),
                                      "-m", str(model)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    layers = [name for name, geom in pyogrio.list_layers(gpkg) if geom]
    assert layers == ["class1", "class2", "class3"]

    doc = run_check(python, gpkg, "--layers", ",".join(layers), "--raster", raster, "--png", tmp_path / "map.png")
    for i, name in enumerate(layers, start=1):
        layer = doc["layers"][name]
        assert layer["valid"] and layer["features"] == 1 and layer["geometry"].endswith("Polygon")
        # the style in layer_styles was applied: geoseg's categorized renderer, the model's colour
        assert layer["renderer"] == "categorizedSymbol" and layer["attribute"] == "class_name"
        assert layer["categories"] == [{"value": name, "label": name, "color": "#{:02x}{:02x}{:02x}".format(*COLORS[i])}]
    palette = doc["raster"]["palette"]
    assert doc["raster"]["renderer"] == "paletted"
    assert [p["label"] for p in palette] == ["background", *layers]
    assert [p["color"] for p in palette] == ["#{:02x}{:02x}{:02x}".format(*c) for c in COLORS[:4]]
    assert [p["alpha"] for p in palette] == [0, 180, 180, 180]  # background transparent, classes see-through

    # the picture: each class's fill shows over the raster's paletted colours
    render = doc["render"]
    assert Path(render["png"]).stat().st_size > 0 and render["width"] == 900
    seen = np.array([[int(h[1:3], 16), int(h[3:5], 16), int(h[5:7], 16)] for h in render["colors"]])
    for i in (1, 2, 3):
        raster_px = over_white(COLORS[i], 180 / 255)  # the class raster's see-through colour over white
        expected = np.round(np.array(COLORS[i]) * 0.6 + raster_px * 0.4)  # the fill over it
        assert np.abs(seen - expected).max(axis=1).min() <= 3, (i, expected)


@pytest.mark.slow
def test_the_class_raster_is_transparent_on_background_and_see_through_on_classes(tmp_path):
    """Rendered alone in QGIS over the map's white: background pixels stay pure white (nothing is
    drawn there, so over a scene the scene shows), class pixels show the white through the class
    colour (alpha 180 of 255); so the raster overlays the imagery without restyling."""
    python = qgis_python()
    model = keras_onehot_bundle(tmp_path / "onehot.keras", classes=3)
    labels = np.zeros((128, 128), np.float32)
    labels[10:60, 10:60] = 1
    scene = write_raster(tmp_path / "scene.tif", labels, crs="EPSG:32633", transform=from_origin(500000, 5000000, 0.5, 0.5))
    gpkg, raster = tmp_path / "out.gpkg", tmp_path / "classes.tif"
    assert CliRunner().invoke(cli, ["predict", str(scene), "-o", str(gpkg), "--raster-out", str(raster),
                                    "-m", str(model)], catch_exceptions=False).exit_code == 0
    doc = run_check(python, gpkg, "--layers", "", "--raster", raster, "--png", tmp_path / "map.png", "--size", 256)
    colors = doc["render"]["colors"]
    assert max(colors, key=colors.get) == "#ffffff"  # background: transparent, the white below shows
    assert "#000000" not in colors  # the background class's black is never drawn
    seen = np.array([[int(h[1:3], 16), int(h[3:5], 16), int(h[5:7], 16)] for h in colors])
    assert np.abs(seen - over_white(COLORS[1], 180 / 255)).max(axis=1).min() <= 3


@pytest.mark.slow
def test_vector_layers_render_in_their_colours(tmp_path):
    python = qgis_python()
    model = keras_onehot_bundle(tmp_path / "onehot.keras", classes=3)
    labels = np.zeros((128, 128), np.float32)
    labels[10:60, 10:60] = 1
    labels[70:120, 60:120] = 2
    scene = write_raster(tmp_path / "scene.tif", labels)
    gpkg = tmp_path / "out.gpkg"
    result = CliRunner().invoke(cli, ["predict", str(scene), "-o", str(gpkg), "-m", str(model)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    doc = run_check(python, gpkg, "--layers", "class1,class2", "--png", tmp_path / "map.png", "--size", 400)
    seen = np.array([[int(h[1:3], 16), int(h[3:5], 16), int(h[5:7], 16)] for h in doc["render"]["colors"]])
    for i in (1, 2):
        assert np.abs(seen - over_white(COLORS[i])).max(axis=1).min() <= 3, i


@pytest.mark.slow
def test_the_gallery_script_renders_the_readme_picture_from_its_own_command(tmp_path):
    """docs/gallery.py runs the README's first command and renders its GeoPackage over the scene in
    QGIS: the picture has the scene's gray pixels and the building style's red where it found houses."""
    import sys

    from PIL import Image

    python = qgis_python()
    proc = subprocess.run([sys.executable, str(REPO / "docs" / "gallery.py"), "--only", "atlanta", "--size", "300",
                           "--images", str(tmp_path / "images"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "GEOSEG_QGIS_PYTHON": python, "QT_QPA_PLATFORM": "offscreen"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "geoseg predict sample_data/atlanta_sn4_pan.tif -o buildings.gpkg" in proc.stdout
    picture = np.asarray(Image.open(tmp_path / "images" / "qgis-atlanta-buildings.png").convert("RGB")).astype(int)
    assert picture.shape[1] == 300
    r, g, b = picture[..., 0], picture[..., 1], picture[..., 2]
    gray = (abs(r - g) < 8) & (abs(g - b) < 8)
    red = (r > g + 60) & (r > b + 40)
    assert gray.mean() > 0.8 and 0 < red.mean() < 0.1  # the scene shows through; a few houses are marked
