"""Seams: does the class raster depend on the tiling? Pixel agreement between two tilings.

A fully convolutional U-Net with random (seeded) weights is run over a real scene twice, with tiles
of 256 px (overlap 64) and 512 px (overlap 128), for each blending window, and once more with no
overlap at all. Away from tile edges both tilings see the same pixels, so any disagreement comes from
the tile edges: the better the blending hides them, the higher the agreement.

    python benchmarks/seams.py [SCENE] [--write docs/seams.md]

Default scene: ../shared/data/buildings-oam-train/mosaics/2-kampala_ug/kampala_ug_block2_z21_rgb.tif
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from geoseg.models.bundle import load_bundle  # noqa: E402
from geoseg.inference.options import PredictOptions  # noqa: E402
from geoseg.workflows.predict import predict  # noqa: E402
from tests.testmodels import random_unet_bundle  # noqa: E402

DEFAULT = REPO.parent / "shared/data/buildings-oam-train/mosaics/2-kampala_ug/kampala_ug_block2_z21_rgb.tif"
CONFIGS = [  # (label, blend, (tile, overlap) A, (tile, overlap) B)
    ("cosine (default)", "cosine", (256, 64), (512, 128)),
    ("gaussian", "gaussian", (256, 64), (512, 128)),
    ("plain mean", "mean", (256, 64), (512, 128)),
    ("no overlap", "mean", (256, 0), (512, 0)),
]


def classes_for(scene: Path, bundle, tile: int, overlap: int, blend: str, tmp: Path) -> tuple[np.ndarray, float]:
    name = f"{tile}_{overlap}_{blend}"
    t0 = time.perf_counter()
    predict(scene, tmp / f"{name}.gpkg", raster_out=tmp / f"{name}.tif", bundle=bundle,
            options=PredictOptions(tile_size=tile, overlap=overlap, blend=blend, batch_size=8))
    with rasterio.open(tmp / f"{name}.tif") as ds:
        return ds.read(1), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scene", nargs="?", default=str(DEFAULT))
    ap.add_argument("--write", default=None, help="Markdown file to write the table to")
    args = ap.parse_args()
    scene = Path(args.scene)
    with rasterio.open(scene) as ds:
        sample = ds.read(out_shape=(ds.count, 256, 256)).reshape(ds.count, -1).astype(np.float64)
        shape = ds.shape
    mean, std = sample.mean(1), sample.std(1) + 1e-6
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = load_bundle(random_unet_bundle(tmp / "random.keras", bands=len(mean), classes=4, width=16, depth=4,
                                                mean=mean, std=std, seed=7))
        for label, blend, (ta, oa), (tb, ob) in CONFIGS:
            a, sa = classes_for(scene, bundle, ta, oa, blend, tmp)
            b, sb = classes_for(scene, bundle, tb, ob, blend, tmp)
            valid = (a != 255) & (b != 255)
            agree = float((a[valid] == b[valid]).mean())
            rows.append((label, f"{ta}/{oa}", f"{tb}/{ob}", agree, sa, sb))
            print(f"{label:18s} {ta}/{oa} vs {tb}/{ob}: {100 * agree:.3f} % of {valid.sum()} valid pixels agree "
                  f"({sa:.1f} s, {sb:.1f} s)", flush=True)
    if args.write:
        lines = [
            "# Seams: pixel agreement between two tilings",
            "",
            f"Measured {datetime.date.today()} on {platform.node()} ({platform.processor() or platform.machine()}, "
            f"2 cores, CPU only, TensorFlow backend, float32).",
            "",
            f"Scene: `{scene.name}` ({shape[1]} x {shape[0]} px, real drone RGB from `../shared/data`). Model: a U-Net "
            "(width 16, depth 4, 4 classes) with random seeded weights, normalised with the scene's band statistics.",
            "",
            f"Command: `python benchmarks/seams.py {args.scene if args.scene != str(DEFAULT) else ''}--write {args.write}`",
            "",
            "| blending | tiling A (tile/overlap) | tiling B | pixels that agree | time A (s) | time B (s) |",
            "|---|---|---|---|---|---|",
        ]
        lines += [f"| {l} | {a} | {b} | {100 * g:.3f} % | {sa:.1f} | {sb:.1f} |" for l, a, b, g, sa, sb in rows]
        Path(args.write).write_text("\n".join(lines).replace("py --write", "py --write") + "\n")
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
