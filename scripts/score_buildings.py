"""Score a buildings model on the held-back and unseen scenes of its model card.

    python scripts/score_buildings.py [--model geoseg/models/bundled/buildings.keras] [--precision float32]
                                      [--scales 1,ZOOM,...] [--scene NAME ...]

Runs ``geoseg evaluate --json`` (the full predict pipeline) on each scene and prints a Markdown
table. Each Dubai tile (held out from training, all nine images) is scored as one set: the confusion
matrices of its images are summed before IoU, F1, precision and recall are computed; its object
counts are summed too. ``--scene`` scores only the rows whose name contains one of its words
(e.g. ``--scene kampala atlanta``). Needs ``../shared/data`` and, for Dubai, ``python scripts/prepare_dubai.py``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OAM = REPO.parent / "shared" / "data" / "buildings-oam-train" / "mosaics"
DUBAI = REPO.parent / "geoseg-data" / "multiclass-dubai"
DUBAI_VALUES = "0=ignore,1=building,2-5=background"

SCENES = [
    ("`kampala_ug_block1_z21` (drone RGB, 7.5 cm)", "held back",
     [(OAM / "2-kampala_ug" / "kampala_ug_block1_z21_rgb.tif", OAM / "2-kampala_ug" / "kampala_ug_block1_z21_buildings.gpkg", None)]),
    ("Dubai tile 2, 9 images (DubaiSat RGB, ~1 m)", "held back (3 images validated on)",
     [(DUBAI / "tile2" / f"image_part_{i:03d}.tif", DUBAI / "tile2" / f"image_part_{i:03d}_labels.tif", DUBAI_VALUES)
      for i in range(1, 10)]),
    ("Dubai tile 3, 9 images (DubaiSat RGB, ~1 m)", "held out",
     [(DUBAI / "tile3" / f"image_part_{i:03d}.tif", DUBAI / "tile3" / f"image_part_{i:03d}_labels.tif", DUBAI_VALUES)
      for i in range(1, 10)]),
    ("SpaceNet 4 Atlanta chip (WorldView-2 pan, 0.5 m; `sample_data/atlanta_sn4_pan.tif`)", "unseen sensor and region",
     [(REPO / "sample_data" / "atlanta_sn4_pan.tif", REPO / "sample_data" / "atlanta_sn4_buildings.gpkg", None)]),
    ("`nairobi_ke_block1_z21` (drone RGB, 7.5 cm)", "unseen, labels offset",
     [(OAM / "5-nairobi_ke" / "nairobi_ke_block1_z21_rgb.tif", OAM / "5-nairobi_ke" / "nairobi_ke_block1_z21_buildings.gpkg", None)]),
    ("`nairobi_ke_block2_z21` (drone RGB, 7.5 cm)", "unseen, labels offset",
     [(OAM / "5-nairobi_ke" / "nairobi_ke_block2_z21_rgb.tif", OAM / "5-nairobi_ke" / "nairobi_ke_block2_z21_buildings.gpkg", None)]),
]


def evaluate(model: str, scene: Path, labels: Path, values: str | None, precision: str, extra: list[str]) -> dict:
    geoseg = str(Path(sys.executable).with_name("geoseg"))
    cmd = [geoseg, "-q", "evaluate", str(scene), str(labels), "--model", model, "--precision", precision, "--json", *extra]
    if values:
        cmd += ["--label-values", values]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "geoseg" / "models" / "bundled" / "buildings.keras"))
    ap.add_argument("--precision", default="float32")
    ap.add_argument("--scales", default=None, help="zooms to run (predict --scales); default: the bundle's")
    ap.add_argument("--scene", nargs="*", default=None, help="score only rows whose name contains one of these")
    args = ap.parse_args()
    extra = ["--scales", args.scales] if args.scales else []
    print("| scene | role | building IoU | F1 | precision | recall | object F1 (TP / FP / FN) |")
    print("|---|---|---|---|---|---|---|")
    for name, role, items in SCENES:
        if args.scene and not any(word.lower() in name.lower() for word in args.scene):
            continue
        tp = fp = fn = otp = ofp = ofn = 0
        for scene, labels, values in items:
            if not scene.exists():
                print(f"| {name} | {role} | missing: {scene} | | | | |")
                break
            doc = evaluate(args.model, scene, labels, values, args.precision, extra)
            (_, f), (m, t) = doc["confusion"]  # rows: true class, columns: predicted
            tp, fp, fn = tp + t, fp + f, fn + m
            b = doc["classes"]["building"]
            otp, ofp, ofn = otp + (b["objects_tp"] or 0), ofp + (b["objects_fp"] or 0), ofn + (b["objects_fn"] or 0)
        else:
            iou = tp / max(tp + fp + fn, 1)
            prec, rec = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
            f1 = 2 * tp / max(2 * tp + fp + fn, 1)
            of1 = 2 * otp / max(2 * otp + ofp + ofn, 1)
            print(f"| {name} | {role} | **{iou:.3f}** | {f1:.3f} | {prec:.3f} | {rec:.3f} | {of1:.3f} ({otp} / {ofp} / {ofn}) |",
                  flush=True)


if __name__ == "__main__":
    main()
