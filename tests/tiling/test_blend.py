"""Blending: windows are positive, the accumulator is exact for consistent tiles and bounded in rows."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geoseg.tiling.blend import StripAccumulator, WINDOWS, weight_window
from geoseg.errors import InputError
from geoseg.tiling.tiles import plan_tiles


@pytest.mark.parametrize("kind", WINDOWS)
@pytest.mark.parametrize("size, overlap", [(1, 0), (7, 3), (64, 16), (512, 128)])
def test_windows_are_positive_symmetric_and_peak_at_one(kind, size, overlap):
    w = weight_window(size, kind=kind, overlap=overlap)
    assert w.shape == (size, size) and w.dtype == np.float32
    assert (w > 0).all() and np.isclose(w.max(), 1.0)
    np.testing.assert_allclose(w, w.T)
    np.testing.assert_allclose(w, w[::-1, ::-1])


def test_unknown_window_names_the_choices():
    with pytest.raises(InputError, match="cosine, gaussian, mean"):
        weight_window(8, kind="hann")


def blend_scene(field, valid, *, tile, overlap, kind):
    """Run per-tile logits cut from a known full-scene logit field through the accumulator."""
    h, w, c = field.shape
    strips = []
    acc = StripAccumulator(height=h, width=w, classes=c, tile_size=tile,
                           window=weight_window(tile, kind=kind, overlap=overlap), sink=strips.append)
    for t in plan_tiles(h, w, tile_size=tile, overlap=overlap):
        logits = np.zeros((tile, tile, c), np.float32)
        v = np.zeros((tile, tile), bool)
        hh, ww = min(tile, h - t.row), min(tile, w - t.col)
        logits[:hh, :ww] = field[t.row : t.row + hh, t.col : t.col + ww]
        v[:hh, :ww] = valid[t.row : t.row + hh, t.col : t.col + ww]
        acc.add(t, logits, v)
        assert acc.acc.shape[0] <= tile  # memory: never more than one tile of rows
    acc.finish()
    rows = [s.row_off for s in strips]
    assert rows == sorted(rows)
    classes = np.concatenate([s.classes for s in strips])
    probs = np.concatenate([s.probs for s in strips])
    return classes, probs


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 120), w=st.integers(1, 120), tile=st.integers(4, 48),
    overlap_frac=st.floats(0, 0.9), kind=st.sampled_from(WINDOWS), seed=st.integers(0, 2**16),
)
def test_consistent_tiles_blend_back_to_the_field(h, w, tile, overlap_frac, kind, seed):
    overlap = min(int(tile * overlap_frac), tile - 1)
    rng = np.random.default_rng(seed)
    field = rng.normal(size=(h, w, 3)).astype(np.float32)
    valid = rng.random((h, w)) > 0.2
    classes, probs = blend_scene(field, valid, tile=tile, overlap=overlap, kind=kind)
    assert classes.shape == (h, w)
    expected = np.where(valid, field.argmax(-1), 255)
    np.testing.assert_array_equal(classes, expected)
    e = np.exp(field - field.max(-1, keepdims=True))
    np.testing.assert_allclose(probs[valid], (e / e.sum(-1, keepdims=True))[valid], atol=1e-5)
    assert (probs[~valid] == 0).all()
