"""geoseg vectorize CLASSES.tif -o OUT.gpkg: polygons from a class raster, as predict writes them."""

from __future__ import annotations

import click

from geoseg.cli.options import (
    StageBars, centerline_options, cleanup_options, echo_json, json_option, logger, output_option, overwrite_option,
    pop_centerline_options, pop_cleanup_options,
)


@click.command()
@click.argument("classes", type=click.Path(dir_okay=True))
@output_option(help="GeoPackage of polygons, one styled layer per class (.gpkg).")
@click.option("--classes", "class_names", default=None, metavar="NAME,NAME,...",
              help="Names of class ids 0, 1, ... Default: the raster's class_names tag (geoseg predict "
                   "writes it), else class0, class1, ...")
@click.option("--skip", default=None, metavar="CLASS,...",
              help="Classes (names or ids) that get no layer. Default: class 0, the background.")
@click.option("--min-area", "min_area_m2", default=None, metavar="M2|CLASS=M2,...",
              help="Drop polygons smaller than this many m²: one value, or per class (building=10,water=200).")
@cleanup_options
@click.option("--regularize", is_flag=True,
              help="Building outlines with straight edges and right angles (the class named building).")
@centerline_options
@overwrite_option
@json_option
@click.pass_context
def vectorize(ctx: click.Context, classes: str, output: str, class_names: str | None, skip: str | None,
              min_area_m2: str | None, regularize: bool, overwrite: bool, as_json: bool, **lines) -> None:
    """Turn a class raster into a styled GeoPackage (the polygon step of predict, on its own).

    \b
    geoseg vectorize classes.tif -o polygons.gpkg
    geoseg vectorize landcover.tif -o lc.gpkg --classes background,building,road --min-area 4
    geoseg vectorize roads.tif -o roads.gpkg --classes background,road --spur-m 20 --bridge-m 15
    geoseg vectorize landcover.tif -o lc.gpkg --sieve 4 --max-hole building=20 --simplify 1
    """
    from geoseg.inference.options import parse_min_area
    from geoseg.workflows.vectorize import vectorize as run

    names = [n.strip() for n in class_names.split(",")] if class_names else None
    skips = [s.strip() for s in skip.split(",") if s.strip()] if skip is not None else None
    centerlines, line_options = pop_centerline_options(lines)
    cleanup = pop_cleanup_options(lines)
    with StageBars("vectorize", quiet=bool(ctx.obj.get("quiet")), units={"vectorize": "row"}) as progress:
        result = run(classes, output, class_names=names, skip=skips, min_area_m2=parse_min_area(min_area_m2),
                     overwrite=overwrite, progress=progress, regularize=regularize, centerlines=centerlines,
                     centerline_options=line_options, **cleanup)
    if as_json:
        echo_json(result.to_dict())
        return
    summary = ", ".join(f"{n} {name}" for name, n in result.counts.items())
    if result.centerlines:
        summary += ", {lines} road centre-lines ({length_m:.0f} m, {junctions} junctions)".format(**result.centerlines)
    logger().info("wrote %s (%s) in %.1f s", result.output, summary or "no layers", result.timings_s["total"])
