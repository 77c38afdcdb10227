"""geoseg predict SCENE -o OUT.gpkg: the main job."""

from __future__ import annotations

import click

from geoseg.cli.options import (
    assume_crs_option, bands_option, echo_json, json_option, logger, model_option,
    output_option, overwrite_option, StageBars,
)


@click.command()
@click.argument("scene", type=click.Path(dir_okay=True))
@output_option(help="GeoPackage of polygons, one layer per class (.gpkg).")
@model_option
@click.option("--raster-out", type=click.Path(dir_okay=False), default=None,
              help="Also write the class raster as a Cloud-Optimized GeoTIFF (with a QGIS .qml style).")
@click.option("--probs-out", type=click.Path(dir_okay=False), default=None,
              help="Also write per-class probabilities (float32 COG, one band per class).")
@click.option("--tile-size", type=int, default=None, help="Model window in pixels. Default: the model's.")
@click.option("--overlap", type=int, default=None, help="Pixels shared by neighbouring tiles. Default: the model's.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Tiles per model call.")
@click.option("--blend", type=click.Choice(["cosine", "gaussian", "mean"]), default="cosine", show_default=True,
              help="Weight window for overlapping tiles.")
@click.option("--precision", type=click.Choice(["float32", "mixed_bfloat16", "mixed_float16"]), default="float32",
              show_default=True, help="mixed_bfloat16 is much faster on CPUs with AMX; mixed_float16 on GPUs.")
@click.option("--min-area", "min_area_m2", type=float, default=None,
              help="Drop polygons smaller than this many m². Default: the model's per-class values.")
@click.option("--gsd", default="auto", show_default=True, metavar="auto|native|METRES",
              help="Ground sample distance the model runs at: auto resamples scenes outside the model's "
                   "training range to its GSD (outputs stay on the scene's grid); native never resamples.")
@click.option("--stretch", type=click.Choice(["auto", "none"]), default="auto", show_default=True,
              help="auto: when the scene's data type differs from the model's training imagery (e.g. uint16 "
                   "satellite data, uint8 model), map its 2-98 % value range onto the model's.")
@bands_option
@assume_crs_option
@overwrite_option
@json_option
@click.pass_context
def predict(ctx: click.Context, scene: str, output: str, model: str | None, raster_out: str | None,
            probs_out: str | None, tile_size: int | None, overlap: int | None, batch_size: int, blend: str,
            precision: str, min_area_m2: float | None, gsd: str, stretch: str, bands: tuple[int, ...] | None,
            assume_crs: str | None, overwrite: bool, as_json: bool) -> None:
    """Segment SCENE and write polygons per class to a GeoPackage.

    \b
    geoseg predict scene.tif -o buildings.gpkg
    geoseg predict scene.tif -o out.gpkg --raster-out classes.tif --model my.keras
    """
    from geoseg.predict import PredictOptions
    from geoseg.predict import predict as run

    options = PredictOptions(
        tile_size=tile_size, overlap=overlap, batch_size=batch_size, blend=blend, precision=precision,
        bands=bands, assume_crs=assume_crs, min_area_m2=min_area_m2, gsd=gsd, stretch=stretch,
    )
    with StageBars("predict", quiet=bool(ctx.obj.get("quiet"))) as progress:
        result = run(scene, output, model=model, raster_out=raster_out, probs_out=probs_out,
                     options=options, overwrite=overwrite, progress=progress)
    if as_json:
        echo_json(result.to_dict())
        return
    log = logger()
    for name, n in result.counts.items():
        log.info("%s: %d polygons, %.1f m²", name, n, result.area_m2[name])
    log.info("wrote %s in %.1f s (%d tiles, %d skipped as nodata)", ", ".join(result.outputs.values()),
             result.timings_s["total"], result.tiles["total"], result.tiles["skipped"])
