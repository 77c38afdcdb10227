"""Road masks -> centre-line networks, and the standard measures of extracted roads.

The data flow of :func:`centrelines` (and :func:`centrelines_from_raster`), one strip of rows at a
time::

    mask strip + halo ──thinning (skimage, Zhang-Suen)──▶ skeleton of the strip's own rows
                      ──chessboard/taxicab distance──▶ road half-widths at skeleton pixels
    skeleton rows     ──pixel graph (4-neighbours, diagonals only where no 4-path)──▶ 2-point
                        segments + junction pixels (degree >= 3); segments that cross the strip
                        line belong to the strip above, so every edge is made exactly once
                      ──line_merge──▶ pieces between junction pixels, ends and strip lines
    all pieces        ──junction pixels that touch collapse to one node; line_merge──▶ network
                      ──prune spurs, join close junctions, bridge gaps, simplify──▶ lines

Pieces that meet at a strip line share that pixel's centre, so merging them gives what the whole
mask gives (``test_centrelines``: any strip height, same nodes and length). The thinning of a strip
is exact when its halo is at least twice the widest road's half-width; the halo grows to that
(up to ``max_halo`` rows) strip by strip.

Memory: one strip of the mask (bool, plus int32 distances and the skeleton) and the network
itself (pieces hold one vertex per change of direction of the skeleton: about 16 bytes per pixel
of skeleton on winding roads, far less on straight ones). The network is the output, so memory
grows with the length of road, not with the raster: 100,000 km of skeleton pixels at 1 m
(10^8 pixels, far more than any city) would be about 1.6 GB.

Defaults (all in metres on the ground, measured from the mask itself):

- holes in the mask up to 25 m² (a car, a tree's shadow, noise) are filled before thinning, or
  each would become a loop;
- road width ``w``: the median, over skeleton pixels, of twice the distance to the road's edge;
- spurs (branches from an end to a junction) shorter than ``2 w`` are pruned, repeatedly, so the
  bumps and corners of a mask's outline leave no whiskers; a whole isolated road is never removed,
  and where every branch of a junction is a spur the two longest stay. A branch that ends within
  ``w`` of the raster's border is a road leaving the raster: the longest such branch of a
  junction stays;
- junctions joined by a line no longer than ``w`` are one junction. Roads that cross at a
  shallow angle (under ~45 degrees) thin into two junctions further apart than that, and stay
  two: joining more widely merged distinct junctions of real streets (SpaceNet Las Vegas: 53
  labelled junctions; 51 found with ``w``, 41 with ``2 w``);
- an end whose last stretch points at another end or a line within ``2 w`` (and within 35 degrees)
  is joined to it: gaps across occlusions (trees, shadows, cars) of a few pixels are bridged;
- lines are simplified by Douglas-Peucker at 1 pixel; ends and junctions never move, so lines
  that meet share exact coordinates.

Columns: ``class_name``, ``length_m`` (true metres: geodesic for geographic and Mercator CRSs),
``node_from``, ``node_to`` (node ids, shared where lines meet), ``degree_from``, ``degree_to`` (how
many lines meet there: 1 an end, >= 3 a junction) and ``network`` (connected component id).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import shapely
from pyproj import CRS

from geoseg.errors import InputError
from geoseg.vector.measure import line_length_m, needs_ellipsoid, pixels_to_world

if TYPE_CHECKING:
    import geopandas as gpd

__all__ = ["CentrelineOptions", "Centrelines", "centrelines", "centrelines_from_raster",
           "road_class", "write_centreline_layer", "RoadMetrics", "road_metrics"]

log = logging.getLogger(__name__)

LAYER = "road_centerline"
COLUMNS = ("class_name", "length_m", "node_from", "node_to", "degree_from", "degree_to", "network")
_STRIP_PIXELS = 8_000_000  # mask pixels per strip (bool mask, int32 distances, skeleton: ~90 MB)


@dataclass(frozen=True)
class CentrelineOptions:
    """How to turn a road mask into centre-lines; ``None`` means "from the measured road width"."""

    class_name: str = "road"  # the class of a class raster that holds roads
    spur_m: float | None = None  # prune end-to-junction branches shorter than this (default 2 widths)
    bridge_m: float | None = None  # join ends to ends or lines up to this far (default 2 widths)
    angle_deg: float = 35.0  # how far a bridge may turn from the direction the road ends in
    simplify_px: float = 1.0  # Douglas-Peucker tolerance, pixels
    halo: int = 64  # rows read above and below each strip (grows for wide roads, up to max_halo)
    max_halo: int = 512
    hole_m2: float = 25.0  # holes in the mask smaller than this are filled first (cars, noise)
    strip_rows: int | None = None  # rows per strip (default: about 8 M pixels)

    def check(self) -> None:
        for name in ("spur_m", "bridge_m"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise InputError(f"--{name.replace('_', '-')} {value}: give a length >= 0 in metres")
        if not (math.isfinite(self.hole_m2) and self.hole_m2 >= 0):
            raise InputError(f"hole_m2={self.hole_m2}: give an area >= 0 in square metres")
        if not 0 < self.angle_deg <= 90:
            raise InputError(f"angle_deg={self.angle_deg}: give an angle in (0, 90] degrees")
        if self.strip_rows is not None and self.strip_rows < 1:
            raise InputError(f"strip_rows={self.strip_rows} must be >= 1")


@dataclass
class Centrelines:
    """A road network: the lines (a GeoDataFrame with :data:`COLUMNS`) and what was used to build it."""

    lines: gpd.GeoDataFrame
    width_m: float  # median road width measured on the mask (NaN without roads)
    spur_m: float
    bridge_m: float
    bridges: int = 0
    stats: dict = field(default_factory=dict)

    def summary(self) -> dict:
        deg = np.bincount(np.concatenate([self.lines["node_from"], self.lines["node_to"]]).astype(np.int64)) \
            if len(self.lines) else np.zeros(0, np.int64)
        return {
            "layer": LAYER,
            "lines": int(len(self.lines)),
            "length_m": round(float(self.lines["length_m"].sum()), 3),
            "junctions": int((deg >= 3).sum()),
            "ends": int((deg == 1).sum()),
            "networks": int(self.lines["network"].nunique()) if len(self.lines) else 0,
            "bridges": self.bridges,
            "width_m": round(self.width_m, 3) if math.isfinite(self.width_m) else None,
            "spur_m": round(self.spur_m, 3),
            "bridge_m": round(self.bridge_m, 3),
        }


# --------------------------------------------------------------------------------------------
# entry points


def centrelines(mask: np.ndarray, transform, crs, *, options: CentrelineOptions = CentrelineOptions(),
                progress: Callable[[int], None] | None = None) -> Centrelines:
    """Centre-lines of a boolean road ``mask`` (rows, cols) on the grid ``transform`` in ``crs``."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise InputError(f"a road mask has 2 dimensions (rows, cols), got shape {mask.shape}")
    mask = mask.astype(bool, copy=False)
    return _network(lambda a, b: mask[a:b], mask.shape[0], mask.shape[1], transform, crs, options, progress)


