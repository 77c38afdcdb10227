"""Fuzz the scene reader with mutated GeoTIFF bytes.

Every mutated file must either open and read completely, or fail with geoseg's InputError (the one
line a user sees); any other exception, or a crash of the process, is a bug. The seeds are small
real-looking GeoTIFFs that geoseg writes itself: tiled and striped, deflate and uncompressed, uint8
RGB with an internal mask, uint16 with nodata, float32 with NaN, and an alpha band.

The test suite runs a short fuzz (tests/system/test_fuzz.py). For a long run:

    python tests/fuzz_scene.py --inputs 20000 --seed 1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from geoseg.errors import InputError  # noqa: E402
from geoseg.io.scene import SceneReader, open_scene  # noqa: E402


def seed_files(folder: Path) -> list[bytes]:
    """The unmutated GeoTIFFs, as bytes."""
    rng = np.random.default_rng(0)
    t = from_origin(500000, 5000000, 0.5, 0.5)
    specs = [
        dict(data=rng.integers(0, 255, (3, 48, 40)).astype("uint8"), tiled=True, compress="deflate", mask=True),
        dict(data=rng.integers(0, 2000, (1, 33, 50)).astype("uint16"), tiled=False, compress=None, nodata=0),
        dict(data=np.where(rng.random((2, 40, 40)) < 0.1, np.nan, rng.random((2, 40, 40))).astype("float32"),
             tiled=True, compress="lzw", nodata=float("nan")),
        dict(data=rng.integers(0, 255, (4, 32, 32)).astype("uint8"), tiled=True, compress="deflate", alpha=True),
    ]
    blobs = []
    for i, spec in enumerate(specs):
        data = spec["data"]
        path = folder / f"seed{i}.tif"
        profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=data.dtype, crs="EPSG:32633", transform=t, nodata=spec.get("nodata"))
        if spec["tiled"]:
            profile.update(tiled=True, blockxsize=16, blockysize=16)
        if spec["compress"]:
            profile["compress"] = spec["compress"]
        if spec.get("alpha"):
            profile["photometric"] = "RGB"
            profile["alpha"] = "YES"
        with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
            with rasterio.open(path, "w", **profile) as ds:
                ds.write(data)
                if spec.get("mask"):
                    ds.write_mask(np.where(rng.random(data.shape[1:]) < 0.9, 255, 0).astype("uint8"))
        blobs.append(path.read_bytes())
    return blobs


def mutate(blob: bytes, rng: np.random.Generator) -> bytes:
    """One of: flip random bytes, overwrite a run with a magic value, truncate, duplicate a slice."""
    data = bytearray(blob)
    if not data:  # truncated to nothing by an earlier round: nothing left to mutate
        return blob
    kind = rng.integers(0, 5)
    if kind == 0:  # a few random bytes anywhere
        for _ in range(int(rng.integers(1, 9))):
            data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
    elif kind == 1:  # the header and IFD live in the first few hundred bytes: hit them harder
        for _ in range(int(rng.integers(1, 5))):
            data[int(rng.integers(0, min(len(data), 512)))] = int(rng.integers(0, 256))
    elif kind == 2:  # interesting values (0, max, sign bits) over a run
        at = int(rng.integers(0, len(data)))
        value = rng.choice([b"\x00", b"\xff", b"\x7f", b"\x80"])
        n = int(rng.integers(1, 9))
        data[at : at + n] = value * min(n, len(data) - at)
    elif kind == 3:  # truncation
        data = data[: int(rng.integers(0, len(data)))]
    else:  # a slice copied over another place
        a, b = sorted(rng.integers(0, len(data), 2).tolist())
        at = int(rng.integers(0, len(data)))
        piece = data[a : b][: len(data) - at]
        data[at : at + len(piece)] = piece
    return bytes(data)


def read_through(path: Path) -> str:
    """Open and read the whole scene like predict does. 'ok' or 'input-error'; anything else raises."""
    try:
        info = open_scene(path)
        with SceneReader(info) as reader:
            for r in range(0, info.height, 32):
                reader.read(r, min(r + 32, info.height), 0, info.width)
        return "ok"
    except InputError:
        return "input-error"


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang("no answer within the time limit")


def fuzz(inputs: int, seed: int, folder: Path, limit_s: int = 20) -> dict[str, int]:
    """Mutate the seeds ``inputs`` times; an input that takes longer than ``limit_s`` counts as a
    bug too (a damaged header must not keep geoseg busy for hours)."""
    import signal

    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        return _fuzz(inputs, seed, folder, limit_s)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _fuzz(inputs: int, seed: int, folder: Path, limit_s: int) -> dict[str, int]:
    import signal

    rng = np.random.default_rng(seed)
    blobs = seed_files(folder)
    counts = {"ok": 0, "input-error": 0}
    path = folder / "fuzz.tif"
    for i in range(inputs):
        path.write_bytes(mutate(blobs[i % len(blobs)], rng))
        signal.alarm(limit_s)
        try:
            counts[read_through(path)] += 1
            signal.alarm(0)
        except Exception as exc:
            signal.alarm(0)  # a bug: keep the input for the report
            keep = folder / f"failure-{seed}-{i}.tif"
            keep.write_bytes(path.read_bytes())
            raise AssertionError(f"input {i} (seed {seed}, kept as {keep}) raised {type(exc).__name__}: {exc}") from exc
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description="Fuzz geoseg's scene reader with mutated GeoTIFFs.")
    parser.add_argument("--inputs", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", type=Path, default=None, help="folder for the files (default: a temporary one)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    os.environ.setdefault("CPL_LOG", os.devnull)  # GDAL's own warnings about broken files
    start = time.perf_counter()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        counts = fuzz(args.inputs, args.seed, args.keep)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            counts = fuzz(args.inputs, args.seed, Path(tmp))
    print(f"{args.inputs} mutated GeoTIFFs (seed {args.seed}) in {time.perf_counter() - start:.0f} s: "
          f"{counts['ok']} read completely, {counts['input-error']} refused with InputError, 0 other errors")


if __name__ == "__main__":
    main()
