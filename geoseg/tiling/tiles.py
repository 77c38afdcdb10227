"""Plan tiles and cores: a pure function of the scene's shape, the tile size and the overlap.

Tiles are the fixed-size windows fed to the model. Consecutive tiles share at least ``overlap``
pixels; the last tile of a row or column is moved back so that it ends at the scene's edge (the
model then sees real pixels rather than padding), which can make its overlap larger. A tile only
extends past the scene (and is padded by the reader) when the scene is smaller than one tile.

Cores partition the scene: each pixel belongs to the core of exactly one tile, the tile in which it
is furthest from an edge. Cores split every overlap in the middle.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from geoseg.errors import InputError


@dataclass(frozen=True)
class Tile:
    """One model window and its core, in scene pixel coordinates (rows and columns).

    ``row, col`` is the tile's top-left corner; the tile spans ``size`` rows and columns and may
    extend past the scene's bottom or right edge when the scene is smaller than a tile, and past
    any edge of a crop (``plan_tiles(window=...)``). ``core`` is ``(row0, row1, col0, col1)``,
    half-open, always inside the scene (or crop; there some cores may be empty).
    """

    index: int
    row: int
    col: int
    size: int
    core: tuple[int, int, int, int]

    @property
    def window(self) -> tuple[int, int, int, int]:
        """``(row0, row1, col0, col1)`` of the whole tile, half-open; may pass the scene's edge."""
        return (self.row, self.row + self.size, self.col, self.col + self.size)


def spaced_starts(lo: int, hi: int, size: int, stride: int) -> list[int]:
    """Starts of windows of ``size`` pixels inside ``[lo, hi)``: from ``lo``, ``stride`` apart, and
    the last one flush with ``hi`` (closer to the one before it when the stride does not divide the
    span). The one window planner: inference tiles (:func:`axis_starts`) and training chips
    (``geoseg.training.chip_windows``) both use it. Needs ``hi - lo >= size`` and ``stride >= 1``."""
    if hi - lo < size or stride < 1:
        raise ValueError(f"no window of {size} fits [{lo}, {hi}) with stride {stride}")
    starts = list(range(lo, hi - size, stride))
    starts.append(hi - size)
    return starts


def axis_starts(length: int, *, tile_size: int, overlap: int) -> list[int]:
    """Start offsets of tiles along one axis of ``length`` pixels."""
    check_tiling(tile_size=tile_size, overlap=overlap)
    if length <= 0:
        raise InputError(f"a scene axis has {length} pixels; a scene needs at least one row and column")
    if length <= tile_size:
        return [0]
    return spaced_starts(0, length, tile_size, tile_size - overlap)


