"""The predict job: a scene in, a styled GeoPackage (and optional rasters) out, all or nothing.

The steps, each in its own module:

- the scene is opened (``geoseg.io.scene``), cut to ``--aoi`` (``geoseg.io.aoi``), and every option and the
  scene are checked against the model's metadata before Keras loads (``geoseg.inference.options``);
- ``geoseg.inference.segment`` runs the model over it, streaming: a background thread reads strips
  into fixed-shape batches, the model runs one batch at a time, the blender turns finished rows into
  classes and scores and appends them to tiled GeoTIFFs in a scratch folder; with several zooms the
  chain runs once per zoom and the runs are merged on the scene's grid;
- the class raster is polygonized into the GeoPackage (``geoseg.vector.polygons``; beside the model with
  ``--polygonize live``), road centre-lines added (``geoseg.vector.centrelines``), and the rasters copied
  to COGs (``geoseg.io.outputs``);
- all outputs are renamed into place together at the end (``atomic.Staging``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import geoseg
from geoseg.io.atomic import Staging, claim_outputs
from geoseg.errors import InputError
from geoseg.inference.live import LiveRows
from geoseg.inference.options import (PredictOptions, Progress, as_options, building_class, cleanup_for, min_areas,
                                      scales_for, thresholds)
from geoseg.inference.rasters import CLASS_NODATA, SCORE_SCALE
from geoseg.inference.segment import check_scene_for, segment, streams_rows, warm_up
from geoseg.models.bundle import release_keras, sha256_or_blank
from geoseg.io.aoi import open_within
from geoseg.threads import Background

log = logging.getLogger(__name__)


@dataclass
class PredictResult:
    scene: str
    outputs: dict[str, str]
    model: dict[str, str]
    crs: str
    gsd_m: float
    model_gsd_m: float | None
    width: int
    height: int
    tiles: dict[str, int]
    counts: dict[str, int] = field(default_factory=dict)
    pixels: dict[str, int] = field(default_factory=dict)
    area_m2: dict[str, float] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    centerlines: dict | None = None  # centrelines.Centrelines.summary() of the road_centerline layer
    aoi: str | None = None  # the --aoi file; width and height are then those of its bounding box

    def to_dict(self) -> dict:
        return asdict(self)


def model_meta(model: str | os.PathLike | None):
    """The metadata of ``--model`` (None: the default), read without Keras (milliseconds)."""
    from geoseg.models.bundle import read_meta, resolve_model

    return read_meta(resolve_model(None if model is None else str(model)))


def load_model_for(model: str | os.PathLike | None, options: PredictOptions):
    """Resolve ``--model`` (None: the default) and load it with the requested precision."""
    from geoseg.models.bundle import load_bundle, resolve_model

    return load_bundle(resolve_model(None if model is None else str(model)), precision=options.precision)


def release_model(bundle, timings: dict[str, float]):
    """``bundle`` without its Keras model, whose memory goes back before polygonizing (timed as
    ``release``: Keras' session cleared and garbage collected, about 0.5 s)."""
    t0 = time.perf_counter()
    bundle = dataclasses.replace(bundle, model=None)
    release_keras()
    timings["release"] = round(time.perf_counter() - t0, 3)
    return bundle


@dataclass
class _Settings:
    """What one predict run resolved from its options and the model's metadata, before Keras loads."""

    class_names: list[str]
    colors: list
    background: set[int]
    min_area: dict[str, float]
    cleanup: object
    threshold: dict[str, float]
    line_options: object
    regularize: bool

    @property
    def kept(self) -> list[str]:
        return [name for i, name in enumerate(self.class_names) if i not in self.background]

    @property
    def color_of(self) -> dict[str, tuple]:
        return {name: tuple(c) for name, c in zip(self.class_names, self.colors)}

    def polygon_options(self) -> dict:
        """The keywords of polygons.iter_polygons and iter_polygons_of for this run."""
        return dict(class_names=self.class_names, skip=self.background, score_scale=1.0 / SCORE_SCALE,
                    min_area_m2=self.min_area, cleanup=self.cleanup)


def predict(
    scene: str | os.PathLike,
    output: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    raster_out: str | os.PathLike | None = None,
    probs_out: str | os.PathLike | None = None,
    options: PredictOptions | Mapping[str, object] = PredictOptions(),
    overwrite: bool = False,
    progress: Progress | None = None,
    bundle=None,
    regularize: bool = False,
    centerlines: bool | None = None,
    centerline_options=None,
    aoi: str | os.PathLike | None = None,
    preview: str | os.PathLike | None = None,
) -> PredictResult:
    """Segment ``scene`` and write the GeoPackage ``output`` (and optional rasters), all or nothing.
    ``regularize``: straight, right-angled outlines for the ``building`` class (``geoseg.vector.regularize``).
    ``centerlines``: a ``road_centerline`` line layer too (``geoseg.vector.centrelines``; None: when the model
    has a class named ``centerline_options.class_name``, default ``road``). ``aoi``: polygons (any
    vector file, any CRS) outside which nothing is written (``geoseg.io.aoi``); the outputs cover their
    bounding box. ``preview``: a PNG quick look of the classes over the scene (``geoseg.preview``)."""
    from geoseg.vector import centrelines as roads
    from geoseg.io import outputs

    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    options = as_options(options)
    _check_output_names(output, raster_out, probs_out, preview)
    info = open_within(scene, aoi, bands=options.bands, assume_crs=options.assume_crs)
    # Fail on outputs before any heavy work: none is an input, and this run is their only writer.
    inputs = {"SCENE": scene, "--aoi": aoi, "--model": model if model is not None and Path(str(model)).is_file() else None}
    with claim_outputs({"-o": output, "--raster-out": raster_out, "--probs-out": probs_out, "--preview": preview},
                       inputs=inputs, overwrite=overwrite):
        own_model = bundle is None
        meta = bundle.meta if bundle is not None else model_meta(model)  # no Keras yet: check everything first
        settings = _resolve(options, meta, regularize, centerlines, centerline_options)
        check_scene_for(info, meta, options)
        if own_model:
            bundle = load_model_for(model, options)
        timings["load"] = round(time.perf_counter() - t_start, 3)
        scene_hash = Background(sha256_or_blank, info.path)  # the scene's checksum, read while the model runs
        t0 = time.perf_counter()
        warm_up(bundle, info, options)
        timings["trace"] = round(time.perf_counter() - t0, 3)
        with Staging(overwrite=overwrite) as staging:
            gpkg_tmp = staging.output(output)
            raster_tmp = staging.output(raster_out) if raster_out else None
            probs_tmp = staging.output(probs_out) if probs_out else None
            seg, totals, bundle = _segment_and_polygonize(info, bundle, meta, options, settings, staging, output,
                                                          gpkg_tmp, probs=probs_out is not None, progress=progress,
                                                          timings=timings, release=own_model)
            run_meta = _run_metadata(info, bundle, meta, options, settings, seg, aoi, scene_hash.result())
            outputs.add_run_metadata(gpkg_tmp, run_meta)
            t0 = time.perf_counter()
            lines = roads.write_centreline_layer(gpkg_tmp, seg.class_path, class_names=settings.class_names,
                                                 colors=settings.color_of, enabled=centerlines,
                                                 options=settings.line_options)
            if lines:
                timings["centerlines"] = round(time.perf_counter() - t0, 3)
            t0 = time.perf_counter()
            _write_rasters(seg, raster_tmp, probs_tmp, run_meta, settings)
            timings["write"] = round(time.perf_counter() - t0, 3)
            if preview is not None:
                _write_preview(staging.output(preview), info, seg, settings, timings)
            staging.commit()

    timings["total"] = round(time.perf_counter() - t_start, 3)
    outs = {key: str(path) for key, path in (("gpkg", output), ("raster", raster_out), ("probs", probs_out),
                                              ("preview", preview)) if path}
    return _result(info, bundle, seg, outs, totals, timings, lines, aoi)


def _result(info, bundle, seg, outs: dict[str, str], totals: dict, timings: dict[str, float], lines,
            aoi) -> PredictResult:
    return PredictResult(
        scene=str(info.path),
        model_gsd_m=bundle.meta.gsd,
        outputs=outs,
        model={"name": bundle.meta.name, "sha256": bundle.sha256, "path": str(bundle.path),
               "precision": bundle.precision},
        crs=info.crs.to_string(),
        gsd_m=round(info.gsd, 6),
        width=info.width,
        height=info.height,
        tiles=seg.tiles,
        counts={name: n for name, (n, _) in totals.items()},
        area_m2={name: round(area, 3) for name, (_, area) in totals.items()},
        pixels=seg.pixels,
        timings_s=timings,
        centerlines=lines,
        aoi=str(aoi) if aoi is not None else None,
    )


def _write_preview(path: Path, info, seg, settings: _Settings, timings: dict[str, float]) -> None:
    """The PNG quick look of the classes over the scene (``geoseg.preview``), timed as ``preview``."""
    from geoseg.preview import write_preview

    t0 = time.perf_counter()
    write_preview(path, info.path, seg.class_path, class_names=settings.class_names, colors=settings.colors,
                  hidden=settings.background, nodata=CLASS_NODATA, bands=info.bands, gsd_m=info.gsd)
    timings["preview"] = round(time.perf_counter() - t0, 3)


def _check_output_names(output, raster_out, probs_out, preview) -> None:
    """Each output's name says its format: .gpkg, .tif for the rasters, .png for the quick look."""
    if Path(output).suffix.lower() != ".gpkg":
        raise InputError(f"-o {output}: the polygon output must be a GeoPackage ending in .gpkg")
    for path, what in ((raster_out, "--raster-out"), (probs_out, "--probs-out")):
        if path is not None and Path(path).suffix.lower() not in (".tif", ".tiff"):
            raise InputError(f"{what} {path}: raster outputs are GeoTIFFs; use a name ending in .tif")
    if preview is not None and Path(preview).suffix.lower() != ".png":
        raise InputError(f"--preview {preview}: the quick look is a PNG; use a name ending in .png")


def _resolve(options: PredictOptions, meta, regularize: bool, centerlines: bool | None, centerline_options,
             ) -> _Settings:
    """The run's settings from the options and the model's metadata; every bad value fails here."""
    from geoseg.vector import centrelines as roads

    class_names = list(meta.class_names)
    settings = _Settings(class_names=class_names, colors=list(meta.colors), background=set(meta.background),
                         min_area=min_areas(options, meta), cleanup=cleanup_for(options, meta),
                         threshold=thresholds(options, meta),
                         line_options=centerline_options or roads.CentrelineOptions(), regularize=regularize)
    if regularize:
        building_class(class_names)
    if centerlines is not False:
        settings.line_options.check()
    if centerlines:
        roads.road_class(class_names, settings.line_options.class_name, required=True)
    return settings


def _polygon_writer(gpkg_tmp: Path, settings: _Settings, crs):
    """A function writing polygons.iter_polygons batches to the GeoPackage; {layer: (count, area)}."""
    from geoseg.io import outputs
    from geoseg.vector import polygons

    def write_polygons(batches, pixel: float) -> dict:
        if settings.regularize:
            batches = polygons.regularize_batches(batches, class_id=building_class(settings.class_names), pixel=pixel)
        return outputs.write_polygon_stream(
            gpkg_tmp, batches, class_names=settings.class_names, layers=settings.kept, crs=crs,
            colors=settings.color_of,
            columns={"building": polygons.REGULARIZE_COLUMNS} if settings.regularize else None,
        )

    return write_polygons


def _segment_and_polygonize(info, bundle, meta, options: PredictOptions, settings: _Settings, staging: Staging,
                            output, gpkg_tmp: Path, *, probs: bool, progress: Progress | None,
                            timings: dict[str, float], release: bool):
    """Run the model over the scene and polygonize its classes into the GeoPackage: a scene of one
    column chunk beside the model, strip by strip as the blender finishes them (``--polygonize
    live``, LiveRows), otherwise from the class raster once the model is done and (``release``)
    its memory given back. Returns the segmentation, {layer: (count, area)} and the bundle."""
    from geoseg.vector import polygons

    write_polygons = _polygon_writer(gpkg_tmp, settings, info.crs)
    how = settings.polygon_options()
    live = LiveRows(info) if options.polygonize == "live" and streams_rows(info, meta, options) else None
    live_polygons = None
    if live is not None:
        def polygonize_live():
            error = None
            try:
                return write_polygons(polygons.iter_polygons_of(live.rows(), **how), abs(info.transform.a))
            except BaseException as exc:
                error = exc
                raise
            finally:
                live.reader_finished(error)

        live_polygons = Background(polygonize_live)
    try:
        seg = segment(info, bundle, staging.scratch(output), options=options, probs=probs,
                      progress=progress, timings=timings, on_rows=live.add if live else None)
    except BaseException:
        if live is not None:
            live.stop()
            try:
                live_polygons.result()
            except BaseException:  # noqa: S110 - the segmenting error is the one to report
                pass
        raise
    if release:  # polygonizing does not need the model: give its memory back first
        bundle = release_model(bundle, timings)

    t0 = time.perf_counter()
    if live_polygons is not None:
        totals = live_polygons.result()
    else:
        # the outlines' detail is the model's pixel when the scene was read resampled
        coarser = max(1.0, (seg.work_gsd or info.gsd) / info.gsd)
        totals = write_polygons(polygons.iter_polygons(seg.class_path, score_path=seg.score_path, **how),
                                abs(info.transform.a) * coarser)
    timings["polygonize"] = round(time.perf_counter() - t0, 3)  # after the model (live: what was left)
    return seg, totals, bundle


def _run_metadata(info, bundle, meta, options: PredictOptions, settings: _Settings, seg, aoi,
                  scene_sha256: str) -> dict[str, str]:
    """The run's provenance, written into the GeoPackage and the rasters' tags."""
    from geoseg.zooms import zoom_text

    return {
        "geoseg_version": geoseg.__version__,
        "model_name": meta.name,
        "model_sha256": bundle.sha256,
        "model_path": str(bundle.path),
        "scene": str(Path(info.path).resolve()),
        "scene_sha256": scene_sha256,
        **({"aoi": str(Path(aoi).resolve()), "aoi_window": f"rows {info.row_off}-{info.row_off + info.height}, "
            f"columns {info.col_off}-{info.col_off + info.width} of the scene"} if aoi is not None else {}),
        "tile_size": str(seg.tile_size),
        "overlap": str(seg.overlap),
        "batch_size": str(options.batch_size),
        "blend": options.blend,
        "precision": bundle.precision,
        "tta": options.tta,
        "scales": zoom_text(seg.scales),
        **({"scale_merge": scales_for(options, meta)[1]} if len(seg.scales) > 1 else {}),
        "threshold": ",".join(f"{k}={v:g}" for k, v in settings.threshold.items()),
        "regularize": str(settings.regularize).lower(),
        "min_area_m2": ",".join(f"{k}={v:g}" for k, v in settings.min_area.items()),
        **settings.cleanup.metadata(settings.class_names),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _write_rasters(seg, raster_tmp: Path | None, probs_tmp: Path | None, run_meta: dict[str, str],
                   settings: _Settings) -> None:
    """The class raster (with its colour table and QGIS style) and the probabilities as COGs."""
    from geoseg.io import outputs

    if raster_tmp:
        outputs.write_cog(
            seg.class_path,
            raster_tmp,
            colormap=outputs.class_colormap(settings.colors, nodata=CLASS_NODATA),
            band_descriptions=["class"],
            tags={**run_meta, "class_names": ",".join(settings.class_names)},
        )
        outputs.write_raster_qml(raster_tmp.with_suffix(".qml"), class_names=settings.class_names,
                                 colors=settings.colors, transparent=settings.background)
    if probs_tmp:
        outputs.write_cog(
            seg.probs_path,
            probs_tmp,
            band_descriptions=[f"p_{name}" for name in settings.class_names],
            tags=run_meta,
            resampling="average",
        )
