"""Shared fixtures: tiny generated georeferenced rasters, and where the real data lives."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def write_raster(
    path,
    data: np.ndarray,
    *,
    crs="EPSG:32633",
    transform=None,
    nodata=None,
    mask: np.ndarray | None = None,
    alpha: np.ndarray | None = None,
    tiled: bool = True,
    **creation,
) -> Path:
    """Write ``data`` (bands, rows, cols) as a GeoTIFF; ``mask`` becomes an internal mask, ``alpha`` an alpha band."""
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    count, h, w = data.shape
    profile = dict(
        driver="GTiff", width=w, height=h, count=count + (alpha is not None), dtype=data.dtype,
        crs=crs, transform=transform if transform is not None else from_origin(500000, 5000000, 0.5, 0.5),
        nodata=nodata,
    )
    if tiled and h >= 16 and w >= 16:
        profile.update(tiled=True, blockxsize=16, blockysize=16)
    if alpha is not None:
        profile["photometric"] = "RGB" if count == 3 else "MINISBLACK"
    profile.update(creation)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
        with rasterio.open(path, "w", **profile) as ds:
            ds.write(data, indexes=list(range(1, count + 1)))
            if alpha is not None:
                ds.write(alpha.astype(data.dtype), count + 1)
                ci = list(ds.colorinterp)
                ci[-1] = rasterio.enums.ColorInterp.alpha
                ds.colorinterp = ci
            if mask is not None:
                ds.write_mask(np.where(mask, 255, 0).astype(np.uint8))
    return Path(path)


@pytest.fixture
def raster(tmp_path):
    """Factory: ``raster(data, name="scene.tif", **write_raster options)``."""
    def make(data, name="scene.tif", **kw):
        return write_raster(tmp_path / name, data, **kw)
    return make


def shared(*parts: str) -> Path:
    """A path in ../shared/data, or skip the test with the reason when it is absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data {p} is not present (../shared/data beside the repository)")
    return p
