"""Polygonize and clean a large class raster: geoseg against the usual whole-array approach.

    python benchmarks/cleanup.py --size 8192 [--sieve 2] [--simplify 1] [--write docs/performance.md]

The raster: ``size`` x ``size`` uint8 class ids, 5 classes with organic outlines (the argmax of
smoothed random fields, upsampled 8x: staircase edges in every direction) plus 0.05 % single-pixel
speckles, 0.5 m pixels in UTM, tiled DEFLATE GeoTIFF. Every class is vectorized (the background
too), so the output should cover the raster. Each run is its own process (peak RSS from
``/usr/bin/time``):

- ``geoseg vectorize --skip '' --sieve S --simplify T`` (strips with a halo for the sieve,
  coverage simplification per strip, exact merge across strips, streamed GeoPackage);
- ``geoseg vectorize --skip ''`` without clean-up (the exact pixel outlines, for reference);
- the usual approach: the whole array read into memory, ``rasterio.features.sieve`` on it,
  ``rasterio.features.shapes``, ``shape(...).simplify(T)`` per polygon, ``GeoDataFrame.to_file``.

Then, in this process: polygons, vertices, invalid geometries, and the area where polygons overlap
(summed over intersecting pairs found with an STRtree) or leave a gap (the raster's area minus the
area covered once: sum of areas minus overlaps).
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
import rasterio.features
from rasterio.transform import from_origin
from rasterio.windows import Window

REPO = Path(__file__).resolve().parents[1]
PIXEL = 0.5
CLASSES = ["background", "building", "road", "vegetation", "water"]


def make_raster(path: Path, size: int, seed: int = 0, zoom: int = 8, speckle: float = 0.0005) -> Path:
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    n = size // zoom + 2
    field = ndimage.gaussian_filter(rng.normal(size=(len(CLASSES), n, n)).astype(np.float32), (0, 1.2, 1.2))
    profile = dict(driver="GTiff", width=size, height=size, count=1, dtype="uint8", crs="EPSG:32633", nodata=255,
                   transform=from_origin(500000, 5000000, PIXEL, PIXEL), tiled=True, blockxsize=512,
                   blockysize=512, compress="deflate")
    step = 1024
    with rasterio.open(path, "w", **profile) as ds:
        for r0 in range(0, size, step):
            h = min(step, size - r0)
            rows = (np.arange(r0, r0 + h) + 0.5) / zoom
            cols = (np.arange(size) + 0.5) / zoom
            rr, cc = np.meshgrid(rows, cols, indexing="ij")
            strip = np.stack([ndimage.map_coordinates(f, [rr, cc], order=1) for f in field]).argmax(0).astype(np.uint8)
            spots = rng.random(strip.shape) < speckle
            strip[spots] = rng.integers(0, len(CLASSES), int(spots.sum()))
            ds.write(strip, 1, window=Window(0, r0, size, h))
    return path


def child_naive(raster: str, out: str, sieve_px: int, tolerance: float) -> None:
    import geopandas as gpd
    import rasterio.features
    import shapely.geometry

    t0 = time.perf_counter()
    with rasterio.open(raster) as ds:
        array, transform, crs = ds.read(1), ds.transform, ds.crs
    if sieve_px > 1:
        array = rasterio.features.sieve(array, size=sieve_px, connectivity=4)
    geoms, ids = [], []
    for geom, value in rasterio.features.shapes(array, mask=array != 255, connectivity=4, transform=transform):
        geoms.append(shapely.geometry.shape(geom).simplify(tolerance, preserve_topology=True))
        ids.append(int(value))
    frame = gpd.GeoDataFrame({"class_id": ids}, geometry=geoms, crs=crs)
    frame["area_m2"] = frame.area
    frame.to_file(out, driver="GPKG", layer="polygons")
    print(json.dumps({"seconds": time.perf_counter() - t0}))


def measure(path: Path, total_area: float) -> dict:
    """Polygons, vertices, invalid geometries, overlap and gap areas of every layer of a GeoPackage."""
    import pyogrio
    import shapely

    geoms = np.concatenate([pyogrio.read_dataframe(path, layer=name).geometry.values
                            for name, kind in pyogrio.list_layers(path) if kind and "Polygon" in kind])
    tree = shapely.STRtree(geoms)
    left, right = tree.query(geoms, predicate="intersects")
    pair = left < right
    overlap = float(shapely.area(shapely.intersection(geoms[left[pair]], geoms[right[pair]])).sum())
    area = float(shapely.area(geoms).sum())
    return {"polygons": len(geoms), "vertices": int(shapely.get_num_coordinates(geoms).sum()),
            "invalid": int((~shapely.is_valid(geoms)).sum()), "overlap_m2": overlap,
            "gap_m2": total_area - (area - overlap)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--sieve", type=float, default=2.0, help="m² (0.5 m pixels: 2 m² = 8 px)")
    ap.add_argument("--simplify", type=float, default=1.0, help="metres")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--write", default=None)
    ap.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_naive(args.child[0], args.child[1], int(args.child[2]), float(args.child[3]))
        return
    from report import machine, publish, timed
    from scipy import ndimage

    geoseg = str(Path(sys.executable).with_name("geoseg"))
    sieve_px = int(np.ceil(args.sieve / PIXEL**2))
    total = args.size**2 * PIXEL**2
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        raster = make_raster(tmp / "classes.tif", args.size)
        with rasterio.open(raster) as ds:
            a = ds.read(1)
        four = ndimage.generate_binary_structure(2, 1)
        regions = sum(ndimage.label(a == c, structure=four)[1] for c in range(len(CLASSES)))
        sieved = rasterio.features.sieve(a, size=sieve_px, connectivity=4)
        regions_sieved = sum(ndimage.label(sieved == c, structure=four)[1] for c in range(len(CLASSES)))
        del a, sieved
        common = [geoseg, "-q", "vectorize", str(raster), "--classes", ",".join(CLASSES), "--skip", "", "--no-centerlines", "--json"]
        runs = {}
        proc, wall, rss = timed([*common, "-o", str(tmp / "clean.gpkg"), "--sieve", f"{args.sieve:g}",
                                 "--simplify", f"{args.simplify:g}"])
        runs["clean"] = (wall, rss, json.loads(proc.stdout)["timings_s"]["total"], measure(tmp / "clean.gpkg", total))
        proc, wall, rss = timed([*common, "-o", str(tmp / "exact.gpkg")])
        runs["exact"] = (wall, rss, json.loads(proc.stdout)["timings_s"]["total"], measure(tmp / "exact.gpkg", total))
        proc, wall, rss = timed([sys.executable, __file__, "--child", str(raster), str(tmp / "naive.gpkg"),
                                 str(sieve_px), str(args.simplify)])
        runs["naive"] = (wall, rss, json.loads(proc.stdout)["seconds"], measure(tmp / "naive.gpkg", total))
    mpx = args.size**2 / 1e6
    labels = {
        "clean": f"`geoseg vectorize --sieve {args.sieve:g} --simplify {args.simplify:g}` (strips, coverage simplify)",
        "exact": "`geoseg vectorize` without clean-up (exact pixel outlines)",
        "naive": f"whole array: `features.sieve` ({sieve_px} px) + `features.shapes` + per-polygon "
                 f"`simplify({args.simplify:g})` + `to_file`",
    }
    lines = [f"## Polygonize and clean a {args.size} x {args.size} class raster", "",
             f"Measured {machine()}, CPU only. The raster: {len(CLASSES)} classes with organic outlines plus "
             f"0.05 % speckles, {regions:,} regions ({regions_sieved:,} after a {sieve_px}-px sieve), "
             f"{PIXEL} m pixels in UTM; every class vectorized, the background too.", "",
             f"Command: `python benchmarks/cleanup.py --size {args.size} --sieve {args.sieve:g} "
             f"--simplify {args.simplify:g}`", "",
             "| run | wall (s) | in-process (s) | Mpx/s (wall) | peak RSS (MiB) | polygons | vertices | invalid | "
             "overlap (m²) | gap (m²) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, (wall, rss, inner, m) in runs.items():
        lines.append(f"| {labels[key]} | {wall:.1f} | {inner:.1f} | {mpx / wall:.1f} | {rss:.0f} | {m['polygons']:,} | "
                     f"{m['vertices']:,} | {m['invalid']} | {m['overlap_m2']:.2f} | {m['gap_m2']:.2f} |")
    print(json.dumps({k: v[3] for k, v in runs.items()}), file=sys.stderr)
    c, n = runs["clean"], runs["naive"]
    lines += ["", f"Clean-up in geoseg takes **{c[0] / n[0]:.2f}x** the wall time and **{c[1] / n[1]:.2f}x** the "
              f"peak memory of the usual approach, which leaves {n[3]['overlap_m2']:.0f} m² of overlaps and "
              f"{n[3]['gap_m2']:.0f} m² of gaps between neighbouring polygons (of {total:.0f} m²); geoseg's "
              f"overlap and gap areas are floating-point noise. Overlap: sum of the intersection areas of "
              f"intersecting pairs (STRtree); gap: the raster's area minus the area covered (sum of areas "
              f"minus overlaps)."]
    publish(lines, args.write)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "benchmarks"))
    sys.path.insert(0, str(REPO))
    main()
