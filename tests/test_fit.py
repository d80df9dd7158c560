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
from toyfarm.likelihood.run import generation_pars
from toyfarm.likelihood.sample import sample_toy, toy_keys
from toyfarm.likelihood.teststat import compute_test_statistic as statistic_of  # not a pytest test
from toyfarm.likelihood.teststat import conditional_fit, free_fit, toy_test_statistics
from toyfarm.workspace import WORKSPACE_HYPOTHESIS, ModelSource

pytestmark = needs_shared

ANALYSIS = {"normsys": {"interpcode": "code4"}, "histosys": {"interpcode": "code4p"}}
SEED = 20240917
N_TOYS = 30
# fits are vmapped and compiled per batch shape: every batch in this module has BATCH rows (under
# 16, so minimize never regroups stragglers into new shapes), observed data included (tiled)
BATCH = 15
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
    def _batch_nll(self):
        model = self.model
        return jax.jit(jax.vmap(lambda p, d: -model.logpdf(p, d)[0]))

    @cached_property
    def _sum_nll_and_grad(self):
        return jax.jit(jax.value_and_grad(lambda p, d: jnp.sum(self._batch_nll(p, d))))

    def reference_fit(self, data, starts, mu=None) -> tuple[np.ndarray, np.ndarray]:
        """Tight bounded minima of pyhf's -log L for a batch ``data [n, n_data]`` (pyhf order).

        ``starts`` is a list of ``[n, P]`` starting points; the lowest result of each row is kept.
        The rows are independent problems, so one L-BFGS-B run on their sum solves all of them
        (one Python callback per iteration instead of one per row). POI held at ``mu`` if given.
        """
        config = self.model.config
        data = jnp.atleast_2d(jnp.asarray(data))
        n = data.shape[0]
        bounds = np.asarray(config.suggested_bounds(), dtype=float)
        fixed = np.asarray(config.suggested_fixed(), dtype=bool)
        if mu is not None:
            fixed[config.poi_index] = True
        free = np.broadcast_to(~fixed, (n, fixed.size))
        box = np.broadcast_to(bounds, (n, *bounds.shape))[free]
        best_nll, best_pars = np.full(n, np.inf), np.zeros((n, fixed.size))
        for start in starts:
            x0 = np.clip(np.broadcast_to(start, (n, fixed.size)), bounds[:, 0], bounds[:, 1])
            if mu is not None:
                x0[:, config.poi_index] = mu

            def fun(z, x0=x0):
                pars = x0.copy()
                pars[free] = z
                value, grad = self._sum_nll_and_grad(jnp.asarray(pars), data)
                return float(value), np.asarray(grad)[free]

            res = scipy.optimize.minimize(
                fun, x0[free], jac=True, method="L-BFGS-B", bounds=box,
                options={"ftol": 1e-16, "gtol": 1e-10, "maxiter": 20000, "maxfun": 50000},
            )
            pars = x0.copy()
            pars[free] = res.x
            nll = np.asarray(self._batch_nll(jnp.asarray(pars), data))
            better = nll < best_nll
            best_nll[better], best_pars[better] = nll[better], pars[better]
        return best_nll, best_pars


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


def _reference_q(case: Case, toys, mu, cond_pars, free_pars):
    """Reference (nll_cond, nll_free, muhat) per toy; starts include toyfarm's own optimum."""
    init = np.asarray(case.model.config.suggested_init(), dtype=float)
    nll_cond, _ = case.reference_fit(toys, [init, _pyhf_order(case.lk, cond_pars)], mu=mu)
    nll_free, pars = case.reference_fit(toys, [init, _pyhf_order(case.lk, free_pars)])
    return np.stack([nll_cond, nll_free, pars[:, case.model.config.poi_index]], axis=1)


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
    gen: np.ndarray  # generating parameters (internal order)
    toys: np.ndarray
    q: np.ndarray  # toyfarm's statistic (qtilde unless asked otherwise)
    converged: np.ndarray
    nll_cond: np.ndarray  # toyfarm's fits on the same toys
    nll_free: np.ndarray
    ref: np.ndarray  # [n, 3] reference nll_cond, nll_free, muhat


def _tiled(case: Case) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(case.data), (BATCH, case.data.size))


def _generating_pars(case: Case, mu: float) -> jax.Array:
    """Row 0 of the conditional fit of the observed data at mu."""
    lk = case.lk
    gen = conditional_fit(lk, _tiled(case), mu, jnp.broadcast_to(lk.init, (BATCH, lk.n_pars)))
    assert int(gen.status[0]) == CONVERGED
    return gen.pars[0]


