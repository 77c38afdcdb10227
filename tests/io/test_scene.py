"""Scene reading: nodata in all its forms, boundless windows, GSD in metres, clear refusals."""

import math

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.transform import from_origin

from geoseg.errors import InputError
from geoseg.io.scene import SceneReader, open_scene
from tests.conftest import shared


def rgb(h=40, w=50, dtype="uint8", seed=0):
    return np.random.default_rng(seed).integers(1, 200, size=(3, h, w)).astype(dtype)


def read_all(info):
    with SceneReader(info) as r:
        return r.read(0, info.height, 0, info.width)


def test_boundless_window_pads_and_marks_outside_invalid(raster):
    data = rgb()
    info = open_scene(raster(data))
    with SceneReader(info) as r:
        px, valid = r.read(-5, 20, 40, 70)
    assert px.shape == (25, 30, 3) and valid.shape == (25, 30)
    np.testing.assert_array_equal(px[5:, :10], np.moveaxis(data[:, 0:20, 40:50], 0, -1))
    assert valid[5:, :10].all() and not valid[:5].any() and not valid[:, 10:].any()
    assert (px[:5] == 0).all()


def test_window_entirely_outside_is_all_invalid(raster):
    info = open_scene(raster(rgb()))
    with SceneReader(info) as r:
        px, valid = r.read(100, 110, 100, 120)
    assert not valid.any() and (px == 0).all()


def test_nodata_value_marks_pixels_where_every_band_is_nodata(raster):
    data = rgb()
    data[:, 0, 0] = 0
    data[0, 1, 1] = 0  # one band only: still a valid pixel
    _, valid = read_all(open_scene(raster(data, nodata=0)))
    assert not valid[0, 0] and valid[1, 1] and valid.sum() == valid.size - 1


def test_nan_nodata_and_nonfinite_floats_are_invalid(raster):
    data = rgb(dtype="float32")
    data[:, 2, 3] = np.nan
    data[1, 4, 4] = np.inf
    info = open_scene(raster(data, nodata=float("nan")))
    px, valid = read_all(info)
    assert not valid[2, 3] and not valid[4, 4] and valid.sum() == valid.size - 2
    assert np.isfinite(px).all()


def test_internal_mask_and_alpha_band(raster):
    data = rgb()
    mask = np.ones(data.shape[1:], bool)
    mask[10:20, 5:15] = False
    info = open_scene(raster(data, mask=mask, name="masked.tif"))
    assert info.mask_kind == "mask"
    np.testing.assert_array_equal(read_all(info)[1], mask)

    info = open_scene(raster(data, alpha=np.where(mask, 255, 0), name="alpha.tif"))
    assert info.bands == (1, 2, 3) and info.alpha_band == 4
    px, valid = read_all(info)
    assert px.shape[-1] == 3
    np.testing.assert_array_equal(valid, mask)


def test_alpha_band_and_internal_mask_read_resampled(raster):
    """Reading at another GSD warps the scene: an alpha band is the warped VRT's alpha (GDAL refused
    a second one), an internal mask becomes one."""
    from geoseg.io.scene import at_gsd

    data = rgb()
    mask = np.ones(data.shape[1:], bool)
    mask[:, :10] = False  # the left columns are invalid
    for kind in ("alpha", "mask"):
        path = raster(data, name=f"{kind}.tif", **({"alpha": np.where(mask, 255, 0)} if kind == "alpha" else {"mask": mask}))
        info = open_scene(path)
        coarse = at_gsd(info, info.gsd * 2)
        px, valid = read_all(coarse)
        assert px.shape[-1] == 3 and px.shape[:2] == (coarse.height, coarse.width)
        assert not valid[:, :4].any() and valid[:, 6:].all(), kind


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "float32"])
def test_dtypes_read_unchanged(raster, dtype):
    data = rgb(dtype=dtype)
    px, _ = read_all(open_scene(raster(data)))
    assert px.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(px, np.moveaxis(data, 0, -1))


def test_gsd_in_metres_for_projected_geographic_and_web_mercator(raster):
    assert open_scene(raster(rgb(), name="utm.tif")).gsd == pytest.approx(0.5, rel=1e-3)
    # 0.3 m at the equator is about 2.7e-6 degrees
    deg = 0.3 / 111320
    info = open_scene(raster(rgb(), crs="EPSG:4326", transform=from_origin(32.58, 0.35, deg, deg), name="geo.tif"))
    assert info.gsd == pytest.approx(0.3, rel=0.01)
    # Web Mercator at 60 degrees north: nominal 1 m pixels are 0.5 m on the ground
    y60 = 8399737.89
    info = open_scene(raster(rgb(), crs="EPSG:3857", transform=from_origin(0, y60, 1.0, 1.0), name="merc.tif"))
    assert info.gsd == pytest.approx(0.5, rel=0.01)


