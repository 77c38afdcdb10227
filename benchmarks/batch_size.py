"""Model throughput and peak memory against batch size (the default tile, the bundled model).

    python benchmarks/batch_size.py --sizes 1 2 4 8 [--precision mixed_bfloat16] [--write docs/performance.md]

Each batch size runs in its own process under ``/usr/bin/time`` (peak resident memory): the
bundle's ``predict_on_batch`` on random tiles of the model's default tile size, one warm-up call,
then enough calls for 32 tiles. This is what chose ``--batch-size``'s default.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(model: str, batch: int, precision: str, tiles: int) -> None:
    import numpy as np

    from geoseg.models.bundle import load_bundle, resolve_model

    bundle = load_bundle(resolve_model(model), precision=precision)
    tile = bundle.meta.tile_size
    x = np.random.default_rng(0).uniform(0, 255, size=(batch, tile, tile, len(bundle.meta.bands))).astype(np.float32)
    bundle.model.predict_on_batch(x)
    calls = max(1, tiles // batch)
    t0 = time.perf_counter()
    for _ in range(calls):
        np.asarray(bundle.model.predict_on_batch(x))
    seconds = time.perf_counter() - t0
    print(json.dumps({"mpx_s": calls * batch * tile * tile / 1e6 / seconds, "tile": tile}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--model", default="buildings")
    ap.add_argument("--precision", default="float32")
    ap.add_argument("--tiles", type=int, default=32)
    ap.add_argument("--write", default=None)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.model, args.child, args.precision, args.tiles)
        return
    from report import machine, publish, timed

    rows = []
    for b in args.sizes:
        proc, _, rss = timed([sys.executable, __file__, "--child", str(b), "--model", args.model,
                              "--precision", args.precision, "--tiles", str(args.tiles)])
        doc = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append((b, doc["mpx_s"], rss, doc["tile"]))
        print(f"batch {b}: {doc['mpx_s']:.3f} Mpx/s, peak {rss:.0f} MiB", file=sys.stderr)
    lines = [f"## Model throughput against batch size ({args.model}, {args.precision}, {rows[0][3]} px tiles)", "",
             f"Measured {machine()}, CPU only, TensorFlow backend.", "",
             f"Command: `python benchmarks/batch_size.py --sizes {' '.join(map(str, args.sizes))} "
             f"--precision {args.precision}`", "",
             "| batch | model Mpx/s | peak RSS (MiB) |", "|---|---|---|"]
    lines += [f"| {b} | {m:.3f} | {r:.0f} |" for b, m, r, _ in rows]
    publish(lines, args.write)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
