"""Choose the building decision threshold of a buildings model on its validation scenes.

    python scripts/tune_threshold.py [--model PATH] [--scales 1,2 --scale-merge mean] [--write OUT.keras [--keep-threshold]]

Runs the full predict pipeline once per scene (probabilities on the scene's own grid), then scores
the building IoU at each threshold from the probabilities: pixels labelled ``ignore`` take no part,
as in ``geoseg evaluate``. The threshold chosen is the one with the best mean IoU over the two
validation groups of ``recipes/experiments/buildings_v1_stage2.toml`` (the Kampala block; images 1, 3, 5 of
Dubai tile 2), each group counted once, so the few drone pixels weigh as much as the many Dubai
ones. The other scenes (Dubai tile 2's other six images, the Nairobi block) took no part in training
or in any choice: they show whether the threshold carries over. ``--write`` saves a copy of the
bundle with that threshold as its default (``geoseg predict --threshold`` overrides it), and with
``--scales``/``--scale-merge`` as its default zooms (``geoseg.scales``) when they are given;
``--keep-threshold`` keeps the bundle's own threshold (only the zooms change).
Needs ``../shared/data`` and ``python scripts/prepare_dubai.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np
import rasterio

REPO = Path(__file__).resolve().parents[1]
OAM = REPO.parent / "shared" / "data" / "buildings-oam-train" / "mosaics"
DUBAI = REPO.parent / "geoseg-data" / "multiclass-dubai" / "tile2"
DUBAI_VALUES = "0=ignore,1=building,2-5=background"
THRESHOLDS = [0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6]

GROUPS = {  # name: (used to choose?, [(image, labels, label_values)])
    "Kampala block 1 (validation)": (True, [(OAM / "2-kampala_ug" / "kampala_ug_block1_z21_rgb.tif",
                                             OAM / "2-kampala_ug" / "kampala_ug_block1_z21_buildings.gpkg", None)]),
    "Dubai tile 2, images 1, 3, 5 (validation)": (True, [(DUBAI / f"image_part_{i:03d}.tif",
                                                         DUBAI / f"image_part_{i:03d}_labels.tif", DUBAI_VALUES)
                                                        for i in (1, 3, 5)]),
    "Dubai tile 2, images 2, 4, 6-9 (held out)": (False, [(DUBAI / f"image_part_{i:03d}.tif",
                                                          DUBAI / f"image_part_{i:03d}_labels.tif", DUBAI_VALUES)
                                                         for i in (2, 4, 6, 7, 8, 9)]),
    "Nairobi block 1 (unseen, labels offset)": (False, [(OAM / "5-nairobi_ke" / "nairobi_ke_block1_z21_rgb.tif",
                                                         OAM / "5-nairobi_ke" / "nairobi_ke_block1_z21_buildings.gpkg",
                                                         None)]),
}


def counts(bundle, image: Path, labels: Path, label_values: str | None, building: int, options) -> np.ndarray:
    """(intersection, union) of building pixels per threshold on one scene."""
    from geoseg.io.labels import IGNORE, LabelReader, parse_label_values
    from geoseg.workflows.predict import predict
    from geoseg.io.scene import open_scene

    names = list(bundle.meta.class_names)
    info = open_scene(image)
    value_map = parse_label_values(label_values, names) if label_values else None
    with tempfile.TemporaryDirectory() as tmp:
        probs_path = Path(tmp) / "p.tif"
        predict(image, Path(tmp) / "o.gpkg", probs_out=probs_path, bundle=bundle, options=options)
        with rasterio.open(probs_path) as ds:
            p = ds.read(building + 1)
            covered = ds.read_masks(1) > 0
    with LabelReader(labels, info, class_names=names, value_map=value_map) as reader:
        truth = reader.read(0, info.height, 0, info.width)
    known = covered & (truth != IGNORE)
    t = truth == building
    out = np.zeros((len(THRESHOLDS), 2))
    for i, th in enumerate(THRESHOLDS):
        pred = p >= th
        out[i] = ((pred & t & known).sum(), ((pred | t) & known).sum())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="buildings", help="bundle path or built-in name (default: buildings)")
    parser.add_argument("--scales", default=None, help="zooms to run and merge, e.g. 1,2 (default: the model's)")
    parser.add_argument("--scale-merge", default=None, choices=["max", "mean"], help="default: the model's")
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--write", type=Path, default=None, help="save the bundle with the chosen threshold here")
    parser.add_argument("--keep-threshold", action="store_true", help="with --write: keep the bundle's threshold")
    args = parser.parse_args()
    from geoseg.models.bundle import load_bundle, resolve_model, save_bundle
    from geoseg.inference.options import PredictOptions
    from geoseg.zooms import parse_scales

    options = PredictOptions(precision=args.precision, scales=parse_scales(args.scales), scale_merge=args.scale_merge)

    bundle = load_bundle(resolve_model(args.model), precision=args.precision)
    building = list(bundle.meta.class_names).index("building")
    # score what the network gives: the bundle's own threshold must not move the probabilities, and
    # predict's classes are not used here
    rows = {}
    for name, (_, scenes) in GROUPS.items():
        total = sum(counts(bundle, *scene, building, options) for scene in scenes)
        rows[name] = total[:, 0] / np.maximum(total[:, 1], 1)
        print(f"scored {name}", file=sys.stderr, flush=True)
    chosen_on = [name for name, (choose, _) in GROUPS.items() if choose]
    mean = np.mean([rows[name] for name in chosen_on], axis=0)
    best = int(np.argmax(mean))
    print("| building IoU at threshold | " + " | ".join(f"{t:g}" for t in THRESHOLDS) + " |")
    print("|---|" + "---|" * len(THRESHOLDS))
    for name, iou in [*rows.items(), ("mean of the two validation groups", mean)]:
        cells = [f"**{v:.3f}**" if i == best else f"{v:.3f}" for i, v in enumerate(iou)]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\nchosen: building={THRESHOLDS[best]:g} (0.5 is the plain most probable class)")
    if args.write:
        classes = tuple(dataclasses.replace(c, threshold=THRESHOLDS[best]) if i == building and not args.keep_threshold
                        else c for i, c in enumerate(bundle.meta.classes))
        meta = dataclasses.replace(bundle.meta, classes=classes)
        if options.scales is not None:
            meta = dataclasses.replace(meta, scales=options.scales)
        if options.scale_merge is not None:
            meta = dataclasses.replace(meta, scale_merge=options.scale_merge)
        sha = save_bundle(bundle.model, meta, args.write)
        print(f"wrote {args.write} (sha256 {sha})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
