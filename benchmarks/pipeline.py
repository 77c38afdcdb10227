"""Pipeline against model alone, and geoseg against a naive pipeline, on the same scene and model.

    python benchmarks/pipeline.py --size 8192 [--precision mixed_bfloat16] [--write docs/performance.md]

The scene: real satellite imagery at the default model's GSD (0.3 m), a mosaic of the DubaiSat
images of ``../shared/data/multiclass-dubai`` (tile 8, ~1 m) upsampled bilinearly to 0.3 m and laid
side by side until the square is full (a georeferenced uint8 RGB GeoTIFF, tiled, DEFLATE).

Three runs, each in its own process (peak resident memory from ``/usr/bin/time``):

1. ``geoseg predict`` with the bundled ``buildings`` model: GeoPackage + class COG;
2. the model alone: the same bundle on as many tiles as predict ran, with the same batch size,
   tile shape and precision, on real tiles of the scene read before the clock starts (16 tiles,
   cycled through: random arrays ran the old U-Net 5-10 % slower than imagery), called both ways: Keras's
   ``predict_on_batch`` and the forward pass geoseg itself calls (``inference.engine.predict_fn``:
   a ``tf.function`` under TensorFlow); the faster of the two is the model's throughput;
3. a naive pipeline written the way common tools do it: the whole scene read into memory, tiles
   predicted one at a time, softmax probabilities averaged in full-scene float64 arrays,
   ``rasterio.features.shapes`` on the whole class array, then ``shape(...).simplify`` per polygon
   and a GeoPackage written with geopandas.

Reported: megapixels of scene per second, the pipeline / model-alone ratio, each stage's share
of predict's wall time, and time, peak memory and pixel agreement of geoseg against the naive run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.transform import from_origin
from rasterio.windows import Window

REPO = Path(__file__).resolve().parents[1]
DUBAI = REPO.parent / "shared" / "data" / "multiclass-dubai" / "tile8" / "images"
GSD = 0.3


def make_scene(path: Path, size: int) -> Path:
    """A size x size mosaic of upsampled DubaiSat images at 0.3 m (see the module docstring)."""
    images = sorted(DUBAI.glob("*.jpg"))
    if not images:
        raise SystemExit(f"no images in {DUBAI}: this benchmark needs ../shared/data beside the repository")
    canvas = np.zeros((3, size, size), np.uint8)
    r = c = row_h = 0
    i = 0
    import warnings

    warnings.simplefilter("ignore")
    while r < size:
        with rasterio.open(images[i % len(images)]) as ds:
            h, w = int(ds.height / GSD), int(ds.width / GSD)  # placeholder 1 m pixels -> 0.3 m
            img = ds.read(out_shape=(3, h, w), resampling=Resampling.bilinear)
        i += 1
        hh, ww = min(h, size - r), min(w, size - c)
        canvas[:, r : r + hh, c : c + ww] = img[:, :hh, :ww]
        row_h = max(row_h, hh)
        c += ww
        if c >= size:
            r, c, row_h = r + row_h, 0, 0
    profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs="EPSG:32640",
                   transform=from_origin(300000, 2800000, GSD, GSD), tiled=True, blockxsize=512, blockysize=512,
                   compress="deflate", photometric="RGB")
    with rasterio.open(path, "w", **profile) as ds:
        for r0 in range(0, size, 2048):
            ds.write(canvas[:, r0 : r0 + 2048], window=Window(0, r0, size, min(2048, size - r0)))
    return path


# --- the model alone and the naive pipeline run as `python benchmarks/pipeline.py --child ...` -------


def child_model_alone(model: str, tiles: int, batch: int, tile: int, precision: str, scene: str) -> None:
    from geoseg.inference.engine import predict_fn
    from geoseg.models.bundle import load_bundle, resolve_model

    bundle = load_bundle(resolve_model(model), precision=precision)
    assert bundle.precision == precision, (bundle.precision, precision)
    # real tiles of the scene, as predict feeds them (float32 pixel values, bands last), read before
    # the clock starts: 16 tiles spread over the scene, cycled through
    with rasterio.open(scene) as ds:
        rng = np.random.default_rng(0)
        rows = rng.integers(0, ds.height - tile + 1, 16)
        cols = rng.integers(0, ds.width - tile + 1, 16)
        pool = np.stack([np.moveaxis(ds.read(window=Window(c, r, tile, tile)), 0, -1) for r, c in zip(rows, cols)])
    pool = pool.astype(np.float32)
    if pool.shape[-1] != len(bundle.meta.bands):
        pool = np.repeat(pool, len(bundle.meta.bands), axis=-1)
    calls = -(-tiles // batch)
    xs = [pool[(np.arange(batch) + i * batch) % len(pool)] for i in range(min(calls, 8))]
    out = {"calls": calls}
    for name, fn in (("predict_on_batch_s", bundle.model.predict_on_batch), ("geoseg_forward_s", predict_fn(bundle.model))):
        np.asarray(fn(xs[0]))  # warm-up (graph tracing), left out as predict leaves out its "trace" stage
        t0 = time.perf_counter()
        for i in range(calls):
            np.asarray(fn(xs[i % len(xs)]))
        out[name] = time.perf_counter() - t0
    out["model_s"] = min(out["predict_on_batch_s"], out["geoseg_forward_s"])
    print(json.dumps(out))


def child_naive(scene: str, model: str, out: str, tile: int, overlap: int, precision: str) -> None:
    import geopandas as gpd
    import rasterio.features
    import shapely.geometry

    from geoseg.tiling.blend import decision_bias
    from geoseg.models.bundle import load_bundle, resolve_model
    from geoseg.tiling.tiles import plan_tiles

    t0 = time.perf_counter()
    bundle = load_bundle(resolve_model(model), precision=precision)
    t_load = time.perf_counter() - t0
    with rasterio.open(scene) as ds:
        image = ds.read()  # the whole scene in memory
        transform, crs = ds.transform, ds.crs
    _, h, w = image.shape
    k = len(bundle.meta.classes)
    probs = np.zeros((k, h, w), np.float64)
    weights = np.zeros((h, w), np.float64)
    for t in plan_tiles(h, w, tile_size=tile, overlap=overlap):
        x = np.zeros((tile, tile, image.shape[0]), np.float32)
        patch = image[:, t.row : t.row + tile, t.col : t.col + tile]
        x[: patch.shape[1], : patch.shape[2]] = np.moveaxis(patch, 0, -1)
        logits = np.asarray(bundle.model.predict_on_batch(x[None]), np.float64)[0]  # one tile at a time
        e = np.exp(logits - logits.max(-1, keepdims=True))
        p = np.moveaxis(e / e.sum(-1, keepdims=True), -1, 0)
        ph, pw = patch.shape[1:]
        probs[:, t.row : t.row + ph, t.col : t.col + pw] += p[:, :ph, :pw]
        weights[t.row : t.row + ph, t.col : t.col + pw] += 1
    mean = probs / weights
    bias = decision_bias([c.threshold for c in bundle.meta.classes])
    if bias is not None:  # the model's decision thresholds, as geoseg applies them (like for like), in place
        np.maximum(mean, 1e-12, out=mean)
        np.log(mean, out=mean)
        mean += bias[:, None, None]
    classes = np.argmax(mean, axis=0).astype(np.uint8)
    t_model = time.perf_counter() - t0 - t_load
    np.save(out + ".npy", classes)
    t1 = time.perf_counter()
    geoms, ids = [], []
    for geom, value in rasterio.features.shapes(classes, mask=classes > 0, connectivity=4, transform=transform):
        geoms.append(shapely.geometry.shape(geom).simplify(GSD / 2))
        ids.append(int(value))
    frame = gpd.GeoDataFrame({"class_id": ids}, geometry=geoms, crs=crs)
    frame["area_m2"] = frame.area
    frame.to_file(out, driver="GPKG", layer="polygons")
    print(json.dumps({"load_s": t_load, "predict_s": t_model, "vector_s": time.perf_counter() - t1,
                      "polygons": len(frame), "precision": bundle.precision}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--model", default="buildings")
    ap.add_argument("--precision", default="auto", help="geoseg's and the model-alone run's --precision")
    ap.add_argument("--naive-precision", default="float32",
                    help="the naive pipeline's (common tools run float32; 'auto' or any --precision value)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-naive", action="store_true", help="skip the naive pipeline")
    ap.add_argument("--blend", default="cosine", help="geoseg's --blend (mean: the naive pipeline's even averaging)")
    ap.add_argument("--polygonize", default="after", choices=["after", "live"],
                    help="geoseg's --polygonize: beside the model (live) or after it")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--write", default=None, help="Markdown file to append the tables to")
    ap.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "model":
            child_model_alone(rest[0], int(rest[1]), int(rest[2]), int(rest[3]), rest[4], rest[5])
        else:
            child_naive(rest[0], rest[1], rest[2], int(rest[3]), int(rest[4]), rest[5])
        return

    from report import machine, publish, timed

    py, geoseg = sys.executable, str(Path(sys.executable).with_name("geoseg"))
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        scene = make_scene(tmp / "scene.tif", args.size)
        mpx = args.size * args.size / 1e6
        proc, wall, rss = timed([geoseg, "-q", "predict", str(scene), "-o", str(tmp / "g.gpkg"), "--raster-out",
                                 str(tmp / "g.tif"), "--model", args.model, "--precision", args.precision,
                                 "--batch-size", str(args.batch_size), "--blend", args.blend, "--polygonize",
                                 args.polygonize, "--json"])
        doc = json.loads(proc.stdout)
        t = doc["timings_s"]
        run_tiles, tile, overlap = doc["tiles"]["run"], doc["tiles"]["size"], doc["tiles"]["overlap"]
        precision = doc["model"]["precision"]  # what --precision (auto by default) chose on this machine
        # Model set-up is left out on both sides: loading, and the one-time graph trace that predict
        # does before its first batch ("trace") and the model-alone run in its warm-up call.
        trace_s = t.get("trace", 0.0)
        pipeline_s = t["total"] - t["load"] - trace_s
        proc_m, _, _ = timed([py, __file__, "--child", "model", args.model, str(run_tiles), str(args.batch_size),
                              str(tile), precision, str(scene)])
        alone = json.loads(proc_m.stdout)
        model_s = alone["model_s"]
        naive = None
        if not args.no_naive:
            proc_n, wall_n, rss_n = timed([py, __file__, "--child", "naive", str(scene), args.model,
                                           str(tmp / "naive.gpkg"), str(tile), str(overlap), args.naive_precision])
            nd = json.loads(proc_n.stdout)
            naive_precision = nd["precision"]
            with rasterio.open(tmp / "g.tif") as ds:
                ours = ds.read(1)
            theirs = np.load(tmp / "naive.gpkg.npy")
            naive = {"wall": wall_n, "rss": rss_n, "work_s": nd["predict_s"] + nd["vector_s"], **nd,
                     "agree": float((ours == theirs).mean())}

    lines = [
        f"## Pipeline against model alone{' and a naive pipeline' if naive else ''}, {args.size} x {args.size}",
        "",
        f"Measured {machine()}, CPU only, TensorFlow backend, model `{args.model}` in {precision} (geoseg "
        f"and the model alone; --precision {args.precision})"
        f"{f', the naive pipeline in {naive_precision}' if naive else ''}, "
        f"tile {tile} / overlap {overlap}, batch {args.batch_size}; {run_tiles} tiles run.",
        "",
        f"Command: `python benchmarks/pipeline.py --size {args.size} --batch-size {args.batch_size} "
        f"--precision {args.precision} --naive-precision {args.naive_precision} --blend {args.blend} "
        f"--polygonize {args.polygonize}"
        f"{' --no-naive' if args.no_naive else ''}`",
        "",
        "| run | seconds | Mpx/s | peak RSS (MiB) |",
        "|---|---|---|---|",
        f"| model alone ({run_tiles} tiles, forward passes only; the faster of predict_on_batch "
        f"{alone['predict_on_batch_s']:.1f} s and geoseg's forward pass {alone['geoseg_forward_s']:.1f} s) | "
        f"{model_s:.1f} | {mpx / model_s:.2f} | - |",
        f"| geoseg predict (read, model, blend, write, polygonize; model load and graph trace excluded) | {pipeline_s:.1f} | "
        f"{mpx / pipeline_s:.2f} | {rss:.0f} |",
    ]
    if naive:
        lines.append(f"| naive pipeline (model load excluded) | {naive['work_s']:.1f} | {mpx / naive['work_s']:.2f} | "
                     f"{naive['rss']:.0f} |")
    lines += ["", f"Pipeline / model alone: **{model_s / pipeline_s:.2f}** of the model's throughput "
              f"(model load {t['load']:.1f} s and graph trace {trace_s:.1f} s left out, as the model-alone run "
              f"leaves out its load and warm-up call; with them counted in predict: "
              f"{model_s / (pipeline_s + trace_s):.2f})."]
    stages = {k: v for k, v in t.items() if k not in ("total", "load", "trace")}
    lines += ["", "Stages of `geoseg predict` (seconds; model and blend_write overlap with reading, which runs in a "
              "background thread):", "", "| " + " | ".join(stages) + " | total |", "|" + "---|" * (len(stages) + 1),
              "| " + " | ".join(f"{v:.1f} ({v / pipeline_s:.0%})" for v in stages.values()) + f" | {pipeline_s:.1f} |"]
    if naive:
        lines += ["", f"geoseg against the naive pipeline: **{naive['work_s'] / pipeline_s:.1f}x** faster, "
                  f"**{naive['rss'] / rss:.1f}x** less peak memory; pixel agreement of the class rasters "
                  f"**{naive['agree']:.2%}** (the naive run averages overlaps evenly, geoseg blended with "
                  f"--blend {args.blend}); polygons: geoseg {sum(doc['counts'].values())}, naive {naive['polygons']}."]
    publish(lines, args.write)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
