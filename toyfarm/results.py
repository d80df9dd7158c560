"""Results from stores: CLs per (patch, μ) and upper limits per patch.

Stores, never live runs, are the input: toys thrown on different days or sites count alike once
combined. The numbers come from ``toyfarm.stats``; this module only selects and shapes them into
the ``cls --json`` and ``limit --json`` contracts of DESIGN.md.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from toyfarm.stats import HypotestResult, Limit, hypotest, upper_limit
from toyfarm.store import Store
from toyfarm.workspace import InputError

__all__ = ["hypotests", "cls_table", "limits", "json_safe"]


def json_safe(value: Any) -> Any:
    """NaN and inf become ``null``: JSON has no such numbers (NaN = undefined / not bracketed)."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _open(store: Store | str | os.PathLike[str]) -> Store:
    return store if isinstance(store, Store) else Store.open(store)


def _select(store: Store, patches: Iterable[str] | None) -> list[str]:
    chosen = list(patches) if patches else store.patches()
    for patch in chosen:
        if not store.has_patch(patch):
            raise InputError(f"the store {store.path} has no patch {patch!r}")
    return chosen


def hypotests(
    store: Store | str | os.PathLike[str],
    patches: Iterable[str] | None = None,
    mus: Iterable[float] | None = None,
) -> dict[str, dict[float, HypotestResult]]:
    """``{patch: {mu: HypotestResult}}`` from every done toy, μ in increasing order."""
    store = _open(store)
    wanted = None if mus is None else {float(mu) for mu in mus}
    out: dict[str, dict[float, HypotestResult]] = {}
    for patch in _select(store, patches):
        grid = store.mus(patch)
        q_obs, observed_ok = store.observed(patch)
        q_obs = np.where(observed_ok, q_obs, np.nan)  # an observed fit that failed decides nothing
        sb, b = store.toys(patch, "sb"), store.toys(patch, "b")
        rows = {}
        for i in np.argsort(grid):
            mu = float(grid[i])
            if wanted is None or mu in wanted:
                rows[mu] = hypotest(q_obs[i], sb.q[i], b.q[i], sb.converged[i], b.converged[i])
        if wanted is not None and not rows:
            known = ", ".join(f"{mu:g}" for mu in sorted(grid))
            raise InputError(
                f"patch {patch!r} has no toys at mu = {sorted(wanted)} (it has: {known})"
            )
        out[patch] = rows
    return out


def cls_table(results: dict[str, dict[float, HypotestResult]]) -> dict[str, dict[str, Any]]:
    """The ``cls --json`` contract: MU keys formatted as ``str(float(mu))``."""
    keys = ("CLs_obs", "CLsb_obs", "CLb_obs", "CLs_obs_error", "CLs_exp", "ntoys_sb", "ntoys_b",
            "not_converged_sb", "not_converged_b")
    return {
        patch: {str(float(mu)): {k: r.as_dict()[k] for k in keys} for mu, r in rows.items()}
        for patch, rows in results.items()
    }


def _bracket(grid: np.ndarray, limit: Limit) -> list[float | None]:
    """The grid points ``[mu_lo, mu_hi]`` around a limit; ``None`` on a side that has none."""
    return [None if i is None else float(grid[i]) for i in (limit.lo, limit.hi)]


def limits(
    store: Store | str | os.PathLike[str],
    patches: Iterable[str] | None = None,
    level: float = 0.05,
) -> dict[str, dict[str, Any]]:
    """``{patch: {"obs", "exp": [5], "detail"}}``: upper limits on μ at CLs = ``level``.

    ``detail`` says how each limit was found: ``"obs"`` and ``"exp"`` (5) a sentence naming the
    grid points that bracket the crossing, or why there is none (NaN limit); ``"status"`` each
    limit's status (``ok``, ``below_scan``, ``above_scan``, ``no_data``); ``"bracket"`` each
    limit's ``[mu_lo, mu_hi]`` grid points (see ``stats.Limit``; ``None`` where there is none).
    """
    if not 0 < level < 1:
        raise InputError(f"level must be in (0, 1), got {level}")
    out = {}
    for patch, rows in hypotests(store, patches).items():
        grid = np.array(list(rows))
        obs = np.array([r.CLs_obs for r in rows.values()])
        exp = np.array([r.CLs_exp for r in rows.values()]).reshape(len(rows), 5)
        result = upper_limit(grid, obs, exp, level)
        out[patch] = {
            "obs": result.obs.value,
            "exp": [limit.value for limit in result.exp],
            "detail": {"obs": result.obs.message,
                       "exp": [limit.message for limit in result.exp],
                       "status": {"obs": result.obs.status,
                                  "exp": [limit.status for limit in result.exp]},
                       "bracket": {"obs": _bracket(grid, result.obs),
                                   "exp": [_bracket(grid, limit) for limit in result.exp]}},
        }
    return out
