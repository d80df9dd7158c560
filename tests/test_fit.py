"""Fits, test statistics and toys against independent references.

The reference fits minimise pyhf's own -log L (pyhf's JAX backend, so gradients are exact) with
scipy's L-BFGS-B at tight tolerances, from pyhf's suggested init and from toyfarm's optimum, and
keep the lower of the two: toyfarm passes when no reference finds a lower NLL than it did.
Compiled models and fitted toys are module-scoped: every JAX compilation costs seconds.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property

import jax
import jax.numpy as jnp
import numpy as np
import pyhf
import pytest
import scipy.optimize

from conftest import SHARED, needs_shared
from toyfarm.likelihood import Likelihood, compile_model
from toyfarm.likelihood.fit import CONVERGED
from toyfarm.likelihood.sample import sample_toy, toy_keys
from toyfarm.likelihood.teststat import (
    conditional_fit,
    free_fit,
    test_statistic,
    toy_test_statistics,
)
from toyfarm.workspace import WORKSPACE_HYPOTHESIS, ModelSource

pytestmark = needs_shared

ANALYSIS = {"normsys": {"interpcode": "code4"}, "histosys": {"interpcode": "code4p"}}
SEED = 20240917
N_TOYS = 32
Q_ABS, Q_REL = 1e-3, 1e-4  # |Δq| allowed: absolute, or relative to q
NLL_SLACK = 1e-6  # toyfarm's NLL may exceed the reference's by this much (rounding)


def _sources() -> dict[str, tuple[ModelSource, str]]:
    small = SHARED / "small"
    return {
        "2-bin": (ModelSource(small / "2-bin_1-channel.json"), WORKSPACE_HYPOTHESIS),
        "patchset_example": (
            ModelSource(
                small / "patchset_example_BkgOnly.json", small / "patchset_example_patchset.json"
            ),
            "patch_channel1_signal_syst1",
        ),
        "1Lbb_simplified": (
            ModelSource(
                SHARED / "1Lbb" / "simplified" / "BkgOnly.json",
                SHARED / "1Lbb" / "simplified" / "patchset.json",
                modifier_settings=ANALYSIS,
                verify_digest=False,  # this patchset's digest does not match on purpose
            ),
            "C1N2_Wh_hbb_1000_0",
        ),
        "sbottom_RegionA": (
            ModelSource(
                SHARED / "sbottom_RegionA" / "BkgOnly.json",
                SHARED / "sbottom_RegionA" / "patchset.json",
                modifier_settings=ANALYSIS,
            ),
            "",  # first patch, filled in below
        ),
    }


@dataclass
class Case:
    """One hypothesis: its pyhf model (built under the JAX backend), observed data, compiled lk."""

    name: str
    patch: str
    model: pyhf.pdf.Model
    data: np.ndarray
    lk: Likelihood

    @cached_property
    def _nll_and_grad(self):
        model = self.model
        return jax.jit(jax.value_and_grad(lambda p, d: -model.logpdf(p, d)[0]))

    def reference_fit(self, data, starts, mu=None) -> tuple[float, np.ndarray]:
        """Tight bounded minimum of pyhf's -log L (pyhf order); POI held at ``mu`` if given."""
        config = self.model.config
        bounds = np.asarray(config.suggested_bounds(), dtype=float)
        fixed = np.asarray(config.suggested_fixed(), dtype=bool)
        if mu is not None:
            fixed[config.poi_index] = True
        free = ~fixed
        data = jnp.asarray(data)
        best = (np.inf, None)
        for start in starts:
            x0 = np.clip(np.array(start, dtype=float), bounds[:, 0], bounds[:, 1])
            if mu is not None:
                x0[config.poi_index] = mu

            def fun(z, x0=x0):
                pars = x0.copy()
                pars[free] = z
                value, grad = self._nll_and_grad(jnp.asarray(pars), data)
                return float(value), np.asarray(grad)[free]

            res = scipy.optimize.minimize(
                fun, x0[free], jac=True, method="L-BFGS-B", bounds=bounds[free],
                options={"ftol": 1e-15, "gtol": 1e-11, "maxiter": 5000, "maxfun": 20000},
            )
            if res.fun < best[0]:
                pars = x0.copy()
                pars[free] = res.x
                best = (float(res.fun), pars)
        return best


