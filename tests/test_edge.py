"""Fits whose optimum lies on the edge of non-negative expected counts.

In an empty bin pyhf's -log L is λ, which keeps decreasing below λ = 0: a histosys that can push
a sample negative lets an unconstrained fit run to negative expected counts. toyfarm holds every
count at λ >= 0 (as RooFit does). The model here is built so that the observed data and most
toys put the optimum on that edge; the reference is pyhf's own -log L minimised with SLSQP under
the same constraint.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pyhf
import pytest
import scipy.optimize

from toyfarm.likelihood import compile_model
from toyfarm.likelihood.fit import CONVERGED
from toyfarm.likelihood.logpdf import EDGE_TOLERANCE, expected_rates, fisher_information
from toyfarm.likelihood.run import generation_pars
from toyfarm.likelihood.sample import toy_keys
from toyfarm.likelihood.teststat import compute_test_statistic, toy_test_statistics

SPEC = {
    "channels": [{"name": "SR", "samples": [
        {"name": "bkg", "data": [2.0, 20.0], "modifiers": [
            # lo_data below zero: for shape < -2/3 this sample's first bin is negative
            {"name": "shape", "type": "histosys",
             "data": {"hi_data": [3.0, 22.0], "lo_data": [-1.0, 18.0]}},
            {"name": "norm", "type": "normsys", "data": {"hi": 1.2, "lo": 0.8}}]},
        {"name": "other", "data": [0.5, 5.0], "modifiers": [
            {"name": "onorm", "type": "normsys", "data": {"hi": 1.3, "lo": 0.7}}]},
        {"name": "sig", "data": [1.0, 2.0], "modifiers": [
            {"name": "mu", "type": "normfactor", "data": None}]}]}],
    "observations": [{"name": "SR", "data": [0.0, 20.0]}],
    "measurements": [{"name": "m", "config": {"poi": "mu", "parameters": []}}],
    "version": "1.0.0",
}
SETTINGS = {"normsys": {"interpcode": "code4"}, "histosys": {"interpcode": "code4p"}}
BATCH = 16


@pytest.fixture(scope="module")
def case():
    previous = pyhf.get_backend()
    pyhf.set_backend("jax")
    workspace = pyhf.Workspace(SPEC)
    model = workspace.model(modifier_settings=SETTINGS)
    yield model, np.asarray(workspace.data(model)), compile_model(model)
    pyhf.set_backend(*previous)


def _reference(model, data, mu=None, positive=True) -> tuple[float, np.ndarray]:
    """Minimum of pyhf's -log L (POI held at ``mu`` if given), with λ >= 0 in empty bins."""
    data = jnp.asarray(data)
    nll = jax.jit(lambda p: -model.logpdf(p, data)[0])
    grad = jax.jit(jax.grad(lambda p: -model.logpdf(p, data)[0]))
    empty = np.flatnonzero(np.asarray(data[: model.config.nmaindata]) == 0)
    rates = jax.jit(lambda p: model.expected_actualdata(p)[empty])
    bounds = list(model.config.suggested_bounds())
    init = np.asarray(model.config.suggested_init(), dtype=float)
    if mu is not None:
        bounds[model.config.poi_index] = (mu, mu)
        init[model.config.poi_index] = mu
    constraints = [{"type": "ineq", "fun": lambda p: np.asarray(rates(p)),
                    "jac": lambda p: np.asarray(jax.jacfwd(rates)(p))}] if positive else []
    best = None
    for start in (init, np.clip(init - 0.5, *np.asarray(bounds).T)):
        res = scipy.optimize.minimize(
            lambda p: float(nll(p)), start, jac=lambda p: np.asarray(grad(p)), method="SLSQP",
            bounds=bounds, constraints=constraints, options={"ftol": 1e-15, "maxiter": 2000},
        )
        if best is None or res.fun < best.fun:
            best = res
    return float(best.fun), best.x


def test_observed_fits_end_on_the_edge_as_the_constrained_reference(case):
    model, data, lk = case
    batch = jnp.broadcast_to(jnp.asarray(data), (BATCH, data.size))
    init = jnp.broadcast_to(jnp.asarray(lk.init), (BATCH, lk.n_pars))
    stat = compute_test_statistic(lk, "qtilde", batch, 1.0, init)
    for fit, mu in ((stat.conditional, 1.0), (stat.free, None)):
        assert np.all(np.asarray(fit.status) == CONVERGED)
        ref_nll, _ = _reference(model, data, mu)
        assert float(fit.nll[0]) == pytest.approx(ref_nll, abs=1e-8)
        rate = float(expected_rates(lk, fit.pars[0])[0])
        assert -EDGE_TOLERANCE <= rate < 1e-9  # on the edge
    # the free fit moves along the edge: μ̂ = 0 here, not the conditional fit's μ = 1
    assert float(lk.to_pyhf(stat.free.pars[0])[model.config.poi_index]) == pytest.approx(0.0)
    # why the edge: pyhf's unconstrained minimum has a negative expected count
    free_nll, pars = _reference(model, data, positive=False)
    assert free_nll < float(stat.free.nll[0]) - 1.0
    assert float(model.expected_actualdata(pars)[0]) < -1.0


def test_toys_on_the_edge_match_the_constrained_reference(case):
    model, data, lk = case
    gen = generation_pars(lk, data, 1.0)
    keys = toy_keys(7, "edge", 1.0, "sb", np.arange(BATCH))
    q, converged, toys = toy_test_statistics(lk, "qtilde", 1.0, keys, gen, keep_toys=True)
    toys = np.asarray(toys)
    init = jnp.broadcast_to(gen, (BATCH, lk.n_pars))
    stat = compute_test_statistic(lk, "qtilde", jnp.asarray(toys), 1.0, init,
                                  fisher_information(lk, gen))
    np.testing.assert_array_equal(np.asarray(stat.value), np.asarray(q))
    assert np.asarray(converged).all()
    on_edge = 0
    for i, toy in enumerate(toys):
        if toy[0] != 0:
            continue
        cond_nll, _ = _reference(model, toy, 1.0)
        free_nll, pars = _reference(model, toy)
        muhat = pars[model.config.poi_index]
        q_ref = 0.0 if muhat > 1.0 else max(2 * (cond_nll - free_nll), 0.0)
        assert float(q[i]) == pytest.approx(q_ref, abs=1e-6), i
        on_edge += float(expected_rates(lk, stat.conditional.pars[i])[0]) < 1e-9
    assert on_edge >= 3  # the edge is really exercised
