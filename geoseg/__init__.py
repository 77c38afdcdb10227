"""geoseg: segment large satellite and drone GeoTIFFs into GIS-ready maps.

The jobs, under their command names::

    import geoseg
    result = geoseg.predict("scene.tif", "buildings.gpkg", model="buildings")
    print(result.counts)                 # {"building": 812}

``predict``, ``vectorize``, ``evaluate``, ``change``, ``train`` and ``run_batch`` (with
``load_manifest`` and ``read_config`` to read their files); their options (``PredictOptions``,
``ChangeOptions``, ``TrainConfig``, ``Cleanup``); and the building blocks of the data flow:
``open_scene`` -> ``list_models`` / ``resolve_model`` / ``load_bundle`` -> ``segment`` ->
``polygonize``. See
docs/api.md. The folders follow the data flow: ``scene`` and ``tiling``, ``models``, ``inference``,
``polygons`` and ``outputs``, ``workflows``, ``training``, ``batch``, ``cli`` (docs/how-it-works.md).

Names are imported when first used, and Keras only when a model is built or loaded, so importing
geoseg and running ``geoseg --help`` stay fast.
"""

import importlib
import os

__version__ = "0.1.0"

# GDAL caches written and read blocks up to 5 % of RAM by default, which made peak memory grow with
# the scene (every block of the class and score rasters stayed cached). geoseg streams its rasters
# strip by strip (column chunks of at most 8192 px), so 64 MB is enough; set GDAL_CACHEMAX yourself
# to override.
os.environ.setdefault("GDAL_CACHEMAX", "64")

# public name -> "module:attribute", imported on first use (PEP 562)
_PUBLIC = {
    # the jobs, named as their commands
    "predict": "geoseg.workflows.predict:predict",
    "vectorize": "geoseg.workflows.vectorize:vectorize",
    "evaluate": "geoseg.workflows.evaluate:evaluate",
    "change": "geoseg.workflows.change:change",
    "train": "geoseg.training:train",
    "run_batch": "geoseg.batch:run_batch",
    "load_manifest": "geoseg.batch:load_manifest",
    "read_config": "geoseg.training:read_config",
    # their options
    "PredictOptions": "geoseg.inference.options:PredictOptions",
    "ChangeOptions": "geoseg.workflows.change:ChangeOptions",
    "TrainConfig": "geoseg.training:TrainConfig",
    "Cleanup": "geoseg.vector.cleanup:Cleanup",
    # the building blocks, in data-flow order
    "open_scene": "geoseg.io.scene:open_scene",
    "load_bundle": "geoseg.models.bundle:load_bundle",
    "list_models": "geoseg.models.bundle:list_builtin",
    "resolve_model": "geoseg.models.bundle:resolve_model",
    "segment": "geoseg.inference.segment:segment",
    "polygonize": "geoseg.vector.polygons:polygonize",
    # errors: every bad input ends in one of these (GeosegError is their base)
    "GeosegError": "geoseg.errors:GeosegError",
    "InputError": "geoseg.errors:InputError",
    "BundleError": "geoseg.errors:BundleError",
    "OutputError": "geoseg.errors:OutputError",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    target = _PUBLIC.get(name)
    if target is None:
        raise AttributeError(f"module 'geoseg' has no attribute {name!r}")
    module, attr = target.split(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
