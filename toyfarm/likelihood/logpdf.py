"""The HistFactory log-likelihood and its exact gradient and Hessian, for one parameter point.

``logpdf`` is the plain definition (the reference that automatic differentiation can check);
``nll_derivatives`` returns the same value with its gradient and Hessian in closed form, built from
the per-cell structure in ``compile.py``: every interpolated factor depends on one parameter, so the
Hessian of the main term is a few dense matrix products over cells, not a hessian of a graph.
All functions are written for one point and are vmapped from outside; parameters in internal order.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln, xlogy

from toyfarm.likelihood.compile import Likelihood
from toyfarm.likelihood.interpolation import histosys_delta, normsys_factor

__all__ = ["Derivatives", "expected_rates", "fisher_information", "logpdf", "nll_derivatives"]

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)  # a float: no JAX work at import (XLA_FLAGS)
#: how far below zero the expected count of an empty bin may go (see ``nll_derivatives``)
EDGE_TOLERANCE = 1e-9


def _linear_values(lk: Likelihood, pars):
    gammas = jnp.concatenate([pars[lk.n_interp :], jnp.ones(1, pars.dtype)])
    return gammas[lk.linear_slot]  # [cells, n_slots]


def _per_cell(lk: Likelihood, per_group):
    """``[..., groups]`` -> ``[..., cells]``: each bin reads its channel's entry."""
    shape = per_group.shape[:-1]
    by_channel = per_group.reshape(*shape, lk.n_samples, lk.n_channels)
    return by_channel[..., lk.bin_channel].reshape(*shape, lk.n_samples * lk.n_bins)


def _per_group(lk: Likelihood, per_cell):
    """``[..., cells]`` -> ``[..., groups]``: sums over the bins of each channel."""
    shape = per_cell.shape[:-1]
    by_bin = per_cell.reshape(*shape, lk.n_samples, lk.n_bins)
    return (by_bin @ lk.channel_bins).reshape(*shape, lk.n_groups)


def _cell_rates(lk: Likelihood, pars):
    alpha = pars[: lk.n_interp, None]
    norm = jnp.prod(normsys_factor(lk.normsys_code, alpha, lk.normsys)[0], axis=0)
    delta = histosys_delta(lk.histosys_code, alpha, lk.histosys)[0]
    base = lk.nominal + jnp.sum(delta, axis=0)
    return base * _per_cell(lk, norm) * jnp.prod(_linear_values(lk, pars), axis=1)


def expected_rates(lk: Likelihood, pars):
    """Expected counts of the main bins (pyhf's ``expected_actualdata``)."""
    return jnp.sum(_cell_rates(lk, pars).reshape(lk.n_samples, lk.n_bins), axis=0)


def _constraint_terms(lk: Likelihood, pars, aux):
    theta = pars[lk.aux_param]
    # Gaussian slots get rate 1 in the discarded Poisson branch: at theta = 0 its gradient would be
    # infinite, and jnp.where turns 0 * inf into a NaN gradient
    rate = jnp.where(lk.aux_poisson, theta * lk.aux_scale, 1.0)
    poisson = xlogy(aux, rate) - rate - gammaln(aux + 1.0)
    gauss = -0.5 * ((aux - theta) / lk.aux_scale) ** 2 - jnp.log(lk.aux_scale) - _LOG_SQRT_2PI
    return jnp.where(lk.aux_poisson, poisson, gauss)


def logpdf(lk: Likelihood, pars, data):
    """log L(pars | data), data = main counts then auxdata, as ``pyhf.Model.logpdf``."""
    counts, aux = data[: lk.n_bins], data[lk.n_bins :]
    rates = expected_rates(lk, pars)
    main = jnp.sum(xlogy(counts, rates) - rates - gammaln(counts + 1.0))
    return main + jnp.sum(_constraint_terms(lk, pars, aux))


