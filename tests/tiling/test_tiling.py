"""Tiling is a pure function: property-test that tiles cover the scene and cores partition it."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geoseg.errors import InputError
from geoseg.tiling.tiles import axis_starts, batches, check_tiling, plan_tiles


@st.composite
def tilings(draw):
    tile = draw(st.integers(1, 96))
    overlap = draw(st.integers(0, tile - 1))
    h = draw(st.integers(1, 400))
    w = draw(st.integers(1, 400))
    return h, w, tile, overlap


@settings(max_examples=300, deadline=None)
@given(tilings())
def test_cores_partition_the_scene_and_tiles_cover_it(args):
    h, w, tile, overlap = args
    tiles = plan_tiles(h, w, tile_size=tile, overlap=overlap)
    core_count = np.zeros((h, w), dtype=np.int32)
    covered = np.zeros((h, w), dtype=bool)
    for t in tiles:
        r0, r1, c0, c1 = t.core
        assert t.row <= r0 < r1 <= t.row + t.size and t.col <= c0 < c1 <= t.col + t.size
        core_count[r0:r1, c0:c1] += 1
        covered[t.row : t.row + t.size, t.col : t.col + t.size] = True
    assert (core_count == 1).all()
    assert covered.all()


@settings(max_examples=300, deadline=None)
@given(tilings())
def test_tiles_stay_inside_unless_the_scene_is_smaller_and_overlap_is_kept(args):
    h, w, tile, overlap = args
    for length in (h, w):
        starts = axis_starts(length, tile_size=tile, overlap=overlap)
        assert starts[0] == 0 and starts == sorted(set(starts))
        if length >= tile:
            assert starts[-1] + tile == length  # the last tile ends at the edge, no padding
        else:
            assert starts == [0]
        for a, b in zip(starts, starts[1:]):
            assert a + tile - b >= overlap  # neighbours share at least the overlap


def test_row_major_order_and_indexes():
    tiles = plan_tiles(1000, 700, tile_size=256, overlap=64)
    assert [t.index for t in tiles] == list(range(len(tiles)))
    assert [(t.row, t.col) for t in tiles] == sorted((t.row, t.col) for t in tiles)
    assert {t.row for t in tiles} == {0, 192, 384, 576, 744}


@pytest.mark.parametrize(
    "tile, overlap, multiple, match",
    [(0, 0, 1, "positive"), (64, -1, 1, "zero or positive"), (64, 64, 1, "smaller than"), (100, 8, 16, "multiple of 16")],
)
def test_bad_tiling_is_a_clear_error(tile, overlap, multiple, match):
    with pytest.raises(InputError, match=match):
        check_tiling(tile_size=tile, overlap=overlap, size_multiple=multiple)


def test_batches_keep_order_and_reject_zero():
    tiles = plan_tiles(300, 300, tile_size=64, overlap=16)
    groups = list(batches(tiles, 4))
    assert [t for g in groups for t in g] == tiles and all(len(g) <= 4 for g in groups)
    with pytest.raises(InputError, match="batch-size"):
        list(batches(tiles, 0))


@given(lo=st.integers(0, 50), span=st.integers(1, 600), size=st.integers(1, 128), stride=st.integers(1, 300))
def test_spaced_starts_cover_the_span_from_its_start_to_its_end(lo, span, size, stride):
    """The one window planner (tiles and training chips): from lo, stride apart, the last flush with hi."""
    from geoseg.tiling.tiles import spaced_starts

    hi = lo + span
    if span < size:
        with pytest.raises(ValueError):
            spaced_starts(lo, hi, size, stride)
        return
    starts = spaced_starts(lo, hi, size, stride)
    assert starts[0] == lo and starts[-1] == hi - size
    steps = np.diff(starts)
    assert (steps > 0).all() and (steps[:-1] == stride).all() and (steps[-1:] <= stride).all()
    if stride <= size:  # overlapping windows cover every pixel of the span
        covered = np.zeros(hi, bool)
        for s in starts:
            covered[s:s + size] = True
        assert covered[lo:].all()


def test_training_chips_and_inference_tiles_use_the_same_planner():
    from geoseg.tiling.tiles import axis_starts, spaced_starts
    from geoseg.training import Rect, chip_windows

    rows = sorted({r for _, r, _ in chip_windows(Rect(0, 0, 1000, 0, 300), (1000, 300), chip=256, stride=192)})
    assert rows == spaced_starts(0, 1000, 256, 192) == axis_starts(1000, tile_size=256, overlap=64)
