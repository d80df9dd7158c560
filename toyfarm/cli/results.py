"""``toyfarm cls`` and ``toyfarm limit``: numbers from a store, a table or the JSON contract."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

#: left-out toys above this share of a (patch, μ) get a warning
NOT_CONVERGED_WARNING = 0.01


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.4g}"


_QUANTILES = ("-2σ", "-1σ", "median", "+1σ", "+2σ")


def _bracket(status: str, lo: float | None, hi: float | None) -> str:
    """Where one limit lies on the μ grid, in a few characters (``stats.Limit`` statuses)."""
    if status == "ok":
        return f"= {lo:g}" if lo == hi else f"in [{lo:g}, {hi:g}]"
    if status == "above_scan":  # the warnings below say why
        return f"> {lo:g}"
    if status == "below_scan":
        return f"< {hi:g}"
    return "no finite CLs"


@click.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--patch", "patches", multiple=True, help="Only this patch (repeatable).")
@click.option("--mu", "mus", multiple=True, type=float, help="Only this μ (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="The JSON contract instead of a table.")
def cls(store: Path, patches: tuple[str, ...], mus: tuple[float, ...], as_json: bool) -> None:
    """CLs per (patch, μ) from STORE: observed with its MC error, and the expected band."""
    from toyfarm.results import cls_table, hypotests, json_safe

    results = hypotests(store, patches or None, mus or None)
    warnings = []
    for patch, rows in results.items():
        for mu, r in rows.items():
            left_out = r.not_converged_sb + r.not_converged_b
            total = left_out + r.ntoys_sb + r.ntoys_b
            if total and left_out / total > NOT_CONVERGED_WARNING:
                warnings.append(f"{patch} mu={mu:g}: {left_out} of {total} toys did not "
                                "converge and are left out")
    if as_json:
        click.echo(json.dumps(json_safe(cls_table(results)), indent=2))
    else:
        click.echo(f"{'patch':<28} {'mu':>6} {'CLs_obs':>18} {'CLs_exp (-2σ -1σ med +1σ +2σ)':>44}"
                   f" {'toys s+b/b':>12}")
        for patch, rows in results.items():
            for mu, r in rows.items():
                obs = f"{_fmt(r.CLs_obs)} ± {_fmt(r.CLs_obs_error)}"
                exp = " ".join(f"{_fmt(x):>8}" for x in r.CLs_exp)
                click.echo(f"{patch:<28} {mu:>6g} {obs:>18} {exp:>44} "
                           f"{f'{r.ntoys_sb}/{r.ntoys_b}':>12}")
    for line in warnings:
        click.echo(f"warning: {line}", err=True)


@click.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--patch", "patches", multiple=True, help="Only this patch (repeatable).")
@click.option("--level", type=float, default=0.05, show_default=True, help="CLs threshold.")
@click.option("--json", "as_json", is_flag=True, help="The JSON contract instead of a table.")
def limit(store: Path, patches: tuple[str, ...], level: float, as_json: bool) -> None:
    """Observed and expected upper limits on μ at CLs = LEVEL, interpolated on the μ grid."""
    from toyfarm.results import json_safe, limits

    result = limits(store, patches or None, level)
    if as_json:
        contract = {p: {"obs": r["obs"], "exp": r["exp"]} for p, r in result.items()}
        click.echo(json.dumps(json_safe(contract), indent=2))
    else:
        click.echo(f"{'patch':<28} {'obs':>8} {'exp (-2σ -1σ med +1σ +2σ)':>44}")
        for patch, r in result.items():
            exp = " ".join(f"{_fmt(x):>8}" for x in r["exp"])
            click.echo(f"{patch:<28} {_fmt(r['obs']):>8} {exp:>44}")
            detail = r["detail"]
            click.echo(f"  observed: {detail['obs']}")
            where = [f"{name} {_bracket(status, *mus)}" for name, status, mus in
                     zip(_QUANTILES, detail["status"]["exp"], detail["bracket"]["exp"],
                         strict=True)]
            click.echo(f"  expected: {', '.join(where)}")
    for patch, r in result.items():
        for name, value, text in [("observed", r["obs"], r["detail"]["obs"])] + [
            (f"expected {k}", v, t)
            for k, v, t in zip(_QUANTILES, r["exp"], r["detail"]["exp"], strict=True)
        ]:
            if math.isnan(value):
                click.echo(f"warning: {patch}: {name} limit not bracketed by the grid: {text}",
                           err=True)
