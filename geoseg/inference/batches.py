"""The scene read strip by strip and cut into fixed-shape batches of the tiles that have data."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from geoseg.io.scene import SceneInfo, SceneReader
from geoseg.tiling.tiles import Tile, TilePlan


@dataclass(frozen=True)
class Batch:
    tiles: list[Tile]
    x: np.ndarray  # (batch_size, T, T, bands) float32, zero-padded past len(tiles)
    valid: np.ndarray  # (len(tiles), T, T) bool


@dataclass
class Skips:
    """Tiles found to have no valid pixels: ``runs`` counts them per chunk that reads them,
    ``tiles`` once each (a tile on a chunk edge is read by two chunks)."""

    runs: int = 0
    tiles: int = 0


def iter_batches(
    info: SceneInfo,
    tiles: TilePlan,
    *,
    batch_size: int,
    fill: np.ndarray,
    repeat: int,
    skipped: Skips,
    stretch: tuple[float, float] | None = None,
    first_col: int | None = None,
) -> Iterator[Batch]:
    """Read the scene strip by strip and yield fixed-shape batches of the tiles that have data.

    ``tiles``: the plan of one column chunk; a skipped tile counts in ``skipped.tiles`` only in the
    chunk it starts in (``first_col``: the chunk's first column; None: the first chunk, which also
    counts the tiles that start left of the scene)."""
    if not len(tiles):
        return
    size = tiles.size
    nb = len(info.bands) * repeat
    c_min, c_max = tiles.col_span()  # read only the columns these tiles need
    pending: list[tuple[Tile, np.ndarray]] = []
    x = np.zeros((batch_size, size, size, nb), dtype=np.float32)  # the batch being filled, tile by tile

    def emit() -> Batch:
        nonlocal x
        b = Batch(tiles=[t for t, _ in pending], x=x, valid=np.stack([v for _, v in pending]))
        pending.clear()
        x = np.zeros_like(b.x)
        return b

    with SceneReader(info) as reader:
        for i in range(len(tiles.rows)):
            row = tiles.row_tiles(i)
            r = row[0].row
            data, valid = reader.read(r, r + size, c_min, c_max)
            area = reader.area(r, r + size, c_min, c_max)  # a crop's own pixels (None: all)
            for t in row:
                c = t.col - c_min
                v = valid[:, c : c + size]
                out = v if area is None else v & area[:, c : c + size]
                if not out.any():
                    skipped.runs += 1
                    if first_col is None or t.col >= first_col:  # counted by the chunk it starts in
                        skipped.tiles += 1
                    continue
                slot = x[len(pending)]  # converted to float32 straight into the batch
                if repeat > 1:
                    slot[:] = np.repeat(data[:, c : c + size], repeat, axis=-1)
                else:
                    slot[:] = data[:, c : c + size]
                if stretch is not None:
                    slot *= np.float32(stretch[0])
                    slot += np.float32(stretch[1])
                if not v.all():
                    slot[~v] = fill  # invalid pixels become the band means: 0 after normalisation
                pending.append((t, out))  # pixels outside a crop's area are context, not output
                if len(pending) == batch_size:
                    yield emit()
        if pending:
            yield emit()
