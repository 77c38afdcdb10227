"""Re-make the pictures of docs/gallery.md (and the README's) from the real outputs of the bundled
models on the bundled sample data, rendered by real QGIS with the styles geoseg writes.

    python docs/gallery.py [--only atlanta,rotterdam,kampala,naip-change] [--size 900] [--out DIR]

Needs geoseg installed in the running Python and QGIS's Python bindings in ``/usr/bin/python3``
(Debian: ``apt install qgis python3-qgis``). Each picture is the scene with the outputs over it,
exactly as QGIS draws the GeoPackage and the class raster's ``.qml`` (background transparent, classes
semi-opaque). Run it whenever a bundled model changes; the commands it runs are printed and listed
in docs/gallery.md. Only pictures of ``sample_data/`` go into the repository: the data beside the
project (``../shared/data``) may not be copied into it, pictures included, so the drone picture
(Kampala) and the two-date NAIP change picture are written to ``--out`` instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "docs" / "images"
QGIS_PYTHON = os.environ.get("GEOSEG_QGIS_PYTHON", "/usr/bin/python3")
SAMPLE = REPO / "sample_data"

NAIP = REPO.parent / "shared" / "data" / "naip-multidate"
OAM = REPO.parent / "shared" / "data" / "buildings-oam-train" / "mosaics" / "2-kampala_ug"

# name: geoseg command (outputs relative to the work folder), layers drawn (None: every layer),
# background image, picture name, and whether the picture may live in the repository
GALLERY = {
    "atlanta": (["predict", SAMPLE / "atlanta_sn4_pan.tif", "-o", "buildings.gpkg", "--raster-out", "buildings.tif"],
                "building", SAMPLE / "atlanta_sn4_pan.tif", "qgis-atlanta-buildings.png", True),
    "rotterdam": (["predict", SAMPLE / "rotterdam_sn6_rgb_1.tif", "-o", "rotterdam.gpkg", "--model", "landcover"],
                  None, SAMPLE / "rotterdam_sn6_rgb_1.tif", "gallery-rotterdam-landcover.png", True),
    # drone imagery and two dates of one place exist only in ../shared/data (NAIP, public domain, but that data is never
    # copied into the repository): this picture goes to --out, outside the repository
    "kampala": (["predict", OAM / "kampala_ug_block1_z21_rgb.tif", "-o", "kampala.gpkg"],
                "building", OAM / "kampala_ug_block1_z21_rgb.tif", "gallery-kampala-buildings.png", False),
    "naip-change": (["change", NAIP / "m_4709963_se_14_1_20090818.tif", NAIP / "m_4709963_se_14_1_20200831.tif",
                     "-o", "changes.gpkg", "--model", "landcover", "--bands", "1,2,3"],
                    None, NAIP / "m_4709963_se_14_1_20200831.tif", "gallery-naip-change.png", False),
}


def layers_of(gpkg: Path) -> list[str]:
    import pyogrio

    return [str(name) for name, geometry in pyogrio.list_layers(gpkg) if geometry is not None]  # not the run table


def make(name: str, work: Path, size: int, out: Path, images: Path = IMAGES) -> dict:
    command, layers, background, picture, in_repo = GALLERY[name]
    folder = images if in_repo else out
    if not Path(background).exists():
        print(f"skip {name}: {background} is absent")
        return {}
    args = [str(a) for a in command]
    shown = [os.path.relpath(a, REPO) if a.startswith(str(REPO.parent)) else a for a in args]
    print("geoseg " + " ".join(shlex.quote(a) for a in shown), flush=True)
    subprocess.run([sys.executable, "-m", "geoseg", "-q", *args, "--overwrite"], cwd=work, check=True)
    gpkg = work / args[args.index("-o") + 1]
    drawn = layers or ",".join(layers_of(gpkg))
    # the polygons over the scene (QGIS draws the GeoPackage's own styles: 60 % fills, darker outlines)
    render = [QGIS_PYTHON, str(REPO / "tests" / "qgis_check.py"), str(gpkg), "--layers", drawn,
              "--background", str(background), "--png", str(folder / picture), "--size", str(size)]
    done = subprocess.run(render, capture_output=True, text=True, check=True)
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    where = os.path.relpath(folder / picture, REPO) if folder.is_relative_to(REPO) else folder / picture
    print(f"  -> {where} ({doc['render']['width']} x {doc['render']['height']} px, QGIS {doc['qgis']}; "
          f"layers {drawn})")
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(GALLERY), help="comma-separated: " + ", ".join(GALLERY))
    ap.add_argument("--size", type=int, default=900, help="picture width in px")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "geoseg-gallery",
                    help="folder for the pictures of data that may not be in the repository (default: %(default)s)")
    ap.add_argument("--images", type=Path, default=IMAGES,
                    help="folder for the pictures of sample_data (default: docs/images, the ones the docs show)")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(GALLERY))
    if unknown:
        sys.exit(f"Error: unknown gallery entries {', '.join(unknown)}; choose from {', '.join(GALLERY)}")
    if not Path(QGIS_PYTHON).exists():
        sys.exit(f"Error: {QGIS_PYTHON} not found; install QGIS (apt install qgis python3-qgis) or set GEOSEG_QGIS_PYTHON")
    args.images.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="geoseg-gallery-") as tmp:
        for name in names:
            make(name, Path(tmp), args.size, args.out.resolve(), args.images.resolve())


if __name__ == "__main__":
    main()
