"""Writers: tiled GeoTIFF, COG, QGIS styles and the GeoPackage with layer_styles."""

from __future__ import annotations

import sqlite3
import xml.etree.ElementTree as ET

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from pyproj import CRS
from rasterio.transform import from_origin

from geoseg.errors import OutputError
from geoseg.io.outputs import (
    TiledTiffWriter,
    class_colormap,
    layer_qml,
    read_run_metadata,
    write_cog,
    write_geopackage,
    write_raster_qml,
)

TRANSFORM = from_origin(500_000, 4_000_000, 0.5, 0.5)
COLUMNS = ["class_name", "class_id", "area_m2", "perimeter_m", "score"]


def write_strips(path, array, heights, *, nodata=255, dtype=None):
    count = 1 if array.ndim == 2 else array.shape[0]
    height, width = array.shape[-2:]
    with TiledTiffWriter(path, width=width, height=height, count=count, dtype=dtype or array.dtype.name,
                         crs="EPSG:32633", transform=TRANSFORM, nodata=nodata) as writer:
        row = 0
        for h in heights:
            writer.write(array[..., row : row + h, :], row_off=row)
            row += h
        assert writer.rows_written == height
    return str(path)


def test_tiled_writer_strips_of_odd_heights_read_back_exactly(tmp_path):
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 5, (1100, 700)).astype(np.uint8)
    path = write_strips(tmp_path / "c.tif", classes, [7, 600, 1, 333, 159])
    with rasterio.open(path) as ds:
        assert ds.profile["tiled"] and ds.block_shapes == [(512, 512)]
        assert ds.nodata == 255 and ds.crs == "EPSG:32633"
        np.testing.assert_array_equal(ds.read(1), classes)

    aligned = write_strips(tmp_path / "a.tif", classes.astype(np.int64), [1024, 70, 6],
                           dtype="uint8")
    with rasterio.open(aligned) as ds:
        assert ds.dtypes == ("uint8",)
        np.testing.assert_array_equal(ds.read(1), classes)

    probs = rng.random((3, 530, 300)).astype(np.float32)
    path = write_strips(tmp_path / "p.tif", probs, [3, 512, 15], nodata=None)
    with rasterio.open(path) as ds:
        assert ds.count == 3
        np.testing.assert_array_equal(ds.read(), probs)


def test_tiled_writer_refuses_rows_out_of_order_and_bad_shapes(tmp_path):
    with TiledTiffWriter(tmp_path / "c.tif", width=10, height=10, count=1, dtype="uint8",
                         crs="EPSG:32633", transform=TRANSFORM) as writer:
        writer.write(np.zeros((3, 10), np.uint8), row_off=0)
        with pytest.raises(ValueError, match="expected row_off=3"):
            writer.write(np.zeros((3, 10), np.uint8), row_off=5)
        with pytest.raises(ValueError, match="shape"):
            writer.write(np.zeros((3, 9), np.uint8), row_off=3)
        with pytest.raises(ValueError, match="float64"):
            writer.write(np.zeros((3, 10)), row_off=3)
        with pytest.raises(ValueError, match="height"):
            writer.write(np.zeros((30, 10), np.uint8), row_off=3)


