"""What a second zoom costs: `geoseg predict --scales 1` against the default `buildings` model's zooms 1,2.

    python benchmarks/scales.py [SCENE ...] [--write docs/performance.md]

Default scenes: the drone blocks ``nairobi_ke_block1_z21`` (4096 x 2048 px at 7.5 cm) and
``zanzibar_tz_block1_z21`` (8192 x 4096) of ``../shared/data/buildings-oam-train``, and the
Atlanta chip of ``sample_data`` (0.5 m: zoom 2 is left out there, so both runs should cost the
same). Each run is its own process (peak resident memory from ``/usr/bin/time``), with the default
precision. Reported: wall time, peak memory, tiles the model ran, the model's and the merge's
seconds (predict's ``timings_s``) and the building polygons written.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, publish, timed  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OAM = REPO.parent / "shared" / "data" / "buildings-oam-train" / "mosaics"
SCENES = [OAM / "5-nairobi_ke" / "nairobi_ke_block1_z21_rgb.tif", OAM / "1-zanzibar_tz" / "zanzibar_tz_block1_z21_rgb.tif",
          REPO / "sample_data" / "atlanta_sn4_pan.tif"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenes", nargs="*", type=Path, default=SCENES)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--write", default=None, help="append the Markdown section to this file")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="geoseg-scales-"))
    work.mkdir(parents=True, exist_ok=True)
    lines = ["## A second zoom (`predict --scales`, default `buildings` model)", "",
             "`python benchmarks/scales.py`: each scene with `--scales 1` and with the model's default zooms "
             "(1,2, merged by mean), each run its own process.", "",
             "| scene | zooms run | tiles run | wall s | model s | merge s | peak MiB | building polygons |",
             "|---|---|---|---|---|---|---|---|"]
    for scene in args.scenes:
        if not scene.exists():
            print(f"skipped {scene}: not found", file=sys.stderr)
            continue
        for name, extra in (("1", ["--scales", "1"]), ("default", [])):
            stem = work / f"{scene.stem}-{name}"
            cmd = [sys.executable, "-m", "geoseg", "-q", "predict", str(scene), "-o", f"{stem}.gpkg", "--overwrite",
                   "--json", *extra]
            proc, wall, rss = timed(cmd)
            doc = json.loads(proc.stdout)
            t = doc["timings_s"]
            zooms = ",".join(f"{z:g}" for z in doc["tiles"].get("scales", [1.0]))
            lines.append(f"| {scene.name} ({doc['width']} x {doc['height']}, {doc['gsd_m']:.3g} m) | {zooms} "
                         f"| {doc['tiles']['run']} | {wall:.1f} | {t.get('model', 0):.1f} | {t.get('merge', 0):.1f} "
                         f"| {rss:.0f} | {doc['counts'].get('building', 0)} |")
            print(lines[-1], file=sys.stderr, flush=True)
    lines += ["", f"*{machine()}.*"]
    publish(lines, args.write)


if __name__ == "__main__":
    main()
