"""Peak memory and time of `geoseg predict` against scene size (generated scenes, same settings).

    python benchmarks/memory.py --sizes 4096 16384 [--write docs/performance.md]

Each size gets a generated 3-band uint8 GeoTIFF (tiled, DEFLATE) of the same smooth picture (low-frequency waves),
and `geoseg predict` runs in its own process under `/usr/bin/time -f %M` (peak resident memory)
with a small fully convolutional bundle (5x5 conv + 1x1 logits, seeded random weights; its smooth
class regions keep the polygon count low, so the figures show the pipeline's memory rather than the
number of polygons, which grows with what the scene contains), writing the GeoPackage and the class COG.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.testmodels import small_cnn_bundle  # noqa: E402

SETTINGS = ["--tile-size", "512", "--overlap", "128", "--batch-size", "8"]


def make_scene(path: Path, size: int, *, waves: float = 6.0, seed: int = 0) -> Path:
    """The same smooth 3-band picture (``waves`` periods across) at any size, so every size has about
    the same number of regions and memory shows the pipeline rather than the polygon count."""
    period = size / waves
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * np.pi, size=(3, 2))
    profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs="EPSG:32633",
                   transform=from_origin(500000, 5000000, 0.3, 0.3), tiled=True, blockxsize=512,
                   blockysize=512, compress="deflate", photometric="RGB")
    x = np.arange(size) / period
    with rasterio.open(path, "w", **profile) as ds:
        for r0 in range(0, size, 512):
            y = (np.arange(r0, min(r0 + 512, size)) / period)[:, None]
            bands = [127 + 100 * np.sin(y * (1.0 + 0.3 * b) + phase[b, 0]) * np.cos(x * (1.2 - 0.2 * b) + phase[b, 1])
                     for b in range(3)]
            ds.write(np.stack(bands).astype(np.uint8), window=Window(0, r0, size, y.shape[0]))
    return path


def measure(scene: Path, model: Path, out: Path) -> dict:
    geoseg = str(Path(sys.executable).with_name("geoseg"))
    cmd = ["/usr/bin/time", "-f", "MAXRSS_KB %M", geoseg, "-q", "predict", str(scene), "-o", str(out.with_suffix(".gpkg")),
           "--raster-out", str(out.with_suffix(".tif")), "--model", str(model), *SETTINGS, "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(proc.stderr)
    rss_kb = int([l for l in proc.stderr.splitlines() if l.startswith("MAXRSS_KB")][-1].split()[1])
    doc = json.loads(proc.stdout)
    return {"peak_mib": rss_kb / 1024, "wall_s": wall, "timings": doc["timings_s"], "tiles": doc["tiles"]["total"],
            "polygons": sum(doc["counts"].values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--workdir", default=None, help="where to put the generated scenes (default: a temp folder)")
    ap.add_argument("--write", default=None, help="Markdown file to append the table to")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        model = small_cnn_bundle(tmp / "cnn.keras", bands=3, classes=3, mean=[127.5] * 3, std=[74.0] * 3, seed=1)
        for size in args.sizes:
            scene = make_scene(tmp / f"scene_{size}.tif", size)
            r = measure(scene, model, tmp / f"out_{size}")
            rows.append((size, r))
            print(f"{size}x{size}: peak {r['peak_mib']:.0f} MiB, {r['wall_s']:.1f} s, {r['tiles']} tiles, {r['polygons']} polygons, "
                  f"stages {r['timings']}", flush=True)
            for p in tmp.glob(f"*_{size}*"):
                p.unlink()
    base = rows[0][1]["peak_mib"]
    if args.write:
        lines = [
            "",
            "## Peak memory against scene size",
            "",
            f"Measured {datetime.date.today()} on {platform.node()} ({platform.machine()}, 2 cores, 24 GB, CPU only, "
            "TensorFlow backend, float32).",
            "",
            f"Command: `python benchmarks/memory.py --sizes {' '.join(map(str, args.sizes))} --write {args.write}`; "
            f"`geoseg predict` with {' '.join(SETTINGS)}, GeoPackage and class COG written, a small random-weight "
            "CNN (5x5 conv + 1x1 logits), generated smooth 3-band scenes.",
            "",
            "| scene (px) | peak RSS (MiB) | vs smallest | wall (s) | tiles | polygons | model (s) | polygonize (s) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [f"| {s} x {s} | {r['peak_mib']:.0f} | {r['peak_mib'] / base:.2f}x | {r['wall_s']:.0f} | {r['tiles']} | "
                  f"{r['polygons']} | {r['timings']['model']:.0f} | {r['timings']['polygonize']:.0f} |"
                  for s, r in rows]
        with open(args.write, "a") as f:
            f.write("\n".join(lines) + "\n")
        print(f"appended to {args.write}")


if __name__ == "__main__":
    main()
