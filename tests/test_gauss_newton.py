"""The Gauss-Newton step's Woodbury solve against a dense solve of the same matrix.

``newton._gauss_newton_step`` never forms the P x P Gauss-Newton matrix: it solves through the
n_bins x n_bins Woodbury system. The reference here builds the matrix densely from the
derivatives' own Gauss-Newton matrix (damped where no constraint curves a parameter, identity on
held parameters) and solves it with numpy, on random workspaces with every modifier type.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_logpdf import SETTINGS, SETTINGS_IDS, derivative_point, random_case

from toyfarm.likelihood import nll_derivatives
from toyfarm.likelihood.newton import _DAMPING, _gauss_newton_step


def _dense_step(d, free):
    jac, w = np.asarray(d.jacobian), np.asarray(d.weight)
    data_part = (jac * w) @ jac.T
    metric = np.asarray(d.gauss_newton).copy()
    np.testing.assert_allclose(metric, data_part + np.diag(np.asarray(d.curvature)), rtol=1e-12,
                               atol=1e-12 * np.abs(metric).max())
    diag = np.maximum(np.asarray(d.curvature), _DAMPING * np.diag(data_part))
    metric[np.diag_indices_from(metric)] = np.diag(data_part) + diag
    held = ~free
    metric[held, :], metric[:, held] = 0.0, 0.0
    metric[held, held] = 1.0
    g = np.where(free, np.asarray(d.grad), 0.0)
    step = -np.linalg.solve(metric, g)
    return step, -0.5 * g @ step


@pytest.mark.parametrize("settings", SETTINGS, ids=SETTINGS_IDS)
@pytest.mark.parametrize("seed", range(3))
def test_woodbury_step_is_the_dense_solve(seed: int, settings: dict) -> None:
    model, lk, data, rng = random_case(seed, settings)
    pars = jnp.asarray(lk.to_internal(derivative_point(model, lk, rng, alpha_max=1.5)))
    d = jax.jit(nll_derivatives)(lk, pars, jnp.asarray(data))
    # a parameter curved by nothing (no constraint, no bin with a count) has no Newton step: the
    # kernel sends it as far as the line search lets it; left out of the comparison
    curved = np.diag(np.asarray(d.gauss_newton)) > 0
    for free in (~np.asarray(lk.fixed) & curved, (rng.random(lk.n_pars) < 0.6) & curved):
        step, predicted = jax.jit(_gauss_newton_step)(d, jnp.asarray(free))
        ref_step, ref_predicted = _dense_step(d, free)
        scale = np.abs(ref_step).max()
        np.testing.assert_allclose(np.asarray(step), ref_step, rtol=1e-8, atol=1e-10 * scale)
        np.testing.assert_allclose(float(predicted), ref_predicted, rtol=1e-8)
        assert np.all(np.asarray(step)[~free] == 0.0)
