"""Building regularisation: straight edges and right angles along each building's own orientation.

For each footprint (``regularize``):

1. its dominant orientation, estimated three times: the length-weighted mean of its edge
   directions modulo 90° on the outline simplified by one and by three pixels (so the staircase of
   a diagonal wall counts as one slanted edge), and the orientation of its minimum rotated
   rectangle; step 2 runs for each and the simplest outline within 0.02 IoU of the best fit wins;
   when the winner still has steps (more than 8 corners), angles within ±1° of it are tried too;
2. the footprint turned by that angle is rasterized on a grid of ``cell`` metres aligned with the
   turned axes (a cell is inside when at least half of it is covered), traced back into a polygon whose edges are
   all parallel to the axes, and turned back: a rectilinear outline with right angles;
3. the result is kept when its IoU with the original footprint is at least ``min_iou``, its
   area within ``max_area_change`` and it has at most 3n + 4 vertices, n those of the outline
   simplified by two pixels (a round or slanted shape turned into a fine staircase is no
   improvement); otherwise the original outline is kept, simplified by half a
   pixel (``fallback``).

Each polygon gets ``reg_iou`` (IoU of what is written against the unregularised mask outline),
``vertices`` (outline vertices after) and ``regularized`` (1 if the rectilinear form was kept).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import rasterio.features
import shapely
import shapely.affinity
from rasterio.transform import Affine


@dataclass(frozen=True)
class RegularizeResult:
    geoms: np.ndarray
    iou: np.ndarray
    vertices: np.ndarray
    regularized: np.ndarray


def dominant_angle(geom, pixel: float) -> float:
    """Orientation in degrees (0-90) of a polygon's walls, weighted by their lengths."""
    simple = shapely.simplify(geom, pixel)
    xy = shapely.get_coordinates(shapely.get_exterior_ring(_largest(simple)))
    d = np.diff(xy, axis=0)
    lengths = np.hypot(d[:, 0], d[:, 1])
    if not lengths.sum():
        return 0.0
    theta = np.arctan2(d[:, 1], d[:, 0]) * 4  # period of 90°: opposite and perpendicular walls agree
    mean = math.atan2((lengths * np.sin(theta)).sum(), (lengths * np.cos(theta)).sum()) / 4
    return math.degrees(mean) % 90


def rectangle_angle(geom) -> float:
    """Orientation in degrees (0-90) of the polygon's minimum rotated rectangle."""
    xy = shapely.get_coordinates(shapely.minimum_rotated_rectangle(geom))
    if len(xy) < 2:
        return 0.0
    d = xy[1] - xy[0]
    return math.degrees(math.atan2(d[1], d[0])) % 90


def _largest(geom):
    if geom.geom_type == "MultiPolygon":
        return max(geom.geoms, key=lambda g: g.area)
    return geom


def rectilinear(geom, angle: float, cell: float):
    """``geom`` turned by ``-angle``, rasterized on a ``cell`` grid, traced, and turned back."""
    centre = geom.centroid
    turned = shapely.affinity.rotate(geom, -angle, origin=centre)
    minx, miny, maxx, maxy = turned.bounds
    cols = max(1, int(math.ceil((maxx - minx) / cell)) + 2)
    rows = max(1, int(math.ceil((maxy - miny) / cell)) + 2)
    transform = Affine(cell, 0, minx - cell, 0, -cell, maxy + cell)
    # a cell is inside when at least half of it is covered (measured on a 4x finer grid): stable
    # where a wall runs close to cell centres, unlike a centre-point test
    k = 4
    fine = rasterio.features.rasterize([(turned, 1)], out_shape=(rows * k, cols * k), fill=0, dtype="uint8",
                                       transform=transform * Affine.scale(1 / k))
    mask = (fine.reshape(rows, k, cols, k).mean(axis=(1, 3)) >= 0.5).astype(np.uint8)
    if not mask.any():
        return None
    parts = [shapely.geometry.shape(g) for g, v in rasterio.features.shapes(mask, mask=mask > 0, transform=transform,
                                                                           connectivity=4) if v == 1]
    if not parts:
        return None
    shape = shapely.simplify(shapely.union_all(parts), 0)
    return shapely.affinity.rotate(shape, angle, origin=centre)


def regularize(geoms: np.ndarray, *, pixel: float, cell: float | None = None, min_iou: float = 0.8,
               max_area_change: float = 0.2) -> RegularizeResult:
    """Regularise building footprints (see the module docstring). ``pixel``: the class raster's
    pixel size in CRS units; ``cell``: the grid of the rectilinear outline (default 2 pixels)."""
    geoms = np.asarray(geoms, dtype=object)
    cell = cell or 2 * pixel
    out = np.empty(len(geoms), dtype=object)
    iou = np.zeros(len(geoms))
    kept = np.zeros(len(geoms), np.int32)
    for i, g in enumerate(geoms):
        best = None
        if g is not None and not g.is_empty and g.area > 4 * cell * cell:
            # two estimates of the orientation; keep the outline that fits better, then the simpler
            tried: list[tuple[float, int, float, object]] = []  # (IoU, vertices, angle, outline)

            def pick():
                top = max(t[0] for t in tried)
                return min((t for t in tried if t[0] >= top - 0.02), key=lambda t: (t[1], -t[0]))

            estimates = {round(dominant_angle(g, pixel), 2), round(dominant_angle(g, 3 * pixel), 2),
                         round(rectangle_angle(g), 2)}
            for refine in (False, True):
                if refine:  # steps left in the outline: the angle is a little off; look around it
                    if not tried or pick()[1] <= 9:
                        break
                    centre = pick()[2]
                    estimates = {centre + d for d in (-1, -0.75, -0.5, -0.25, 0.25, 0.5, 0.75, 1)}
                for angle in estimates:
                    candidate = rectilinear(g, angle, cell)
                    if candidate is None or candidate.is_empty or not candidate.is_valid:
                        continue
                    score = shapely.intersection(candidate, g).area / max(shapely.union(candidate, g).area, 1e-12)
                    tried.append((score, int(shapely.get_num_coordinates(candidate)), angle, candidate))
            if tried:
                score, _, _, candidate = pick()
                best = (candidate, score)
        fallback = shapely.make_valid(shapely.simplify(g, pixel / 2)) if g is not None else g
        if fallback is None or fallback.is_empty or fallback.geom_type not in ("Polygon", "MultiPolygon"):
            fallback = g
        if best is not None:
            candidate, score = best
            if (score >= min_iou and abs(candidate.area / g.area - 1) <= max_area_change
                    and shapely.get_num_coordinates(candidate) <= 3 * shapely.get_num_coordinates(
                        shapely.simplify(g, 2 * pixel)) + 4):
                out[i], iou[i], kept[i] = candidate, score, 1
                continue
        out[i] = fallback
        inter = shapely.intersection(fallback, g).area
        iou[i] = inter / max(shapely.union(fallback, g).area, 1e-12)
    vertices = shapely.get_num_coordinates(out).astype(np.int64)
    return RegularizeResult(out, iou, vertices, kept)