def _exclusive_products(values):
    """prod over j != k, and over i not in {k, j} (zero on k == j), without division."""
    n = values.shape[-1]
    cols = [values[..., i] for i in range(n)]

    def prod_except(skip):
        out = jnp.ones_like(cols[0])
        for i in range(n):
            if i not in skip:
                out = out * cols[i]
        return out

    single = jnp.stack([prod_except({k}) for k in range(n)], axis=-1)
    zero = jnp.zeros_like(cols[0])
    pair = jnp.stack(
        [
            jnp.stack([zero if k == j else prod_except({k, j}) for j in range(n)], -1)
            for k in range(n)
        ],
        axis=-2,
    )
    return single, pair


class Derivatives(NamedTuple):
    nll: jax.Array
    grad: jax.Array  # [P]
    hess: jax.Array  # [P, P]
    gauss_newton: jax.Array  # [P, P]
    rates: jax.Array  # [n_bins] expected counts
    jacobian: jax.Array  # [P, n_bins] their derivatives
    #: the Gauss-Newton matrix is ``jacobian diag(weight) jacobianᵀ + diag(curvature)``
    weight: jax.Array  # [n_bins] n / λ² (0 in empty bins)
    curvature: jax.Array  # [P] of the constraint terms (0 for unconstrained parameters)