def _toy_statistics(case: Case, statistic: str, mu: float, gen, toys: np.ndarray):
    """toy_test_statistics over toys ``toys`` in batches of BATCH: (q, converged, toy data)."""
    out = []
    for chunk in np.array_split(toys, -(-toys.size // BATCH)):
        assert chunk.size == BATCH or toys.size % BATCH
        keys = toy_keys(SEED, case.patch, mu, "sb", chunk)
        out.append(toy_test_statistics(case.lk, statistic, mu, keys, gen, keep_toys=True))
    return tuple(np.concatenate([np.asarray(part[i]) for part in out]) for i in range(3))


def _throw(case: Case, mu: float, statistic: str) -> ToyRun:
    lk = case.lk
    gen = _generating_pars(case, mu)
    q, converged, toys = _toy_statistics(case, statistic, mu, gen, np.arange(N_TOYS))
    # the same fits again, to get at toyfarm's optima (and hand them to the reference as a start)
    cond, free = [], []
    for chunk in np.split(jnp.asarray(toys), N_TOYS // BATCH):
        stat = statistic_of(lk, statistic, chunk, mu, jnp.broadcast_to(gen, (BATCH, lk.n_pars)))
        cond.append(stat.conditional)
        free.append(stat.free)
    cat = lambda fits, f: np.concatenate([np.asarray(f(r)) for r in fits])  # noqa: E731
    ref = _reference_q(case, toys, mu, cat(cond, lambda r: r.pars), cat(free, lambda r: r.pars))
    return ToyRun(case, mu, np.asarray(gen), toys, q, converged,
                  cat(cond, lambda r: r.nll), cat(free, lambda r: r.nll), ref)


@pytest.fixture(scope="module")
def toy_runs(cases):
    return {}


def _run(toy_runs, cases, name, mu=1.0, statistic="qtilde") -> ToyRun:
    if (name, mu) not in toy_runs:
        toy_runs[name, mu] = _throw(cases[name], mu, statistic)
    return toy_runs[name, mu]


MAX_DQ: dict[str, float] = {}


def _compare(run: ToyRun, statistic: str, q_tf) -> None:
    """Assert toyfarm's statistic matches the reference on converged toys."""
    nll_cond, nll_free, muhat = run.ref.T
    q_ref = _statistic_from_fits(statistic, run.mu, nll_cond, nll_free, muhat)
    ok = run.converged
    # a non-converged toy is allowed, but more than a few on these small models is a regression
    assert ok.mean() >= 0.9, f"only {ok.sum()} of {ok.size} toys converged"
    # toyfarm lower than the reference: the reference did not converge, not a toyfarm failure
    lower = ok & ((run.nll_cond < nll_cond - NLL_SLACK) | (run.nll_free < nll_free - NLL_SLACK))
    if lower.any():
        warnings.warn(f"{run.case.name}: toyfarm's NLL below the reference on toys "
                      f"{np.flatnonzero(lower).tolist()}", stacklevel=2)
    # never higher than the reference: a higher NLL is a fit that stopped short
    assert np.all(run.nll_cond[ok] <= nll_cond[ok] + NLL_SLACK), run.nll_cond - nll_cond
    assert np.all(run.nll_free[ok] <= nll_free[ok] + NLL_SLACK), run.nll_free - nll_free
    delta = np.abs(np.asarray(q_tf) - q_ref)
    bad = ok & ~lower & (delta > np.maximum(Q_ABS, Q_REL * np.abs(q_ref)))
    assert not bad.any(), f"{statistic}: toys {np.flatnonzero(bad)} q={q_tf[bad]} ref={q_ref[bad]}"
    MAX_DQ[f"{run.case.name} {statistic} mu={run.mu}"] = float(delta[ok].max())
    print(f"{run.case.name} {statistic} mu={run.mu}: max |dq| = {delta[ok].max():.2e}")


# --- 1. test statistics against the reference (and pyhf's own) ---------------------------------


@pytest.mark.parametrize("name", ["2-bin", "patchset_example", "1Lbb_simplified"])
def test_qtilde_toys_match_reference(cases, toy_runs, name):
    run = _run(toy_runs, cases, name)
    # toys on both sides of mu, or the clipping at muhat > mu goes untested
    assert (run.q > 0).any() and (run.q == 0).any()
    _compare(run, "qtilde", run.q)


def test_reference_agrees_with_pyhf_qmu_tilde(cases, toy_runs):
    """Sanity check of the reference itself: pyhf's qmu_tilde on a few toys (its default fit)."""
    run = _run(toy_runs, cases, "2-bin")
    config = run.case.model.config
    q_ref = _statistic_from_fits("qtilde", run.mu, *run.ref.T)
    checked = np.flatnonzero(q_ref > 0.05)[:3]
    assert checked.size
    for i in checked:
        q_pyhf = pyhf.infer.test_statistics.qmu_tilde(
            run.mu, jnp.asarray(run.toys[i]), run.case.model, config.suggested_init(),
            config.suggested_bounds(), config.suggested_fixed(),
        )
        assert float(q_pyhf) == pytest.approx(q_ref[i], abs=1e-3, rel=1e-3)


@pytest.mark.parametrize("statistic", ["q", "t", "ttilde"])
def test_other_statistics_on_2bin(cases, toy_runs, statistic):
    run = _run(toy_runs, cases, "2-bin")
    # same keys, so the same toys and fits: only the statistic's definition differs
    q, converged, toys = _toy_statistics(run.case, statistic, run.mu, run.gen, np.arange(N_TOYS))
    np.testing.assert_array_equal(toys, run.toys)
    np.testing.assert_array_equal(converged, run.converged)
    _compare(run, statistic, q)
    if statistic == "t":  # t is not clipped where muhat > mu: it must differ from qtilde there
        assert (q[run.q == 0] > 0).any()


def test_q0_on_2bin(cases, toy_runs):
    # q0 tests mu = 0, on toys thrown at the background-only fit
    run = _run(toy_runs, cases, "2-bin", mu=0.0, statistic="q0")
    assert (run.q > 0).any()
    _compare(run, "q0", run.q)
    i = int(np.argmax(run.q))
    config = run.case.model.config
    q0_pyhf = pyhf.infer.test_statistics.q0(
        0.0, jnp.asarray(run.toys[i]), run.case.model, config.suggested_init(),
        config.suggested_bounds(), config.suggested_fixed(),
    )
    ref = _statistic_from_fits("q0", 0.0, *run.ref[i])
    assert float(q0_pyhf) == pytest.approx(ref, abs=1e-3, rel=1e-3)


# --- 2. the free fit of the observed data ------------------------------------------------------


@pytest.mark.parametrize("name", ["2-bin", "patchset_example", "sbottom_RegionA"])
def test_observed_free_fit_matches_pyhf(cases, name):
    case = cases[name]
    lk = case.lk
    rows = 1 if name == "sbottom_RegionA" else BATCH  # small models: reuse the toys' compilation
    data = jnp.broadcast_to(jnp.asarray(case.data), (rows, case.data.size))
    fit = free_fit(lk, data, jnp.broadcast_to(lk.init, (rows, lk.n_pars)))
    assert int(fit.status[0]) == CONVERGED
    twice_nll = 2.0 * float(fit.nll[0])
    _, pyhf_twice_nll = pyhf.infer.mle.fit(jnp.asarray(case.data), case.model,
                                           return_fitted_val=True)
    ref_nll = case.reference_fit(
        case.data, [case.model.config.suggested_init(), _pyhf_order(lk, fit.pars[0])]
    )[0][0]
    print(f"{name}: 2 NLL toyfarm {twice_nll:.10f} pyhf {float(pyhf_twice_nll):.10f} "
          f"reference {2 * ref_nll:.10f}")
    assert float(fit.nll[0]) <= ref_nll + NLL_SLACK
    if twice_nll < float(pyhf_twice_nll) - 1e-6:  # pyhf's default fit stopped short
        warnings.warn(f"{name}: toyfarm's 2 NLL {twice_nll} below pyhf's {pyhf_twice_nll}",
                      stacklevel=1)
    else:
        assert twice_nll == pytest.approx(float(pyhf_twice_nll), abs=1e-6, rel=0)


# --- 3. sampling and toy keys -------------------------------------------------------------------

N_SAMPLE = 20000


@pytest.mark.parametrize("name", ["2-bin", "patchset_example"])  # Poisson / Gaussian auxdata
def test_sample_toy_moments(cases, name):
    case = cases[name]
    lk, config = case.lk, case.model.config
    # away from the nominal point, so a sampler that ignores pars would fail
    init = np.asarray(config.suggested_init(), dtype=float)
    pars_pyhf = np.where(config.suggested_fixed(), init, init + 0.1)
    keys = toy_keys(SEED, case.patch, 1.0, "moments", np.arange(N_SAMPLE))
    toys = np.asarray(jax.jit(jax.vmap(sample_toy, (None, 0, None)))(
        lk, keys, jnp.asarray(lk.to_internal(pars_pyhf))))
    # pyhf's expected data: main rates, then theta (Gaussian) or gamma * tau (Poisson) per slot
    expected = np.asarray(case.model.expected_data(jnp.asarray(pars_pyhf)))
    variance = expected.copy()  # Poisson
    slot = config.nmaindata
    for par in config.auxdata_order:
        paramset = config.param_set(par)
        width = np.ones(paramset.n_parameters)
        if paramset.pdf_type == "normal":
            width = np.asarray(paramset.width())
            variance[slot : slot + width.size] = width**2
        slot += width.size
    assert slot == expected.size
    mean = toys.mean(axis=0)
    np.testing.assert_array_less(np.abs(mean - expected), 5 * np.sqrt(variance / N_SAMPLE))
    # the spread too: a sampler using sigma^2 for sigma, or a wrong tau, fails here
    var = toys.var(axis=0)
    fourth = ((toys - mean) ** 4).mean(axis=0)
    np.testing.assert_array_less(np.abs(var - variance), 5 * np.sqrt((fourth - var**2) / N_SAMPLE))


def _key_data(*args) -> np.ndarray:
    return np.asarray(jax.random.key_data(toy_keys(*args)))


def test_toy_keys_deterministic_and_distinct():
    toys = np.arange(8)
    base = (SEED, "patch_a", 1.0, "sb", toys)
    np.testing.assert_array_equal(_key_data(*base), _key_data(*base))
    # every toy of a stream has its own key
    assert len({tuple(row) for row in _key_data(*base)}) == toys.size
    # a key depends on the toy index, not on the batch it is thrown in
    np.testing.assert_array_equal(_key_data(SEED, "patch_a", 1.0, "sb", toys[5:])[0],
                                  _key_data(*base)[5])
    variants = [
        (SEED + 1, "patch_a", 1.0, "sb", toys),
        (SEED, "patch_b", 1.0, "sb", toys),
        (SEED, "patch_a", 1.5, "sb", toys),
        (SEED, "patch_a", np.nextafter(1.0, 2.0), "sb", toys),
        (SEED, "patch_a", 1.0, "b", toys),
    ]
    seen = {tuple(row) for row in _key_data(*base)}
    for args in variants:
        rows = {tuple(row) for row in _key_data(*args)}
        assert not rows & seen, args
        seen |= rows


def test_sbottom_toys_with_two_minima_end_in_the_lower(cases):
    """Two sbottom toys (benchmarks/parity_toys.py's seed) where the conditional fits from the
    generation point and from the model's init both end in a minimum 0.011 above the lowest
    (a nuisance parameter with two minima): the start reflected through the generation point
    finds it. Reference q: SLSQP on pyhf's -log L from two starts (parity_toys.py)."""
    case = cases["sbottom_RegionA"]
    gen = generation_pars(case.lk, case.data, 1.0)
    toys = np.array([50, 151, *range(BATCH - 2)])
    keys = toy_keys(20261204, case.patch, 1.0, "sb", toys)
    q, converged, _ = toy_test_statistics(case.lk, "qtilde", 1.0, keys, gen)
    assert np.asarray(converged)[:2].all()
    # with two starts: 0.1707 and 0.0
    np.testing.assert_allclose(np.asarray(q)[:2], [0.14791225201, 0.03534842333], atol=Q_ABS)


# --- 4. convergence flags -----------------------------------------------------------------------


def test_nan_data_is_not_converged(cases):
    case = cases["2-bin"]
    lk = case.lk
    data = np.array(_tiled(case))
    data[3, 0] = np.nan  # a main bin
    data[7, -1] = np.nan  # an auxdata slot
    init = jnp.broadcast_to(lk.init, (BATCH, lk.n_pars))
    stat = statistic_of(lk, "qtilde", jnp.asarray(data), 1.0, init)  # must not raise
    converged = np.asarray(stat.converged)
    assert not converged[3] and not converged[7]
    assert np.asarray(free_fit(lk, jnp.asarray(data), init).status)[[3, 7]].tolist() == [
        int(s) for s in np.asarray(stat.free.status)[[3, 7]]
    ]
    assert (np.asarray(stat.free.status)[[3, 7]] != CONVERGED).all()
    # the NaN rows do not spoil their batch: the clean rows converge to one value
    clean = np.delete(np.arange(BATCH), [3, 7])
    assert converged[clean].all()
    assert np.ptp(np.asarray(stat.value)[clean]) == 0.0


# --- 5. determinism -----------------------------------------------------------------------------


def test_toy_statistics_bit_identical(cases, toy_runs):
    run = _run(toy_runs, cases, "2-bin")
    toys = np.arange(75)  # toys 0..63, padded to whole batches (no new compilation)
    first, _, _ = _toy_statistics(run.case, "qtilde", run.mu, run.gen, toys)
    second, _, _ = _toy_statistics(run.case, "qtilde", run.mu, run.gen, toys)
    np.testing.assert_array_equal(first[:64], second[:64])
    # toy t is the same however the toys are batched: toys 0..29 were thrown in other batches
    np.testing.assert_array_equal(first[:N_TOYS], run.q)