def centrelines_from_raster(class_path: str | os.PathLike, *, class_id: int,
                            options: CentrelineOptions = CentrelineOptions(),
                            progress: Callable[[int], None] | None = None) -> Centrelines:
    """Centre-lines of the pixels equal to ``class_id`` in a class raster, read in strips."""
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(class_path) as ds:
        if ds.crs is None:
            raise InputError(f"{class_path} has no CRS: centre-line lengths in metres need one")

        def read(a: int, b: int) -> np.ndarray:
            return ds.read(1, window=Window(0, a, ds.width, b - a)) == class_id

        return _network(read, ds.height, ds.width, ds.transform, CRS.from_wkt(ds.crs.to_wkt()), options, progress)


def road_class(class_names: Sequence[str], name: str = "road", *, required: bool = False) -> int | None:
    """The id of the class named ``name`` (None if there is none; InputError when ``required``)."""
    names = list(class_names)
    if name in names:
        return names.index(name)
    if required:
        raise InputError(f"--centerlines needs a class named {name!r}, but the classes are {', '.join(names)}; "
                         f"name the road class with --centerline-class")
    return None


def write_centreline_layer(gpkg_path: str | os.PathLike, class_path: str | os.PathLike, *,
                           class_names: Sequence[str], colors: dict, enabled: bool | None,
                           options: CentrelineOptions = CentrelineOptions()) -> dict | None:
    """Add the ``road_centerline`` layer to a GeoPackage written from ``class_path``.

    ``enabled``: None writes it when a class is named ``options.class_name``; True requires one.
    Returns :meth:`Centrelines.summary`, or None when no layer was written."""
    from geoseg.io import outputs

    if enabled is False:
        return None
    options.check()
    cid = road_class(class_names, options.class_name, required=bool(enabled))
    if cid is None:
        return None
    net = centrelines_from_raster(class_path, class_id=cid, options=options)
    summary = net.summary()
    outputs.write_line_layer(gpkg_path, LAYER, net.lines, color=outputs.line_color(colors[options.class_name]),
                             metadata={f"centerline_{k}": str(v) for k, v in summary.items() if k != "layer"})
    return summary


