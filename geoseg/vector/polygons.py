"""Class raster -> polygons per class, with true areas, perimeters and mean scores.

The data flow of :func:`iter_polygons` (and :func:`polygonize`, which collects it), one strip of
rows at a time::

    class strip ──4-connected regions per class (ndimage.label)──▶ label image
                ──GDAL's polygonizer on the labels──▶ one polygon per region
    score strip ──bincount over the labels──▶ score sums and counts per region
    strip line  ──same class above and below──▶ union-find of regions; groups that no longer touch
                 the line are dissolved (union_all) into the polygon the whole raster would give
                ──make_valid, area_m2 / perimeter_m / min area──▶ finished polygons, per class

Memory is bounded by one strip of rows and the regions still open at the strip line, never by
the raster; polygons leave as soon as they are finished, so a writer can stream them.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import rasterio
import rasterio.features
import shapely
from pyproj import CRS
from rasterio.windows import Window

from geoseg import memory
from geoseg.vector.cleanup import Cleanup, clean_strips, simplify_coverage
from geoseg.errors import InputError
from geoseg.vector.measure import area_m2, perimeter_m, pixels_to_world
from geoseg.vector.regions import label_regions
from geoseg.io.outputs import polygon_frame

if TYPE_CHECKING:
    import geopandas as gpd

__all__ = ["polygonize", "iter_polygons", "iter_polygons_of", "RasterRows", "PolygonBatch"]

COLUMNS = ("class_name", "class_id", "area_m2", "perimeter_m", "score", "geometry")

_BUILD_CHUNK = 50_000  # features turned into shapely geometries at a time
_STRIP_PIXELS = 4_000_000  # pixels per strip (class ids int64, labels int32, scores: ~100 MB)


# --------------------------------------------------------------------------------------------
# polygonize


def polygonize(
    class_path: str,
    *,
    class_names: Sequence[str],
    skip: Container[int] = (0,),
    score_path: str | None = None,
    score_scale: float = 1 / 65535,
    min_area_m2: float | Mapping[str, float] = 0.0,
    progress: Callable[[int], None] | None = None,
    strip_rows: int | None = None,
    cleanup: Cleanup | None = None,
) -> dict[str, gpd.GeoDataFrame]:
    """Polygonize a class raster into one GeoDataFrame per class that is not skipped.

    ``class_path`` is a single-band integer GeoTIFF of class ids (id == index into
    ``class_names``); pixels equal to its nodata value and ids in ``skip`` never become
    polygons. Polygons are 4-connected regions of one id, valid Polygon/MultiPolygon geometries
    in the raster's CRS, with columns ``class_name, class_id, area_m2, perimeter_m, score``.

    The raster is read in strips of ``strip_rows`` rows (default: about 8 M pixels); regions that
    cross a strip line are merged exactly, so the polygons do not depend on the strip height.

    ``score`` is the mean of ``score_path`` (a single-band raster on the same grid, usually
    uint16 holding probability x 65535) times ``score_scale`` over each polygon's pixels, NaN
    without a score raster. ``min_area_m2`` drops smaller polygons: one number for all classes
    or ``{class_name: m2}``. ``progress(n)`` receives increments of rows (total: the raster height).
    ``cleanup`` (:class:`geoseg.vector.cleanup.Cleanup`): sieve, hole filling and coverage simplification.
    """
    class_names = list(class_names)
    parts: dict[int, list] = {}
    crs = None
    for batch in iter_polygons(class_path, class_names=class_names, skip=skip, score_path=score_path,
                               score_scale=score_scale, min_area_m2=min_area_m2, progress=progress,
                               strip_rows=strip_rows, cleanup=cleanup):
        crs = batch.crs
        parts.setdefault(int(batch.class_id), []).append(batch)
    if crs is None:
        with rasterio.open(class_path) as ds:
            crs = CRS.from_wkt(ds.crs.to_wkt())
    out = {}
    for cid in range(len(class_names)):
        if cid in skip:
            continue
        got = parts.get(cid, [])
        joined = [np.concatenate([getattr(b, f) for b in got]) if got else np.zeros(0, dtype=object if f == "geoms" else float)
                  for f in ("geoms", "areas", "perimeters", "scores")]
        out[class_names[cid]] = polygon_frame(class_names[cid], cid, *joined, crs)
    return out


@dataclass
class PolygonBatch:
    """Finished polygons of one class: geometries and their attributes (arrays of equal length)."""

    class_id: int
    geoms: np.ndarray
    areas: np.ndarray
    perimeters: np.ndarray
    scores: np.ndarray
    crs: CRS
    extra: dict = field(default_factory=dict)  # more columns, e.g. from regularize_batches


#: The columns regularize_batches adds, with their types.
REGULARIZE_COLUMNS = {"reg_iou": "float64", "vertices": "int64", "regularized": "int32"}


def regularize_batches(batches: Iterable[PolygonBatch], *, class_id: int, pixel: float, **kw) -> Iterator[PolygonBatch]:
    """Regularise the polygons of ``class_id`` (``geoseg.vector.regularize``) as they stream past; their
    areas and perimeters are measured again, and ``reg_iou``, ``vertices`` and ``regularized``
    columns are added. Other classes pass unchanged."""
    import logging

    from geoseg.vector.regularize import regularize

    n = squared = before = after = 0
    for batch in batches:
        if batch.class_id != class_id or not len(batch.geoms):
            yield batch
            continue
        r = regularize(batch.geoms, pixel=pixel, **kw)
        n, squared = n + len(r.geoms), squared + int(r.regularized.sum())
        before += int(shapely.get_num_coordinates(batch.geoms).sum())
        after += int(r.vertices.sum())
        yield PolygonBatch(batch.class_id, r.geoms, area_m2(r.geoms, batch.crs), perimeter_m(r.geoms, batch.crs),
                           batch.scores, batch.crs,
                           extra={"reg_iou": r.iou, "vertices": r.vertices, "regularized": r.regularized})
    if n:
        logging.getLogger(__name__).info(
            "regularized %d of %d footprints (the rest keep their outline, simplified); vertices %d -> %d",
            squared, n, before, after)


def iter_polygons(
    class_path: str,
    *,
    class_names: Sequence[str],
    skip: Container[int] = (0,),
    score_path: str | None = None,
    score_scale: float = 1 / 65535,
    min_area_m2: float | Mapping[str, float] = 0.0,
    progress: Callable[[int], None] | None = None,
    strip_rows: int | None = None,
    cleanup: Cleanup | None = None,
) -> Iterator[PolygonBatch]:
    """The polygons of :func:`polygonize`, in batches per class as soon as they are finished.

    Memory is bounded by one strip of rows plus the regions that are still open (those that
    touch the last strip line read), never by the raster or the number of polygons.

    For each strip: 4-connected regions of one class are labelled (``scipy.ndimage.label``),
    traced by GDAL (``rasterio.features.shapes`` on the label image) and scored (``bincount``).
    Where a pixel on the last row of the strip above and the pixel below it on the first row of
    this strip hold the same class, their regions are one: a union-find joins them, and once no
    member of a group touches the strip line any more its pieces are dissolved (``union_all``)
    into one polygon, exactly the polygon the whole raster would give.

    With ``cleanup`` (:mod:`geoseg.vector.cleanup`), each strip is sieved and its holes filled with a
    halo of rows around it (the same pixels as on the whole raster), and when it simplifies, the
    pieces of every class, skipped ones included, are simplified together as one coverage with the
    strip's outline fixed, before the skipped classes' pieces are dropped.
    """
    if not list(class_names):
        raise InputError("class_names is empty: pass one name per class id (id 0 first)")
    _min_area_per_class(min_area_m2, list(class_names))  # bad values fail before the raster is opened

    with rasterio.open(class_path) as ds, (rasterio.open(score_path) if score_path else nullcontext()) as sds:
        if ds.crs is None:
            raise InputError(
                f"{class_path} has no CRS: areas in m² need one; assign it (e.g. with "
                "`rio edit-info --crs EPSG:32633`) and try again"
            )
        if not np.issubdtype(np.dtype(ds.dtypes[0]), np.integer):
            raise InputError(
                f"{class_path} has {ds.dtypes[0]} pixels: a class raster holds integer class ids "
                "(uint8 usually)"
            )
        if sds is not None and ((sds.height, sds.width) != (ds.height, ds.width)
                                or not sds.transform.almost_equals(ds.transform)):
            raise InputError(
                f"score raster {score_path} ({sds.width}x{sds.height}, {tuple(sds.transform)[:6]})"
                f" is not on the class raster's grid ({ds.width}x{ds.height}, "
                f"{tuple(ds.transform)[:6]}); write both from the same prediction"
            )
        width = ds.width
        rows = RasterRows(
            name=str(class_path), crs=CRS.from_wkt(ds.crs.to_wkt()), transform=ds.transform, height=ds.height,
            width=width, dtype=np.dtype(ds.dtypes[0]), nodata=ds.nodata, block_rows=ds.block_shapes[0][0],
            read=lambda r0, r1: ds.read(1, window=Window(0, r0, width, r1 - r0)),
            read_score=(lambda r0, r1: sds.read(1, window=Window(0, r0, width, r1 - r0))) if sds is not None else None,
            score_nodata=sds.nodata if sds is not None else None,
        )
        yield from iter_polygons_of(rows, class_names=class_names, skip=skip, score_scale=score_scale,
                                    min_area_m2=min_area_m2, progress=progress, strip_rows=strip_rows, cleanup=cleanup)


@dataclass(frozen=True)
class RasterRows:
    """A class raster (and optionally its score raster) as rows read from the top: from files
    (:func:`iter_polygons`) or from strips as predict finishes them (``predict.LiveRows``).
    ``read(r0, r1)`` returns class ids of rows ``r0..r1-1``; ``read_score`` the same rows' scores.
    Both are called with increasing, contiguous row ranges (clean-up halos are kept, not re-read)."""

    name: str
    crs: CRS
    transform: object
    height: int
    width: int
    dtype: np.dtype
    nodata: float | None
    block_rows: int
    read: Callable[[int, int], np.ndarray]
    read_score: Callable[[int, int], np.ndarray] | None = None
    score_nodata: float | None = None

    def strip_rows(self) -> int:
        """Rows per strip: about _STRIP_PIXELS pixels, whole blocks when that fits."""
        rows = max(1, _STRIP_PIXELS // max(self.width, 1))
        if rows >= self.block_rows:
            rows -= rows % self.block_rows
        return min(rows, self.height)


def iter_polygons_of(
    source: RasterRows,
    *,
    class_names: Sequence[str],
    skip: Container[int] = (0,),
    score_scale: float = 1 / 65535,
    min_area_m2: float | Mapping[str, float] = 0.0,
    progress: Callable[[int], None] | None = None,
    strip_rows: int | None = None,
    cleanup: Cleanup | None = None,
) -> Iterator[PolygonBatch]:
    """:func:`iter_polygons` on rows from any source (see :class:`RasterRows`)."""
    class_names = list(class_names)
    if not class_names:
        raise InputError("class_names is empty: pass one name per class id (id 0 first)")
    thresholds = _min_area_per_class(min_area_m2, class_names)
    limit = np.array([thresholds[n] for n in class_names])
    kept = np.array([i not in skip for i in range(len(class_names))])
    crs, transform = source.crs, source.transform
    height, width, nodata = source.height, source.width, source.nodata
    scored = source.read_score is not None
    rows = strip_rows or source.strip_rows()
    clean = (cleanup or Cleanup()).for_raster(class_names, _pixel_area_m2(transform, crs, width, height))
    state = _Regions()
    prev_row: np.ndarray | None = None  # class ids of the last row of the previous strip
    prev_ids: np.ndarray | None = None  # their global region ids (0: none)

    # class ids as int32 when every value fits (half the memory of int64 in each strip's temporaries)
    ids = np.int32 if source.dtype in (np.uint8, np.int8, np.uint16, np.int16, np.int32) else np.int64

    def read(r0: int, r1: int) -> np.ndarray:
        return source.read(r0, r1).astype(ids)

    def valid_of(cls: np.ndarray) -> np.ndarray:
        return np.ones(cls.shape, bool) if nodata is None else cls != nodata

    for row0, _, cls in clean_strips(read, height=height, strip_rows=rows, valid_of=valid_of, cleanup=clean):
        h = cls.shape[0]
        valid = valid_of(cls)
        _check_class_ids(cls, valid, class_names, source.name)
        wanted = valid & kept[np.clip(cls, 0, len(class_names) - 1)]
        # Simplifying needs every class's pieces (they form the coverage); else only kept ones.
        labels, region_class = label_regions(cls, valid if clean.simplifies else wanted)
        n = len(region_class)
        base = state.add(region_class)  # global id = base + local id (local ids from 1)
        geoms, local = _trace(labels, row0)
        if clean.simplifies:
            geoms = simplify_coverage(geoms, region_class[local - 1], clean.tolerance_px)
            mine = kept[region_class[local - 1]]
            geoms, local = geoms[mine], local[mine]
            labels = np.where(wanted, labels, 0)
        if scored:
            state.add_scores(base, *_score_sums(labels, source.read_score(row0, row0 + h), source.score_nodata, n))
        state.add_pieces(base + local, geoms)
        top = labels[0]
        if prev_row is not None:
            same = (prev_ids > 0) & (top > 0) & (prev_row == cls[0])
            for a, b in set(zip(prev_ids[same].tolist(), (base + top[same]).tolist())):
                state.union(a, b)
        bottom = labels[-1]
        prev_row = cls[-1].copy()  # not a view: the strip itself can go
        prev_ids = np.where(bottom > 0, base + bottom, 0)
        last = row0 + h >= height
        open_ids = np.zeros(0, np.int64) if last else np.unique(prev_ids[prev_ids > 0])
        if progress is not None:
            progress(h)
        del labels, geoms, local, wanted, valid, top, bottom
        for cid, gs, ss, cs in state.finish(open_ids):
            yield from _batch(cid, pixels_to_world(gs, transform), ss, cs, crs, limit, score_scale, scored)
        memory.release()  # the strip's temporaries are gone: give their pages back (geoseg.memory)


def _check_class_ids(cls: np.ndarray, valid: np.ndarray, class_names: list[str], name: str) -> None:
    """Refuse a strip holding a class id that has no name (outside 0 .. len(class_names) - 1)."""
    unknown = np.unique(cls[valid & ((cls < 0) | (cls >= len(class_names)))])
    if unknown.size:
        raise InputError(
            f"{name} holds class id(s) {unknown.tolist()} but only {len(class_names)} "
            f"class names were given ({class_names}); pass a name for every id, or set "
            "the raster's nodata value"
        )


def _score_sums(labels: np.ndarray, values: np.ndarray, score_nodata, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per region (local ids 1..n) the sum of the strip's scores and how many pixels had one."""
    ok = labels > 0
    if score_nodata is not None:
        ok &= values != score_nodata
    return (np.bincount(labels[ok], weights=values[ok], minlength=n + 1)[1:],
            np.bincount(labels[ok], minlength=n + 1)[1:])


