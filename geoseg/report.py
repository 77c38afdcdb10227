"""The batch report page: ``report.html`` beside ``report.json``, one static file.

Every area with its dates (predict jobs) and date pairs (change jobs): a thumbnail of the job's
quick look (``preview.png``, embedded as a data URI so the page needs nothing but itself, and a
link to the full picture beside it), the counts and areas per class, or what appeared and
disappeared per class, the seconds, and the status; the jobs that failed or were blocked first,
each with its one-line error. No scripts, no fonts, no stylesheets from elsewhere: it reads the same
offline, from a mail attachment or a shared drive.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["THUMBNAIL", "render_report", "write_report_html"]

#: The long side of a thumbnail in the page, pixels.
THUMBNAIL = 320

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; }
.meta { color: #555; } table { border-collapse: collapse; margin: 0.6em 0; }
td, th { border: 1px solid #ddd; padding: 4px 8px; vertical-align: top; text-align: left; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.status { font-weight: bold; } .done, .current { color: #1a7f37; } .failed, .blocked { color: #c62828; }
.pending, .planned { color: #8a6d00; } .errors { background: #fff3f3; border: 1px solid #f5c2c2; padding: 0.6em 1em; }
img.thumb { max-width: 320px; max-height: 320px; display: block; border: 1px solid #ccc; }
.none { color: #999; font-style: italic; }
"""


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _thumbnail(png: Path) -> str | None:
    """A data URI of ``png`` shrunk to ``THUMBNAIL`` px (None when it is absent or unreadable)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(png) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL, THUMBNAIL))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", optimize=True)
    except (OSError, UnidentifiedImageError):
        return None
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _job_result(job: Mapping[str, Any]) -> dict[str, Any] | None:
    """The job's result: from its ``job.json`` (written by whichever run made its outputs)."""
    outputs = job.get("outputs") or {}
    folder = Path(next(iter(outputs.values()))).parent if outputs else None
    if folder is None:
        return None
    try:
        return json.loads((folder / "job.json").read_text()).get("result")
    except (OSError, ValueError):
        return None


def _picture(job: Mapping[str, Any], base: Path) -> str:
    preview = (job.get("outputs") or {}).get("preview")
    if not preview or job.get("status") not in ("done", "current"):
        return '<span class="none">no picture</span>'
    uri = _thumbnail(Path(preview))
    if uri is None:
        return '<span class="none">no picture</span>'
    try:
        href = os.path.relpath(preview, base)
    except ValueError:  # another drive (Windows)
        href = preview
    return f'<a href="{_esc(href)}"><img class="thumb" src="{uri}" alt="quick look of {_esc(job["id"])}"></a>'


def _predict_cell(result: Mapping[str, Any] | None) -> str:
    if not result or not result.get("counts"):
        return '<span class="none">—</span>'
    rows = "".join(f'<tr><td>{_esc(name)}</td><td class="num">{n:,}</td>'
                   f'<td class="num">{result.get("area_m2", {}).get(name, 0):,.0f}</td></tr>'
                   for name, n in result["counts"].items())
    return f"<table><tr><th>class</th><th>polygons</th><th>m²</th></tr>{rows}</table>"


def _change_cell(result: Mapping[str, Any] | None) -> str:
    if not result or not result.get("gained_m2"):
        return '<span class="none">—</span>'
    rows = []
    for name, gained in result["gained_m2"].items():
        lost = result.get("lost_m2", {}).get(name, 0)
        counts = result.get("counts", {}).get(name, {})
        rows.append(f'<tr><td>{_esc(name)}</td><td class="num">{counts.get("appeared", 0):,}</td>'
                    f'<td class="num">{gained:,.0f}</td><td class="num">{counts.get("disappeared", 0):,}</td>'
                    f'<td class="num">{lost:,.0f}</td><td class="num">{gained - lost:+,.0f}</td></tr>')
    return ("<table><tr><th>class</th><th>appeared</th><th>m² gained</th><th>disappeared</th><th>m² lost</th>"
            f"<th>net m²</th></tr>{''.join(rows)}</table>")