def nll_derivatives(lk: Likelihood, pars, data, multipliers=None) -> Derivatives:
    """-log L, its gradient, Hessian and Gauss-Newton Hessian at one point, in closed form; and
    the expected counts with their Jacobian (the fitter keeps them non-negative).

    ``multipliers`` ``[n_bins]`` (optional): Lagrange multipliers ν of constraints on the counts
    ``λ_b >= 0``; ``hess`` is then the Hessian of the Lagrangian, -log L - Σ ν_b λ_b.

    The Gauss-Newton matrix drops the curvature of the rates (keeps J^T diag(n/λ²) J and the
    constraints): always positive semi-definite, the fitter's fallback far from the minimum.
    """
    counts, aux = data[: lk.n_bins], data[lk.n_bins :]
    alpha = pars[: lk.n_interp, None]
    f, r, w = normsys_factor(lk.normsys_code, alpha, lk.normsys)  # [n_interp, groups]
    delta, d1, d2 = histosys_delta(lk.histosys_code, alpha, lk.histosys)  # [n_interp, cells]
    values = _linear_values(lk, pars)
    lin_single, lin_pair = _exclusive_products(values)  # [cells, K], [cells, K, K]

    base = lk.nominal + jnp.sum(delta, axis=0)  # A
    norm = _per_cell(lk, jnp.prod(f, axis=0))  # N
    scale = norm * jnp.prod(values, axis=1)  # T = N * L
    rate = base * scale  # per cell
    rates = jnp.sum(rate.reshape(lk.n_samples, lk.n_bins), axis=0)

    main = jnp.sum(xlogy(counts, rates) - rates - gammaln(counts + 1.0))
    nll = -main - jnp.sum(_constraint_terms(lk, pars, aux))
    # a negative expected count is outside the model: pyhf's -log L is NaN there, or, in an empty
    # bin, λ, which decreases without bound (on 1Lbb toys a fit following it ends at λ = -1e4).
    # The fits stay where every count is >= 0; an empty bin may miss by EDGE_TOLERANCE (its term
    # is λ: -log L moves by as little), so that steps along the edge survive rounding
    outside = (rates < 0) & ((counts > 0) | (rates < -EDGE_TOLERANCE))
    nll = jnp.where(jnp.any(outside), jnp.nan, nll)

    # d(nll)/d(rate_b) = c_b and d2 = counts/rate^2: chain rule through the bin sums
    # an empty bin contributes λ whatever λ is, on the edge λ = 0 too (where n/λ would be 0/0)
    ratio = jnp.where(counts == 0, 0.0, counts / jnp.where(counts == 0, 1.0, rates))
    c_bin = 1.0 - ratio
    weight = ratio / jnp.where(counts == 0, 1.0, rates)
    # the rates' curvature enters the Hessian weighted by c_b (minus ν_b for the Lagrangian)
    curv_bin = c_bin if multipliers is None else c_bin - multipliers
    c = jnp.tile(curv_bin, lk.n_samples)

    # Jacobian of the bin rates. Interpolated: d rate_c = rate r_g(c) + T Δ'; the normsys part is
    # r [n_interp, groups] times the rate each group puts in each bin. Linear: A N prod_{j!=k}
    spread = rate.reshape(lk.n_samples, 1, lk.n_bins) * lk.channel_bins.T
    spread = spread.reshape(lk.n_groups, lk.n_bins)
    td1 = scale * d1
    jac_i = r @ spread + jnp.sum(td1.reshape(lk.n_interp, lk.n_samples, lk.n_bins), axis=1)
    # products over the few slots as broadcasts: a dot with a per-cell batch axis is slow on CPU
    q = jnp.sum(lin_single[:, :, None] * lk.linear_onehot, axis=1)  # [cells, n_linear]
    jac_l = jnp.sum(((base * norm)[:, None] * q).reshape(lk.n_samples, lk.n_bins, -1), axis=0)
    jac = jnp.concatenate([jac_i, jac_l.T])  # [n_pars, bins]
    grad = jac @ c_bin

    # sum_c c_c * Hessian(rate_c), see the module docstring of compile.py. Interpolated block:
    # R diag(c rate) R^T + R E^T + E R^T (+ diagonal), with R and E = sum_g c T Δ' over groups
    cr = spread @ curv_bin  # [groups]
    e = _per_group(lk, td1 * c)
    x = r @ (0.5 * cr[:, None] * r.T + e.T)
    h_ii = x + x.T + jnp.diag((w - r**2) @ cr + (scale * d2) @ c)
    cnq = (c * norm)[:, None] * q  # [cells, n_linear]
    h_il = r @ _per_group(lk, (base[:, None] * cnq).T).T + d1 @ cnq
    # [cells, slot k, parameter m]: sum_j pair(k, j) onehot(j, m), weighted by the cell
    pair = jnp.sum(lin_pair[..., None] * lk.linear_onehot[:, None], axis=2)
    pair = (c * base * norm)[:, None, None] * pair
    h_ll = lk.linear_onehot.reshape(-1, lk.n_linear).T @ pair.reshape(-1, lk.n_linear)
    gauss_newton = (jac * weight) @ jac.T

    # constraints: one parameter each, so diagonal
    theta = pars[lk.aux_param]
    c_grad = jnp.where(
        lk.aux_poisson,
        lk.aux_scale - aux / theta,
        (theta - aux) / lk.aux_scale**2,
    )
    c_curv = jnp.where(lk.aux_poisson, aux / theta**2, 1.0 / lk.aux_scale**2)
    grad = grad.at[lk.aux_param].add(c_grad)
    curvature = jnp.zeros_like(pars).at[lk.aux_param].add(c_curv)
    gauss_newton = gauss_newton + jnp.diag(curvature)
    hess = gauss_newton + jnp.block([[h_ii, h_il], [h_il.T, h_ll]])
    return Derivatives(nll, grad, hess, gauss_newton, rates, jac, weight, curvature)


def fisher_information(lk: Likelihood, pars):
    """Expected Hessian of -log L at ``pars`` (data = their expectation): positive semi-definite.

    On the expected data every residual ``1 - n/λ`` vanishes, so the Hessian is its Gauss-Newton
    part; auxdata at their expectation (θ, or θτ for Poisson constraints).
    """
    theta = pars[lk.aux_param]
    aux = jnp.where(lk.aux_poisson, theta * lk.aux_scale, theta)
    data = jnp.concatenate([expected_rates(lk, pars), aux])
    return nll_derivatives(lk, pars, data).gauss_newton