def _trace(labels: np.ndarray, row0: int) -> tuple[np.ndarray, np.ndarray]:
    """Polygons of the labelled regions (GDAL's polygonizer), with their local label ids, in
    pixel coordinates of the whole raster: whole numbers, so pieces from neighbouring strips meet
    exactly and dissolve without rounding."""
    if not labels.any():
        return np.empty(0, dtype=object), np.zeros(0, np.int64)
    features = rasterio.features.shapes(labels, mask=labels > 0, connectivity=4,
                                        transform=rasterio.Affine.translation(0, row0))
    geoms, values = _bulk_polygons(features)
    return geoms, values.astype(np.int64)


class _Regions:
    """Regions met so far: union-find over global ids, their pieces, score sums and counts."""

    def __init__(self) -> None:
        self.parent = np.zeros(1, np.int64)  # id 0 unused
        self.region_class = np.zeros(1, np.int64)
        self.sums = np.zeros(1)
        self.counts = np.zeros(1, np.int64)
        self.pieces: dict[int, list] = {}  # root -> geometries
        self.members: dict[int, list[int]] = {}  # root -> ids (only for groups of several)
        self.done_upto = 0  # every id <= this is finished

    def add(self, region_class: np.ndarray) -> int:
        base = len(self.parent) - 1
        n = len(region_class)
        self.parent = np.concatenate([self.parent, np.arange(base + 1, base + n + 1)])
        self.region_class = np.concatenate([self.region_class, region_class])
        self.sums = np.concatenate([self.sums, np.zeros(n)])
        self.counts = np.concatenate([self.counts, np.zeros(n, np.int64)])
        return base

    def add_scores(self, base: int, sums: np.ndarray, counts: np.ndarray) -> None:
        self.sums[base + 1 : base + 1 + len(sums)] += sums
        self.counts[base + 1 : base + 1 + len(counts)] += counts

    def add_pieces(self, ids: np.ndarray, geoms: np.ndarray) -> None:
        self.new_ids, self.new_geoms = ids, geoms

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        keep, gone = min(ra, rb), max(ra, rb)
        self.parent[gone] = keep
        self.sums[keep] += self.sums[gone]
        self.counts[keep] += self.counts[gone]
        self.pieces.setdefault(keep, []).extend(self.pieces.pop(gone, []))
        self.members.setdefault(keep, [keep]).extend(self.members.pop(gone, [gone]))

    def finish(self, open_ids: np.ndarray):
        """Yield ``(class, geometries, score sums, counts)`` per class for every group that no
        longer touches the strip line (``open_ids``: the regions on its last row)."""
        ids, geoms = self.new_ids, self.new_geoms
        self.new_ids = self.new_geoms = None
        # Pieces of regions that were joined or stay open wait in `pieces`; the rest (most of
        # them) are whole regions already and leave at once.
        roots = np.array([self.find(int(i)) for i in ids], np.int64) if len(ids) else np.zeros(0, np.int64)
        open_roots = {self.find(int(i)) for i in open_ids.tolist()}
        grouped = np.array([r in self.members or r in open_roots or r in self.pieces for r in roots.tolist()], bool)
        for r, g in zip(roots[grouped].tolist(), geoms[grouped]):
            self.pieces.setdefault(r, []).append(g)
        out_geoms = list(geoms[~grouped])
        out_ids = list(roots[~grouped].tolist())
        for r in [r for r in list(self.pieces) if r not in open_roots]:
            pieces = self.pieces.pop(r)
            self.members.pop(r, None)
            out_geoms.append(pieces[0] if len(pieces) == 1 else _dissolve(pieces))
            out_ids.append(r)
        if not out_ids:
            return
        out_ids = np.asarray(out_ids, np.int64)
        out_geoms = np.asarray(out_geoms + [None], dtype=object)[:-1]
        cls = self.region_class[out_ids]
        for c in np.unique(cls).tolist():
            sel = cls == c
            yield c, out_geoms[sel], self.sums[out_ids[sel]], self.counts[out_ids[sel]]


