"""Score a segmentation against labels, strip by strip, with the metrics of ``geoseg.metrics``.

The data flow of :func:`evaluate`::

    scene ──segment (inference.segment)──▶ class raster (temporary, on the scene's grid)
    class raster + labels (LabelReader, same grid) ──strips of rows with a halo──▶
        ConfusionMatrix    pixel IoU, Dice/F1, precision, recall, accuracy
        BoundaryCounter    boundary F1 within a tolerance in pixels
    predicted polygons (polygonize) + true polygons ──match_objects──▶ object TP / FP / FN
    predicted road centre-lines + reference centre-lines (label lines, or the centre-lines of the
        labels' road mask) ──centrelines.road_metrics──▶ completeness / correctness / quality

Memory is bounded by one strip of rows (plus the polygons), never by the raster. Pixels whose
label is ``IGNORE`` (255) or whose prediction is nodata take no part in pixel or boundary metrics.
:func:`evaluate_classes` scores an existing class raster (training, change detection); ``evaluate``
runs the model first and then calls it.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geoseg.errors import InputError
from geoseg.io.labels import IGNORE, LabelReader, parse_label_values
from geoseg.inference.options import PredictOptions
from geoseg.metrics import (BoundaryCounter, ConfusionMatrix, ObjectMatch, match_objects,
                            precision_recall_f1, strips, valid_polygons)

log = logging.getLogger(__name__)

__all__ = ["ClassScores", "EvaluationResult", "evaluate", "evaluate_classes", "reference_road_lines", "road_scores"]

#: ``evaluate``'s road buffer when the model has a road class and none is given (metres).
DEFAULT_ROAD_BUFFER_M = 3.0

_STRIP_PIXELS = 4_000_000  # pixels per strip of the class raster (a few uint8/bool copies each)

# progress(stage, done, total): stage "predict" counts tiles, "score" counts rows
Progress = Callable[[str, int, int], None]


@dataclass
class ClassScores:
    """Every metric of one class. Object counts are None for background classes (not vectorised)."""

    name: str
    id: int
    iou: float
    f1: float
    precision: float
    recall: float
    boundary_f1: float
    boundary_precision: float
    boundary_recall: float
    pixels_true: int
    pixels_predicted: int
    objects_true: int | None = None
    objects_predicted: int | None = None
    objects_tp: int | None = None
    objects_fp: int | None = None
    objects_fn: int | None = None
    object_precision: float | None = None
    object_recall: float | None = None
    object_f1: float | None = None


@dataclass
class EvaluationResult:
    """Scores of a class raster against labels. ``to_dict()`` is JSON-ready (NaN becomes null)."""

    labels: str
    class_names: list[str]
    background: list[int]
    classes: dict[str, ClassScores]
    accuracy: float
    mean_iou: float  # over the foreground classes present in truth or prediction
    mean_f1: float
    mean_boundary_f1: float
    object_f1: float | None  # over all foreground objects (micro average)
    confusion: list[list[int]]  # [truth][prediction] pixel counts
    pixels_scored: int
    pixels_ignored: int
    boundary_tolerance_px: int
    iou_threshold: float
    scene: str | None = None
    class_path: str | None = None
    model: dict[str, str] | None = None
    tiles: dict[str, int] | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    # road network scores (centrelines.RoadMetrics.to_dict() plus "reference": "lines" or "mask")
    roads: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return _json_ready(asdict(self))


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else round(float(value), 6)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _nanmean(values) -> float:
    values = np.asarray([v for v in values if v is not None], dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


# --------------------------------------------------------------------------------------------
# scoring a class raster


def _read_rows(ds, r0: int, r1: int, nodata: float | None) -> np.ndarray:
    """Rows ``[r0, r1)`` of band 1 as uint8 class ids, 255 outside the raster and at nodata."""
    from rasterio.windows import Window

    out = np.full((r1 - r0, ds.width), IGNORE, dtype=np.uint8)
    a, b = max(r0, 0), min(r1, ds.height)
    if a >= b:
        return out
    values = ds.read(1, window=Window(0, a, ds.width, b - a))
    bad = values == nodata if nodata is not None else np.zeros(values.shape, dtype=bool)
    if values.dtype != np.uint8:
        bad |= (values < 0) | (values > 255)
    out[a - r0 : b - r0] = np.where(bad, IGNORE, values).astype(np.uint8)
    return out


def _strip_rows(ds, halo: int) -> int:
    rows = max(_STRIP_PIXELS // max(ds.width, 1), 4 * halo, 16)
    block = ds.block_shapes[0][0]
    if rows >= block:
        rows -= rows % block  # whole blocks of the class raster: each is decompressed once
    return min(rows, ds.height)


def evaluate_classes(
    class_path: str | os.PathLike,
    labels: str | os.PathLike | LabelReader,
    *,
    class_names: Sequence[str],
    background: Container[int] = (0,),
    class_field: str = "class",
    line_width_m: float | None = None,
    value_map: Mapping[int, int] | None = None,
    boundary_tolerance_px: int = 2,
    iou_threshold: float = 0.5,
    min_area_m2: float | Mapping[str, float] = 0.0,
    objects: bool = True,
    strip_rows: int | None = None,
    progress: Progress | None = None,
) -> EvaluationResult:
    """Score a class raster (uint8 class ids, e.g. ``Segmentation.class_path``) against labels.

    ``labels`` is a vector or raster file (read on the class raster's grid with ``LabelReader``)
    or an open ``LabelReader`` on that grid. The raster is read strip by strip; ``strip_rows``
    overrides the strip height (tests). ``objects=False`` skips object F1 (it polygonizes both
    sides). ``min_area_m2`` drops small predicted polygons before matching, as ``predict`` does.
    """
    import rasterio

    from geoseg.io.scene import open_scene

    t_start = time.perf_counter()
    class_names = list(class_names)
    n = len(class_names)
    if not 2 <= n <= 255:
        raise InputError(f"class_names must name 2 to 255 classes (id 0 first), got {n}")
    if not 0 < iou_threshold <= 1:
        raise InputError(f"the object IoU threshold must be in (0, 1], got {iou_threshold}")
    background = sorted(i for i in range(n) if i in background)
    own_reader = not isinstance(labels, LabelReader)
    if own_reader:
        grid = open_scene(class_path)
        reader = LabelReader(labels, grid, class_names=class_names, class_field=class_field,
                             line_width_m=line_width_m, value_map=value_map)
    else:
        reader, grid = labels, labels.grid
    cm = ConfusionMatrix(n)
    boundaries = BoundaryCounter(n, boundary_tolerance_px)
    halo = boundaries.halo()
    scratch = tempfile.TemporaryDirectory(prefix="geoseg-eval-") if objects and reader.kind == "raster" else None
    timings: dict[str, float] = {}
    try:
        with rasterio.open(class_path) as ds:
            if ds.shape != grid.shape or not ds.transform.almost_equals(grid.transform):
                raise InputError(f"{class_path} ({ds.width}x{ds.height}) is not on the grid of the labels' "
                                 f"reader ({grid.width}x{grid.height}); open the LabelReader on that raster")
            # raster labels are kept on the grid, to polygonize the true objects
            ignored, invalid_strips = _score_pixels(ds, class_path, reader, cm, boundaries, class_names,
                                                    rows=strip_rows or _strip_rows(ds, halo),
                                                    truth_path=Path(scratch.name) / "truth.tif" if scratch else None,
                                                    progress=progress)
        timings["pixels"] = round(time.perf_counter() - t_start, 3)
        if cm.matrix.sum() == 0:
            raise InputError(
                f"no pixel of {class_path} has both a prediction and a label: the labels {reader.path} "
                f"do not overlap the image's valid pixels, or all of them are ignored"
            )
        t0 = time.perf_counter()
        matches = {}
        if objects:
            matches = _match_classes(class_path, reader, grid, class_names, background,
                                     Path(scratch.name) / "truth.tif" if scratch else None,
                                     min_area_m2=min_area_m2, invalid_strips=invalid_strips,
                                     iou_threshold=iou_threshold)
        timings["objects"] = round(time.perf_counter() - t0, 3)
    finally:
        if scratch is not None:
            scratch.cleanup()
        if own_reader:
            reader.close()
    timings["total"] = round(time.perf_counter() - t_start, 3)
    return _result(cm, boundaries, matches, class_names=class_names, background=background,
                   labels=str(reader.path), class_path=str(class_path), ignored=ignored,
                   iou_threshold=iou_threshold, timings=timings)


def _score_pixels(ds, class_path, reader: LabelReader, cm: ConfusionMatrix, boundaries: BoundaryCounter,
                  class_names: list[str], *, rows: int, truth_path: Path | None, progress: Progress | None,
                  ) -> tuple[int, list[tuple[int, int]]]:
    """Count the class raster against the labels strip by strip (confusion and boundaries; the
    labels written to ``truth_path`` on the raster's grid when given). Returns the pixels ignored
    and the strips that held any: objects there may lie on unscored pixels."""
    truth_writer = None
    if truth_path is not None:
        from geoseg.io.outputs import TiledTiffWriter

        truth_writer = TiledTiffWriter(truth_path, width=ds.width, height=ds.height, count=1, dtype="uint8",
                                       crs=ds.crs, transform=ds.transform, nodata=IGNORE)
    try:
        result = _count_strips(ds, class_path, reader, cm, boundaries, class_names, rows, truth_writer, progress)
    except BaseException:
        if truth_writer is not None:  # the scoring failed part-way: scratch, no check
            truth_writer.close(complete=False)
        raise
    if truth_writer is not None:
        truth_writer.close()
    return result


def _count_strips(ds, class_path, reader, cm, boundaries, class_names, rows, truth_writer, progress):
    n = len(class_names)
    ignored = 0
    invalid_strips: list[tuple[int, int]] = []
    for r0, r1, a, b in strips(ds.height, rows, boundaries.halo()):
        pred = _read_rows(ds, a, b, ds.nodata)
        unknown = (pred >= n) & (pred != IGNORE)
        if unknown.any():
            raise InputError(
                f"{class_path} holds class id(s) {np.unique(pred[unknown]).tolist()[:5]} but only {n} "
                f"classes are named ({', '.join(class_names)}); set its nodata value or name every class"
            )
        truth = reader.read(a, b, 0, ds.width)
        core = slice(r0 - a, r0 - a + (r1 - r0))
        cm.update(pred[core], truth[core])
        invalid = int(((pred[core] == IGNORE) | (truth[core] == IGNORE)).sum())
        if invalid:
            ignored += invalid
            invalid_strips.append((r0, r1))
        boundaries.update(pred, truth, top=r0 - a, bottom=b - r1)
        if truth_writer is not None:
            truth_writer.write(truth[core], row_off=r0)
        if progress:
            progress("score", r1, ds.height)
    return ignored, invalid_strips


def _match_classes(class_path, reader: LabelReader, grid, class_names: list[str], background: list[int],
                   truth_path: Path | None, *, min_area_m2, invalid_strips: list[tuple[int, int]],
                   iou_threshold: float) -> dict[int, ObjectMatch]:
    """Object matches per foreground class id: the predicted polygons against the true ones."""
    truth_objects = _true_objects(reader, grid, class_names, background, truth_path)
    predicted_objects = _predicted_objects(class_path, class_names, background, min_area_m2)
    if invalid_strips:
        _drop_unscored(truth_objects, predicted_objects, class_path, reader, invalid_strips)
    return {c: match_objects(predicted_objects[c], truth_objects[c], iou_threshold=iou_threshold)
            for c in range(len(class_names)) if c not in background}


def _result(cm: ConfusionMatrix, boundaries: BoundaryCounter, matches: dict[int, ObjectMatch], *,
            class_names: list[str], background: list[int], labels: str, class_path: str, ignored: int,
            iou_threshold: float, timings: dict[str, float]) -> EvaluationResult:
    iou, f1, prec, rec = cm.iou(), cm.f1(), cm.precision(), cm.recall()
    bf1, bp, br = boundaries.f1(), boundaries.precision(), boundaries.recall()
    scores = {}
    for c, name in enumerate(class_names):
        s = ClassScores(
            name=name, id=c, iou=float(iou[c]), f1=float(f1[c]), precision=float(prec[c]), recall=float(rec[c]),
            boundary_f1=float(bf1[c]), boundary_precision=float(bp[c]), boundary_recall=float(br[c]),
            pixels_true=int(cm.matrix[c].sum()), pixels_predicted=int(cm.matrix[:, c].sum()),
        )
        if c in matches:
            m = matches[c]
            s.objects_true, s.objects_predicted = m.true, m.predicted
            s.objects_tp, s.objects_fp, s.objects_fn = m.tp, m.fp, m.fn
            s.object_precision, s.object_recall, s.object_f1 = precision_recall_f1(m.tp, m.fp, m.fn)
        scores[name] = s
    fg = [c for c in range(len(class_names)) if c not in background]
    if matches:
        tp, fp, fn = (sum(getattr(matches[c], k) for c in matches) for k in ("tp", "fp", "fn"))
        object_f1 = precision_recall_f1(tp, fp, fn)[2]
    else:
        object_f1 = None
    return EvaluationResult(
        labels=labels, class_names=class_names, background=background, classes=scores,
        accuracy=cm.accuracy(),
        mean_iou=_nanmean(iou[fg]), mean_f1=_nanmean(f1[fg]), mean_boundary_f1=_nanmean(bf1[fg]),
        object_f1=object_f1, confusion=cm.matrix.tolist(), pixels_scored=int(cm.matrix.sum()),
        pixels_ignored=ignored, boundary_tolerance_px=boundaries.tolerance, iou_threshold=iou_threshold,
        class_path=class_path, timings_s=timings,
    )


def _predicted_objects(class_path, class_names, background, min_area_m2) -> dict[int, np.ndarray]:
    from geoseg.vector.polygons import polygonize

    layers = polygonize(str(class_path), class_names=class_names, skip=set(background), min_area_m2=min_area_m2)
    return {c: layers[class_names[c]].geometry.values for c in range(len(class_names)) if c not in background}


def _true_objects(reader: LabelReader, grid, class_names, background, truth_path) -> dict[int, np.ndarray]:
    """True polygons per class id: the label polygons clipped to the scene, or the polygonized label raster."""
    import rasterio
    import shapely

    if truth_path is not None:
        from geoseg.vector.polygons import polygonize

        layers = polygonize(str(truth_path), class_names=class_names, skip=set(background))
        return {c: layers[class_names[c]].geometry.values for c in range(len(class_names)) if c not in background}
    # LabelReader keeps the reprojected, repaired (and buffered) label geometries and their class ids.
    geoms, ids = reader.objects()
    left, bottom, right, top = rasterio.transform.array_bounds(grid.height, grid.width, grid.transform)
    clipped = shapely.clip_by_rect(geoms, left, bottom, right, top) if len(geoms) else geoms
    return {c: clipped[ids == c] for c in range(len(class_names)) if c not in background}


def _drop_unscored(truth_objects: dict[int, np.ndarray], predicted_objects: dict[int, np.ndarray], class_path,
                   reader: LabelReader, invalid_strips: list[tuple[int, int]]) -> None:
    """Drop objects of either side that lie mostly (> 50 %) on pixels left out of the pixel metrics.

    A true building under the scene's nodata collar, or a predicted one in an unlabelled (IGNORE)
    area, can be neither found nor wrong; counting it would make object F1 disagree with the pixel
    metrics. Only the strips that have such pixels are read again.
    """
    import rasterio
    import rasterio.features
    import shapely
    from rasterio.windows import Window

    sides = [truth_objects, predicted_objects]
    keys = [(side, c) for side in range(2) for c in sorted(sides[side]) if len(sides[side][c])]
    if not keys:
        return
    groups = [valid_polygons(sides[side][c]) for side, c in keys]
    geoms = np.concatenate(groups)
    owner = np.repeat(np.arange(len(keys)), [len(g) for g in groups])
    n = len(geoms)
    if not n:
        return
    unscored = np.zeros(n + 1, dtype=np.int64)
    tree = shapely.STRtree(geoms)
    with rasterio.open(class_path) as ds:
        pixel_area = abs(ds.transform.a * ds.transform.e)
        for r0, r1 in invalid_strips:
            window = Window(0, r0, ds.width, r1 - r0)
            bounds = rasterio.windows.bounds(window, ds.transform)
            idx = tree.query(shapely.box(*bounds))
            if not idx.size:
                continue
            pieces = shapely.clip_by_rect(geoms[idx], *bounds)
            ok = ~shapely.is_empty(pieces)
            if not ok.any():
                continue
            ids = rasterio.features.rasterize(zip(pieces[ok], (idx[ok] + 1).tolist()), out_shape=(r1 - r0, ds.width),
                                              transform=ds.window_transform(window), fill=0, dtype="int32")
            bad = (_read_rows(ds, r0, r1, ds.nodata) == IGNORE) | (reader.read(r0, r1, 0, ds.width) == IGNORE)
            unscored += np.bincount(ids[bad], minlength=n + 1)
    pixels = shapely.area(geoms) / pixel_area
    drop = unscored[1:] > 0.5 * pixels
    if drop.any():
        log.info("object F1: left out %d objects that lie mostly on nodata or unlabelled pixels", int(drop.sum()))
    for k, (side, c) in enumerate(keys):
        sides[side][c] = geoms[(owner == k) & ~drop]


# --------------------------------------------------------------------------------------------
# road networks


def road_scores(class_path: str | os.PathLike, reader: LabelReader, *, road_id: int, buffer_m: float,
                reference_lines=None, options=None) -> dict[str, Any]:
    """Completeness, correctness and quality of the predicted road network at ``buffer_m`` metres.

    The predicted network is the centre-lines of the pixels of class ``road_id`` in ``class_path``.
    The reference is ``reference_lines`` (centre-lines, a GeoSeries with a CRS) when given, else the
    centre-lines of the labels' own road pixels (``reader``, on the class raster's grid), extracted
    with the same ``options`` (``centrelines.CentrelineOptions``). Pixels the labels ignore are
    taken out of the predicted road mask, so an unlabelled area counts neither way. Both masks are
    written to temporary GeoTIFFs strip by strip; the centre-lines are read from them in strips.
    """
    import rasterio
    from rasterio.windows import Window

    from geoseg.vector.centrelines import CentrelineOptions, centrelines_from_raster, road_metrics

    options = options or CentrelineOptions()
    options.check()
    with tempfile.TemporaryDirectory(prefix="geoseg-roads-") as scratch, rasterio.open(class_path) as ds:
        profile = dict(driver="GTiff", width=ds.width, height=ds.height, count=1, dtype="uint8", crs=ds.crs,
                       transform=ds.transform, tiled=True, blockxsize=256, blockysize=256, compress="deflate")
        pred_path, ref_path = Path(scratch) / "pred.tif", Path(scratch) / "ref.tif"
        rows = max(256, _STRIP_PIXELS // max(ds.width, 1) // 256 * 256)
        with rasterio.open(pred_path, "w", **profile) as pred_out, rasterio.open(ref_path, "w", **profile) as ref_out:
            for r0 in range(0, ds.height, rows):
                r1 = min(ds.height, r0 + rows)
                window = Window(0, r0, ds.width, r1 - r0)
                pred = _read_rows(ds, r0, r1, ds.nodata)
                truth = reader.read(r0, r1, 0, ds.width)
                pred_out.write(((pred == road_id) & (truth != IGNORE)).astype(np.uint8), 1, window=window)
                ref_out.write((truth == road_id).astype(np.uint8), 1, window=window)
        predicted = centrelines_from_raster(pred_path, class_id=1, options=options).lines
        if reference_lines is None:
            reference, kind = centrelines_from_raster(ref_path, class_id=1, options=options).lines, "mask"
        else:
            reference, kind = reference_lines, "lines"
    metrics = road_metrics(predicted, reference, buffer_m)
    return {**metrics.to_dict(), "reference": kind, "predicted_lines": int(len(predicted)),
            "reference_lines": int(len(reference))}


def reference_road_lines(labels: str | os.PathLike, grid, *, class_names: Sequence[str], road_id: int,
                         class_field: str = "class", label_class: str | None = None):
    """The road centre-lines of vector labels, clipped to the scene (None: raster labels, or no lines).

    Lines count as roads when ``label_class`` is the road class, or (without ``label_class``) when
    the labels have no ``class_field`` attribute, or where it names the road class (by name or id)."""
    import geopandas as gpd
    import rasterio
    import shapely

    from geoseg.io.labels import RASTER_SUFFIXES

    if Path(labels).suffix.lower() in RASTER_SUFFIXES:
        return None
    gdf = gpd.read_file(labels)
    gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty]
    gdf = gdf[gdf.geom_type.isin(["LineString", "MultiLineString"])]
    if label_class is not None:
        if label_class.lower() != class_names[road_id].lower():
            return None
    elif class_field in gdf.columns:
        values = gdf[class_field]
        road = values.astype(str).str.strip().str.lower() == class_names[road_id].lower()
        road |= values.astype(str).str.strip() == str(road_id)
        gdf = gdf[road]
    if not len(gdf):
        return None
    if gdf.crs is None:
        raise InputError(f"labels {labels} have no CRS; set one (e.g. ogr2ogr -a_srs EPSG:4326) and retry")
    lines = gdf.geometry.to_crs(grid.crs)
    left, bottom, right, top = rasterio.transform.array_bounds(grid.height, grid.width, grid.transform)
    clipped = shapely.clip_by_rect(lines.values, left, bottom, right, top)
    if grid.aoi is not None:  # an area of interest (geoseg.io.aoi): only the lines inside
        clipped = shapely.intersection(clipped, grid.aoi)
    keep = ~shapely.is_empty(clipped)
    return gpd.GeoSeries(clipped[keep], crs=grid.crs)


# --------------------------------------------------------------------------------------------
# the whole job


def evaluate(
    scene: str | os.PathLike,
    labels: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    bundle=None,
    options: PredictOptions | Mapping[str, object] = PredictOptions(),
    class_field: str = "class",
    label_class: str | None = None,
    line_width_m: float | None = None,
    value_map: Mapping[int, int] | None = None,
    label_values: str | None = None,
    boundary_tolerance_px: int = 2,
    iou_threshold: float = 0.5,
    objects: bool = True,
    road_buffer_m: float | None = None,
    road_class_name: str = "road",
    centreline_options=None,
    progress: Progress | None = None,
    aoi: str | os.PathLike | None = None,
) -> EvaluationResult:
    """Segment ``scene`` with a model (``bundle``, or ``model``: a name or path, default the
    built-in one) into a temporary folder and score the class raster against ``labels``.

    When the model has a class named ``road_class_name``, the road network is scored too
    (``result.roads``, see :func:`road_scores`): completeness, correctness and quality at
    ``road_buffer_m`` metres (default 3 m; 0 turns it off). The reference is the labels' road
    centre-lines when they are vector lines, else the centre-lines of their road pixels.

    Labels are checked (CRS, overlap, class values) before the model runs. Predicted polygons
    below the model's per-class minimum area (or ``options.min_area_m2``) are dropped before
    object matching, as in ``geoseg predict``. ``aoi``: score only inside these polygons (any
    vector file, any CRS; ``geoseg.io.aoi``), for labels that are complete only there.
    """
    from geoseg.inference.options import as_options, min_areas
    from geoseg.inference.segment import segment
    from geoseg.models.bundle import load_bundle
    from geoseg.zooms import zoom_text

    t_start = time.perf_counter()
    options = as_options(options)
    if not 0 < iou_threshold <= 1:
        raise InputError(f"the object IoU threshold must be in (0, 1], got {iou_threshold}")
    info, model_path, meta = _open_and_check(scene, aoi, options, model, bundle)
    class_names = list(meta.class_names)
    min_area = min_areas(options, meta)
    road_id, road_buffer_m = _road_setting(road_buffer_m, class_names, road_class_name)
    value_map = value_map if label_values is None else parse_label_values(label_values, class_names)
    timings: dict[str, float] = {}
    with LabelReader(labels, info, class_names=class_names, class_field=class_field,
                     line_width_m=line_width_m, value_map=value_map, label_class=label_class) as reader:
        if bundle is None:
            bundle = load_bundle(model_path, precision=options.precision)
        timings["load"] = round(time.perf_counter() - t_start, 3)
        with tempfile.TemporaryDirectory(prefix="geoseg-eval-") as scratch:
            t0 = time.perf_counter()
            seg = segment(info, bundle, scratch, options=options,
                          progress=(lambda done, total: progress("predict", done, total)) if progress else None)
            timings["predict"] = round(time.perf_counter() - t0, 3)
            result = evaluate_classes(
                seg.class_path, reader, class_names=class_names, background=set(meta.background),
                boundary_tolerance_px=boundary_tolerance_px, iou_threshold=iou_threshold,
                min_area_m2=min_area, objects=objects, progress=progress,
            )
            if road_id is not None:
                t0 = time.perf_counter()
                lines = reference_road_lines(labels, info, class_names=class_names, road_id=road_id,
                                             class_field=class_field, label_class=label_class)
                result.roads = road_scores(seg.class_path, reader, road_id=road_id, buffer_m=road_buffer_m,
                                           reference_lines=lines, options=centreline_options)
                timings["roads"] = round(time.perf_counter() - t0, 3)
    timings.update({f"score_{k}" if k != "total" else "score": v for k, v in result.timings_s.items()})
    timings["total"] = round(time.perf_counter() - t_start, 3)
    result.scene, result.labels, result.class_path = str(info.path), str(labels), None  # it was temporary
    result.model = {"name": meta.name, "sha256": bundle.sha256, "path": str(bundle.path),
                    "scales": zoom_text(seg.scales)}
    result.tiles = seg.tiles
    result.timings_s = timings
    return result


def _open_and_check(scene, aoi, options: PredictOptions, model, bundle) -> tuple:
    """The scene (restricted to ``aoi``), the model's path (None for a given bundle) and its
    metadata, read without Keras; the options checked against both before any model loads."""
    from geoseg.inference.options import thresholds
    from geoseg.inference.segment import check_scene_for
    from geoseg.io.aoi import open_within
    from geoseg.models.bundle import read_meta, resolve_model

    info = open_within(scene, aoi, bands=options.bands, assume_crs=options.assume_crs)
    model_path = None
    if bundle is None:
        model_path = resolve_model(None if model is None else str(model))
        meta = read_meta(model_path)  # no Keras yet: check the labels first
    else:
        meta = bundle.meta
    thresholds(options, meta)  # a bad --threshold fails before the model loads
    check_scene_for(info, meta, options)  # and so do bands, tiling and GSD
    return info, model_path, meta


def _road_setting(road_buffer_m: float | None, class_names: list[str], road_class_name: str,
                  ) -> tuple[int | None, float]:
    """The road class id to score (None: no road scores) and the buffer in metres (default 3 m)."""
    from geoseg.vector.centrelines import road_class

    if road_buffer_m is not None and not (math.isfinite(road_buffer_m) and road_buffer_m >= 0):
        raise InputError(f"--road-buffer {road_buffer_m}: give a distance >= 0 in metres (0 turns road scores off)")
    road_id = road_class(class_names, road_class_name)
    if road_id is None and road_buffer_m:
        raise InputError(f"--road-buffer {road_buffer_m:g} scores roads, but the model has no class named "
                         f"{road_class_name!r} (classes: {', '.join(class_names)})")
    if road_buffer_m is None:
        road_buffer_m = DEFAULT_ROAD_BUFFER_M
    if not road_buffer_m:
        road_id = None
    return road_id, road_buffer_m
