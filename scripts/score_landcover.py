"""Score a landcover model on the held-out Dubai tiles and the SpaceNet Las Vegas road chip.

    python scripts/score_landcover.py [--model geoseg/models/bundled/landcover.keras] [--json out.json]
                                      [--gsd auto|native|METRES] [--scales 1,ZOOM,... --scale-merge mean|max]
                                      [--tta none|flips|d4] [--tiles 2,3]

Runs the full predict pipeline (``geoseg.workflows.evaluate.evaluate``, the library call behind
``geoseg evaluate``) on each scene and prints Markdown tables:

- Dubai tiles 2 and 3 (held out whole from training; all 18 images): per-class IoU, F1, precision
  and recall from the confusion matrices of the images summed, per tile and together; road
  completeness, correctness and quality at a 3 m buffer against the centre-lines of the labelled
  road pixels, from the matched and total lengths summed over the images.
- SpaceNet 3 Las Vegas chip 0 (pan-sharpened RGB, 0.3 m, EPSG:4326; predict reads it at the model's
  1 m): road completeness, correctness and quality at 3 m against its 38 real road centre-lines (and
  road IoU against the lines buffered to 7 m, for reference only: road widths vary).
- Water plausibility: the Sen1Floods11 Spain chip (Sentinel-2 L1C, 10 m; bands 4, 3, 2 as RGB, value
  range stretched by predict) against its hand-labelled water, read at 2 m (the coarsest GSD of the
  model's range; 10 m is 10x past its training scale) and at its own 10 m; and the share of each
  class on the three NAIP dates (RGB bands of the 4-band 5 m scenes, read at 1 m), which have no labels.

Needs ``../shared/data`` and ``python scripts/prepare_dubai.py`` (Dubai as GeoTIFFs, outside the repo).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DUBAI = REPO.parent / "geoseg-data" / "multiclass-dubai"
VEGAS = REPO.parent / "shared" / "data" / "spacenet" / "vegas_sn3_roads_rgb"
DUBAI_VALUES = "0=ignore,1=building,2=background,3=road,4=vegetation,5=water"
HELD_OUT = (2, 3)
BUFFER_M = 3.0


def _table(cm: np.ndarray, names: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    for c, name in enumerate(names):
        tp = float(cm[c, c])
        fp, fn = float(cm[:, c].sum()) - tp, float(cm[c].sum()) - tp
        out[name] = {"iou": tp / max(tp + fp + fn, 1), "f1": 2 * tp / max(2 * tp + fp + fn, 1),
                     "precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1), "pixels": int(cm[c].sum())}
    return out


def _roads(parts: list[dict]) -> dict[str, float]:
    ref = sum(p["reference_m"] for p in parts)
    pred = sum(p["predicted_m"] for p in parts)
    mr = sum(p["matched_reference_m"] for p in parts)
    mp = sum(p["matched_predicted_m"] for p in parts)
    return {"completeness": mr / ref if ref else float("nan"), "correctness": mp / pred if pred else float("nan"),
            "quality": mp / (pred + ref - mr) if pred + ref - mr else float("nan"), "reference_m": ref, "predicted_m": pred}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "geoseg" / "models" / "bundled" / "landcover.keras"))
    ap.add_argument("--precision", default="float32")
    ap.add_argument("--json", default=None, help="also write every figure to this JSON file")
    ap.add_argument("--dubai-only", action="store_true", help="score only the Dubai tiles (--tiles)")
    ap.add_argument("--gsd", default="auto", help="as predict --gsd (the Dubai tiles and the Vegas chip)")
    ap.add_argument("--scales", default=None, help="as predict --scales, e.g. 1,0.5 (default: the model's)")
    ap.add_argument("--scale-merge", default=None, choices=["max", "mean"], help="as predict --scale-merge")
    ap.add_argument("--tta", default="none", choices=["none", "flips", "d4"], help="as predict --tta")
    ap.add_argument("--tiles", default=",".join(map(str, HELD_OUT)),
                    help="Dubai tiles to score (default: the held-out 2,3; a training tile shows the fit, not skill)")
    args = ap.parse_args()

    from geoseg.workflows.evaluate import evaluate
    from geoseg.models.bundle import load_bundle
    from geoseg.inference.options import PredictOptions
    from geoseg.zooms import parse_scales

    bundle = load_bundle(args.model, precision=args.precision)
    names = list(bundle.meta.class_names)
    options = PredictOptions(precision=args.precision, gsd=args.gsd, scales=parse_scales(args.scales),
                             scale_merge=args.scale_merge, tta=args.tta)
    report: dict = {"model": {"path": args.model, "sha256": bundle.sha256}, "dubai": {}, "vegas": None}

    chosen = tuple(int(t) for t in args.tiles.split(","))
    tiles = {}
    for tile in chosen:
        images = sorted((DUBAI / f"tile{tile}").glob("image_part_*[0-9].tif"))
        if not images:
            sys.exit(f"no images in {DUBAI / f'tile{tile}'}: run python scripts/prepare_dubai.py")
        cm, roads = np.zeros((len(names), len(names)), np.int64), []
        for image in images:
            labels = image.with_name(image.stem + "_labels.tif")
            doc = evaluate(image, labels, bundle=bundle, options=options, label_values=DUBAI_VALUES, objects=False,
                           road_buffer_m=BUFFER_M).to_dict()
            cm += np.asarray(doc["confusion"], np.int64)
            roads.append(doc["roads"])
            print(f"  tile {tile} {image.name}: " + ", ".join(f"{n} {v['iou']:.3f}" if v["iou"] is not None else f"{n} -"
                                                               for n, v in doc["classes"].items()), file=sys.stderr)
        tiles[tile] = (cm, roads)
    rows = [(f"tile {t}", *tiles[t]) for t in chosen]
    if len(chosen) > 1:
        rows.append(("tiles " + " + ".join(map(str, chosen)), sum(tiles[t][0] for t in chosen),
                     [r for t in chosen for r in tiles[t][1]]))
    which = "held-out" if set(chosen) <= set(HELD_OUT) else "training" if not set(chosen) & set(HELD_OUT) else "mixed"
    print(f"| {which} Dubai | " + " | ".join(f"{n} IoU" for n in names) + " | mean fg IoU | road compl. | road corr. | road quality |")
    print("|---" * (len(names) + 5) + "|")
    for label, cm, roads in rows:
        scores, net = _table(cm, names), _roads(roads)
        miou = float(np.mean([scores[n]["iou"] for n in names[1:]]))
        report["dubai"][label] = {"classes": scores, "mean_foreground_iou": miou, "roads": net, "confusion": cm.tolist()}
        print(f"| {label} | " + " | ".join(f"{scores[n]['iou']:.3f}" for n in names) +
              f" | {miou:.3f} | {net['completeness']:.3f} | {net['correctness']:.3f} | {net['quality']:.3f} |")

    image = VEGAS / "RGB-PanSharpen_AOI_2_Vegas_img0.tif"
    if image.exists() and not args.dubai_only:
        import geopandas as gpd

        with tempfile.TemporaryDirectory() as scratch:
            lines = gpd.read_file(VEGAS / "AOI_2_Vegas_img0_roads.geojson")[["geometry"]]
            lines["class"] = "road"  # the SpaceNet lines carry no class name
            labels = Path(scratch) / "vegas_roads.gpkg"
            lines.to_file(labels)
            doc = evaluate(image, labels, bundle=bundle, options=options, line_width_m=7.0, objects=False,
                           road_buffer_m=BUFFER_M).to_dict()
        r = doc["roads"]
        report["vegas"] = {"roads": r, "road_iou_7m": doc["classes"]["road"]["iou"],
                           "predicted_fraction": {n: doc["classes"][n]["pixels_predicted"] / max(doc["pixels_scored"], 1)
                                                  for n in names}}
        print()
        print("| SpaceNet Las Vegas chip 0 | road completeness | correctness | quality | reference m | predicted m | road IoU (lines at 7 m) |")
        print("|---|---|---|---|---|---|---|")
        print(f"| 3 m buffer, {r['reference_lines']} reference lines | {r['completeness']:.3f} | {r['correctness']:.3f} | "
              f"{r['quality']:.3f} | {r['reference_m']:.0f} | {r['predicted_m']:.0f} | {doc['classes']['road']['iou']:.3f} |")
    if not args.dubai_only:
        report["water"] = _water(bundle, options)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=float))


def _classes_of(bundle, scene: Path, options, bands: tuple[int, ...], gsd: str) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class ids on the scene's grid (and where they are valid)."""
    import dataclasses

    import rasterio

    from geoseg.inference.segment import segment
    from geoseg.io.scene import open_scene

    info = open_scene(scene, bands=bands)
    with tempfile.TemporaryDirectory() as scratch:
        seg = segment(info, bundle, scratch, options=dataclasses.replace(options, bands=bands, gsd=gsd, force=True))  # 10 m native: on purpose
        with rasterio.open(seg.class_path) as ds:
            ids = ds.read(1)
    return ids, ids != 255


