"""A short fuzz of the scene reader: mutated GeoTIFF bytes open and read, or fail with InputError.

The long run is ``python tests/fuzz_scene.py --inputs 20000``; see that file for the mutations.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz_scene import fuzz, mutate, read_through, seed_files


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return seed_files(tmp_path_factory.mktemp("seeds"))


def test_the_unmutated_seeds_read_completely(seeds, tmp_path):
    for i, blob in enumerate(seeds):
        (tmp_path / f"s{i}.tif").write_bytes(blob)
        assert read_through(tmp_path / f"s{i}.tif") == "ok"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 3), seed=st.integers(0, 2**32 - 1), rounds=st.integers(1, 4))
def test_mutated_geotiffs_read_or_fail_with_input_error(seeds, tmp_path, which, seed, rounds):
    rng = np.random.default_rng(seed)
    blob = seeds[which]
    for _ in range(rounds):
        blob = mutate(blob, rng)
    path = tmp_path / "m.tif"
    path.write_bytes(blob)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert read_through(path) in ("ok", "input-error")


def test_a_crs_name_that_is_not_utf8_is_an_input_error(seeds, tmp_path):
    """Found by the long fuzz run (seed 1, input 10101): rasterio.open raised UnicodeDecodeError.
    Two bytes of the uint16 seed: a GeoKey 33 bytes before the CRS citation, and a byte of the
    citation ("WGS 84 / UTM zone 33N") that is not UTF-8."""
    from geoseg.errors import InputError
    from geoseg.io.scene import open_scene

    blob = bytearray(seeds[1])
    at = blob.index(b"UTM zone ") + len(b"UTM zone")
    assert blob[at - 33] == 0
    blob[at - 33], blob[at] = 81, 0xEC
    path = tmp_path / "crs.tif"
    path.write_bytes(bytes(blob))
    with pytest.raises(InputError, match="damaged"):
        open_scene(path)


def test_a_header_claiming_tens_of_thousands_of_bands_is_refused_at_once(tmp_path):
    """Found by the long fuzz run: a damaged SamplesPerPixel of 60161 kept the reader busy for
    minutes (band names were looked up in a quadratic loop). Now: a limit, and linear lookups."""
    import time

    import rasterio

    from geoseg.errors import InputError
    from geoseg.io.scene import MAX_BANDS, open_scene

    path = tmp_path / "many.tif"
    n = MAX_BANDS + 1
    with rasterio.open(path, "w", driver="GTiff", width=4, height=4, count=n, dtype="uint8", crs="EPSG:32633",
                       transform=rasterio.transform.from_origin(500000, 5000000, 1, 1), interleave="pixel") as ds:
        ds.write(np.zeros((n, 4, 4), np.uint8))
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=f"claims {n} bands"):
        open_scene(path)
    assert time.perf_counter() - t0 < 30  # not a speed target: before the fix this took minutes


def test_a_thousand_mutations_in_a_row(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        counts = fuzz(1000, seed=7, folder=tmp_path)
    assert counts["ok"] + counts["input-error"] == 1000 and counts["ok"] > 0 and counts["input-error"] > 0
