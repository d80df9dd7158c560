"""The HistFactory log-likelihood and its exact gradient and Hessian, for one parameter point.

``logpdf`` is the plain definition (the reference that automatic differentiation can check);
``nll_derivatives`` returns the same value with its gradient and Hessian in closed form, built from
the per-cell structure in ``compile.py``: every interpolated factor depends on one parameter, so the
Hessian of the main term is a few dense matrix products over cells, not a hessian of a graph.
All functions are written for one point and are vmapped from outside; parameters in internal order.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.scipy.special import gammaln, xlogy

from toyfarm.likelihood.compile import Likelihood
from toyfarm.likelihood.interpolation import histosys_delta, normsys_factor

__all__ = ["expected_rates", "logpdf", "nll_derivatives"]

_LOG_SQRT_2PI = 0.5 * jnp.log(2 * jnp.pi)


def _linear_values(lk: Likelihood, pars):
    gammas = jnp.concatenate([pars[lk.n_interp :], jnp.ones(1, pars.dtype)])
    return gammas[lk.linear_slot]  # [cells, n_slots]


def _cell_rates(lk: Likelihood, pars):
    alpha = pars[: lk.n_interp, None]
    factor = normsys_factor(lk.normsys_code, alpha, lk.normsys)[0]
    delta = histosys_delta(lk.histosys_code, alpha, lk.histosys)[0]
    base = lk.nominal + jnp.sum(delta, axis=0)
    return base * jnp.prod(factor, axis=0) * jnp.prod(_linear_values(lk, pars), axis=1)


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


def nll_derivatives(lk: Likelihood, pars, data):
    """(-log L, gradient, Hessian, Gauss-Newton Hessian) at one point, in closed form.

    The Gauss-Newton matrix drops the curvature of the rates (keeps J^T diag(n/λ²) J and the
    constraints): always positive semi-definite, the fitter's fallback far from the minimum.
    """
    counts, aux = data[: lk.n_bins], data[lk.n_bins :]
    alpha = pars[: lk.n_interp, None]
    f, r, w = normsys_factor(lk.normsys_code, alpha, lk.normsys)  # [n_interp, cells]
    delta, d1, d2 = histosys_delta(lk.histosys_code, alpha, lk.histosys)
    values = _linear_values(lk, pars)
    lin_single, lin_pair = _exclusive_products(values)  # [cells, K], [cells, K, K]

    base = lk.nominal + jnp.sum(delta, axis=0)  # A
    norm = jnp.prod(f, axis=0)  # N
    scale = norm * jnp.prod(values, axis=1)  # T = N * L
    rate = base * scale  # per cell
    rates = jnp.sum(rate.reshape(lk.n_samples, lk.n_bins), axis=0)

    main = jnp.sum(xlogy(counts, rates) - rates - gammaln(counts + 1.0))
    nll = -main - jnp.sum(_constraint_terms(lk, pars, aux))

    # d(nll)/d(rate_b) = c_b and d2 = counts/rate^2: chain rule through the bin sums
    c_bin = 1.0 - counts / rates
    weight = counts / rates**2
    c = jnp.tile(c_bin, lk.n_samples)

    # d rate_c / d param: interpolated G_I = rate r + T Δ'; linear G_L = A N prod_{j!=k}
    grad_i = rate * r + scale * d1  # [n_interp, cells]
    q = jnp.einsum("ck,ckl->cl", lin_single, lk.linear_onehot)  # [cells, n_linear]
    grad_l = (base * norm)[None, :] * q.T  # [n_linear, cells]
    jac_cells = jnp.concatenate([grad_i, grad_l])  # [n_pars, cells]
    jac = jnp.sum(jac_cells.reshape(-1, lk.n_samples, lk.n_bins), axis=1)  # [n_pars, bins]
    grad = jac_cells @ c

    # sum_c c_c * Hessian(rate_c): dense blocks, see the module docstring of compile.py
    cr, ct = c * rate, c * scale
    h_ii = r @ (cr * r + ct * d1).T + (ct * d1) @ r.T
    h_ii = h_ii + jnp.diag(jnp.sum(cr * (w - r**2) + ct * d2, axis=1))
    h_il = (c * norm * (base * r + d1)) @ q
    h_ll = jnp.einsum(
        "c,ckj,ckl,cjm->lm", c * base * norm, lin_pair, lk.linear_onehot, lk.linear_onehot
    )
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
    gauss_newton = gauss_newton.at[lk.aux_param, lk.aux_param].add(c_curv)
    hess = gauss_newton + jnp.block([[h_ii, h_il], [h_il.T, h_ll]])
    return nll, grad, hess, gauss_newton