def test_missing_crs_names_assume_crs_which_then_works(raster):
    path = raster(rgb(), crs=None)
    with pytest.raises(InputError, match="--assume-crs"):
        open_scene(path)
    assert open_scene(path, assume_crs="EPSG:32633").crs.to_epsg() == 32633


def test_rotated_transform_is_refused(raster):
    t = Affine.rotation(10) * Affine.scale(0.5, -0.5)
    t = Affine.translation(500000, 5000000) * t
    with pytest.raises(InputError, match="rotated or skewed"):
        open_scene(raster(rgb(), transform=t))


@pytest.mark.parametrize("content, match", [(None, "no such file"), (b"", "empty file"), (b"hello world" * 10, "not a raster")])
def test_bad_files(tmp_path, content, match):
    path = tmp_path / "scene.tif"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=match):
        open_scene(path)
    with pytest.raises(InputError, match="directory"):
        open_scene(tmp_path)


def test_complex_data_is_refused(raster):
    with pytest.raises(InputError, match="complex"):
        open_scene(raster(np.ones((1, 20, 20), np.complex64)))


def test_band_selection(raster):
    data = rgb()
    info = open_scene(raster(data), bands=(3, 1))
    np.testing.assert_array_equal(read_all(info)[0], np.moveaxis(data[[2, 0]], 0, -1))
    with pytest.raises(InputError, match="band 5 does not exist"):
        open_scene(raster(data, name="b.tif"), bands=(5,))


def test_truncated_file_is_refused_when_opened(tmp_path, raster):
    data = np.random.default_rng(1).integers(0, 255, (3, 256, 256)).astype("uint8")
    blob = raster(data).read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(blob[: len(blob) * 2 // 3])
    with pytest.raises(InputError, match="is damaged: .* past the end of the .*truncated"):
        open_scene(cut)


def test_garbled_blocks_fail_cleanly_mid_scene(tmp_path, raster):
    """Blocks that lie inside the file but do not decompress pass the header check and fail when read."""
    data = np.random.default_rng(1).integers(0, 255, (3, 256, 256)).astype("uint8")
    blob = bytearray(raster(data, compress="deflate").read_bytes())
    start = len(blob) // 2
    blob[start:start + len(blob) // 4] = bytes(len(blob) // 4)  # zeros are not a deflate stream
    bad = tmp_path / "garbled.tif"
    bad.write_bytes(bytes(blob))
    info = open_scene(bad)  # opens fine: the header and the block table are intact
    with pytest.raises(InputError, match="truncated or corrupted"):
        read_all(info)


def test_real_scenes_open_with_true_gsd():
    kampala = shared("buildings-oam-train", "mosaics", "2-kampala_ug", "kampala_ug_block1_z21_rgb.tif")
    info = open_scene(kampala)
    assert info.crs.to_epsg() == 3857 and info.mask_kind == "mask" and len(info.bands) == 3
    assert info.gsd == pytest.approx(0.0746, rel=0.02)
    vegas = open_scene(shared("spacenet", "vegas_sn3_roads_rgb", "RGB-PanSharpen_AOI_2_Vegas_img0.tif"))
    # 2.7e-6 degrees at 36 N: 0.30 m north-south, 0.24 m east-west
    assert vegas.crs.to_epsg() == 4326 and vegas.gsd == pytest.approx(math.sqrt(0.30 * 0.243), rel=0.02)
    atlanta = open_scene(shared("spacenet", "atlanta_sn4_buildings_pan", "sample_geotiff.tif"))
    assert atlanta.gsd == pytest.approx(0.5, rel=0.02) and atlanta.dtype == "uint16"


def test_read_valid_matches_read_for_every_mask_kind(raster):
    data = rgb()
    mask = np.ones(data.shape[1:], bool)
    mask[5:15, 10:30] = False
    nodata = data.copy()
    nodata[:, 0:3, 0:4] = 0
    for info in (open_scene(raster(data, name="plain.tif")), open_scene(raster(data, mask=mask, name="m.tif")),
                 open_scene(raster(nodata, nodata=0, name="nd.tif"))):
        with SceneReader(info) as r:
            for win in ((0, 40, 0, 50), (-3, 20, 30, 60), (50, 60, 0, 10)):
                np.testing.assert_array_equal(r.read_valid(*win), r.read(*win)[1])
