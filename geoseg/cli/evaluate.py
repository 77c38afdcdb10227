"""geoseg evaluate SCENE LABELS: segment a scene and score it against labels."""

from __future__ import annotations

import math

import click

from geoseg.cli.options import (
    StageBars, aoi_option, echo_json, inference_options, json_option, model_option, pop_predict_options,
)


@click.command()
@click.argument("scene", type=click.Path(dir_okay=True))
@click.argument("labels", type=click.Path(dir_okay=True))
@model_option
@click.option("--label-field", default="class", show_default=True,
              help="Attribute of vector labels that holds the class name or id.")
@click.option("--label-class", default=None, metavar="NAME",
              help="Every feature of vector LABELS is this class, whatever its attributes (for files without a "
                   "class attribute, e.g. SpaceNet road lines: --label-class road --line-width 6).")
@click.option("--line-width", "line_width_m", type=float, default=None, metavar="METRES",
              help="Width of line and point labels (e.g. road centre-lines), buffered into areas.")
@click.option("--label-values", default=None, metavar="V=CLASS,...",
              help="What the values of a label raster mean, e.g. 0=ignore,1=building,2-5=background "
                   "(ignore: not scored). Default: values are class ids; any non-zero value of a 2-class mask is the class.")
@click.option("--boundary-tolerance", "boundary_tolerance_px", type=click.IntRange(min=0), default=2,
              show_default=True, help="Boundary F1: a boundary pixel matches within this many pixels.")
@click.option("--iou-threshold", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True,
              help="Object F1: a predicted polygon matches a true one when their IoU is at least this.")
@click.option("--road-buffer", "road_buffer_m", type=click.FloatRange(min=0), default=None, metavar="METRES",
              help="Score the road network: completeness, correctness and quality of the predicted centre-lines "
                   "within this distance of the reference (the labels' road lines, or the centre-lines of their "
                   "road pixels). Default: 3 when the model has a road class; 0 turns it off.")
@click.option("--road-class", "road_class_name", default="road", show_default=True,
              help="The model class that holds roads.")
@aoi_option("only pixels inside are scored (for labels complete only there)")
@inference_options
@json_option
@click.pass_context
def evaluate(ctx: click.Context, scene: str, labels: str, model: str | None, label_field: str,
             label_class: str | None, line_width_m: float | None, label_values: str | None, boundary_tolerance_px: int,
             iou_threshold: float, road_buffer_m: float | None, road_class_name: str, aoi: str | None,
             as_json: bool, **inference) -> None:
    """Segment SCENE and score it against LABELS (polygons in any CRS, or a class/mask raster).

    Per class: IoU, F1 (Dice), precision, recall, boundary F1 and object F1; then pixel accuracy
    and the mean IoU over foreground classes. With a road class: road completeness, correctness
    and quality of the centre-line network at --road-buffer metres.

    \b
    geoseg evaluate scene.tif buildings.gpkg
    geoseg evaluate scene.tif spacenet_roads.geojson --model landcover --label-class road --line-width 6 --json
    geoseg evaluate scene.tif classes.tif --model landcover --label-values 0=ignore,1=building,2=background,3=road
    geoseg evaluate scene.tif osm_buildings.gpkg --aoi mapped_area.geojson   # labels complete only there
    """
    from geoseg.workflows.evaluate import evaluate as run

    options = pop_predict_options(inference)
    with StageBars("predict", quiet=bool(ctx.obj.get("quiet")), units={"score": "row"}) as progress:
        result = run(scene, labels, model=model, options=options, class_field=label_field, label_class=label_class,
                     line_width_m=line_width_m, label_values=label_values,
                     boundary_tolerance_px=boundary_tolerance_px, iou_threshold=iou_threshold,
                     road_buffer_m=road_buffer_m, road_class_name=road_class_name, progress=progress, aoi=aoi)
    if as_json:
        echo_json(result.to_dict())
        return
    click.echo(format_table(result))


def _num(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _int(value: int | None) -> str:
    return "-" if value is None else str(value)


def format_table(result) -> str:
    """The scores as a plain-text table, one row per class, then the summary lines."""
    head = ("class", "IoU", "F1", "prec", "recall", "bF1", "obj TP", "FP", "FN", "obj F1")
    rows = [head]
    for s in result.classes.values():
        rows.append((s.name, _num(s.iou), _num(s.f1), _num(s.precision), _num(s.recall), _num(s.boundary_f1),
                     _int(s.objects_tp), _int(s.objects_fp), _int(s.objects_fn), _num(s.object_f1)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("")
    lines.append(f"pixel accuracy   {_num(result.accuracy)}  ({result.pixels_scored} pixels scored, "
                 f"{result.pixels_ignored} ignored)")
    lines.append(f"mean IoU         {_num(result.mean_iou)}  (foreground classes)")
    lines.append(f"mean F1          {_num(result.mean_f1)}")
    lines.append(f"boundary F1      {_num(result.mean_boundary_f1)}  (tolerance {result.boundary_tolerance_px} px)")
    lines.append(f"object F1        {_num(result.object_f1)}  (IoU >= {result.iou_threshold:g})")
    if result.roads:
        r = result.roads
        lines.append(f"road network     completeness {_num(r['completeness'])}  correctness {_num(r['correctness'])}  "
                     f"quality {_num(r['quality'])}  (buffer {r['buffer_m']:g} m; reference: "
                     f"{'label lines' if r['reference'] == 'lines' else 'centre-lines of the labelled road pixels'}, "
                     f"{r['reference_m']:.0f} m; predicted {r['predicted_m']:.0f} m)")
    if result.model:
        zooms = f"  zooms {result.model['scales']}" if result.model.get("scales", "1") != "1" else ""
        lines.append(f"model            {result.model['name']}  sha256 {result.model['sha256']}{zooms}")
    return "\n".join(lines)