def _dissolve(pieces: list) -> object:
    """One polygon from the pieces of a region cut by strip lines: their union, without the
    vertices the cuts left on straight edges (the whole-raster polygon has none there)."""
    merged = shapely.union_all(np.asarray(pieces + [None], dtype=object)[:-1])
    return shapely.simplify(merged, 0.0)


def _batch(cid, geoms, sums, counts, crs, limit, score_scale, scored) -> Iterator[PolygonBatch]:
    geoms = _make_valid_polygonal(geoms)
    present = ~shapely.is_empty(geoms) & ~shapely.is_missing(geoms)
    geoms, sums, counts = geoms[present], sums[present], counts[present]
    areas = area_m2(geoms, crs)
    big = areas >= limit[cid]
    geoms, sums, counts, areas = geoms[big], sums[big], counts[big], areas[big]
    if not len(geoms):
        return
    if scored:
        with np.errstate(invalid="ignore", divide="ignore"):
            scores = np.where(counts > 0, sums / np.maximum(counts, 1) * score_scale, np.nan)
    else:
        scores = np.full(len(geoms), np.nan)
    yield PolygonBatch(cid, geoms, areas, perimeter_m(geoms, crs), scores, crs)


def _min_area_per_class(
    min_area_m2: float | Mapping[str, float], class_names: Sequence[str]
) -> dict[str, float]:
    if isinstance(min_area_m2, Mapping):
        unknown = sorted(set(min_area_m2) - set(class_names))
        if unknown:
            raise InputError(
                f"min_area_m2 names unknown class(es) {unknown}; use names from {list(class_names)}"
            )
        values = {name: float(min_area_m2.get(name, 0.0)) for name in class_names}
    else:
        values = dict.fromkeys(class_names, float(min_area_m2))
    bad = {k: v for k, v in values.items() if not v >= 0}
    if bad:
        raise InputError(f"min_area_m2 must be >= 0 square metres, got {bad}")
    return values


