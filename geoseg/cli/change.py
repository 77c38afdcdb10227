"""geoseg change BEFORE AFTER -o CHANGES.gpkg: what appeared and what disappeared between two dates."""

from __future__ import annotations

import click

from geoseg.cli.options import (
    StageBars, aoi_option, echo_json, inference_options, json_option, logger, model_option, output_option, overwrite_option,
    pop_predict_options,
)


@click.command()
@click.argument("before", type=click.Path(dir_okay=True))
@click.argument("after", type=click.Path(dir_okay=True))
@output_option(help="GeoPackage of change polygons: one layer <class>_change per class (.gpkg).")
@model_option
@click.option("--raster-out", type=click.Path(dir_okay=False), default=None,
              help="Also write the change raster on the common grid (uint8 transition codes, COG, QGIS .qml).")
@click.option("--classes", "class_names", default=None, metavar="NAME,NAME,...",
              help="Names of the ids of class rasters that have no class_names tag (geoseg predict writes it).")
@click.option("--min-area", type=float, default=None, metavar="M2",
              help="Drop change polygons smaller than this many m². Default: 4 pixels of the common grid.")
@click.option("--margin", type=float, default=0.0, show_default=True, metavar="P",
              help="Probability margin: a pixel from class A to B counts only if A beats B by P on BEFORE and "
                   "B beats A by P on AFTER (dates given as class rasters always pass).")
@click.option("--tolerance", type=float, default=None, metavar="METRES",
              help="Misregistration tolerance: a pixel from A to B does not count when B lies within this "
                   "distance on BEFORE and A within it on AFTER. Default: 3 m or 1.5 pixels, whichever is "
                   "larger; 0: off.")
@click.option("--preview", type=click.Path(dir_okay=False), default=None, metavar="PNG",
              help="Also write a quick look: what appeared (green) and disappeared (red) over AFTER, at most "
                   "2048 px on the long side, with a legend and a scale bar.")
@aoi_option("the change outputs cover their bounding box, nodata outside them")
@inference_options
@overwrite_option
@json_option
@click.pass_context
def change(ctx: click.Context, before: str, after: str, output: str, model: str | None, raster_out: str | None,
           class_names: str | None, min_area: float | None, margin: float, tolerance: float | None,
           preview: str | None, aoi: str | None, overwrite: bool, as_json: bool, **inference) -> None:
    """Compare two dates of a place: polygons of what appeared and what disappeared, per class.

    BEFORE and AFTER are scenes (segmented with the model) or rasters of an earlier
    `geoseg predict` (--raster-out class rasters or --probs-out probabilities), in any CRS,
    resolution and extent; only their overlap is compared, on BEFORE's CRS at the finer resolution.

    \b
    geoseg change 2019.tif 2024.tif -o changes.gpkg
    geoseg change 2019_classes.tif 2024_probs.tif -o changes.gpkg --raster-out changes.tif --min-area 20
    geoseg change 2019.tif 2024.tif -o district_changes.gpkg --aoi district_boundary.geojson
    """
    from geoseg.workflows.change import ChangeOptions
    from geoseg.workflows.change import change as run

    names = tuple(n.strip() for n in class_names.split(",")) if class_names is not None else None
    options = ChangeOptions(min_area=min_area, margin=margin, tolerance=tolerance, classes=names)
    predict_options = pop_predict_options(inference)
    with StageBars("compare", quiet=bool(ctx.obj.get("quiet")),
                   units={"compare": "row", "polygonize": "row"}) as progress:
        result = run(before, after, output, model=model, raster_out=raster_out, options=options,
                     predict_options=predict_options, overwrite=overwrite, progress=progress, aoi=aoi,
                     preview=preview)
    if as_json:
        echo_json(result.to_dict())
        return
    click.echo(format_table(result))
    logger().info("wrote %s in %.1f s (compared %d pixels; %d changed, %d within the tolerance, %d below the margin)",
                  ", ".join(result.outputs.values()), result.timings_s["total"], result.pixels["compared"],
                  result.pixels["changed"], result.pixels["suppressed_by_tolerance"],
                  result.pixels["suppressed_by_margin"])


def format_table(result) -> str:
    """Gained and lost area per class as a plain-text table."""
    head = ("class", "gained m²", "lost m²", "net m²", "appeared", "disappeared")
    rows = [head]
    for name in result.gained_m2:
        gained, lost = result.gained_m2[name], result.lost_m2[name]
        counts = result.counts[name]
        rows.append((name, f"{gained:.1f}", f"{lost:.1f}", f"{gained - lost:+.1f}", str(counts["appeared"]),
                     str(counts["disappeared"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
