"""``toyfarm plot``: PNG figures of a store for talks (test statistics, CLs vs μ, contour)."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--output", required=True, type=click.Path(path_type=Path),
              help="Folder for the PNG files (made if missing).")
@click.option("--patch", "patches", multiple=True, help="Only this patch (repeatable).")
@click.option("--level", type=float, default=0.05, show_default=True, help="CLs threshold.")
def plot(store: Path, output: Path, patches: tuple[str, ...], level: float) -> None:
    """Plots of STORE into OUTPUT: per (patch, μ) test statistics, per patch CLs vs μ, and the
    exclusion contour over the signal grid; the files written go to stdout as JSON."""
    from toyfarm.plot import write_plots

    report = write_plots(store, output, patches or None, level)
    click.echo(json.dumps({"files": [str(path) for path in report.files]}, indent=2))
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