def _water(bundle, options) -> dict:
    import rasterio

    names = list(bundle.meta.class_names)
    water = names.index("water")
    out: dict = {"sentinel2": {}, "naip": {}}
    s2 = REPO.parent / "shared" / "data" / "water-sen1floods11"
    if (s2 / "Spain_7370579_S2Hand.tif").exists():
        with rasterio.open(s2 / "Spain_7370579_LabelHand.tif") as ds:
            truth = ds.read(1)
        print()
        print("| Sen1Floods11 Spain chip (S2 bands 4,3,2) | read at | water IoU | precision | recall | predicted water | labelled water |")
        print("|---|---|---|---|---|---|---|")
        for gsd in ("2", "native"):
            ids, valid = _classes_of(bundle, s2 / "Spain_7370579_S2Hand.tif", options, (4, 3, 2), gsd)
            ok = valid & (truth >= 0)
            p, t = (ids == water) & ok, (truth == 1) & ok
            tp, fp, fn = int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum())
            row = {"iou": tp / max(tp + fp + fn, 1), "precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1),
                   "predicted_water": float(p.sum() / ok.sum()), "labelled_water": float(t.sum() / ok.sum()),
                   "classes": {n: float(((ids == i) & ok).sum() / ok.sum()) for i, n in enumerate(names)}}
            out["sentinel2"][gsd] = row
            print(f"| | {'2 m' if gsd == '2' else '10 m (native)'} | {row['iou']:.3f} | {row['precision']:.3f} | "
                  f"{row['recall']:.3f} | {row['predicted_water']:.3f} | {row['labelled_water']:.3f} |")
    naip = sorted((REPO.parent / "shared" / "data" / "naip-multidate").glob("*.tif"))
    if naip:
        print()
        print("| NAIP scene (bands 1,2,3, read at 1 m) | " + " | ".join(names) + " |")
        print("|---" * (len(names) + 1) + "|")
        for scene in naip:
            ids, valid = _classes_of(bundle, scene, options, (1, 2, 3), "auto")
            shares = {n: float(((ids == i) & valid).sum() / valid.sum()) for i, n in enumerate(names)}
            out["naip"][scene.name] = shares
            print(f"| {scene.stem} | " + " | ".join(f"{shares[n]:.3f}" for n in names) + " |")
    return out


if __name__ == "__main__":
    main()
