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


def axis_starts(length: int, *, tile_size: int, overlap: int) -> list[int]:
    """Start offsets of tiles along one axis of ``length`` pixels."""
    check_tiling(tile_size=tile_size, overlap=overlap)
    if length <= 0:
        raise InputError(f"a scene axis has {length} pixels; a scene needs at least one row and column")
    if length <= tile_size:
        return [0]
    stride = tile_size - overlap
    starts = list(range(0, length - tile_size, stride))
    starts.append(length - tile_size)
    return starts


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


def plan_tiles(height: int, width: int, *, tile_size: int, overlap: int,
               window: tuple[int, int, int, int] | None = None) -> list[Tile]:
    """All tiles of a ``height`` x ``width`` scene, in row-major order (the order blending needs).

    ``window`` ``(row0, row1, col0, col1)``: only the scene's tiles that overlap that window, in
    the window's own coordinates (a crop of the scene, ``scene.crop``): the same tiles, so the crop
    blends exactly as the whole scene does there. They may then start above or left of the window
    (negative ``row``/``col``); their cores are clipped to it and still partition it.
    """
    rows = axis_starts(height, tile_size=tile_size, overlap=overlap)
    cols = axis_starts(width, tile_size=tile_size, overlap=overlap)
    row_cores = axis_cores(height, rows, tile_size=tile_size)
    col_cores = axis_cores(width, cols, tile_size=tile_size)
    wr0, wr1, wc0, wc1 = window if window is not None else (0, height, 0, width)
    tiles = []
    for r, (r0, r1) in zip(rows, row_cores):
        if r >= wr1 or r + tile_size <= wr0:
            continue
        for c, (c0, c1) in zip(cols, col_cores):
            if c >= wc1 or c + tile_size <= wc0:
                continue
            a, b = max(r0, wr0) - wr0, max(r0, wr0, min(r1, wr1)) - wr0  # empty when the core is outside
            d, e = max(c0, wc0) - wc0, max(c0, wc0, min(c1, wc1)) - wc0
            core = (a, b, d, e)
            tiles.append(Tile(index=len(tiles), row=r - wr0, col=c - wc0, size=tile_size, core=core))
    return tiles


def batches(tiles: list[Tile], batch_size: int) -> Iterator[list[Tile]]:
    """Consecutive groups of at most ``batch_size`` tiles, keeping row-major order."""
    if batch_size <= 0:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    for start in range(0, len(tiles), batch_size):
        yield tiles[start : start + batch_size]
