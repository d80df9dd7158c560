"""Commands on whole stores: ``toyfarm info`` (what a store holds, what its workers spent) and
``toyfarm combine`` (merge stores of separate runs)."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from toyfarm.plan import HYPOTHESES
from toyfarm.store import Store

#: lines of missing toys the text summary shows (``--json`` has them all)
_MISSING_LINES = 10


def _runs(indices: np.ndarray) -> list[list[int]]:
    """Sorted toy indices -> ``[start, stop)`` of each run of consecutive ones."""
    runs = np.split(indices, np.flatnonzero(np.diff(indices) != 1) + 1)
    return [[int(run[0]), int(run[-1]) + 1] for run in runs if run.size]


def store_info(store: Store) -> dict:
    """The ``info --json`` contract (DESIGN.md), plus per-hypothesis detail: ``missing`` lists
    the toys planned but not done (``[start, stop)`` ranges) and ``missing_observed`` the μ
    whose observed statistic is not computed yet, i.e. what the next ``generate`` will do."""
    out = {"store": str(store.path), "patches": store.patches(), "mu": {}, "toys_planned": 0,
           "toys_done": 0, "not_converged": 0, "observed_missing": 0,
           "observed_not_converged": 0, "missing": [], "missing_observed": {}}
    for patch in out["patches"]:
        mus = [float(mu) for mu in store.mus(patch)]
        out["mu"][patch] = mus
        q_obs, ok = store.observed(patch)
        out["observed_missing"] += int(np.isnan(q_obs).sum())
        out["observed_not_converged"] += int((~np.isnan(q_obs) & ~ok).sum())
        if np.isnan(q_obs).any():
            out["missing_observed"][patch] = [mu for mu, q in zip(mus, q_obs, strict=True)
                                              if np.isnan(q)]
        for hyp in HYPOTHESES:
            toys, planned = store.toys(patch, hyp), store.planned(patch, hyp)
            out["toys_planned"] += int(planned.sum())
            out["toys_done"] += int(toys.done.sum())
            out["not_converged"] += int((toys.done & ~toys.converged).sum())
            for i, mu in enumerate(mus):
                ranges = _runs(np.flatnonzero(~toys.done[i, : planned[i]]))
                if ranges:
                    out["missing"].append({"patch": patch, "hypothesis": hyp, "mu": mu,
                                           "toys": ranges})
    stats = store.stats()
    out.update({key: stats[key] for key in ("tasks", "compiles", "cache_hits")})
    out.update({key: round(stats[key], 3) for key in ("compile_seconds", "fit_seconds")})
    out["run"] = store.identity
    out["versions"] = store.meta["versions"]
    return out


@click.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="The JSON contract instead of text.")
@click.option("--check", is_flag=True,
              help="Read every chunk; name the toys whose data is damaged (exit 1 if any).")
def info(store: Path, as_json: bool, check: bool) -> None:
    """What STORE holds: patches, μ, toys planned/done/not converged, worker statistics."""
    opened = Store.open(store)
    damage = opened.check() if check else []
    if damage:  # the summary reads every chunk: report the damage first, and only
        for line in damage:
            click.echo(f"damaged: {line}", err=True)
        click.echo("run 'toyfarm generate' with the store's config again to regenerate them",
                   err=True)
        raise SystemExit(1)
    summary = store_info(opened)
    if check:
        summary["damaged"] = []
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        _print(summary)


def _print(summary: dict) -> None:
    run = summary["run"]
    click.echo(f"store {summary['store']}: {len(summary['patches'])} patches, test statistic "
               f"{run['test_stat']}, seed {run['seed']}")
    done, planned = summary["toys_done"], summary["toys_planned"]
    click.echo(f"toys: {done} of {planned} done, {summary['not_converged']} not converged; "
               f"{summary['observed_missing']} observed statistics missing")
    click.echo(f"tasks {summary['tasks']}: {summary['compiles']} compiles, {summary['cache_hits']} "
               f"cache hits; {summary['compile_seconds']} s compiling, {summary['fit_seconds']} s "
               "fitting (summed over workers)")
    if summary["observed_not_converged"]:
        click.echo(f"{summary['observed_not_converged']} observed fits did not converge (their "
                   "CLs_obs is undefined)")
    lines = [f"{m['patch']} {m['hypothesis']} mu={m['mu']:g}: toys "
             + ", ".join(f"{a}-{b - 1}" for a, b in m["toys"]) for m in summary["missing"]]
    lines += [f"{patch} observed statistic at mu={', '.join(f'{mu:g}' for mu in mus)}"
              for patch, mus in summary["missing_observed"].items()]
    for line in lines[:_MISSING_LINES]:
        click.echo(f"missing: {line}")
    if len(lines) > _MISSING_LINES:
        click.echo(f"missing: ... and {len(lines) - _MISSING_LINES} more (--json lists all)")
    if lines:  # a combined store (several seeds) is not generated into: its inputs lacked them
        click.echo("(a combined store: none of its inputs held these toys)"
                   if isinstance(summary["run"]["seed"], list) else
                   "run 'toyfarm generate' with the store's config again to do what is missing")


@click.command()
@click.argument("stores", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--output", required=True, type=click.Path(path_type=Path),
              help="The new combined store.")
def combine(stores: tuple[Path, ...], output: Path) -> None:
    """Merge STOREs of separate runs (other seeds or sites) into OUTPUT: the union of their toys.

    Refuses, touching nothing, stores of different models or settings; a toy (seed, index) in
    several inputs counts once.
    """
    from toyfarm.merge import combine as run

    click.echo(json.dumps(run(list(stores), output), indent=2))
