"""geoseg batch MANIFEST: predict every scene, change between consecutive dates; resumable."""

from __future__ import annotations

import click

from geoseg.cli.options import StageBars, echo_json, json_option, logger, model_option


@click.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="Output root (AREA/DATE/... below it). Default: the manifest's `output`.")
@model_option
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Jobs at a time: local processes, or the workers of a Dask LocalCluster (--dask).")
@click.option("--scheduler", default=None, metavar="ADDRESS", envvar="DASK_SCHEDULER_ADDRESS",
              help="Run the jobs on the Dask cluster whose scheduler is at ADDRESS (e.g. tcp://host:8786). "
                   "Default: $DASK_SCHEDULER_ADDRESS.")
@click.option("--dask", "use_dask", is_flag=True, help="Run on a Dask LocalCluster of -j worker processes.")
@click.option("--dry-run", is_flag=True, help="List the jobs and whether each is current or would run; run nothing.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Where to write the JSON report. Default: OUTPUT/report.json.")
@json_option
@click.pass_context
def batch(ctx: click.Context, manifest: str, output: str | None, model: str | None, jobs: int,
          scheduler: str | None, use_dask: bool, dry_run: bool, report_path: str | None, as_json: bool) -> None:
    """Segment the scenes a MANIFEST lists by area and date, and detect change between consecutive dates.

    A rerun skips the jobs whose outputs are complete and current (same scene content, model and
    options) and redoes the others; a killed run resumes where it stopped. Exit code 1 when any job
    failed; the report (OUTPUT/report.json) has each job's status, timing and error.

    \b
    geoseg batch scenes.toml
    geoseg batch scenes.csv -o runs/ -j 2
    geoseg batch scenes.toml --scheduler tcp://head:8786
    """
    from geoseg.batch import load_manifest, run_batch
    from geoseg.errors import GeosegError

    log = logger()
    spec = load_manifest(manifest, output=output, model=model)

    def on_job(entry: dict) -> None:
        if entry["status"] == "failed":
            log.error("%s failed: %s", entry["id"], entry["error"])
        elif entry["status"] == "blocked":
            log.warning("%s not run: %s", entry["id"], entry["error"])
        else:
            log.info("%s %s in %.1f s", entry["id"], entry["status"], entry["seconds"] or 0.0)

    with StageBars("batch", quiet=bool(ctx.obj.get("quiet")), units={"batch": "job"}) as progress:
        report = run_batch(spec, jobs=jobs, scheduler=scheduler, dask=use_dask, dry_run=dry_run,
                           report_path=report_path, progress=progress, on_job=on_job)
    if as_json:
        echo_json(report.to_dict())
    elif dry_run:
        for job in report.jobs:
            click.echo(f"{job['status']:8} {job['id']:40} {job['key'][:12] if job['key'] else '-':12} "
                       f"{job['error'] or job['outputs']['gpkg']}")
    counts = ", ".join(f"{n} {s}" for s, n in sorted(report.counts.items()))
    log.info("%d jobs: %s (%s, %.1f s)", len(report.jobs), counts, report.executor, report.seconds)
    bad = [j for j in report.jobs if j["status"] in ("failed", "blocked")]
    if bad:
        first = next(j for j in bad if j["status"] == "failed") if any(j["status"] == "failed" for j in bad) else bad[0]
        where = "" if dry_run else f"; see {report_path or spec.output / 'report.json'}"
        raise GeosegError(f"{len(bad)} of {len(report.jobs)} jobs did not finish ({counts}); "
                          f"first: {first['id']}: {first['error']}{where}")