# --------------------------------------------------------------------------------------------
# mask -> skeleton -> pieces, strip by strip


def _network(read, height: int, width: int, transform, crs, options: CentrelineOptions,
             progress) -> Centrelines:
    from geoseg.io.scene import ground_sample_distance

    options.check()
    crs = CRS.from_user_input(crs.to_wkt() if hasattr(crs, "to_wkt") else crs)
    if transform.b or transform.d:
        raise InputError(f"the grid is rotated or skewed ({tuple(transform)[:6]}); warp it north-up first")
    gsd = ground_sample_distance(crs, transform, width, height)
    rows = options.strip_rows or max(256, _STRIP_PIXELS // max(width, 1))
    hole_px = options.hole_m2 / gsd**2
    pieces: list[np.ndarray] = []
    junctions: list[np.ndarray] = []
    widths = np.zeros(0, np.int64)  # histogram of twice the half-width, in half pixels
    above = np.zeros(width, bool)  # skeleton of the row above the pending strip
    pending = None
    for r0 in list(range(0, height, rows)) + [height]:
        if r0 < height:
            core, doubled = _skeleton_rows(read, height, r0, min(height, r0 + rows), options, hole_px)
            widths = _add_hist(widths, doubled)
            below = core[0]
        else:
            core, below = None, np.zeros(width, bool)
        if pending is not None:
            p0, pcore = pending
            segs, junc = _strip_graph(np.vstack([above[None], pcore, below[None]]), p0)
            # a pixel on the strip's first row or on the row below may have more edges in the
            # neighbouring strip: pieces must end there, or a junction would be merged through
            lines = _merge(_segments(segs), simplify=False)
            pieces.append(shapely.simplify(_break_at_rows(lines, (p0 + 0.5, p0 + len(pcore) + 0.5)), 0.0))
            junctions.append(junc)
            above = pcore[-1]
            if progress is not None:
                progress(len(pcore))
        pending = None if core is None else (r0, core)
    width_px = _median_hist(widths) / 2 if widths.sum() else math.nan
    width_m = width_px * gsd
    lines = _assemble(np.concatenate(pieces) if pieces else np.empty(0, object),
                      np.concatenate(junctions) if junctions else np.zeros((0, 2), np.int64))
    w = width_px if math.isfinite(width_px) else 1.0
    spur_px = options.spur_m / gsd if options.spur_m is not None else 2 * w
    bridge_px = options.bridge_m / gsd if options.bridge_m is not None else 2 * w
    n0 = len(lines)
    edge = (w, w, width - w, height - w)  # ends closer than a road width to the border
    lines = _prune(lines, spur_px, edge=edge)
    lines = _join_close_junctions(lines, max(w, 2.0))
    lines = _prune(lines, spur_px, edge=edge)
    lines, bridges = _bridge(lines, bridge_px, options.angle_deg, direction_px=max(2 * w, 5.0))
    lines = shapely.simplify(lines, options.simplify_px, preserve_topology=True) if len(lines) else lines
    log.info("centre-lines: %d pieces -> %d lines (road width %.1f px, spurs < %.1f px pruned, %d gaps <= %.1f px "
             "bridged)", n0, len(lines), w, spur_px, bridges, bridge_px)
    frame = _frame(lines, transform, crs, options.class_name)
    return Centrelines(frame, width_m=width_m, spur_m=spur_px * gsd, bridge_m=bridge_px * gsd, bridges=bridges)


def _skeleton_rows(read, height: int, r0: int, r1: int, options: CentrelineOptions,
                   hole_px: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Skeleton of rows [r0, r1) thinned with a halo of rows around them, and the doubled road widths
    (in half pixels) at its pixels. The halo grows until it is twice the widest half-width. Holes
    of at most ``hole_px`` pixels are filled first (those that reach past the halo stay open:
    a crack longer than the halo)."""
    from scipy import ndimage
    from skimage.morphology import skeletonize

    halo = options.halo
    while True:
        a0, a1 = max(0, r0 - halo), min(height, r1 + halo)
        m = np.asarray(read(a0, a1), dtype=bool)
        if not m.any():
            return np.zeros((r1 - r0, m.shape[1]), bool), np.zeros(0, np.int64)
        if hole_px >= 1:
            m = _fill_holes(m, hole_px, top=a0 > 0, bottom=a1 < height)
        padded = np.pad(m, 1)
        cheb = ndimage.distance_transform_cdt(padded, metric="chessboard")[1:-1, 1:-1]
        need = 2 * int(cheb.max()) + 2
        if need <= halo or halo >= options.max_halo or (a0 == 0 and a1 == height):
            break
        halo = min(options.max_halo, need)
    skel = skeletonize(m)[r0 - a0 : r1 - a0]
    taxi = ndimage.distance_transform_cdt(padded, metric="taxicab")[1:-1, 1:-1][r0 - a0 : r1 - a0]
    # a centre pixel d steps from the edge lies in a road of about 2d - 0.5 pixels; the geometric
    # mean of the chessboard and taxicab distances is right both along the axes and at 45 degrees
    d = np.sqrt(cheb[r0 - a0 : r1 - a0][skel] * taxi[skel].astype(np.float64))
    return skel, np.round(2 * (2 * d - 0.5)).astype(np.int64)


def _fill_holes(m: np.ndarray, max_px: float, *, top: bool, bottom: bool) -> np.ndarray:
    """``m`` with its 4-connected holes of at most ``max_px`` pixels filled. A background region
    that touches the window's cut top or bottom edge may go on outside it, so it is left open
    (the raster's own edges are not cuts: a region there is open anyway)."""
    from scipy import ndimage

    labels, n = ndimage.label(~m)
    if not n:
        return m
    size = np.bincount(labels.ravel(), minlength=n + 1)
    small = size <= max_px
    small[0] = False
    small[np.unique(labels[:, [0, -1]])] = False  # open to the left and right edges of the raster
    if top:
        small[np.unique(labels[0])] = False
    if bottom:
        small[np.unique(labels[-1])] = False
    if not small.any():
        return m
    return m | small[labels]


def _add_hist(hist: np.ndarray, values: np.ndarray) -> np.ndarray:
    add = np.bincount(np.clip(values, 0, None), minlength=len(hist))
    if len(hist) < len(add):
        hist = np.concatenate([hist, np.zeros(len(add) - len(hist), np.int64)])
    hist[: len(add)] += add
    return hist


def _median_hist(hist: np.ndarray) -> float:
    cum = np.cumsum(hist)
    return float(np.searchsorted(cum, cum[-1] / 2))


def _strip_graph(P: np.ndarray, row0: int) -> tuple[np.ndarray, np.ndarray]:
    """Edges and junction pixels of a strip of skeleton rows.

    ``P``: rows ``row0 - 1 .. row0 + h`` (the row above and below included). Pixels are joined to
    their 4-neighbours, and diagonally only when neither pixel of the 2x2 block's other diagonal is
    set (else the 4-path already joins them; keeping both would make triangles and false junctions).
    Returns the edges starting on the strip's own rows, as (n, 2, 2) pixel-centre coordinates
    (x = col + 0.5, y = row + 0.5), with those that go down to the row below, and (row, col) of
    the strip's pixels that have three or more edges.
    """
    Q = np.pad(P, ((0, 0), (1, 1)))
    c = Q[1:-1, 1:-1]
    n, s = Q[:-2, 1:-1], Q[2:, 1:-1]
    w, e = Q[1:-1, :-2], Q[1:-1, 2:]
    east = c & e
    south = c & s
    se = c & Q[2:, 2:] & ~e & ~s
    sw = c & Q[2:, :-2] & ~w & ~s
    ne = c & Q[:-2, 2:] & ~n & ~e
    nw = c & Q[:-2, :-2] & ~n & ~w
    degree = (east.astype(np.uint8) + south + se + sw + ne + nw + (c & w) + (c & n))
    jr, jc = np.nonzero(degree >= 3)
    out = []
    for edges, dr, dc in ((east, 0, 1), (south, 1, 0), (se, 1, 1), (sw, 1, -1)):
        r, col = np.nonzero(edges)
        if len(r):
            x0, y0 = col + 0.5, r + row0 + 0.5
            out.append(np.stack([np.column_stack([x0, y0]), np.column_stack([x0 + dc, y0 + dr])], axis=1))
    segs = np.concatenate(out) if out else np.zeros((0, 2, 2))
    return segs, np.column_stack([jr + row0, jc]).astype(np.int64)


def _segments(segs: np.ndarray) -> np.ndarray:
    if not len(segs):
        return np.empty(0, object)
    return shapely.linestrings(segs.reshape(-1, 2), indices=np.repeat(np.arange(len(segs)), 2))


def _merge(lines: np.ndarray, *, simplify: bool = True) -> np.ndarray:
    """Lines joined wherever exactly two of them meet (GEOS LineMerger), one LineString each;
    ``simplify``: runs of collinear vertices keep only their ends (lossless; ends never move)."""
    lines = np.asarray(lines, dtype=object)
    if not len(lines):
        return np.empty(0, object)
    merged = shapely.get_parts(shapely.line_merge(shapely.multilinestrings(lines)))
    merged = merged[shapely.get_type_id(merged) == shapely.GeometryType.LINESTRING]
    return shapely.simplify(merged, 0.0) if simplify else merged


def _break_at_rows(lines: np.ndarray, ys: tuple[float, ...]) -> np.ndarray:
    """The lines cut at every inner vertex whose y is one of ``ys``."""
    if not len(lines):
        return lines
    coords, owner = shapely.get_coordinates(lines, return_index=True)
    first = np.r_[True, owner[1:] != owner[:-1]]
    last = np.r_[owner[1:] != owner[:-1], True]
    cut = np.isin(coords[:, 1], ys) & ~first & ~last
    if not cut.any():
        return lines
    repeat = np.where(cut, 2, 1)
    starts = np.repeat(first, repeat)
    starts[np.cumsum(repeat)[cut] - 1] = True  # the second copy of a cut vertex starts a piece
    return shapely.linestrings(np.repeat(coords, repeat, axis=0), indices=np.cumsum(starts) - 1)


def _assemble(pieces: np.ndarray, junctions: np.ndarray) -> np.ndarray:
    """Join the strips' pieces into one network; junction pixels that touch become one node (their
    centroid), and pieces that only join pixels of one such cluster are dropped."""
    if not len(pieces):
        return pieces
    pieces = _merge(pieces)  # first across strip lines, so pieces are what the whole mask gives
    if len(junctions):
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components
        from scipy.spatial import cKDTree

        pairs = cKDTree(junctions).query_pairs(1.5, output_type="ndarray")
        n = len(junctions)
        _, cluster = connected_components(coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])),
                                                     shape=(n, n)), directed=False)
        count = np.bincount(cluster)
        centre = np.column_stack([np.bincount(cluster, junctions[:, 1] + 0.5) / count,
                                  np.bincount(cluster, junctions[:, 0] + 0.5) / count])
        stride = int(junctions[:, 1].max()) + 2  # > any junction column, so keys are unique
        keys = junctions[:, 0] * stride + junctions[:, 1]
        order = np.argsort(keys)
        keys, cluster_sorted = keys[order], cluster[order]

        def lookup(xy: np.ndarray) -> np.ndarray:
            r, c = np.floor(xy[:, 1]).astype(np.int64), np.floor(xy[:, 0]).astype(np.int64)
            k = np.where(c < stride - 1, r * stride + c, -1)
            i = np.clip(np.searchsorted(keys, k), 0, len(keys) - 1)
            return np.where(keys[i] == k, cluster_sorted[i], -1)

        first, last = _ends(pieces)
        cf, cl = lookup(first), lookup(last)
        length = shapely.length(pieces)
        inside = (cf >= 0) & (cf == cl) & (length < 3)
        pieces, first, last, cf, cl = pieces[~inside], first[~inside], last[~inside], cf[~inside], cl[~inside]
        first = np.where(cf[:, None] >= 0, centre[np.maximum(cf, 0)], first)
        last = np.where(cl[:, None] >= 0, centre[np.maximum(cl, 0)], last)
        pieces = _set_ends(pieces, first, last)
    return _merge(pieces)


