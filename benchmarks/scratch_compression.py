"""CPU cost of compressing predict's intermediate rasters (class ids and scores) with each codec.

    python benchmarks/scratch_compression.py [--size 4096] [--write docs/performance.md]

predict writes a class raster (uint8) and a score raster (uint16) while the model runs, then reads
them back once to polygonize and to make the COG. On a 2-core machine every CPU second spent
compressing them is taken from the model. The rasters here are like predict's: smooth blobs of
classes and scores that vary slowly with a little noise (the blended probabilities), written in
512-row strips of 512x512 tiles with GDAL's 2 compression threads, then read back whole.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
CODECS = [("DEFLATE (level 6, GDAL's default)", {"compress": "deflate"}),
          ("DEFLATE level 1", {"compress": "deflate", "zlevel": 1}),
          ("LZW", {"compress": "lzw"}),
          ("ZSTD level 1", {"compress": "zstd", "zstd_level": 1}),
          ("none", {})]


def rasters(size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    field = np.kron(ndimage.gaussian_filter(rng.normal(size=(size // 8, size // 8)), 3), np.ones((8, 8)))
    classes = (field > 0.05).astype(np.uint8) + (field > 0.4).astype(np.uint8)
    score = np.clip(40000 + np.abs(field) * 200000, 0, 65000).astype(np.uint16)
    score += rng.integers(0, 64, score.shape, dtype=np.uint16)
    return [classes, score]


def run(folder: Path, arrays: list[np.ndarray], options: dict) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    paths = []
    for i, array in enumerate(arrays):
        path = folder / f"r{i}.tif"
        h, w = array.shape
        with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=1, dtype=array.dtype,
                           crs="EPSG:32633", transform=from_origin(500000, 5000000, 0.3, 0.3), tiled=True,
                           blockxsize=512, blockysize=512, num_threads="2", **options) as ds:
            for r in range(0, h, 512):
                ds.write(array[r:r + 512][None], window=Window(0, r, w, min(512, h - r)))
        paths.append(path)
    write = time.perf_counter() - t0
    t0 = time.perf_counter()
    for path in paths:
        with rasterio.open(path) as ds:
            ds.read()
    read = time.perf_counter() - t0
    return write, read, sum(os.path.getsize(p) for p in paths) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--write", default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "benchmarks"))
    from report import machine, publish

    arrays = rasters(args.size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in CODECS:
            best = min((run(Path(tmp), arrays, options) for _ in range(args.repeat)), key=lambda r: r[0] + r[1])
            rows.append((name, *best))
    mpx = args.size * args.size / 1e6
    lines = [f"## Compressing predict's intermediate rasters ({args.size} x {args.size}, class + score)", "",
             f"`python benchmarks/scratch_compression.py --size {args.size}` (best of {args.repeat}):", "",
             "| codec | write s | read s | MiB | write Mpx/s |", "|---|---:|---:|---:|---:|"]
    for name, write, read, mib in rows:
        lines.append(f"| {name} | {write:.2f} | {read:.2f} | {mib:.1f} | {mpx / write:.0f} |")
    lines += ["", f"Measured {machine()}."]
    publish(lines, args.write)


if __name__ == "__main__":
    main()