def _bulk_polygons(features: Iterable[tuple[dict, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Build shapely Polygons from GeoJSON-like dicts in chunks with array constructors."""
    chunks: list[np.ndarray] = []
    values: list[float] = []
    coords: list[tuple[float, float]] = []
    ring_offsets, poly_offsets = [0], [0]

    def flush() -> None:
        if len(poly_offsets) == 1:
            return
        chunks.append(
            shapely.from_ragged_array(
                shapely.GeometryType.POLYGON,
                np.asarray(coords, dtype=np.float64).reshape(-1, 2),
                (np.asarray(ring_offsets), np.asarray(poly_offsets)),
            )
        )
        coords.clear()
        del ring_offsets[1:], poly_offsets[1:]

    with _gc_paused():
        for geom, value in features:
            for ring in geom["coordinates"]:
                coords.extend(ring)
                ring_offsets.append(len(coords))
            poly_offsets.append(len(ring_offsets) - 1)
            values.append(value)
            if len(poly_offsets) > _BUILD_CHUNK:
                flush()
        flush()
    geoms = np.concatenate(chunks) if chunks else np.empty(0, dtype=object)
    return geoms, np.asarray(values, dtype=np.float64)


@contextmanager
def _gc_paused():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _make_valid_polygonal(geoms: np.ndarray) -> np.ndarray:
    """Repair invalid geometries with make_valid, keeping only their polygonal parts."""
    geoms = np.asarray(geoms, dtype=object)
    invalid = ~shapely.is_valid(geoms)
    if not invalid.any():
        return geoms
    fixed = _as_multi(shapely.make_valid(geoms[invalid]))
    fixed[shapely.is_empty(fixed)] = None
    single = shapely.get_num_geometries(fixed) == 1
    fixed[single] = shapely.get_geometry(fixed[single], 0)
    geoms = geoms.copy()
    geoms[invalid] = fixed
    return geoms


def _as_multi(geoms: np.ndarray) -> np.ndarray:
    """Polygonal parts of each geometry as one MultiPolygon (clipping can yield collections)."""
    parts, owner = shapely.get_parts(geoms, return_index=True)
    parts, sub = shapely.get_parts(parts, return_index=True)
    owner = owner[sub]
    polygonal = shapely.get_type_id(parts) == shapely.GeometryType.POLYGON
    out = np.empty(len(geoms), dtype=object)
    shapely.multipolygons(parts[polygonal], indices=owner[polygonal], out=out)
    missing = shapely.is_missing(out)
    out[missing] = shapely.from_wkt("MULTIPOLYGON EMPTY")
    return out


def _pixel_area_m2(transform, crs, width: int, height: int) -> float:
    """True area of the raster's centre pixel in m² (all pixels of a projected grid; on a lon/lat
    grid the clean-up thresholds in pixels are those of the centre row)."""
    col, row = width // 2, height // 2
    corners = [transform * xy for xy in ((col, row), (col + 1, row), (col + 1, row + 1), (col, row + 1))]
    return float(area_m2(np.array([shapely.Polygon(corners)], dtype=object), crs)[0])
