"""One parser for predict's options (geoseg.inference.options.options_from): the command line, batch
manifests and the Python API give the same PredictOptions for the same values."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from geoseg.errors import InputError
from geoseg.inference.options import PredictOptions, as_options, options_from

EXPECTED = PredictOptions(tile_size=256, overlap=32, threshold={"building": 0.3}, min_area_m2={"building": 4.0},
                          sieve_m2=2.0, simplify_m={"building": 0.5}, scales=(1.0, 2.0), bands=(3, 2, 1),
                          gsd="0.3", polygonize="live")


def test_strings_toml_values_and_python_values_give_the_same_options():
    as_typed = {"tile-size": "256", "overlap": 32, "threshold": "building=0.3", "min-area": "building=4",
                "sieve": "2", "simplify": "building=0.5", "scales": "1,2", "bands": [3, 2, 1], "gsd": "0.3",
                "polygonize": "live"}
    as_toml = {"tile_size": 256, "overlap": 32, "threshold": {"building": 0.3}, "min_area": {"building": 4},
               "sieve_m2": 2.0, "simplify_m": {"building": 0.5}, "scales": [1, 2], "bands": [3, 2, 1], "gsd": 0.3,
               "polygonize": "live"}
    as_fields = {"tile_size": 256, "overlap": 32, "threshold": {"building": 0.3}, "min_area_m2": {"building": 4.0},
                 "sieve_m2": 2.0, "simplify_m": {"building": 0.5}, "scales": (1.0, 2.0), "bands": (3, 2, 1),
                 "gsd": "0.3", "polygonize": "live"}
    as_typed["tile-size"] = 256  # click converts the integer options before they reach the parser
    for values in (as_typed, as_toml, as_fields):
        assert options_from(values) == EXPECTED
    assert as_options(as_toml) == EXPECTED and as_options(EXPECTED) is EXPECTED
    assert as_options(None) == PredictOptions()


def test_none_leaves_the_default():
    assert options_from({"threshold": None, "scales": None, "blend": None}) == PredictOptions()


@pytest.mark.parametrize("values, where, message", [
    ({"tile_sise": 3}, "[predict] ", "[predict] option 'tile_sise' is unknown; the options are"),
    ({"tile_sise": 3}, "", "predict option 'tile_sise' is unknown"),
    ({"threshold": "building=high"}, "--", "--threshold 'building=high': give one value"),
    ({"min_area": "big"}, "[predict] ", "[predict] min-area 'big': give one value"),
    ({"scales": "1,x"}, "--", "--scales '1,x': give zoom factors"),
    ({"blend": "median"}, "--", "--blend"),
])
def test_a_bad_value_names_the_option_as_the_user_wrote_it(values, where, message):
    with pytest.raises(InputError) as err:
        options_from(values, where=where)
    assert message in str(err.value)


def test_as_options_refuses_what_is_neither_options_nor_a_mapping():
    with pytest.raises(InputError, match="mapping of option values"):
        as_options("tile_size=256")


def test_the_command_line_and_a_manifest_table_reach_the_same_options(monkeypatch):
    """geoseg predict's flags and a batch manifest's [predict] table, through their own code paths."""
    from geoseg.batch import predict_options
    from geoseg.cli import cli

    seen = {}

    def fake_predict(scene, output, **kw):
        seen["options"] = kw["options"]
        raise SystemExit(0)

    monkeypatch.setattr("geoseg.workflows.predict.predict", fake_predict)
    result = CliRunner().invoke(cli, ["predict", "scene.tif", "-o", "out.gpkg", "--tile-size", "256",
                                       "--overlap", "32", "--threshold", "building=0.3", "--min-area", "building=4",
                                       "--sieve", "2", "--simplify", "building=0.5", "--scales", "1,2",
                                       "--bands", "3,2,1", "--gsd", "0.3", "--polygonize", "live"])
    assert result.exit_code == 0, result.output
    table = {"tile_size": 256, "overlap": 32, "threshold": "building=0.3", "min_area": "building=4", "sieve": 2,
             "simplify": {"building": 0.5}, "scales": [1, 2], "bands": [3, 2, 1], "gsd": 0.3, "polygonize": "live"}
    assert seen["options"] == predict_options(table)[0] == EXPECTED
