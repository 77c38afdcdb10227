"""The batch report page (geoseg.report): report.html beside report.json, self-contained, with a
quick look, counts and areas per job, the failed and blocked jobs with their errors; loaded in real
headless Chromium (skipped where it is absent)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from geoseg.batch import load_manifest, run_batch
from geoseg.report import render_report
from tests.test_batch import model, write_manifest  # noqa: F401  (model is a fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def batch(tmp_path_factory, model):  # noqa: F811
    folder = tmp_path_factory.mktemp("report")
    manifest = write_manifest(folder, model, naip=False)
    manifest.write_text(manifest.read_text()
                        + '[[scenes]]\narea = "town"\ndate = "2023-05-01"\npath = "scenes/missing.tif"\n')
    report = run_batch(load_manifest(manifest))
    return folder / "out", report


def test_the_page_is_written_beside_the_json_report_and_holds_every_job(batch):
    root, report = batch
    page = (root / "report.html").read_text()
    doc = json.loads((root / "report.json").read_text())
    assert doc["counts"] == {"done": 3, "failed": 1, "blocked": 1}
    # every job that ran has its quick look beside its outputs, embedded in the page, and linked
    for job in doc["jobs"]:
        if job["status"] == "done":
            assert Path(job["outputs"]["preview"]).is_file(), job["id"]
    assert page.count('src="data:image/png;base64,') == 3
    assert 'href="town/2021-05-01/preview.png"' in page
    # the failures first, each with its one-line error
    problems = page[page.index("Failed or blocked"):page.index('<h2 id="area-')]
    assert "predict/town/2023-05-01" in problems and "missing.tif does not exist" in problems
    assert "change/town/2022-05-01_2023-05-01" in problems and "which failed" in problems
    # counts and areas per class, and what appeared and disappeared
    predict = next(j for j in doc["jobs"] if j["id"] == "predict/town/2021-05-01")
    result = json.loads((Path(predict["outputs"]["gpkg"]).parent / "job.json").read_text())["result"]
    name, n = next(iter(result["counts"].items()))
    assert f"<td>{name}</td><td class=\"num\">{n:,}</td>" in page
    assert "m² gained" in page and "disappeared" in page
    # self-contained: nothing to fetch, nothing to run
    assert not re.search(r"<script|<link|src=\"https?:|url\(", page)


def test_render_report_escapes_what_it_is_given(tmp_path):
    report = {"manifest": "<m>", "output": str(tmp_path), "jobs": [
        {"id": "predict/a&b/2024-01-01", "kind": "predict", "area": "a&b", "dates": ["2024-01-01"],
         "outputs": {}, "status": "failed", "error": "<script>alert(1)</script>", "seconds": 0.1}],
        "counts": {"failed": 1}}
    page = render_report(report, tmp_path)
    assert "<script>" not in page and "&lt;script&gt;" in page and "a&amp;b" in page


@pytest.mark.slow
def test_chromium_loads_the_page_offline_and_shows_the_quick_looks(batch, tmp_path):
    if CHROMIUM is None:
        pytest.skip("no Chromium here (Debian: apt install chromium); the page is checked without a browser above")
    root, _ = batch
    shot = tmp_path / "page.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1400,2400",
           f"--screenshot={shot}", (root / "report.html").as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    page = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert page.shape[:2] == (2400, 1400)
    # the failed jobs' red text, and the thumbnails themselves: the generated scenes are mostly
    # black, so two predict quick looks of about 320 x 240 px put tens of thousands of black pixels
    # on the page (its text is #222, a broken image an icon and its alt text)
    red = (np.abs(page - (198, 40, 40)).max(axis=-1) <= 30).sum()
    assert red > 50
    black = (page.max(axis=-1) < 10).sum()
    assert black > 50_000, f"only {black} black pixels: the quick looks are not drawn"
