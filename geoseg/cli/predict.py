"""geoseg predict SCENE -o OUT.gpkg: the main job."""

from __future__ import annotations

import click

from geoseg.cli.options import (
    StageBars, aoi_option, centerline_options, cleanup_options, echo_json, inference_options, json_option, logger,
    model_option, output_option, overwrite_option, pop_centerline_options, pop_predict_options,
)
from geoseg.inference.options import POLYGONIZE


@click.command()
@click.argument("scene", type=click.Path(dir_okay=True))
@output_option(help="GeoPackage of polygons, one layer per class (.gpkg).")
@model_option
@click.option("--raster-out", type=click.Path(dir_okay=False), default=None,
              help="Also write the class raster as a Cloud-Optimized GeoTIFF (with a QGIS .qml style).")
@click.option("--probs-out", type=click.Path(dir_okay=False), default=None,
              help="Also write per-class probabilities (float32 COG, one band per class).")
@click.option("--preview", type=click.Path(dir_okay=False), default=None, metavar="PNG",
              help="Also write a quick look: the classes over the scene, at most 2048 px on the long side, with a "
                   "legend and a scale bar.")
@aoi_option("the outputs cover their bounding box, nodata outside them")
@click.option("--min-area", "min_area_m2", default=None, metavar="M2|CLASS=M2,...",
              help="Drop polygons smaller than this many m²: one value for every class, or per class "
                   "(building=10,water=200). Default: the model's per-class values.")
@cleanup_options
@click.option("--regularize", is_flag=True,
              help="Building outlines with straight edges and right angles along each building's orientation "
                   "(falls back to the plain outline when that would change it too much).")
@centerline_options
@inference_options
@click.option("--polygonize", type=click.Choice(POLYGONIZE), default="after", show_default=True,
              help="after: polygonize once the model is done; live: polygonize strips beside the model as they "
                   "are finished (scenes up to 8192 px wide on the model's grid): faster when the model leaves "
                   "a CPU core free (a GPU, or TF_NUM_INTRAOP_THREADS below the cores), slower when it does not.")
@overwrite_option
@json_option
@click.pass_context
def predict(ctx: click.Context, scene: str, output: str, model: str | None, raster_out: str | None,
            probs_out: str | None, preview: str | None, aoi: str | None, min_area_m2: float | None, regularize: bool, polygonize: str,
            overwrite: bool, as_json: bool, **inference) -> None:
    """Segment SCENE and write polygons per class to a GeoPackage.

    \b
    geoseg predict scene.tif -o buildings.gpkg
    geoseg predict scene.tif -o out.gpkg --raster-out classes.tif --model my.keras
    geoseg predict mosaic.tif -o district.gpkg --aoi district_boundary.geojson
    """
    from geoseg.workflows.predict import predict as run

    centerlines, line_options = pop_centerline_options(inference)
    options = pop_predict_options(inference, min_area_m2=min_area_m2, polygonize=polygonize)
    with StageBars("predict", quiet=bool(ctx.obj.get("quiet"))) as progress:
        result = run(scene, output, model=model, raster_out=raster_out, probs_out=probs_out,
                     options=options, overwrite=overwrite, progress=progress, regularize=regularize, aoi=aoi,
                     centerlines=centerlines, centerline_options=line_options, preview=preview)
    if as_json:
        echo_json(result.to_dict())
        return
    log = logger()
    for name, n in result.counts.items():
        log.info("%s: %d polygons, %.1f m²", name, n, result.area_m2[name])
    if result.centerlines:
        log.info("road_centerline: {lines} lines, {length_m:.0f} m, {junctions} junctions".format(**result.centerlines))
    log.info("wrote %s in %.1f s (%d tiles, %d skipped as nodata%s)", ", ".join(result.outputs.values()),
             result.timings_s["total"], result.tiles["total"], result.tiles["skipped"],
             " or outside the area of interest" if aoi else "")
