"""Time of blending alone: every tile of a square scene added to the strip accumulator and flushed.

    python benchmarks/blend.py [--size 8192] [--classes 2] [--write docs/performance.md]

The tiles are the default model's (512 px, overlap 128, cosine window) with random logits; the sink
only hashes what it gets, so the figure is the accumulator's own cost (weighting, summing, softmax,
argmax, shifting the rolling buffer), which runs in predict's background thread beside the model.
The hash lets two versions of the code be compared for identical output.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from geoseg.tiling.blend import StripAccumulator, weight_window  # noqa: E402
from geoseg.tiling.tiles import plan_tiles  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--classes", type=int, default=2)
    ap.add_argument("--tile-size", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=128)
    ap.add_argument("--write", default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "benchmarks"))
    from report import machine, publish

    tiles = plan_tiles(args.size, args.size, tile_size=args.tile_size, overlap=args.overlap)
    logits = np.random.default_rng(0).normal(size=(args.tile_size, args.tile_size, args.classes)).astype(np.float32)
    valid = np.ones(logits.shape[:2], bool)
    digest = hashlib.sha256()

    def sink(strip) -> None:
        digest.update(strip.classes.tobytes())
        digest.update(strip.probs[::7, ::7].tobytes())

    acc = StripAccumulator(height=args.size, width=args.size, classes=args.classes, tile_size=args.tile_size,
                           window=weight_window(args.tile_size, kind="cosine", overlap=args.overlap), sink=sink)
    t0 = time.perf_counter()
    for tile in tiles:
        acc.add(tile, logits, valid)
    acc.finish()
    seconds = time.perf_counter() - t0
    mpx = len(tiles) * args.tile_size ** 2 / 1e6
    publish([f"blend {args.size}² ({len(tiles)} tiles, {args.classes} classes): {seconds:.2f} s, "
             f"{mpx / seconds:.0f} Mpx of tiles/s, output sha256 {digest.hexdigest()[:16]} ({machine()})"], args.write)


if __name__ == "__main__":
    main()
