"""Parity of toyfarm's toy test statistics with independent reference fits, on real workspaces.

For each (model, patch) this throws toys at μ with toyfarm (``toy_test_statistics``, q̃μ, LHC-style
generation at the conditional MLE of the observed data) and refits every toy that toyfarm flags
converged with a tight reference minimisation of pyhf's own -log L:

* pyhf's JAX backend, ``-model.logpdf(pars, data)[0]`` with exact gradients from ``jax.grad``;
* scipy's SLSQP (``ftol`` 1e-14, up to 5000 iterations) for every toy, within
  ``suggested_bounds()``, ``suggested_fixed()`` parameters held (and the POI at μ in the
  conditional fit), and, for the main bins with count 0, the constraint λ_b >= 0 on the expected
  count (``model.expected_actualdata``, Jacobian by ``jax.jacrev``). toyfarm keeps every λ_b >= 0;
  without that constraint pyhf's -log L of an empty bin (λ_b) runs off to λ_b << 0 on 1Lbb toys.
  L-BFGS-B (bounds only) would do for toys without empty bins, but SLSQP was faster on 1Lbb
  toys in a trial (about 45 iterations from pyhf's init, L-BFGS-B about 600) and one method keeps
  the reference uniform;
* two starts per fit, pyhf's ``suggested_init()`` and toyfarm's own optimum (``lk.to_pyhf``):
  the lower NLL of the feasible results is kept (feasible: within the bounds up to 1e-9, and
  λ_b >= -1e-9 in the empty bins). A toy with no feasible result counts as ``reference_failed``.

The reference's q̃μ is max(2 (nll_cond - nll_free), 0), set to 0 where its μ̂ > μ. Each toy that
toyfarm flags converged and the reference could fit is exactly one of: ``agreeing``
(|Δq| <= max(1e-3, 1e-4 |q_ref|)), ``toyfarm_lower`` (not agreeing, and toyfarm's conditional or
free NLL is more than 1e-6 below the reference's: the reference stopped short, not a toyfarm
failure) or ``disagreeing``. The issue's requirement: ``fraction_ok`` = (agreeing + toyfarm_lower)
/ toys >= 99.5 %, every other toy flagged not converged by toyfarm (``passes``).
``max_nll_vs_pyhf`` is the largest |toyfarm's NLL - pyhf's -log L at toyfarm's optimum|: that
toyfarm's likelihood is pyhf's, so ``toyfarm_lower`` is a genuinely lower pyhf NLL.
``toyfarm_higher_nll`` counts the fitted toys, whatever their category, where a toyfarm fit ended
more than 1e-6 above the reference's NLL: a fit that stopped short, even where q̃μ still agrees
(e.g. a free fit short of a μ̂ > μ, where q̃μ is 0 either way).

Timings: toyfarm's seconds per toy thrown (the last batch's padding included) exclude most of
the compilation (the first batch runs once untimed; a straggler shape first met in a later batch
still compiles inside the timing); the reference's are per fitted toy (both fits, both starts),
single-threaded scipy plus JAX calls.

Usage (from the project root, ``../shared/data`` present)::

    python benchmarks/parity_toys.py [--models NAME[:PATCH] ...] [--toys N] [--quick]
        [--batch B] [--seed S] [--mu MU] [--output PATH]

NAME is one of MODELS (default: all of them); NAME:PATCH runs that model at one patch only.
``--quick``: 8 toys per row and, without ``--models``, the small models only. One JSON line per
row is printed as it finishes and ``results/parity.json`` is rewritten after each row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pyhf
import scipy
import scipy.optimize

from toyfarm.likelihood import Likelihood, compile_model
from toyfarm.likelihood.logpdf import fisher_information
from toyfarm.likelihood.run import generation_pars
from toyfarm.likelihood.sample import toy_keys
from toyfarm.likelihood.teststat import compute_test_statistic, toy_test_statistics
from toyfarm.workspace import WORKSPACE_HYPOTHESIS, ModelSource

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data" / "workspaces"
SETTINGS = {"normsys": {"interpcode": "code4"}, "histosys": {"interpcode": "code4p"}}
SEED = 20261204
Q_ABS, Q_REL = 1e-3, 1e-4  # |Δq| allowed: absolute, or relative to q_ref
NLL_SLACK = 1e-6  # toyfarm's NLL this far below the reference's: the reference stopped short
FEASIBLE = 1e-9  # how far a reference optimum may sit outside the bounds or below λ_b = 0
REQUIRED_FRACTION = 0.995
EXAMPLES = 5  # disagreeing toys listed per row
QUICK_TOYS = 8


@dataclass(frozen=True)
class Workspace:
    """A workspace (paths under SHARED) and the patches checked by default."""

    workspace: str
    patchset: str | None
    patches: tuple[str, ...]  # empty: the patchset's first patch
    verify_digest: bool = True
    small: bool = False  # part of --quick


MODELS = {
    "2-bin": Workspace("small/2-bin_1-channel.json", None, (WORKSPACE_HYPOTHESIS,), small=True),
    "patchset_example": Workspace(
        "small/patchset_example_BkgOnly.json", "small/patchset_example_patchset.json",
        ("patch_channel1_signal_syst1",), small=True,
    ),
    "1Lbb_simplified": Workspace(  # this patchset's digest does not match on purpose
        "1Lbb/simplified/BkgOnly.json", "1Lbb/simplified/patchset.json", ("C1N2_Wh_hbb_1000_0",),
        verify_digest=False, small=True,
    ),
    "sbottom_RegionA": Workspace("sbottom_RegionA/BkgOnly.json", "sbottom_RegionA/patchset.json",
                                 ()),
    "1Lbb": Workspace(  # high mass (small signal), mid mass near the diagonal, low mass
        "1Lbb/BkgOnly.json", "1Lbb/patchset.json",
        ("C1N2_Wh_hbb_1000_0", "C1N2_Wh_hbb_300_150", "C1N2_Wh_hbb_150_0"),
    ),
}


class ReferenceFit:
    """Tight constrained minima of pyhf's -log L for one model built under pyhf's JAX backend."""

    def __init__(self, model: pyhf.pdf.Model) -> None:
        config = model.config
        self.poi = config.poi_index
        self.n_main = config.nmaindata
        self.init = np.asarray(config.suggested_init(), dtype=float)
        self.bounds = np.asarray(config.suggested_bounds(), dtype=float)
        self.fixed = np.asarray(config.suggested_fixed(), dtype=bool)

        def nll(pars: jax.Array, data: jax.Array) -> jax.Array:
            return -model.logpdf(pars, data)[0]

        self.nll = jax.jit(nll)
        self._nll_and_grad = jax.jit(jax.value_and_grad(nll))
        self.rates = jax.jit(model.expected_actualdata)
        self._rates_jacobian = jax.jit(jax.jacrev(model.expected_actualdata))

    def compile(self, data: np.ndarray) -> None:
        """Run every jitted function once, so that fits are timed without compilation."""
        pars, data = jnp.asarray(self.init), jnp.asarray(data)
        jax.block_until_ready((self.nll(pars, data), self._nll_and_grad(pars, data),
                               self.rates(pars), self._rates_jacobian(pars)))

    def minimum(self, data: np.ndarray, starts: list[np.ndarray],
                mu: float | None = None) -> tuple[float, np.ndarray]:
        """(NLL, parameters in pyhf order) of the lowest feasible result over ``starts``.

        The POI is held at ``mu`` when given. (inf, NaN) when no start gives a feasible result.
        """
        held = self.fixed.copy()
        if mu is not None:
            held[self.poi] = True
        empty = np.flatnonzero(data[: self.n_main] == 0)
        data_jax = jnp.asarray(data)
        best_nll, best_pars = np.inf, np.full(self.init.shape, np.nan)
        for start in starts:
            base = np.clip(start, self.bounds[:, 0], self.bounds[:, 1])
            if mu is not None:
                base[self.poi] = mu
            pars = self._slsqp(data_jax, base, ~held, empty)
            nll = float(self.nll(jnp.asarray(pars), data_jax))
            if nll < best_nll and self._feasible(pars, empty):
                best_nll, best_pars = nll, pars
        return best_nll, best_pars

    def _slsqp(self, data: jax.Array, base: np.ndarray, free: np.ndarray,
               empty: np.ndarray) -> np.ndarray:
        """SLSQP over the ``free`` parameters from ``base``, λ_b >= 0 in the ``empty`` bins."""

        def full(z: np.ndarray) -> jax.Array:
            pars = base.copy()
            pars[free] = z
            return jnp.asarray(pars)

        def objective(z: np.ndarray) -> tuple[float, np.ndarray]:
            value, grad = self._nll_and_grad(full(z), data)
            return float(value), np.asarray(grad)[free]

        constraints = []
        if empty.size:
            constraints.append({
                "type": "ineq",
                "fun": lambda z: np.asarray(self.rates(full(z)))[empty],
                "jac": lambda z: np.asarray(self._rates_jacobian(full(z)))[empty][:, free],
            })
        result = scipy.optimize.minimize(
            objective, base[free], jac=True, method="SLSQP", bounds=self.bounds[free],
            constraints=constraints, options={"ftol": 1e-14, "maxiter": 5000},
        )
        return np.asarray(full(result.x))

    def _feasible(self, pars: np.ndarray, empty: np.ndarray) -> bool:
        lower, upper = self.bounds.T
        in_bounds = np.all((pars >= lower - FEASIBLE) & (pars <= upper + FEASIBLE))
        rates = np.asarray(self.rates(jnp.asarray(pars)))
        return bool(in_bounds and np.all(rates[empty] >= -FEASIBLE))


def qtilde(mu: float, nll_cond: np.ndarray, nll_free: np.ndarray,
           muhat: np.ndarray) -> np.ndarray:
    """q̃μ from the two fits: max(2 (nll_cond - nll_free), 0), 0 where μ̂ > μ."""
    return np.where(muhat > mu, 0.0, np.maximum(2.0 * (nll_cond - nll_free), 0.0))


@dataclass
class ToyfarmRun:
    """toyfarm's toys and fits (parameters converted to pyhf order)."""

    toys: np.ndarray  # [n, n_data], pyhf data order
    q: np.ndarray
    converged: np.ndarray
    nll_cond: np.ndarray
    nll_free: np.ndarray
    pars_cond: np.ndarray  # [n, P], pyhf order
    pars_free: np.ndarray
    refit_identical: bool  # compute_test_statistic on the toys gave toy_test_statistics' q
    seconds_per_toy: float  # toy_test_statistics per toy thrown, compilation excluded


