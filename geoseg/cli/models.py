"""geoseg models: list the built-in model bundles."""

from __future__ import annotations

import click

from geoseg.cli.options import echo_json, json_option


@click.command()
@json_option
def models(as_json: bool) -> None:
    """List the built-in models (name, classes, bands, GSD, sha256)."""
    from geoseg.models.bundle import list_builtin
    from geoseg.zooms import zoom_text

    entries = list_builtin()
    if as_json:
        echo_json(entries)
        return
    if not entries:
        click.echo("No built-in models are bundled yet; pass --model PATH.keras to predict.")
        return
    for e in entries:
        gsd = e.get("gsd")
        gsd_text = f"{gsd:.3g} m" if gsd else "any GSD"
        thresholds = "".join(f"; threshold {k}={v:g}" for k, v in e["thresholds"].items())
        zooms = (f"; zooms {zoom_text(e['scales'])} merged by {e['scale_merge']}"
                 if len(e["scales"]) > 1 else "")
        click.echo(f"{e['name']}{' (default)' if e.get('default') else ''}: "
                   f"{', '.join(e['classes'])}{thresholds}; bands {', '.join(e['bands'])}; {gsd_text}{zooms}; "
                   f"{e['architecture']}{'' if e['encoder'] == 'none' else ' on ' + e['encoder']}; sha256 {e['sha256'][:12]}")