def _ends(lines: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (shapely.get_coordinates(shapely.get_point(lines, 0)),
            shapely.get_coordinates(shapely.get_point(lines, -1)))


def _set_ends(lines: np.ndarray, first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """The lines with their first and last vertices moved; lines that become a point are dropped."""
    if not len(lines):
        return lines
    coords = shapely.get_coordinates(lines)
    counts = shapely.get_num_coordinates(lines)
    ends = np.cumsum(counts)
    coords[ends - counts] = first
    coords[ends - 1] = last
    out = shapely.set_coordinates(np.array(lines, dtype=object, copy=True), coords)
    return out[shapely.length(out) > 0]


# --------------------------------------------------------------------------------------------
# the network: topology, spurs, junctions, gaps


def _topology(lines: np.ndarray):
    """(node coordinates, start node, end node, degree) of each line; nodes are exact coordinates."""
    first, last = _ends(lines)
    nodes, inverse = np.unique(np.concatenate([first, last]), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    n = len(lines)
    return nodes, inverse[:n], inverse[n:], np.bincount(inverse, minlength=len(nodes))


def _prune(lines: np.ndarray, spur_px: float, *, edge: tuple[float, float, float, float] | None = None,
           rounds: int = 8) -> np.ndarray:
    """Remove branches from an end to a junction shorter than ``spur_px``, until none is left.
    Where every branch of a junction is such a spur, the two longest stay (so an isolated road
    never disappears, it only loses its whiskers). An end outside ``edge`` (xmin, ymin, xmax, ymax:
    near the raster's border) may be a road that goes on beyond the raster: at each junction the
    longest such branch stays (the others are the fork a road's cut end thins into)."""
    for _ in range(rounds):
        if not len(lines) or spur_px <= 0:
            return lines
        nodes, start, end, degree = _topology(lines)
        length = shapely.length(lines)
        ds, de = degree[start], degree[end]
        spur = (((ds == 1) & (de >= 3)) | ((de == 1) & (ds >= 3))) & (length < spur_px)
        idx = np.flatnonzero(spur)
        if not len(idx):
            return lines
        junction = np.where(ds[idx] >= 3, start[idx], end[idx])
        tip = np.where(ds[idx] >= 3, end[idx], start[idx])
        if edge is not None:
            x, y = nodes[tip, 0], nodes[tip, 1]
            border = (x < edge[0]) | (y < edge[1]) | (x > edge[2]) | (y > edge[3])
        else:
            border = np.zeros(len(idx), bool)
        order = np.lexsort((-length[idx], ~border, junction))  # per junction: border first, longest first
        idx, junction, border = idx[order], junction[order], border[order]
        spurs_at = np.bincount(junction, minlength=len(degree))
        keep_n = np.where(degree - spurs_at == 0, 2, 0)  # branches to keep at each junction
        keep_n = np.maximum(keep_n, np.bincount(junction, weights=border, minlength=len(degree)) > 0)
        rank = np.arange(len(idx)) - np.searchsorted(junction, junction)
        drop = idx[rank >= keep_n[junction]]
        if not len(drop):
            return lines
        keep = np.ones(len(lines), bool)
        keep[drop] = False
        lines = _merge(lines[keep])
    return lines


def _join_close_junctions(lines: np.ndarray, max_px: float) -> np.ndarray:
    """Junctions joined by a line no longer than ``max_px`` become one (at their mean position)."""
    if not len(lines):
        return lines
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    nodes, start, end, degree = _topology(lines)
    short = (degree[start] >= 3) & (degree[end] >= 3) & (start != end) & (shapely.length(lines) <= max_px)
    if not short.any():
        return lines
    n = len(nodes)
    _, group = connected_components(coo_matrix((np.ones(short.sum()), (start[short], end[short])), shape=(n, n)),
                                    directed=False)
    count = np.bincount(group)
    moved = np.column_stack([np.bincount(group, nodes[:, 0]) / count, np.bincount(group, nodes[:, 1]) / count])[group]
    keep = ~short
    return _merge(_set_ends(lines[keep], moved[start[keep]], moved[end[keep]]))


def _bridge(lines: np.ndarray, max_px: float, angle_deg: float, *, direction_px: float) -> tuple[np.ndarray, int]:
    """Join road ends across gaps up to ``max_px``: to another end when both point at each other,
    else to the nearest point of another line that the end points at (within ``angle_deg``)."""
    if len(lines) < 1 or max_px <= 0:
        return lines, 0
    from scipy.spatial import cKDTree

    nodes, start, end, degree = _topology(lines)
    is_end = degree == 1
    if not is_end.any():
        return lines, 0
    length = shapely.length(lines)
    # each end: its line, its position, and the direction the road runs out of it
    at_start = is_end[start]
    at_end = is_end[end] & (start != end)
    line_of = np.concatenate([np.flatnonzero(at_start), np.flatnonzero(at_end)])
    node_of = np.concatenate([start[at_start], end[at_end]])
    back = np.concatenate([np.minimum(direction_px, length[at_start]),
                           np.maximum(length[at_end] - direction_px, 0)])
    pos = nodes[node_of]
    inner = shapely.get_coordinates(shapely.line_interpolate_point(lines[line_of], back))
    direction = _unit(pos - inner)
    cos_max = math.cos(math.radians(angle_deg))

    candidates = []  # (distance, end i, end j or -1, line, target x, y)
    tree = cKDTree(pos)
    for i, j in tree.query_pairs(max_px, output_type="ndarray").tolist():
        if line_of[i] == line_of[j] and length[line_of[i]] < 3 * max_px:
            continue
        v = pos[j] - pos[i]
        dist = float(np.hypot(*v))
        if dist == 0:
            continue
        u = v / dist
        if direction[i] @ u >= cos_max and direction[j] @ -u >= cos_max:
            candidates.append((dist, i, j, -1, *pos[j]))
    points = shapely.points(pos)
    ends_idx, line_idx = shapely.STRtree(lines).query(points, predicate="dwithin", distance=max_px)
    other = line_idx != line_of[ends_idx]
    ends_idx, line_idx = ends_idx[other], line_idx[other]
    if len(ends_idx):
        target = shapely.get_coordinates(shapely.line_interpolate_point(
            lines[line_idx], shapely.line_locate_point(lines[line_idx], points[ends_idx])))
        v = target - pos[ends_idx]
        dist = np.hypot(v[:, 0], v[:, 1])
        ok = dist > 0
        cos = np.einsum("ij,ij->i", direction[ends_idx][ok], _unit(v[ok]))
        sel = np.flatnonzero(ok)[cos >= cos_max]
        for k in sel.tolist():
            candidates.append((float(dist[k]), int(ends_idx[k]), -1, int(line_idx[k]), *target[k]))
    if not candidates:
        return lines, 0
    # ends joined to ends first, then the shortest bridges; each end is used once
    candidates.sort(key=lambda c: (c[2] < 0, c[0]))
    used = np.zeros(len(pos), bool)
    bridges, splits = [], {}
    for dist, i, j, line, x, y in candidates:
        if used[i] or (j >= 0 and used[j]):
            continue
        used[i] = True
        if j >= 0:
            used[j] = True
        elif line >= 0:
            # a bridge that meets a line inside cuts it there, at exactly the bridge's end point;
            # one that meets it at its end takes that end's coordinates
            coords = shapely.get_coordinates(lines[line])
            d = float(shapely.line_locate_point(lines[line], shapely.Point(x, y)))
            if d <= 1e-9:
                x, y = coords[0]
            elif d >= length[line] - 1e-9:
                x, y = coords[-1]
            else:
                splits.setdefault(line, []).append((d, (x, y)))
        bridges.append(((pos[i][0], pos[i][1]), (x, y)))
    cut = sorted(splits)
    kept = np.delete(lines, cut) if cut else lines
    parts = [_split(lines[k], splits[k]) for k in cut]
    out = np.concatenate([kept, *parts, shapely.linestrings(np.array(bridges, dtype=np.float64))])
    return _merge(out), len(bridges)


def _split(line, cuts: list[tuple[float, tuple[float, float]]]) -> np.ndarray:
    """A line cut at points on it, given as (distance along it, the point's coordinates)."""
    coords = shapely.get_coordinates(line)
    along = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(coords, axis=0).T))])
    out, current, i = [], [coords[0]], 1
    for d, p in sorted(cuts):
        while i < len(coords) and along[i] <= d:
            if along[i] < d:
                current.append(coords[i])
            i += 1
        current.append(np.asarray(p))
        out.append(current)
        current = [np.asarray(p)]
    current.extend(coords[i:])
    out.append(current)
    out = [np.array(c) for c in out]
    return np.array([shapely.LineString(c) for c in out if len(c) >= 2 and np.ptp(c, axis=0).any()],
                    dtype=object)


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.hypot(v[:, 0], v[:, 1])
    return v / np.where(n > 0, n, 1)[:, None]