def axis_cores(length: int, starts: list[int], *, tile_size: int) -> list[tuple[int, int]]:
    """Half-open core intervals that partition ``[0, length)``, one per start offset."""
    bounds = [0]
    for left, right in zip(starts, starts[1:]):
        # The middle of the shared part [right, left + tile_size).
        bounds.append((right + left + tile_size) // 2)
    bounds.append(length)
    return list(zip(bounds, bounds[1:]))


def check_tiling(*, tile_size: int, overlap: int, size_multiple: int = 1) -> None:
    """Raise InputError when tile size and overlap cannot work together."""
    if tile_size <= 0:
        raise InputError(f"--tile-size must be positive, got {tile_size}")
    if overlap < 0:
        raise InputError(f"--overlap must be zero or positive, got {overlap}")
    if overlap >= tile_size:
        raise InputError(
            f"--overlap {overlap} must be smaller than --tile-size {tile_size}; "
            f"a quarter of the tile ({tile_size // 4}) is a good choice"
        )
    if tile_size % size_multiple:
        lower = max(size_multiple, tile_size - tile_size % size_multiple)
        raise InputError(
            f"--tile-size {tile_size} is not a multiple of {size_multiple}, which this model needs; "
            f"use {lower} or {lower + size_multiple}"
        )


@dataclass(frozen=True)
class TilePlan:
    """The tiles of a scene (or of a window of it), planned lazily: only the row and column starts
    and cores are kept (a few thousand numbers for a scene of millions of pixels), and tiles are made
    a row at a time, so planning costs O(rows + columns) in time and memory, not O(tiles).

    ``rows`` and ``cols`` are ``(start, core0, core1)`` in the window's coordinates; a tile's
    ``index`` is its row-major position in the whole plan (``ncols`` columns), also in a plan of
    some of its columns (:meth:`touching`).
    """

    size: int
    rows: tuple[tuple[int, int, int], ...]
    cols: tuple[tuple[int, int, int], ...]
    ncols: int
    col_base: int = 0

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    def row_tiles(self, i: int) -> list[Tile]:
        """The tiles of row ``i``, left to right."""
        r, a, b = self.rows[i]
        return [Tile(index=i * self.ncols + self.col_base + j, row=r, col=c, size=self.size, core=(a, b, d, e))
                for j, (c, d, e) in enumerate(self.cols)]

    def __iter__(self) -> Iterator[Tile]:
        for i in range(len(self.rows)):
            yield from self.row_tiles(i)

    def touching(self, col0: int, col1: int) -> "TilePlan":
        """The plan of the columns of tiles that reach into columns ``[col0, col1)`` (their indexes
        unchanged); the columns that touch a range are consecutive."""
        keep = [j for j, (c, _, _) in enumerate(self.cols) if c < col1 and c + self.size > col0]
        if not keep:
            return TilePlan(self.size, self.rows, (), self.ncols, self.col_base)
        return TilePlan(self.size, self.rows, self.cols[keep[0]: keep[-1] + 1], self.ncols, self.col_base + keep[0])

    def col_span(self) -> tuple[int, int]:
        """``(first column, last column + 1)`` the plan's tiles cover (they may pass the window)."""
        return self.cols[0][0], self.cols[-1][0] + self.size


def _axis(length: int, lo: int, hi: int, *, tile_size: int, overlap: int) -> tuple[tuple[int, int, int], ...]:
    """``(start, core0, core1)`` of the tiles along one axis that overlap ``[lo, hi)``, in the
    window's coordinates (cores clipped to it; empty when the core lies outside)."""
    starts = axis_starts(length, tile_size=tile_size, overlap=overlap)
    out = []
    for start, (c0, c1) in zip(starts, axis_cores(length, starts, tile_size=tile_size)):
        if start >= hi or start + tile_size <= lo:
            continue
        a = max(c0, lo) - lo
        b = max(c0, lo, min(c1, hi)) - lo
        out.append((start - lo, a, b))
    return tuple(out)


def tile_plan(height: int, width: int, *, tile_size: int, overlap: int,
              window: tuple[int, int, int, int] | None = None) -> TilePlan:
    """The tiles of a ``height`` x ``width`` scene as a lazy :class:`TilePlan` (see
    :func:`plan_tiles` for what the tiles are)."""
    wr0, wr1, wc0, wc1 = window if window is not None else (0, height, 0, width)
    rows = _axis(height, wr0, wr1, tile_size=tile_size, overlap=overlap)
    cols = _axis(width, wc0, wc1, tile_size=tile_size, overlap=overlap)
    return TilePlan(tile_size, rows, cols, len(cols))


def plan_tiles(height: int, width: int, *, tile_size: int, overlap: int,
               window: tuple[int, int, int, int] | None = None) -> list[Tile]:
    """All tiles of a ``height`` x ``width`` scene, in row-major order (the order blending needs).

    ``window`` ``(row0, row1, col0, col1)``: only the scene's tiles that overlap that window, in
    the window's own coordinates (a crop of the scene, ``scene.crop``): the same tiles, so the crop
    blends exactly as the whole scene does there. They may then start above or left of the window
    (negative ``row``/``col``); their cores are clipped to it and still partition it. A list: for
    scenes of any size use :func:`tile_plan`, which makes the same tiles lazily.
    """
    return list(tile_plan(height, width, tile_size=tile_size, overlap=overlap, window=window))


def batches(tiles: list[Tile], batch_size: int) -> Iterator[list[Tile]]:
    """Consecutive groups of at most ``batch_size`` tiles, keeping row-major order."""
    if batch_size <= 0:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    for start in range(0, len(tiles), batch_size):
        yield tiles[start : start + batch_size]
