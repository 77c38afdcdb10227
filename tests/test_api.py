"""The public Python API: ``import geoseg`` is light, every public name resolves to the library's own
object, and docs/api.md's example runs as written."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys

import pyogrio
import pytest

import geoseg
from tests.conftest import REPO


def test_import_geoseg_loads_no_keras_and_no_job():
    code = ("import sys, geoseg; print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('keras', 'tensorflow') or m.startswith('geoseg.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", sorted(set(geoseg.__all__) - {"__version__"}))
def test_every_public_name_is_the_librarys_own(name):
    module, attr = geoseg._PUBLIC[name].split(":")
    assert getattr(geoseg, name) is getattr(importlib.import_module(module), attr)
    assert name in dir(geoseg)


def test_jobs_keep_their_command_names():
    from geoseg.cli import cli

    for command in ("predict", "vectorize", "evaluate", "change", "train"):
        assert command in cli.commands and callable(getattr(geoseg, command))
    assert callable(geoseg.run_batch) and "batch" in cli.commands


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'segmnt'"):
        geoseg.segmnt  # noqa: B018


def test_the_docs_example_runs(tmp_path, monkeypatch):
    """docs/api.md's example, on the bundled chip with the default model: the whole job, then the
    same steps one by one (without the job's clean-up, so their polygons are not the job's)."""
    text = (REPO / "docs" / "api.md").read_text()
    block = re.search(r"## The example\n.*?```python\n(.*?)```", text, flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sample_data").symlink_to(REPO / "sample_data")
    scope: dict = {}
    exec(compile(block, "docs/api.md", "exec"), scope)  # noqa: S102 - the documented example itself
    result, layers = scope["result"], scope["layers"]
    assert result.counts["building"] > 0
    assert pyogrio.read_info(tmp_path / "buildings.gpkg", layer="building")["features"] == result.counts["building"]
    assert (tmp_path / "buildings.tif").is_file()
    buildings = layers["building"]
    assert len(buildings) > 0 and buildings.crs.to_epsg() == 32616
    assert (buildings.area_m2 >= 4).all() and buildings.geometry.is_valid.all()