# --------------------------------------------------------------------------------------------
# frame and lengths


def _frame(lines: np.ndarray, transform, crs: CRS, class_name: str) -> gpd.GeoDataFrame:
    import geopandas as gpd
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    lines = np.asarray(lines, dtype=object)
    lines = lines[~shapely.is_empty(lines)] if len(lines) else lines
    n = len(lines)
    if n:
        nodes, start, end, degree = _topology(lines)
        _, network = connected_components(coo_matrix((np.ones(n), (start, end)), shape=(len(nodes),) * 2),
                                          directed=False)
        network = network[start]
        _, network = np.unique(network, return_inverse=True)
    else:
        start = end = network = np.zeros(0, np.int64)
        degree = np.zeros(0, np.int64)
    world = pixels_to_world(lines, transform) if n else lines
    return gpd.GeoDataFrame(
        {
            "class_name": np.full(n, class_name, dtype=object),
            "length_m": line_length_m(world, crs),
            "node_from": start.astype(np.int64),
            "node_to": end.astype(np.int64),
            "degree_from": degree[start].astype(np.int32) if n else np.zeros(0, np.int32),
            "degree_to": degree[end].astype(np.int32) if n else np.zeros(0, np.int32),
            "network": network.astype(np.int64).reshape(-1),
        },
        geometry=gpd.GeoSeries(world, crs=crs),
        crs=crs,
    )


