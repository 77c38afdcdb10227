"""No seams on real imagery: a random-weight U-Net gives nearly the same classes with two tilings."""

import numpy as np
import pytest
import rasterio

from geoseg.models.bundle import load_bundle
from geoseg.inference.options import PredictOptions
from geoseg.workflows.predict import predict
from tests.conftest import shared
from tests.testmodels import random_unet_bundle


@pytest.fixture(scope="module")
def kampala_and_model(tmp_path_factory):
    scene = shared("buildings-oam-train", "mosaics", "2-kampala_ug", "kampala_ug_block1_z21_rgb.tif")
    with rasterio.open(scene) as ds:
        sample = ds.read(out_shape=(3, 128, 128)).reshape(3, -1).astype(float)
    path = random_unet_bundle(tmp_path_factory.mktemp("m") / "u.keras", bands=3, classes=4, width=8, depth=3,
                              mean=sample.mean(1), std=sample.std(1) + 1e-6, seed=3)
    return scene, load_bundle(path)


def classes(tmp_path, scene, bundle, tile, overlap, blend):
    out = tmp_path / f"{tile}_{overlap}_{blend}.tif"
    predict(scene, out.with_suffix(".gpkg"), raster_out=out, bundle=bundle,
            options=PredictOptions(tile_size=tile, overlap=overlap, blend=blend, batch_size=4))
    with rasterio.open(out) as ds:
        return ds.read(1)


def test_default_blending_hides_tile_edges_on_a_real_scene(tmp_path, kampala_and_model):
    scene, bundle = kampala_and_model
    agree = {}
    for blend, (a, b) in {"cosine": ((128, 32), (256, 64)), "mean": ((128, 32), (256, 64)),
                          "none": ((128, 0), (256, 0))}.items():
        kind = "mean" if blend == "none" else blend
        x = classes(tmp_path, scene, bundle, *a, kind)
        y = classes(tmp_path, scene, bundle, *b, kind)
        valid = (x != 255) & (y != 255)
        agree[blend] = (x[valid] == y[valid]).mean()
    assert agree["cosine"] >= 0.995, agree
    assert agree["cosine"] > agree["mean"] and agree["cosine"] > agree["none"], agree
