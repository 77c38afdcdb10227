"""Open geoseg outputs in real QGIS, headless, report how each layer is styled, and render a picture.

Run it with a Python that has QGIS's bindings (Debian: ``apt install qgis python3-qgis``, then
``/usr/bin/python3``), not geoseg's virtual environment:

    /usr/bin/python3 tests/qgis_check.py OUT.gpkg --layers building,road [--raster CLASSES.tif]
                     [--background IMAGE.tif] [--png picture.png] [--size 900]

Prints one JSON document: QGIS's version; for each GeoPackage layer whether it is valid, its
feature count, geometry type, renderer type and categories (value, label, colour) as QGIS loaded
them from the GeoPackage's ``layer_styles``; for the class raster its renderer and palette as loaded
from the ``.qml`` sidecar; with ``--png``, the rendered picture's size and its distinct colours.
``tests/system/test_qgis.py`` runs it and checks the answers; it skips when no QGIS is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from qgis.core import (  # noqa: E402  (QT_QPA_PLATFORM must be set first)
    Qgis, QgsApplication, QgsMapRendererParallelJob, QgsMapSettings, QgsRasterLayer, QgsRectangle, QgsVectorLayer,
)
from qgis.PyQt.QtCore import QSize  # noqa: E402
from qgis.PyQt.QtGui import QColor  # noqa: E402


def describe_vector(layer: QgsVectorLayer) -> dict:
    renderer = layer.renderer()
    info = {
        "valid": layer.isValid(),
        "features": layer.featureCount(),
        "geometry": QgsWkbTypesName(layer),
        "renderer": renderer.type() if renderer else None,
        "categories": [],
    }
    if renderer is not None and renderer.type() == "categorizedSymbol":
        info["attribute"] = renderer.classAttribute()
        for cat in renderer.categories():
            info["categories"].append({"value": cat.value(), "label": cat.label(),
                                       "color": cat.symbol().color().name()})
    elif renderer is not None and renderer.type() == "singleSymbol":
        info["color"] = renderer.symbol().color().name()
    return info


def QgsWkbTypesName(layer: QgsVectorLayer) -> str:
    from qgis.core import QgsWkbTypes

    return QgsWkbTypes.displayString(layer.wkbType())


def describe_raster(layer: QgsRasterLayer) -> dict:
    renderer = layer.renderer()
    info = {"valid": layer.isValid(), "renderer": renderer.type() if renderer else None, "palette": []}
    if renderer is not None and renderer.type() == "paletted":
        info["palette"] = [{"value": c.value, "label": c.label, "color": c.color.name(), "alpha": c.color.alpha()}
                           for c in renderer.classes()]
    return info


def render(layers: list, png: str, size: int) -> dict:
    extent = QgsRectangle()
    for layer in layers:
        if extent.isEmpty():
            extent = QgsRectangle(layer.extent())
        else:
            extent.combineExtentWith(layer.extent())
    settings = QgsMapSettings()
    settings.setLayers(layers)  # first on top
    settings.setDestinationCrs(layers[-1].crs())
    settings.setBackgroundColor(QColor(255, 255, 255))
    ratio = extent.height() / extent.width() if extent.width() else 1.0
    settings.setOutputSize(QSize(size, max(1, int(round(size * ratio)))))
    settings.setExtent(extent)
    job = QgsMapRendererParallelJob(settings)
    job.start()
    job.waitForFinished()
    image = job.renderedImage()
    image.save(png, "PNG")
    colors: dict[str, int] = {}
    step = max(1, image.width() // 300)
    for y in range(0, image.height(), step):
        for x in range(0, image.width(), step):
            name = QColor(image.pixel(x, y)).name()
            colors[name] = colors.get(name, 0) + 1
    return {"png": png, "width": image.width(), "height": image.height(), "colors": colors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gpkg")
    ap.add_argument("--layers", required=True, help="comma-separated layer names")
    ap.add_argument("--raster", default=None)
    ap.add_argument("--background", default=None, help="an image drawn under everything in the picture")
    ap.add_argument("--png", default=None)
    ap.add_argument("--size", type=int, default=900)
    args = ap.parse_args()

    app = QgsApplication([], False)
    app.initQgis()
    doc: dict = {"qgis": Qgis.QGIS_VERSION, "layers": {}}
    vectors = []
    for name in [n for n in args.layers.split(",") if n]:
        layer = QgsVectorLayer(f"{args.gpkg}|layername={name}", name, "ogr")
        doc["layers"][name] = describe_vector(layer)
        vectors.append(layer)
    below = []
    if args.raster:
        raster = QgsRasterLayer(args.raster, "classes")
        doc["raster"] = describe_raster(raster)
        below.append(raster)
    if args.background:
        image = QgsRasterLayer(args.background, "image")
        below.append(image)
    if args.png:
        doc["render"] = render(vectors + below, args.png, args.size)
    print(json.dumps(doc))
    sys.stdout.flush()
    # QGIS 3.22 can crash while tearing down layers at interpreter exit; the answer is printed, so leave now
    os._exit(0)


if __name__ == "__main__":
    main()
