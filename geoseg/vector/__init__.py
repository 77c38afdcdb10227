"""From class rasters to vectors: connected regions (``regions``), clean-up before tracing
(``cleanup``: sieve, holes, coverage simplification), exact polygons in strips (``polygons``), true
areas, perimeters and lengths (``measure``), squared building outlines (``regularize``) and road
centre-lines (``centrelines``)."""