@pytest.fixture(scope="module")
def cases():
    """Every workspace compiled once; pyhf's JAX backend for the module, restored afterwards."""
    previous = pyhf.get_backend()
    pyhf.set_backend("jax")
    out = {}
    for name, (source, patch) in _sources().items():
        patch = patch or source.patches()[0]
        model, data = source.model(patch)
        out[name] = Case(name, patch, model, np.asarray(data), compile_model(model))
    yield out
    pyhf.set_backend(*previous)


def _pyhf_order(lk: Likelihood, pars) -> np.ndarray:
    return np.asarray(lk.to_pyhf(np.asarray(pars)))


def _reference_q(case: Case, toys, mu, cond_tf, free_tf):
    """Reference (nll_cond, nll_free, muhat) per toy; starts include toyfarm's own optimum."""
    init = np.asarray(case.model.config.suggested_init(), dtype=float)
    out = []
    for i, toy in enumerate(np.asarray(toys)):
        cond = case.reference_fit(toy, [init, _pyhf_order(case.lk, cond_tf.pars[i])], mu=mu)
        free = case.reference_fit(toy, [init, _pyhf_order(case.lk, free_tf.pars[i])])
        out.append((cond[0], free[0], free[1][case.model.config.poi_index]))
    return np.array(out)


def _statistic_from_fits(name, mu, nll_cond, nll_free, muhat):
    t = np.maximum(2.0 * (nll_cond - nll_free), 0.0)
    if name in ("qtilde", "q"):
        return np.where(muhat > mu, 0.0, t)
    if name == "q0":
        return np.where(muhat < 0.0, 0.0, t)
    return t


@dataclass
class ToyRun:
    case: Case
    mu: float
    toys: np.ndarray
    q: np.ndarray  # toyfarm's statistic (qtilde unless asked otherwise)
    converged: np.ndarray
    fits: object  # toyfarm's TestStatistic on the same toys (fit results)
    ref: np.ndarray  # [n, 3] reference nll_cond, nll_free, muhat


def _throw(case: Case, mu: float, name: str = "qtilde") -> ToyRun:
    """N_TOYS toys at the conditional fit of the observed data at ``mu``, fitted both ways."""
    lk = case.lk
    gen = conditional_fit(lk, jnp.asarray(case.data)[None], mu, jnp.asarray(lk.init)[None])
    assert int(gen.status[0]) == CONVERGED
    keys = toy_keys(SEED, case.patch, mu, "sb", np.arange(N_TOYS))
    q, converged, toys = toy_test_statistics(lk, name, mu, keys, gen.pars[0], keep_toys=True)
    init = jnp.broadcast_to(gen.pars[0], (N_TOYS, lk.n_pars))
    stat = test_statistic(lk, name, toys, mu, init)  # the same fits, to get at the optima
    ref = _reference_q(case, toys, mu, stat.conditional, stat.free)
    return ToyRun(case, mu, np.asarray(toys), np.asarray(q), np.asarray(converged), stat, ref)


@pytest.fixture(scope="module")
def toy_runs(cases):
    return {}


def _run(toy_runs, cases, name, mu=1.0, statistic="qtilde") -> ToyRun:
    if (name, mu) not in toy_runs:
        toy_runs[name, mu] = _throw(cases[name], mu, statistic)
    return toy_runs[name, mu]