def run_toyfarm(lk: Likelihood, data: list[float], patch: str, mu: float, n_toys: int,
                batch: int, seed: int) -> ToyfarmRun:
    """Toys 0 .. n_toys - 1 in batches of ``batch`` (the last one padded with further toys)."""
    gen = generation_pars(lk, data, mu)
    metric = jax.jit(fisher_information)(lk, gen)
    init = jnp.broadcast_to(gen, (batch, lk.n_pars))
    batches = np.arange(-(-n_toys // batch) * batch).reshape(-1, batch)
    keys = [toy_keys(seed, patch, mu, "sb", toys) for toys in batches]
    jax.block_until_ready(toy_test_statistics(lk, "qtilde", mu, keys[0], gen))  # compile
    start = time.perf_counter()
    thrown = [jax.block_until_ready(toy_test_statistics(lk, "qtilde", mu, k, gen, keep_toys=True))
              for k in keys]
    seconds_per_toy = (time.perf_counter() - start) / batches.size
    q, converged, toys = (np.concatenate([np.asarray(part[i]) for part in thrown])[:n_toys]
                          for i in range(3))
    # the same fits again (toy_test_statistics' code path), to get at toyfarm's optima
    stats = [compute_test_statistic(lk, "qtilde", part[2], mu, init, metric) for part in thrown]
    cat = lambda f: np.concatenate([np.asarray(f(s)) for s in stats])[:n_toys]  # noqa: E731
    return ToyfarmRun(
        toys=toys, q=q, converged=converged,
        nll_cond=cat(lambda s: s.conditional.nll), nll_free=cat(lambda s: s.free.nll),
        pars_cond=np.asarray(lk.to_pyhf(cat(lambda s: s.conditional.pars))),
        pars_free=np.asarray(lk.to_pyhf(cat(lambda s: s.free.pars))),
        refit_identical=bool(np.array_equal(cat(lambda s: s.value), q)),
        seconds_per_toy=seconds_per_toy,
    )


def parity_row(name: str, source: ModelSource, patch: str, mu: float, n_toys: int, batch: int,
               seed: int) -> dict:
    """One (model, patch): toyfarm's q̃μ against the reference's on toyfarm-converged toys."""
    model, data = source.model(patch)
    lk = compile_model(model)
    tf = run_toyfarm(lk, data, patch, mu, n_toys, min(batch, n_toys), seed)
    reference = ReferenceFit(model)
    reference.compile(np.asarray(data))

    checked = np.flatnonzero(tf.converged)
    ref = np.full((n_toys, 3), np.nan)  # nll_cond, nll_free, muhat
    nll_vs_pyhf = 0.0
    start = time.perf_counter()
    for i in checked:
        toy = tf.toys[i]
        nll_cond, _ = reference.minimum(toy, [reference.init, tf.pars_cond[i]], mu=mu)
        nll_free, pars = reference.minimum(toy, [reference.init, tf.pars_free[i]])
        ref[i] = nll_cond, nll_free, pars[reference.poi]
        for nll, pars_tf in ((tf.nll_cond[i], tf.pars_cond[i]), (tf.nll_free[i], tf.pars_free[i])):
            pyhf_nll = float(reference.nll(jnp.asarray(pars_tf), jnp.asarray(toy)))
            nll_vs_pyhf = max(nll_vs_pyhf, abs(float(nll) - pyhf_nll))
    reference_seconds = time.perf_counter() - start

    q_ref = qtilde(mu, *ref.T)
    delta = np.abs(tf.q - q_ref)
    fitted = tf.converged & np.isfinite(ref[:, :2]).all(axis=1)
    agree = fitted & (delta <= np.maximum(Q_ABS, Q_REL * np.abs(q_ref)))
    lower = (tf.nll_cond < ref[:, 0] - NLL_SLACK) | (tf.nll_free < ref[:, 1] - NLL_SLACK)
    toyfarm_lower = fitted & ~agree & lower
    disagree = fitted & ~agree & ~lower
    higher = (tf.nll_cond > ref[:, 0] + NLL_SLACK) | (tf.nll_free > ref[:, 1] + NLL_SLACK)
    reference_failed = tf.converged & ~fitted
    fraction = (agree.sum() + toyfarm_lower.sum()) / n_toys
    examples = [
        {"toy": int(i), "q_toyfarm": float(tf.q[i]), "q_reference": float(q_ref[i]),
         "dnll_cond": float(tf.nll_cond[i] - ref[i, 0]),
         "dnll_free": float(tf.nll_free[i] - ref[i, 1])}
        for i in np.flatnonzero(disagree)[:EXAMPLES]
    ]
    return {
        "model": name, "patch": patch, "mu": mu, "parameters": lk.n_pars,
        "toys": n_toys, "converged": int(tf.converged.sum()),
        "agreeing": int(agree.sum()), "disagreeing": int(disagree.sum()),
        "toyfarm_lower": int(toyfarm_lower.sum()),
        "reference_failed": int(reference_failed.sum()),
        "toyfarm_higher_nll": int((fitted & higher).sum()),
        "toys_with_empty_bins": int((tf.toys[:, : lk.n_bins] == 0).any(axis=1).sum()),
        "max_abs_dq": float(delta[agree].max()) if agree.any() else None,
        "fraction_ok": round(float(fraction), 6),
        "passes": bool(fraction >= REQUIRED_FRACTION and not (disagree | reference_failed).any()),
        "max_nll_vs_pyhf": nll_vs_pyhf,
        "refit_identical": tf.refit_identical,
        "toyfarm_s_per_toy": tf.seconds_per_toy,
        "reference_s_per_toy": reference_seconds / checked.size if checked.size else None,
        "disagreeing_examples": examples,
    }


def selected(specs: list[str] | None, quick: bool) -> list[tuple[str, str | None]]:
    """(model, patch or None for the model's default patches) for each NAME[:PATCH]."""
    if specs is None:
        return [(name, None) for name, ws in MODELS.items() if ws.small or not quick]
    out = []
    for spec in specs:
        name, _, patch = spec.partition(":")
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r} (known: {', '.join(MODELS)})")
        out.append((name, patch or None))
    return out


def git_version() -> str:
    """The checkout's commit, with -dirty when tracked files have uncommitted changes."""
    out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=HERE,
                         capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", metavar="NAME[:PATCH]",
                        help=f"models to check (default: all of {', '.join(MODELS)})")
    parser.add_argument("--toys", type=int, default=200, help="toys per (model, patch)")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_TOYS} toys per row; small models unless --models")
    parser.add_argument("--batch", type=int, default=64, help="toys per toyfarm call")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--mu", type=float, default=1.0)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "parity.json")
    args = parser.parse_args()
    n_toys = QUICK_TOYS if args.quick else args.toys

    pyhf.set_backend("jax")  # before any model is built: the reference differentiates pyhf
    meta = {
        "date": time.strftime("%F %T"), "toys_requested": n_toys, "seed": args.seed,
        "mu": args.mu, "batch": args.batch, "machine": platform.machine(),
        "cores": os.cpu_count(), "pyhf": pyhf.__version__, "jax": jax.__version__,
        "scipy": scipy.__version__, "toyfarm_git": git_version(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, patch in selected(args.models, args.quick):
        ws = MODELS[name]
        source = ModelSource(SHARED / ws.workspace, ws.patchset and SHARED / ws.patchset,
                             SETTINGS, verify_digest=ws.verify_digest)
        patches = [patch] if patch else list(ws.patches) or source.patches()[:1]
        for p in source.check_patches(patches):
            rows.append(parity_row(name, source, p, args.mu, n_toys, args.batch, args.seed))
            print(json.dumps(rows[-1]), flush=True)
            args.output.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
