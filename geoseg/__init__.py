"""geoseg: segment large satellite and drone GeoTIFFs into GIS-ready maps.

The data flow, one module a step::

    scene.py  ->  tiling.py  ->  predict.py (batches, model)  ->  blend.py  ->  outputs.py
                                                                     \\-> polygons.py -> outputs.py

Keras is imported lazily (only by ``geoseg.models`` when a model is built or loaded), so importing
geoseg and running ``geoseg --help`` stay fast.
"""

import os

__version__ = "0.1.0"

# GDAL caches written and read blocks up to 5 % of RAM by default, which made peak memory grow with
# the scene (every block of the class and score rasters stayed cached). geoseg streams its rasters
# strip by strip (column chunks of at most 8192 px), so 64 MB is enough; set GDAL_CACHEMAX yourself
# to override.
os.environ.setdefault("GDAL_CACHEMAX", "64")
