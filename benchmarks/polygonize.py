"""Polygonize a large class raster: geoseg's strips against the usual whole-array approach.

    python benchmarks/polygonize.py --size 8192 [--write docs/performance.md]

The raster: ``size`` x ``size`` uint8 class ids (4 classes, 0 background), blocky random regions
(blocks of 24 px, merged where neighbours share a class: tens of thousands of regions for 8192),
0.5 m pixels in UTM, tiled DEFLATE GeoTIFF. Each run is its own process (peak RSS from
``/usr/bin/time``):

- ``geoseg vectorize`` (strips of rows, exact merging, true areas, streamed GeoPackage);
- the usual approach: the whole array read into memory, ``rasterio.features.shapes`` over it,
  ``shapely.geometry.shape(...).simplify(0)`` per polygon, areas, ``GeoDataFrame.to_file``.

Both write one GeoPackage; the polygon counts and total areas are compared.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

REPO = Path(__file__).resolve().parents[1]


def make_raster(path: Path, size: int, block: int = 24, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    n = -(-size // block)
    small = rng.integers(0, 4, size=(n, n), dtype=np.uint8)
    profile = dict(driver="GTiff", width=size, height=size, count=1, dtype="uint8", crs="EPSG:32633", nodata=255,
                   transform=from_origin(500000, 5000000, 0.5, 0.5), tiled=True, blockxsize=512, blockysize=512,
                   compress="deflate")
    with rasterio.open(path, "w", **profile) as ds:
        for r0 in range(0, size, 2048):
            rows = small[r0 // block : -(-(r0 + 2048) // block)]
            strip = np.repeat(np.repeat(rows, block, axis=0), block, axis=1)
            off = r0 - (r0 // block) * block
            ds.write(strip[off : off + min(2048, size - r0), :size], 1, window=Window(0, r0, size, min(2048, size - r0)))
    return path


def child_naive(raster: str, out: str) -> None:
    import geopandas as gpd
    import rasterio.features
    import shapely.geometry

    t0 = time.perf_counter()
    with rasterio.open(raster) as ds:
        array, transform, crs = ds.read(1), ds.transform, ds.crs
    geoms, ids = [], []
    for geom, value in rasterio.features.shapes(array, mask=(array != 0) & (array != 255), connectivity=4,
                                               transform=transform):
        geoms.append(shapely.geometry.shape(geom).simplify(0))
        ids.append(int(value))
    frame = gpd.GeoDataFrame({"class_id": ids}, geometry=geoms, crs=crs)
    frame["area_m2"] = frame.area
    frame.to_file(out, driver="GPKG", layer="polygons")
    print(json.dumps({"seconds": time.perf_counter() - t0, "polygons": len(frame), "area": float(frame["area_m2"].sum())}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--write", default=None)
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_naive(*args.child)
        return
    from report import machine, publish, timed

    geoseg = str(Path(sys.executable).with_name("geoseg"))
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        raster = make_raster(tmp / "classes.tif", args.size)
        proc, wall, rss = timed([geoseg, "-q", "vectorize", str(raster), "-o", str(tmp / "g.gpkg"), "--classes",
                                 "background,a,b,c", "--json"])
        ours = json.loads(proc.stdout)
        proc_n, wall_n, rss_n = timed([sys.executable, __file__, "--child", str(raster), str(tmp / "n.gpkg")])
        theirs = json.loads(proc_n.stdout)
    count, area = sum(ours["counts"].values()), sum(ours["area_m2"].values())
    lines = [f"## Polygonize a {args.size} x {args.size} class raster", "",
             f"Measured {machine()}, CPU only.", "",
             f"Command: `python benchmarks/polygonize.py --size {args.size}`", "",
             "| run | wall (s) | peak RSS (MiB) | polygons | area (m²) |", "|---|---|---|---|---|",
             f"| `geoseg vectorize` (strips, exact merge, true areas, streamed GeoPackage) | {wall:.1f} | {rss:.0f} | "
             f"{count} | {area:.0f} |",
             f"| whole array: `features.shapes` + per-polygon simplify + `to_file` | {wall_n:.1f} | {rss_n:.0f} | "
             f"{theirs['polygons']} | {theirs['area']:.0f} |", "",
             f"geoseg takes **{wall / wall_n:.2f}x** the time and **{rss / rss_n:.2f}x** the peak memory of the "
             f"whole-array approach (wall times include starting Python and importing the libraries)."]
    publish(lines, args.write)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