def _timings(result: Mapping[str, Any] | None, seconds: Any) -> str:
    parts = [f"{seconds:.1f} s" if isinstance(seconds, (int, float)) else "—"]
    timings = (result or {}).get("timings_s") or {}
    stages = [f"{k} {v:.1f}" for k, v in timings.items() if k not in ("total",) and isinstance(v, (int, float)) and v >= 0.5]
    if stages:
        parts.append('<br><span class="meta">' + _esc(", ".join(stages)) + "</span>")
    return "".join(parts)


def render_report(report: Mapping[str, Any], base: str | os.PathLike) -> str:
    """The report page's HTML for a batch report dict (``BatchReport.to_dict``); links are made
    relative to the folder ``base`` the page is written in."""
    base = Path(base)
    jobs: Sequence[Mapping[str, Any]] = report.get("jobs", [])
    counts = report.get("counts", {})
    head = (f"<h1>geoseg batch report</h1><p class=\"meta\">manifest {_esc(report.get('manifest'))} · output "
            f"{_esc(report.get('output'))} · started {_esc(report.get('started'))} · finished "
            f"{_esc(report.get('finished') or 'not yet')} · {float(report.get('seconds') or 0):.1f} s · "
            f"{_esc(report.get('executor'))} with {_esc(report.get('workers'))} worker(s)</p>"
            f"<p>{len(jobs)} jobs: " + ", ".join(f'<span class="status {_esc(s)}">{n} {_esc(s)}</span>'
                                                 for s, n in sorted(counts.items())) + "</p>")
    bad = [j for j in jobs if j.get("status") in ("failed", "blocked")]
    errors = ""
    if bad:
        items = "".join(f'<li><b>{_esc(j["id"])}</b> <span class="status {_esc(j["status"])}">{_esc(j["status"])}'
                        f'</span>: {_esc(j.get("error"))}</li>' for j in bad)
        errors = f'<h2 id="problems">Failed or blocked</h2><div class="errors"><ul>{items}</ul></div>'
    areas: dict[str, list[Mapping[str, Any]]] = {}
    for job in jobs:
        areas.setdefault(str(job.get("area")), []).append(job)
    sections = []
    for area, area_jobs in sorted(areas.items()):
        rows = []
        for job in sorted(area_jobs, key=lambda j: (j.get("kind") != "predict", list(j.get("dates") or []))):
            result = _job_result(job) if job.get("status") in ("done", "current") else None
            kind = job.get("kind")
            what = " → ".join(job.get("dates") or []) if kind == "change" else (job.get("dates") or [""])[0]
            cell = _change_cell(result) if kind == "change" else _predict_cell(result)
            status = _esc(job.get("status"))
            error = f'<br>{_esc(job.get("error"))}' if job.get("error") else ""
            rows.append(f"<tr><td>{_esc(kind)}</td><td>{_esc(what)}</td><td>{_picture(job, base)}</td><td>{cell}</td>"
                        f'<td>{_timings(result, job.get("seconds"))}</td><td><span class="status {status}">{status}'
                        f"</span>{error}</td></tr>")
        sections.append(f'<h2 id="area-{_esc(area)}">{_esc(area)}</h2><table><tr><th>job</th><th>date</th>'
                        f"<th>quick look</th><th>classes / change</th><th>time</th><th>status</th></tr>"
                        f"{''.join(rows)}</table>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>geoseg batch report</title>"
            f"<style>{_STYLE}</style></head><body>{head}{errors}{''.join(sections)}</body></html>\n")


def write_report_html(path: str | os.PathLike, report: Mapping[str, Any]) -> None:
    """Write the page atomically (a temporary name in the same folder, then a rename)."""
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}-{secrets.token_hex(3)}{path.suffix}")  # atomic.clean_stale
    tmp.write_text(render_report(report, path.parent), encoding="utf-8")
    os.replace(tmp, path)