def _compare(run: ToyRun, statistic: str, q_tf) -> float:
    """Assert toyfarm's statistic matches the reference on converged toys; return max |Δq|."""
    cond_tf = np.asarray(run.fits.conditional.nll)
    free_tf = np.asarray(run.fits.free.nll)
    nll_cond, nll_free, muhat = run.ref.T
    q_ref = _statistic_from_fits(statistic, run.mu, nll_cond, nll_free, muhat)
    ok = run.converged
    # a non-converged toy is allowed, but a handful on these small models would be a regression
    assert ok.mean() >= 0.9, f"only {ok.sum()} of {ok.size} toys converged"
    # toyfarm lower than the reference: the reference did not converge, not a toyfarm failure
    lower = ok & ((cond_tf < nll_cond - NLL_SLACK) | (free_tf < nll_free - NLL_SLACK))
    if lower.any():
        warnings.warn(f"{run.case.name}: toyfarm's NLL below the reference on toys "
                      f"{np.flatnonzero(lower).tolist()}", stacklevel=2)
    # never higher than the reference: a higher NLL is a fit that stopped short
    assert np.all(cond_tf[ok] <= nll_cond[ok] + NLL_SLACK), cond_tf - nll_cond
    assert np.all(free_tf[ok] <= nll_free[ok] + NLL_SLACK), free_tf - nll_free
    delta = np.abs(np.asarray(q_tf) - q_ref)
    bad = ok & ~lower & (delta > np.maximum(Q_ABS, Q_REL * np.abs(q_ref)))
    assert not bad.any(), f"{statistic}: toys {np.flatnonzero(bad)} q={q_tf[bad]} ref={q_ref[bad]}"
    worst = float(delta[ok].max())
    print(f"{run.case.name} {statistic} mu={run.mu}: max |dq| = {worst:.2e}")
    return worst


# --- 1. test statistics against pyhf ------------------------------------------------------------


@pytest.mark.parametrize("name", ["2-bin", "patchset_example", "1Lbb_simplified"])
def test_qtilde_toys_match_reference(cases, toy_runs, name):
    run = _run(toy_runs, cases, name)
    # the toys must spread over both sides of mu, or the clipping at muhat > mu is untested
    assert (run.q > 0).any() and (run.q == 0).any()
    _compare(run, "qtilde", run.q)


def test_reference_agrees_with_pyhf_qmu_tilde(cases, toy_runs):
    """Sanity check of the reference itself: pyhf's own qmu_tilde on a few toys (looser)."""
    run = _run(toy_runs, cases, "2-bin")
    model = run.case.model
    config = model.config
    nll_cond, nll_free, muhat = run.ref.T
    q_ref = _statistic_from_fits("qtilde", run.mu, nll_cond, nll_free, muhat)
    for i in np.flatnonzero(q_ref > 0.05)[:3]:
        q_pyhf = pyhf.infer.test_statistics.qmu_tilde(
            run.mu, jnp.asarray(run.toys[i]), model, config.suggested_init(),
            config.suggested_bounds(), config.suggested_fixed(),
        )
        assert float(q_pyhf) == pytest.approx(q_ref[i], abs=1e-2, rel=1e-2)


@pytest.mark.parametrize("statistic", ["q", "t", "ttilde"])
def test_other_statistics_on_2bin(cases, toy_runs, statistic):
    run = _run(toy_runs, cases, "2-bin")
    # same keys, so the same toys: only the statistic's definition differs
    keys = toy_keys(SEED, run.case.patch, run.mu, "sb", np.arange(N_TOYS))
    gen = conditional_fit(run.case.lk, jnp.asarray(run.case.data)[None], run.mu,
                          jnp.asarray(run.case.lk.init)[None])
    q, converged, toys = toy_test_statistics(run.case.lk, statistic, run.mu, keys, gen.pars[0],
                                             keep_toys=True)
    np.testing.assert_array_equal(np.asarray(toys), run.toys)
    np.testing.assert_array_equal(np.asarray(converged), run.converged)
    _compare(run, statistic, np.asarray(q))
    if statistic == "t":  # t is not clipped where muhat > mu: it must differ from qtilde there
        assert (np.asarray(q)[run.q == 0] > 0).any()


def test_q0_on_2bin(cases, toy_runs):
    # q0 tests mu = 0 on toys thrown at the background-only fit
    run = _run(toy_runs, cases, "2-bin", mu=0.0, statistic="q0")
    _compare(run, "q0", run.q)
    assert (run.q > 0).any()
    i = int(np.argmax(run.q))
    model = run.case.model
    q0_pyhf = pyhf.infer.test_statistics.q0(
        0.0, jnp.asarray(run.toys[i]), model, model.config.suggested_init(),
        model.config.suggested_bounds(), model.config.suggested_fixed(),
    )
    ref = _statistic_from_fits("q0", 0.0, *run.ref[i])
    assert float(q0_pyhf) == pytest.approx(ref, abs=1e-2, rel=1e-2)
