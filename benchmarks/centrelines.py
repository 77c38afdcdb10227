"""Road centre-lines of a large generated road raster: time and peak memory.

    python benchmarks/centrelines.py --size 8192 [--write docs/performance.md]

The raster: ``size`` x ``size`` uint8 (0 background, 1 road), 0.5 m pixels in UTM, tiled DEFLATE
GeoTIFF, written in strips. Roads: a jittered grid (one road every 150-350 px each way, 6-14 px
wide), a diagonal avenue every ~2000 px, a sine-curved road every ~1500 px, holes of 1-3 px
sprinkled over the roads (noise in a predicted mask) and 3-px gaps cut across some roads. Each run
is its own process (peak RSS from ``/usr/bin/time``):

- ``centrelines_from_raster`` alone (strips of rows, the network built and pruned, lengths);
- ``geoseg vectorize`` with the road polygons and the ``road_centerline`` layer.
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


def layout(size: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def positions() -> list[tuple[int, int]]:
        out, p = [], int(rng.integers(50, 200))
        while p < size - 20:
            out.append((p, int(rng.integers(6, 15))))
            p += int(rng.integers(150, 351))
        return out

    return {"rows": positions(), "cols": positions(),
            "diagonals": [int(o) for o in range(-size, size, 2000)],
            "curves": [int(o) for o in range(700, size, 1500)],
            "gaps": [(int(r), int(c)) for r, c in rng.integers(0, size, size=(size // 100, 2))]}


def make_raster(path: Path, size: int, seed: int = 0, strip: int = 1024) -> Path:
    roads = layout(size, seed)
    rng = np.random.default_rng(seed + 1)
    profile = dict(driver="GTiff", width=size, height=size, count=1, dtype="uint8", crs="EPSG:32633", nodata=255,
                   transform=from_origin(500000, 5000000, 0.5, 0.5), tiled=True, blockxsize=512, blockysize=512,
                   compress="deflate", tags=None)
    profile.pop("tags")
    cols = np.arange(size)
    with rasterio.open(path, "w", **profile) as ds:
        ds.update_tags(class_names="background,road")
        for r0 in range(0, size, strip):
            h = min(strip, size - r0)
            y = np.arange(r0, r0 + h)[:, None]
            m = np.zeros((h, size), bool)
            for r, w in roads["rows"]:
                m |= np.abs(y - r) < w / 2
            for c, w in roads["cols"]:
                m[:, np.abs(cols - c) < w / 2] = True
            for o in roads["diagonals"]:
                m |= np.abs(y - cols[None] - o) < 7
            for o in roads["curves"]:
                m |= np.abs(y - (o + 120 * np.sin(cols[None] / 400))) < 5
            for r, c in roads["gaps"]:  # 3-px cuts across roads (occlusions)
                if r0 <= r < r0 + h:
                    m[r - r0 : r - r0 + 3, max(0, c - 10) : c + 10] = False
            m &= rng.random(m.shape) > 0.002
            ds.write(m.astype(np.uint8), 1, window=Window(0, r0, size, h))
    return path


def child(raster: str) -> None:
    from geoseg.vector.centrelines import centrelines_from_raster

    t0 = time.perf_counter()
    net = centrelines_from_raster(raster, class_id=1)
    print(json.dumps({"seconds": time.perf_counter() - t0, **net.summary()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--write", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    from report import machine, publish, timed

    geoseg = str(Path(sys.executable).with_name("geoseg"))
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        raster = make_raster(tmp / "roads.tif", args.size)
        with rasterio.open(raster) as ds:
            road_px = sum(int((ds.read(1, window=w) == 1).sum()) for _, w in ds.block_windows(1))
        proc, wall, rss = timed([sys.executable, __file__, "--child", str(raster)])
        alone = json.loads(proc.stdout)
        proc_v, wall_v, rss_v = timed([geoseg, "-q", "vectorize", str(raster), "-o", str(tmp / "r.gpkg"), "--json"])
        ours = json.loads(proc_v.stdout)
    mpx = args.size * args.size / 1e6
    c = ours["centerlines"]
    lines = [f"## Road centre-lines of a {args.size} x {args.size} road raster", "",
             f"Measured {machine()}, CPU only. Generated roads (jittered grid 6-14 px wide, diagonals, curves, "
             f"1-3 px holes, 3-px gaps), {road_px / 1e6:.1f} M road pixels of {mpx:.0f} M, 0.5 m pixels in UTM.", "",
             f"Command: `python benchmarks/centrelines.py --size {args.size}`", "",
             "| run | wall (s) | peak RSS (MiB) | lines | junctions | ends | networks | length (km) |",
             "|---|---|---|---|---|---|---|---|",
             f"| `centrelines_from_raster` alone (in-process time {alone['seconds']:.1f} s) | {wall:.1f} | {rss:.0f} | "
             f"{alone['lines']} | {alone['junctions']} | {alone['ends']} | {alone['networks']} | "
             f"{alone['length_m'] / 1000:.1f} |",
             f"| `geoseg vectorize` (road polygons + `road_centerline`; centre-lines {ours['timings_s']['centerlines']:.1f} s) "
             f"| {wall_v:.1f} | {rss_v:.0f} | {c['lines']} | {c['junctions']} | {c['ends']} | {c['networks']} | "
             f"{c['length_m'] / 1000:.1f} |", "",
             f"Centre-lines alone: {mpx / alone['seconds']:.1f} Mpx/s; the road width measured on the mask was "
             f"{c['width_m']} m (spurs pruned below {c['spur_m']} m, gaps bridged up to {c['bridge_m']} m, "
             f"{c['bridges']} bridges)."]
    publish(lines, args.write)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
