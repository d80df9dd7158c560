"""``toyfarm toys``: throw and fit toys of one hypothesis in this process, print a JSON summary.

The quick look at a model (and the README's default run): observed test statistic, the toys' test
statistics under s+b and b-only, convergence, and throughput. Nothing is stored.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import numpy as np

from toyfarm.workspace import InputError, ModelSource

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "example_workspace.json"


@click.command()
@click.argument("workspace", required=False, type=click.Path(path_type=Path))
@click.option("--patchset", type=click.Path(path_type=Path), help="Patchset of signal points.")
@click.option("--patch", help="Patch name (default: the first of the patchset).")
@click.option("--mu", type=float, default=1.0, show_default=True, help="Tested signal strength.")
@click.option("--ntoys", type=int, default=500, show_default=True, help="Toys per hypothesis.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--test-stat", default="qtilde", show_default=True,
              type=click.Choice(["qtilde", "q", "q0", "ttilde", "t"]))
@click.option("--normsys", default="code4", show_default=True,
              type=click.Choice(["code1", "code4"]))
@click.option("--histosys", default="code4p", show_default=True,
              type=click.Choice(["code0", "code2", "code4p"]))
@click.option("--no-verify-digest", is_flag=True, help="Apply patches by name.")
def toys(workspace, patchset, patch, mu, ntoys, seed, test_stat, normsys, histosys,
         no_verify_digest) -> None:
    """Throw NTOYS toys under s+b (μ = MU) and b-only, fit them, print JSON.

    WORKSPACE defaults to the shipped example (configs/example_workspace.json).
    """
    from toyfarm.likelihood import compile_model
    from toyfarm.likelihood.run import hypothesis_test_statistics

    if ntoys <= 0:
        raise InputError(f"--ntoys must be positive, got {ntoys}")
    source = ModelSource(
        workspace or EXAMPLE,
        patchset,
        {"normsys": {"interpcode": normsys}, "histosys": {"interpcode": histosys}},
        verify_digest=not no_verify_digest,
    )
    patch = source.check_patches([patch])[0] if patch else source.patches()[0]
    model, data = source.model(patch)
    lk = compile_model(model)
    if not lk.lower[lk.poi] <= mu <= lk.upper[lk.poi]:
        raise InputError(
            f"--mu {mu} is outside the bounds of the POI [{lk.lower[lk.poi]}, {lk.upper[lk.poi]}]"
        )
    start = time.perf_counter()
    result = hypothesis_test_statistics(lk, data, test_stat, mu, seed, patch, np.arange(ntoys))
    seconds = time.perf_counter() - start
    summary = {"patch": patch, "mu": mu, "test_stat": test_stat, "q_obs": result.q_obs}
    for name, (q, ok) in result.toys.items():
        summary[name] = {
            "ntoys": int(q.size),
            "not_converged": int((~ok).sum()),
            "q_quantiles": dict(zip(["5%", "50%", "95%"],
                                    np.quantile(q[ok], [0.05, 0.5, 0.95]).round(6).tolist(),
                                    strict=True)),
            "p_value": float(np.mean(q[ok] >= result.q_obs)),
        }
    summary["toys_per_second"] = round(2 * ntoys / seconds, 2)
    click.echo(json.dumps(summary, indent=2))
