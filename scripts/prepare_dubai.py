"""Give the Dubai multi-class images a placeholder grid, so geoseg can train and evaluate on them.

The 72 images of ``../shared/data/multiclass-dubai`` (MBRSC DubaiSat RGB, CC0 1.0, Humans in the
Loop) are JPEGs with PNG class-index masks and no georeference. geoseg reads GeoTIFFs, so this
script writes, for each ``tileN/images/image_part_NNN.jpg``:

- ``OUT/tileN/image_part_NNN.tif``: the RGB pixels, unchanged (lossless DEFLATE), and
- ``OUT/tileN/image_part_NNN_labels.tif``: the class indices, unchanged
  (0 unlabeled, 1 building, 2 land, 3 road, 4 vegetation, 5 water),

on a placeholder grid: ``--gsd`` metre pixels (default 1 m; the set's GSD is undocumented,
roughly 0.7-1.5 m) in UTM zone 40N (EPSG:32640, where Dubai lies), each image at its own place
10 km from the others, so no two images overlap or touch. The coordinates are not the images'
real positions; only the pixel size matters for training. Training configs map the class indices
to their own classes with ``label_values`` (see ``recipes/experiments/buildings_v1_stage1.toml``).

The output goes outside the repository (the data must never be committed):

    python scripts/prepare_dubai.py                      # -> ../geoseg-data/multiclass-dubai
    python scripts/prepare_dubai.py --out /data/dubai --gsd 1.0
"""

from __future__ import annotations

import argparse
import warnings
import sys
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "data" / "multiclass-dubai"
OUT = REPO.parent / "geoseg-data" / "multiclass-dubai"
CLASSES = "0 unlabeled, 1 building, 2 land, 3 road, 4 vegetation, 5 water"


def convert(source: Path, out: Path, gsd: float) -> int:
    images = sorted(source.glob("tile*/images/image_part_*.jpg"))
    if not images:
        raise SystemExit(f"no tile*/images/image_part_*.jpg under {source}; pass --source")
    crs = CRS.from_epsg(32640)
    written = 0
    for path in images:
        tile = path.parent.parent.name  # tileN
        mask_path = path.parent.parent / "index_masks" / (path.stem + ".png")
        if not mask_path.exists():
            print(f"skipped {path}: no mask {mask_path}", file=sys.stderr)
            continue
        t, p = int(tile.removeprefix("tile")), int(path.stem.rsplit("_", 1)[1])
        # 10 km apart: tiles along x, parts along y; north of the equator, inside zone 40N.
        transform = from_origin(300_000 + 10_000 * p, 2_800_000 - 10_000 * t, gsd, gsd)
        with rasterio.open(path) as src:
            rgb = src.read()
        with rasterio.open(mask_path) as src:
            ids = src.read(1)
        if ids.shape != rgb.shape[1:]:
            raise SystemExit(f"{mask_path} is {ids.shape}, its image {rgb.shape[1:]}")
        folder = out / tile
        folder.mkdir(parents=True, exist_ok=True)
        common = dict(driver="GTiff", height=ids.shape[0], width=ids.shape[1], crs=crs, transform=transform,
                      tiled=True, blockxsize=256, blockysize=256, compress="deflate")
        with rasterio.open(folder / f"{path.stem}.tif", "w", count=3, dtype="uint8", photometric="RGB", **common) as dst:
            dst.write(rgb)
            dst.update_tags(source=str(path.relative_to(source)), licence="CC0 1.0 (MBRSC / Humans in the Loop)",
                            grid=f"placeholder: {gsd} m pixels, not the image's real position")
        with rasterio.open(folder / f"{path.stem}_labels.tif", "w", count=1, dtype="uint8", **common) as dst:
            dst.write(ids.astype(np.uint8), 1)
            dst.update_tags(classes=CLASSES, source=str(mask_path.relative_to(source)))
        written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=SOURCE, help=f"the multiclass-dubai folder (default {SOURCE})")
    parser.add_argument("--out", type=Path, default=OUT, help=f"where to write the GeoTIFFs (default {OUT})")
    parser.add_argument("--gsd", type=float, default=1.0, help="placeholder pixel size in metres (default 1)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=rasterio.errors.NotGeoreferencedWarning)
    if args.out.resolve().is_relative_to(REPO):
        raise SystemExit(f"--out {args.out} is inside the repository; the data must stay outside it")
    n = convert(args.source, args.out, args.gsd)
    print(f"wrote {n} image/label pairs to {args.out}")


if __name__ == "__main__":
    main()
