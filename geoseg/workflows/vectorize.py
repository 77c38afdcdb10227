"""Class raster -> styled GeoPackage: the polygon step of ``geoseg predict``, on its own.

``geoseg vectorize classes.tif -o polygons.gpkg`` takes any single-band integer raster of class
ids: a ``--raster-out`` of predict (its class names, colours and background travel in its tags
and colour table), a label mask, or another tool's classification (``--classes`` names the ids).
It runs the same code as predict (``polygons.iter_polygons`` then ``outputs.write_polygon_stream``),
in strips, so the raster never has to fit in memory.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio

import geoseg
from geoseg.io.atomic import Staging, claim_outputs
from geoseg.errors import InputError
from geoseg.models.bundle import file_sha256
from geoseg.io.outputs import PALETTE

log = logging.getLogger(__name__)

@dataclass
class VectorizeResult:
    source: str
    output: str
    class_names: list[str]
    counts: dict[str, int]
    area_m2: dict[str, float]
    timings_s: dict[str, float] = field(default_factory=dict)
    centerlines: dict | None = None  # centrelines.Centrelines.summary() of the road_centerline layer

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def raster_classes(path: str | os.PathLike, names: Sequence[str] | None = None) -> tuple[list[str], list[tuple[int, int, int]]]:
    """Class names and colours for a class raster: ``names`` if given, else its ``class_names``
    tag (written by predict), else ``class0, class1, ...`` up to its largest value; colours from
    its colour table where it has one."""
    with rasterio.open(path) as ds:
        if ds.count != 1 or not np.issubdtype(np.dtype(ds.dtypes[0]), np.integer):
            raise InputError(f"{path} has {ds.count} band(s) of {ds.dtypes[0]}; a class raster has one band of "
                             f"integer class ids (use the --raster-out of geoseg predict, or a label mask)")
        tagged = ds.tags().get("class_names")
        if names:
            names = list(names)
        elif tagged:
            names = tagged.split(",")
        else:
            top = 0
            for _, window in ds.block_windows(1):
                values = ds.read(1, window=window)
                if ds.nodata is not None:
                    values = values[values != ds.nodata]
                if values.size:
                    top = max(top, int(values.max()))
            if top > 255:
                raise InputError(f"{path} holds class ids up to {top}; name the classes with --classes")
            names = [f"class{i}" for i in range(top + 1)]
        try:
            cmap = ds.colormap(1)
        except ValueError:
            cmap = {}
    colors = [tuple(cmap[i][:3]) if i in cmap else PALETTE[i % len(PALETTE)] for i in range(len(names))]
    return names, colors


def vectorize(
    class_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    skip: Sequence[str | int] | None = None,
    min_area_m2: float | Mapping[str, float] | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    regularize: bool = False,
    centerlines: bool | None = None,
    centerline_options=None,
    sieve_m2: float | Mapping[str, float] | None = None,
    max_hole_m2: float | Mapping[str, float] | None = None,
    simplify_m: float | Mapping[str, float] | None = None,
) -> VectorizeResult:
    """Polygonize ``class_path`` into a new GeoPackage ``output``: one styled layer per class not
    in ``skip`` (names or ids; default: class 0, the background), all or nothing.

    ``min_area_m2`` defaults to the raster's ``min_area_m2`` tag (predict stores the values it
    used), so vectorizing predict's class raster gives predict's polygons; otherwise 0. The same for
    the clean-up (``geoseg.vector.cleanup``): ``sieve_m2``, ``max_hole_m2`` and ``simplify_m`` (one value or
    ``{class_name: value}``) default to the raster's tags of the same names, else 0 (off).

    ``centerlines``: also write the ``road_centerline`` line layer (``geoseg.vector.centrelines``) of the
    class named ``centerline_options.class_name`` (default ``road``); None: when there is one."""
    from geoseg.vector import centrelines as roads
    from geoseg.io import outputs
    from geoseg.vector import polygons
    from geoseg.io.scene import open_dataset

    t_start = time.perf_counter()
    if Path(output).suffix.lower() != ".gpkg":
        raise InputError(f"-o {output}: the polygon output must be a GeoPackage ending in .gpkg")
    with open_dataset(class_path) as ds:
        if ds.crs is None:
            raise InputError(f"{class_path} has no CRS; assign one first (gdal_edit.py -a_srs EPSG:32633 {Path(class_path).name})")
        crs, height = ds.crs, ds.height
    # none is the input, and this run is its only writer
    with claim_outputs({"-o": output}, inputs={"CLASSES": class_path}, overwrite=overwrite):
        names, colors = raster_classes(class_path, class_names)
        skip_ids = _skip_ids(skip, names, class_path)
        with rasterio.open(class_path) as ds:
            tags = ds.tags()  # geoseg predict writes the values it used (the model's, or its options')
        areas = _min_areas(min_area_m2, names, tags)
        cleanup = _cleanup_of({"sieve_m2": sieve_m2, "max_hole_m2": max_hole_m2, "simplify_m": simplify_m}, names, tags)
        layers = [n for i, n in enumerate(names) if i not in skip_ids]
        line_options = _checked_extras(centerline_options, centerlines, regularize, names)
        meta = _run_metadata(class_path, names, regularize, areas, cleanup)
        done = 0

        def rows(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, height)

        with Staging(overwrite=overwrite) as staging:
            tmp = staging.output(output)
            batches = polygons.iter_polygons(str(class_path), class_names=names, skip=skip_ids, min_area_m2=areas,
                                             progress=rows, cleanup=cleanup)
            if regularize:
                batches = _regularized(batches, class_path, names)
            totals = outputs.write_polygon_stream(tmp, batches, class_names=names, layers=layers, crs=crs,
                                                  colors=dict(zip(names, colors)), metadata=meta,
                                                  columns={"building": polygons.REGULARIZE_COLUMNS} if regularize else None)
            t0 = time.perf_counter()
            lines = roads.write_centreline_layer(tmp, class_path, class_names=names, colors=dict(zip(names, colors)),
                                                 enabled=centerlines, options=line_options)
            centerline_s = time.perf_counter() - t0
            staging.commit()
    return VectorizeResult(
        source=str(class_path), output=str(output), class_names=names,
        counts={k: n for k, (n, _) in totals.items()}, area_m2={k: round(a, 3) for k, (_, a) in totals.items()},
        timings_s={"total": round(time.perf_counter() - t_start, 3),
                   **({"centerlines": round(centerline_s, 3)} if lines else {})},
        centerlines=lines,
    )


def _skip_ids(skip: Sequence[str | int] | None, names: list[str], class_path) -> set[int]:
    """The class ids left out (``skip`` by name or id; default class 0, the background)."""
    ids = set()
    for item in ([0] if skip is None else skip):
        if isinstance(item, int) or str(item).isdigit():
            ids.add(int(item))
        elif item in names:
            ids.add(names.index(item))
        else:
            raise InputError(f"--skip {item!r} is not a class of {Path(class_path).name} ({', '.join(names)})")
    return ids


def _min_areas(min_area_m2: float | Mapping[str, float] | None, names: list[str], tags: Mapping[str, str],
               ) -> dict[str, float]:
    """Each class's minimum polygon area: the option's (one value or per class), else the raster's
    ``min_area_m2`` tag (predict's values), else 0."""
    areas = {n: 0.0 for n in names}
    tagged = tags.get("min_area_m2")
    if tagged and min_area_m2 is None:
        from geoseg.inference.options import parse_min_area

        saved = parse_min_area(tagged)
        areas.update({k: v for k, v in saved.items() if k in areas} if isinstance(saved, Mapping) else {})
    if isinstance(min_area_m2, Mapping):
        unknown = sorted(set(min_area_m2) - set(names))
        if unknown:
            raise InputError(f"--min-area names unknown class(es) {', '.join(unknown)}; the classes are {', '.join(names)}")
        areas.update({k: float(v) for k, v in min_area_m2.items()})
    elif min_area_m2 is not None:
        areas = dict.fromkeys(names, float(min_area_m2))
    if any(not v >= 0 for v in areas.values()):
        raise InputError(f"--min-area must be >= 0 square metres, got {min_area_m2}")
    return areas


def _cleanup_of(given: Mapping[str, object], names: list[str], tags: Mapping[str, str]):
    """The clean-up settings: each one given (one value or per class), else the raster's tag of
    the same name (predict's values), else 0 (off)."""
    from geoseg.vector.cleanup import SETTINGS, Cleanup, parse_tagged, per_class

    return Cleanup(**{key: per_class(given[key], {n: parse_tagged(tags.get(key)).get(n, 0.0) for n in names},
                                     option, unit) for key, (option, unit) in SETTINGS.items()})


def _run_metadata(class_path, names: list[str], regularize: bool, areas: dict[str, float], cleanup) -> dict[str, str]:
    """The GeoPackage's run metadata: what made it from which raster, with which settings."""
    return {
        "geoseg_version": geoseg.__version__,
        "command": "vectorize",
        "source": str(Path(class_path).resolve()),
        "source_sha256": file_sha256(class_path),
        "class_names": ",".join(names),
        "regularize": str(regularize).lower(),
        "min_area_m2": ",".join(f"{k}={v:g}" for k, v in areas.items()),
        **cleanup.metadata(names),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _checked_extras(options, centerlines: bool | None, regularize: bool, names: list[str]):
    """The centre-line settings, checked before any work, as is the class the extras need: the road
    class with ``centerlines=True``, the building class with ``regularize``."""
    from geoseg.vector import centrelines as roads

    line_options = options or roads.CentrelineOptions()
    if centerlines is not False:
        line_options.check()
    if centerlines:
        roads.road_class(names, line_options.class_name, required=True)  # fail before any work
    if regularize:
        from geoseg.inference.options import building_class

        building_class(names)
    return line_options


def _regularized(batches, class_path, names: list[str]):
    """The polygon stream with the building class's outlines squared (``geoseg.vector.regularize``)."""
    from geoseg.vector import polygons
    from geoseg.inference.options import building_class

    building = building_class(names)
    with rasterio.open(class_path) as ds:
        pixel = abs(ds.transform.a)
    return polygons.regularize_batches(batches, class_id=building, pixel=pixel)