# --------------------------------------------------------------------------------------------
# road measures


@dataclass(frozen=True)
class RoadMetrics:
    """Completeness, correctness and quality of extracted roads (Wiedemann et al. 1998), by length.

    completeness = matched reference / reference; correctness = matched extraction / extraction;
    quality = matched extraction / (extraction + unmatched reference). "Matched": within
    ``buffer_m`` of the other network.
    """

    completeness: float
    correctness: float
    quality: float
    buffer_m: float
    reference_m: float
    predicted_m: float
    matched_reference_m: float
    matched_predicted_m: float

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in asdict(self).items()}


def road_metrics(predicted, reference, buffer_m: float, *, crs=None, transform=None,
                 options: CentrelineOptions = CentrelineOptions()) -> RoadMetrics:
    """Completeness, correctness and quality of ``predicted`` roads against ``reference`` centre-lines.

    ``predicted``: lines (GeoDataFrame/GeoSeries, or shapely geometries with ``crs``), or a 2-D
    boolean road mask on the grid ``transform`` in ``crs`` (its centre-lines are extracted with
    ``options``). ``reference``: lines (GeoDataFrame/GeoSeries, reprojected to the prediction's
    CRS, or geometries in ``crs``). Lengths and buffers are measured in metres: in a projected CRS
    with metre-like units as they are, else in the UTM zone of the data.
    """
    if not (math.isfinite(buffer_m) and buffer_m > 0):
        raise InputError(f"buffer_m={buffer_m}: give a buffer > 0 in metres (3 m is usual for roads)")
    if isinstance(predicted, np.ndarray) and predicted.ndim == 2 and predicted.dtype != object:
        if transform is None or crs is None:
            raise InputError("a predicted road mask needs its grid: pass transform= and crs=")
        predicted = centrelines(predicted, transform, crs, options=options).lines
    pred = _as_lines(predicted, crs, "predicted")
    ref = _as_lines(reference, pred.crs, "reference")
    if ref.crs is not None and pred.crs is not None and ref.crs != pred.crs:
        ref = ref.to_crs(pred.crs)
    metric = _metric_crs(pred, ref)
    unit = float(metric.axis_info[0].unit_conversion_factor) if metric.axis_info else 1.0
    p = np.asarray(pred.to_crs(metric).values, dtype=object)
    r = np.asarray(ref.to_crs(metric).values, dtype=object)
    buffer = buffer_m / unit
    lp, lr = float(shapely.length(p).sum()) * unit, float(shapely.length(r).sum()) * unit
    near_p = shapely.union_all(shapely.buffer(p, buffer)) if len(p) else shapely.Polygon()
    near_r = shapely.union_all(shapely.buffer(r, buffer)) if len(r) else shapely.Polygon()
    matched_r = float(shapely.length(shapely.intersection(r, near_p)).sum()) * unit if len(r) else 0.0
    matched_p = float(shapely.length(shapely.intersection(p, near_r)).sum()) * unit if len(p) else 0.0
    nan = float("nan")
    return RoadMetrics(
        completeness=matched_r / lr if lr else nan,
        correctness=matched_p / lp if lp else nan,
        quality=matched_p / (lp + lr - matched_r) if (lp + lr - matched_r) else nan,
        buffer_m=float(buffer_m), reference_m=lr, predicted_m=lp,
        matched_reference_m=matched_r, matched_predicted_m=matched_p,
    )


def _as_lines(value, crs, what: str):
    import geopandas as gpd

    if isinstance(value, gpd.GeoDataFrame):
        series = value.geometry
    elif isinstance(value, gpd.GeoSeries):
        series = value
    else:
        series = gpd.GeoSeries(np.asarray(value, dtype=object).reshape(-1), crs=crs)
    if series.crs is None:
        if crs is None:
            raise InputError(f"the {what} lines have no CRS; pass crs=")
        series = series.set_crs(crs)
    series = series[~(series.isna() | series.is_empty)]
    kinds = set(series.geom_type)
    if kinds - {"LineString", "MultiLineString", "LinearRing"}:
        raise InputError(f"the {what} roads hold {sorted(kinds)}; give centre-lines (LineStrings)")
    return series


def _metric_crs(pred, ref) -> CRS:
    """The prediction's CRS when it is projected with metre-like units, else the UTM zone of the data."""
    import pandas as pd

    crs = CRS.from_user_input(pred.crs)
    if crs.is_projected and not needs_ellipsoid(crs):
        return crs
    both = pd.concat([pred, ref]) if len(pred) else ref
    return CRS.from_user_input(both.estimate_utm_crs())