def test_write_cog_is_a_cog_with_nearest_overviews_and_metadata(tmp_path):
    rng = np.random.default_rng(1)
    ids = np.array([0, 10, 20], dtype=np.uint8)  # averaging or cubic would invent values
    classes = ids[rng.integers(0, 3, (1300, 1100))]
    classes[:200, :300] = 255
    src = write_strips(tmp_path / "c.tif", classes, [700, 600])
    colors = [(0, 0, 0)] * 21
    colors[10], colors[20] = (200, 30, 30), (30, 30, 200)
    cmap = class_colormap(colors, nodata=255)
    dst = tmp_path / "cog.tif"
    write_cog(src, dst, colormap=cmap, band_descriptions=["class"],
              tags={"geoseg_model": "buildings-1"})

    with rasterio.open(dst) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert ds.tags(ns="IMAGE_STRUCTURE")["COMPRESSION"] == "DEFLATE"
        assert ds.profile["tiled"] and ds.nodata == 255
        factors = ds.overviews(1)
        assert factors
        for f in factors:
            overview = ds.read(1, out_shape=(ds.height // f, ds.width // f))
            assert set(np.unique(overview)) <= {0, 10, 20, 255}
        np.testing.assert_array_equal(ds.read(1), classes)
        assert ds.colormap(1)[10] == (200, 30, 30, 255)  # TIFF colour tables hold no alpha: the .qml has it
        assert ds.colormap(1)[255] == (0, 0, 0, 0)
        assert ds.descriptions == ("class",)
        assert ds.tags()["geoseg_model"] == "buildings-1"


def test_class_colormap_refuses_nodata_that_is_a_class():
    assert class_colormap([(1, 2, 3)], nodata=None) == {0: (1, 2, 3, 255)}
    with pytest.raises(ValueError, match="nodata=0"):
        class_colormap([(1, 2, 3)], nodata=0)
    with pytest.raises(ValueError, match="colour"):
        class_colormap([(1, 2, 300)], nodata=255)


def test_raster_qml_is_paletted_with_one_named_entry_per_class(tmp_path):
    path = tmp_path / "classes.qml"
    write_raster_qml(path, class_names=["background", "building", "road & path"],
                     colors=[(0, 0, 0), (255, 0, 0), (0, 128, 255)], skip=(0,))
    root = ET.parse(path).getroot()
    renderer = root.find("pipe/rasterrenderer")
    assert renderer.get("type") == "paletted" and renderer.get("band") == "1"
    entries = renderer.findall("colorPalette/paletteEntry")
    assert [(e.get("value"), e.get("label"), e.get("color")) for e in entries] == [
        ("1", "building", "#ff0000"), ("2", "road & path", "#0080ff")]
    write_raster_qml(path, class_names=["background", "building"], colors=[(0, 0, 0), (255, 0, 0)], transparent={0})
    entries = ET.parse(path).getroot().findall("pipe/rasterrenderer/colorPalette/paletteEntry")
    assert [(e.get("value"), e.get("alpha")) for e in entries] == [("0", "0"), ("1", "180")]


def test_layer_qml_is_a_categorized_renderer_on_class_name():
    root = ET.fromstring(layer_qml(class_name="building", color=(200, 100, 50)))
    renderer = root.find("renderer-v2")
    assert renderer.get("type") == "categorizedSymbol" and renderer.get("attr") == "class_name"
    assert [c.get("value") for c in renderer.findall("categories/category")] == ["building"]
    props = {o.get("name"): o.get("value")
             for o in renderer.findall("symbols/symbol/layer/Option/Option")}
    assert props["color"] == "200,100,50,153" and props["outline_color"] == "120,60,30,255"


def polygon_frame(name, cid, n, crs="EPSG:32633", **extra):
    geoms = [shapely.box(500_000 + 10 * i, 4_000_000, 500_005 + 10 * i, 4_000_005)
             for i in range(n)]
    return gpd.GeoDataFrame(
        {"class_name": [name] * n, "class_id": np.full(n, cid, np.int64),
         "area_m2": [25.0] * n, "perimeter_m": [20.0] * n, "score": [0.9] * n, **extra},
        geometry=geoms, crs=crs,
    )


def test_write_geopackage_layers_styles_and_metadata(tmp_path):
    path = tmp_path / "out.tmp-123.gpkg"
    layers = {
        "water": polygon_frame("water", 3, 2, height=[1.0, 2.0]),
        "building": polygon_frame("building", 1, 3),
        "road": polygon_frame("road", 2, 0),
    }
    colors = {"water": (0, 0, 255), "building": (255, 0, 0), "road": (128, 128, 128)}
    write_geopackage(path, layers, colors=colors,
                     metadata={"model": "buildings-1", "scene": "kampala.tif"})

    listed = pyogrio.list_layers(path)
    assert list(listed[:3, 0]) == ["water", "building", "road"]
    assert list(listed[:3, 1]) == ["MultiPolygon"] * 3
    for name, frame in layers.items():
        info = pyogrio.read_info(path, layer=name)
        assert info["features"] == len(frame)
        assert CRS(info["crs"]) == CRS("EPSG:32633")
        expected = COLUMNS + (["height"] if name == "water" else [])
        assert list(info["fields"]) == expected
        assert list(info["dtypes"][:5]) == ["object", "int32", "float64", "float64", "float64"]
    back = pyogrio.read_dataframe(path, layer="water")
    assert back.height.tolist() == [1.0, 2.0] and back.geom_type.unique().tolist() == ["MultiPolygon"]

    with sqlite3.connect(path) as db:
        rows = db.execute(
            "SELECT f_table_catalog, f_table_schema, f_table_name, f_geometry_column, styleName,"
            " styleQML, useAsDefault FROM layer_styles ORDER BY id").fetchall()
        contents = dict(db.execute("SELECT table_name, data_type FROM gpkg_contents"))
    assert [r[2] for r in rows] == ["water", "building", "road"]
    for catalog, schema, table, column, style_name, qml, default in rows:
        assert schema == "" and catalog is None
        assert column == pyogrio.read_info(path, layer=table)["geometry_name"] == "geom"
        assert style_name == table and default == 1
        category = ET.fromstring(qml).find("renderer-v2/categories/category")
        assert category.get("value") == table
    assert contents["layer_styles"] == "attributes" and contents["geoseg_run"] == "attributes"
    assert contents["water"] == "features"
    assert read_run_metadata(path) == {"model": "buildings-1", "scene": "kampala.tif"}


def test_write_geopackage_refuses_bad_targets(tmp_path):
    layers = {"building": polygon_frame("building", 1, 1)}
    with pytest.raises(OutputError, match="gpkg"):
        write_geopackage(tmp_path / "out.tmp", layers, colors={"building": (1, 2, 3)})
    with pytest.raises(OutputError, match="colour"):
        write_geopackage(tmp_path / "a.gpkg", layers, colors={})
    path = tmp_path / "b.gpkg"
    write_geopackage(path, layers, colors={"building": (1, 2, 3)})
    with pytest.raises(OutputError, match="exists"):
        write_geopackage(path, layers, colors={"building": (1, 2, 3)})
    assert read_run_metadata(path) == {}


def test_polygonize_to_geopackage_round_trip(tmp_path):
    from geoseg.vector.polygons import polygonize

    classes = np.zeros((40, 40), np.uint8)
    classes[5:15, 5:15] = 1
    classes[20:30, 2:38] = 2
    classes[35:, :] = 255
    src = write_strips(tmp_path / "c.tif", classes, [40])
    layers = polygonize(src, class_names=["background", "building", "road"])
    path = tmp_path / "out.gpkg"
    write_geopackage(path, layers, colors={"building": (255, 0, 0), "road": (90, 90, 90)})
    back = pyogrio.read_dataframe(path, layer="building")
    assert back.area_m2.tolist() == [25.0] and back.crs == CRS("EPSG:32633")
    assert back.geometry.iloc[0].equals(layers["building"].geometry.iloc[0])
