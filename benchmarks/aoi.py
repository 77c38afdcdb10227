"""An area of interest in a large scene: `geoseg predict --aoi` against the whole scene.

    python benchmarks/aoi.py --size 8192 [--write docs/performance.md]

The scene is the one of ``benchmarks/pipeline.py`` (DubaiSat imagery upsampled to 0.3 m, a mosaic
``--size`` pixels square); the area is a district-like polygon (a skewed octagon) in EPSG:4326
covering about a tenth of it. Both runs use the bundled ``buildings`` model, each in its own
process (peak resident memory from ``/usr/bin/time``). Reported: wall time, peak memory, tiles the
model ran, and the share of the area's pixels whose class equals the whole-scene run's (it must
be 1: the area runs the very tiles of the whole scene).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import rasterio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import make_scene  # noqa: E402
from report import machine, publish, timed  # noqa: E402


def district(scene: Path, path: Path, share: float) -> Path:
    """A skewed octagon around the scene's centre covering about ``share`` of it, in EPSG:4326."""
    import geopandas as gpd
    import shapely

    with rasterio.open(scene) as ds:
        b, crs = ds.bounds, ds.crs
    cx, cy = (b.left + b.right) / 2, (b.bottom + b.top) / 2
    side = b.right - b.left
    radius = side * math.sqrt(share / (2 * math.sqrt(2)))  # a regular octagon's area is 2√2 r²
    points = [(cx + radius * math.cos(a) * (1.2 if i % 2 else 0.85), cy + radius * math.sin(a))
              for i, a in enumerate(np.linspace(0, 2 * math.pi, 8, endpoint=False) + math.pi / 8)]
    gpd.GeoDataFrame({"name": ["district"]}, geometry=[shapely.Polygon(points)], crs=crs).to_crs("EPSG:4326").to_file(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--share", type=float, default=0.1, help="the area's share of the scene")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--write", default=None, help="append the Markdown section to this file")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="geoseg-aoi-"))
    work.mkdir(parents=True, exist_ok=True)
    scene = work / f"scene{args.size}.tif"
    if not scene.exists():
        make_scene(scene, args.size)
    area = district(scene, work / "district.geojson", args.share)
    runs = {}
    for name, extra in (("whole scene", []), ("--aoi", ["--aoi", str(area)])):
        stem = work / ("whole" if not extra else "aoi")
        cmd = [sys.executable, "-m", "geoseg", "predict", str(scene), "-o", f"{stem}.gpkg", "--raster-out",
               f"{stem}.tif", "--overwrite", "--json", *extra]
        proc, wall, rss = timed(cmd)
        runs[name] = (json.loads(proc.stdout), wall, rss, Path(f"{stem}.tif"))
    with rasterio.open(runs["whole scene"][3]) as w, rasterio.open(runs["--aoi"][3]) as a:
        window = rasterio.windows.from_bounds(*a.bounds, w.transform).round_offsets().round_lengths()
        full, part = w.read(1, window=window), a.read(1)
    inside = part != 255
    agree = float((full[inside] == part[inside]).mean())
    lines = [f"## Area of interest in a {args.size} x {args.size} scene (`predict --aoi`)", "",
             f"`python benchmarks/aoi.py --size {args.size}`: the scene of `benchmarks/pipeline.py`, a district "
             f"polygon (EPSG:4326) over {inside.sum() / args.size ** 2:.1%} of it, the default `buildings` model.", "",
             "| run | output size (px) | tiles run | wall s | peak MiB | building polygons |", "|---|---|---|---|---|---|"]
    for name, (doc, wall, rss, _) in runs.items():
        lines.append(f"| {name} | {doc['width']} x {doc['height']} | {doc['tiles']['run']} of {doc['tiles']['total']} "
                     f"| {wall:.1f} | {rss:.0f} | {doc['counts'].get('building', 0)} |")
    lines += ["", f"Pixels of the area whose class equals the whole-scene run's: {agree:.4%} "
              f"({int(inside.sum())} pixels).", "", f"*{machine()}.*"]
    publish(lines, args.write)


if __name__ == "__main__":
    main()
