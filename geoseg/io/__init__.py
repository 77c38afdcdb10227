"""Reading and writing: scenes (``scene``: open, check, read windows; ``tiffheader``: a TIFF's header
against its file), areas of interest (``aoi``), labels on a scene's grid (``labels``), and the outputs
(``outputs``: tiled GeoTIFF, COG, QGIS styles, GeoPackage; ``atomic``: staging and output locks)."""
