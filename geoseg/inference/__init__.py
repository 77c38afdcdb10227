"""Inference: a model bundle over a scene of any size, streaming, into rasters on the scene's grid.

The modules in the order the data flows through them:

- ``options``: how to run (``PredictOptions``), checked once and resolved against the model;
- ``grids``: the grid the model runs on (the scene's, or resampled to the model's GSD), its tiles
  and column chunks;
- ``batches``: the scene read strip by strip into fixed-shape batches of tiles with data;
- ``engine``: forward passes, the logits blended behind the model (``geoseg.tiling.blend``), finished
  strips handed to
- ``rasters``: the class, score and probability GeoTIFFs, and the warp back from a resampled grid;
- ``scales``: the chain once per zoom, merged on the scene's grid;
- ``segment``: the entry point, ``segment(scene, bundle, out_dir)``, that picks one of the above;
- ``live``: strips handed on to a polygonizer running beside the model (``--polygonize live``).

The whole predict job (outputs staged, polygons, COGs, run metadata) is ``geoseg.workflows.predict``.
"""
