"""The jobs, one module per command: ``predict``, ``vectorize``, ``evaluate`` and ``change``.

Each takes paths and options, checks everything it can before the model loads, runs the steps of
``geoseg.inference`` and ``geoseg.vector.polygons`` / ``geoseg.io.outputs``, and writes its outputs all or
nothing (``geoseg.io.atomic``). ``geoseg.training`` and ``geoseg.batch`` build on these; the CLI
(``geoseg.cli``) is a thin layer of options over them; ``import geoseg`` offers them by name.
"""
