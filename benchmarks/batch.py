"""Throughput of `geoseg batch` over a set of real scenes with 1 and 2 local workers (and Dask).

    python benchmarks/batch.py [--runs "-j 1" "-j 2" "--dask -j 2"] [--write docs/performance.md]

The manifest: the three NAIP dates of ../shared/data (one area, so two change jobs) and the nine parts
of DubaiSat tile 8 prepared as GeoTIFFs by ``scripts/prepare_dubai.py`` (one area each), all with the
bundled ``buildings`` model at the scenes' own pixel size (``gsd = "native"``) on bands 1-3. Each run
starts from an empty output folder, in its own process, timed from the shell: it includes starting
Python, TensorFlow in every worker and loading the model.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

import rasterio

REPO = Path(__file__).resolve().parents[1]
NAIP = REPO.parent / "shared" / "data" / "naip-multidate"
DUBAI = Path("/work/geoseg-data/multiclass-dubai/tile8")


def manifest(folder: Path, dubai: Path) -> tuple[Path, int, float]:
    """Write the manifest; return it, the number of scenes and their megapixels."""
    rows = [("naip", f"{name[-12:-8]}-{name[-8:-6]}-{name[-6:-4]}", NAIP / name) for name in sorted(p.name for p in NAIP.glob("*.tif"))]
    rows += [(f"dubai8-{p.stem[-3:]}", "2020-01-01", p) for p in sorted(dubai.glob("image_part_*[0-9].tif"))]
    if len(rows) < 4:
        raise SystemExit(f"scenes not found: {NAIP} and {dubai} (run `python scripts/prepare_dubai.py` first)")
    mpx = 0.0
    for _, _, path in rows:
        with rasterio.open(path) as ds:
            mpx += ds.width * ds.height / 1e6
    text = 'model = "buildings"\n[predict]\nbands = [1, 2, 3]\ngsd = "native"\nforce = true  # throughput only: 5 m NAIP is far from the model\n\n'
    text += "".join(f'[[scenes]]\narea = "{a}"\ndate = "{d}"\npath = "{p}"\n\n' for a, d, p in rows)
    path = folder / "batch.toml"
    path.write_text(text)
    return path, len(rows), mpx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=["-j 1", "-j 2", "--dask -j 2"])
    ap.add_argument("--dubai", type=Path, default=DUBAI)
    ap.add_argument("--write", default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "benchmarks"))
    from report import machine, publish, timed

    with tempfile.TemporaryDirectory() as tmp:
        path, scenes, mpx = manifest(Path(tmp), args.dubai)
        results = []
        for i, run in enumerate(args.runs):
            out = Path(tmp) / f"out{i}"
            proc, wall, rss = timed([sys.executable, "-m", "geoseg", "-q", "batch", str(path), "-o", str(out),
                                     "--json", *shlex.split(run)])
            report = json.loads(proc.stdout)
            jobs = report["counts"]
            busy = sum(j["seconds"] or 0 for j in report["jobs"])
            results.append((run, wall, busy, jobs, rss))
            print(f"{run}: {wall:.1f} s wall, {jobs}", file=sys.stderr)
    base = results[0][1]
    lines = [
        f"## Batch throughput ({scenes} scenes, {mpx:.1f} Mpx, predict and change jobs)",
        "",
        f"`python benchmarks/batch.py` : {scenes} real scenes (three NAIP dates, one area, so 2 change jobs; "
        "nine DubaiSat parts) with the bundled `buildings` model at native GSD. Wall time from the shell, "
        "including Python, TensorFlow and model start-up in every worker.",
        "",
        "| run | wall s | scenes/min | Mpx/s | job seconds (sum) | speed-up | jobs |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for run, wall, busy, jobs, _ in results:
        lines.append(f"| `geoseg batch {run}` | {wall:.1f} | {scenes / wall * 60:.1f} | {mpx / wall:.2f} | {busy:.1f} "
                     f"| {base / wall:.2f}x | {', '.join(f'{n} {s}' for s, n in jobs.items())} |")
    lines += ["", f"Measured {machine()}."]
    publish(lines, args.write)


if __name__ == "__main__":
    main()
