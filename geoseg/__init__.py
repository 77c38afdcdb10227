"""geoseg: segment large satellite and drone GeoTIFFs into GIS-ready maps.

The data flow, one module a step::

    scene.py  ->  tiling.py  ->  predict.py (batches, model)  ->  blend.py  ->  outputs.py
                                                                     \\-> polygons.py -> outputs.py

Keras is imported lazily (only by ``geoseg.models`` when a model is built or loaded), so importing
geoseg and running ``geoseg --help`` stay fast.
"""

__version__ = "0.1.0"
