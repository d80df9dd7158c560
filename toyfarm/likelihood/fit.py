"""Bounded maximum-likelihood fits: a projected Newton method with a step radius.

Written for one problem and vmapped from outside (optimistix style): nothing raises inside, every
fit comes back with a status code. Each iteration takes the Newton step of the exact Hessian from
``nll_derivatives``; where that is not positive definite (far from the minimum the curvature of
the rates can make it indefinite) the next step uses the Gauss-Newton matrix instead. A radius on
the largest parameter move globalises it: a step that does not lower -log L is retried four times
shorter, a step the quadratic model predicted well lets the radius grow. Near the minimum steps
are plain Newton steps and convergence is quadratic. Bounds are handled by projection: a
parameter on a bound with the gradient pushing outwards is held for that iteration, steps are
clipped to the box.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from toyfarm.likelihood.compile import Likelihood
from toyfarm.likelihood.logpdf import nll_derivatives

__all__ = ["CONVERGED", "MAX_ITERATIONS", "NOT_FINITE", "FitResult", "minimize"]

CONVERGED, MAX_ITERATIONS, NOT_FINITE = 0, 1, 2
_RUNNING = -1

#: converged when the Newton step predicts less than this decrease of -log L (q moves 2x that)
NLL_TOLERANCE = 1e-9
MAX_ITER = 100
_RADIUS_START, _RADIUS_MIN = 2.0, 1e-10
_RIDGE = 1e-10  # relative diagonal shift: keeps singular free directions solvable


class FitResult(NamedTuple):
    pars: jax.Array  # internal order
    nll: jax.Array
    status: jax.Array  # CONVERGED, MAX_ITERATIONS or NOT_FINITE
    iterations: jax.Array


class _State(NamedTuple):
    pars: jax.Array
    nll: jax.Array
    grad: jax.Array
    hess: jax.Array
    gauss_newton: jax.Array
    radius: jax.Array  # largest allowed move of any parameter
    exact: jax.Array  # step with the exact Hessian (else Gauss-Newton)
    iteration: jax.Array
    status: jax.Array


def _solve(h, g, free):
    """Newton step ``-h⁻¹ g`` on the free parameters; NaN where ``h`` is not positive definite."""
    both = free[:, None] & free[None, :]
    ridge = _RIDGE * jnp.maximum(jnp.abs(jnp.diagonal(h)), 1e-12)
    shifted = jnp.where(both, h, 0.0) + jnp.diag(jnp.where(free, ridge, 1.0))
    return -jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(shifted), True), g)


def _newton_step(state: _State, fixed, lower, upper):
    """The Newton step on the parameters not held, and the decrease its quadratic model predicts.

    One factorisation per iteration: jaxlib 0.10 on CPU deadlocks when two LAPACK calls of one
    program may run concurrently on a small thread pool.
    """
    x, g = state.pars, state.grad
    free = ~(fixed | ((x <= lower) & (g > 0)) | ((x >= upper) & (g < 0)))
    g_free = jnp.where(free, g, 0.0)
    h = jnp.where(state.exact, state.hess, state.gauss_newton)
    step = _solve(h, g_free, free)
    predicted = -(jnp.dot(g_free, step) + 0.5 * jnp.dot(step, h @ step))
    return step, predicted


def _start(lk: Likelihood, data, init, fixed, lower, upper) -> _State:
    x0 = jnp.clip(init, lower, upper)
    nll0, g0, h0, gn0 = nll_derivatives(lk, x0, data)
    status0 = jnp.where(jnp.isfinite(nll0), _RUNNING, NOT_FINITE)
    return _State(
        x0,
        nll0,
        g0,
        h0,
        gn0,
        jnp.asarray(_RADIUS_START),
        jnp.asarray(True),
        jnp.asarray(0),
        status0,
    )


def _iterate(lk: Likelihood, data, fixed, lower, upper, state: _State) -> _State:
    """One iteration; a finished fit passes through unchanged."""
    step, predicted = _newton_step(state, fixed, lower, upper)
    usable = jnp.all(jnp.isfinite(step))
    step = jnp.where(usable, step, 0.0)
    length = jnp.max(jnp.abs(step))
    done = usable & state.exact & (predicted < NLL_TOLERANCE)
    shrink = jnp.minimum(1.0, state.radius / jnp.maximum(length, 1e-300))
    trial = jnp.clip(state.pars + shrink * step, lower, upper)
    nll, grad, hess, gauss_newton = nll_derivatives(lk, trial, data)
    running = state.status == _RUNNING
    accept = running & usable & ~done & jnp.isfinite(nll) & (nll <= state.nll)
    # how well the quadratic model predicted the decrease of the (possibly shortened) step
    model = shrink * (1.0 - 0.5 * shrink) * predicted
    good = accept & ((state.nll - nll) > 0.5 * model)
    taken = shrink * length
    radius = jnp.where(
        accept,
        jnp.where(good, jnp.maximum(state.radius, 4 * taken), state.radius),
        jnp.where(usable, 0.25 * taken, state.radius),
    )
    # an indefinite exact Hessian: Gauss-Newton (always positive) until a step is accepted
    exact = jnp.where(state.exact, usable, accept)
    stuck = usable & ~accept & ~done & (radius < _RADIUS_MIN)
    iteration = state.iteration + running
    status = jnp.where(
        done, CONVERGED, jnp.where(stuck | (iteration >= MAX_ITER), MAX_ITERATIONS, _RUNNING)
    )
    keep = lambda new, old: jnp.where(accept, new, old)  # noqa: E731
    return _State(
        keep(trial, state.pars),
        keep(nll, state.nll),
        keep(grad, state.grad),
        keep(hess, state.hess),
        keep(gauss_newton, state.gauss_newton),
        jnp.where(running, radius, state.radius),
        jnp.where(running, exact, state.exact),
        iteration,
        jnp.where(running, status, state.status),
    )


_start_batch = jax.jit(jax.vmap(_start, (None, 0, 0, 0, None, None)))
_iterate_batch = jax.jit(jax.vmap(_iterate, (None, 0, 0, None, None, 0)))


def _rows(tree, index):
    return jax.tree_util.tree_map(lambda a: a[index], tree)


def _put_rows(tree, index, rows):
    return jax.tree_util.tree_map(lambda a, b: a.at[index].set(b), tree, rows)


def minimize(lk: Likelihood, data, init, fixed, lower=None, upper=None) -> FitResult:
    """Minimise -log L(pars | data) for a batch: ``data [n, n_data]``, ``init``/``fixed [n, P]``.

    Fixed parameters stay at their init; ``lower``/``upper`` default to the model's bounds.
    Parameters are in internal order. The iteration loop runs on the host, which lets it stop as
    soon as the batch is done and carry on with only the stragglers (in power-of-two sub-batches,
    so a few shapes get compiled): one hard toy no longer costs every toy of the batch its
    iterations. Each toy's fit depends on that toy alone; regrouping changes it only by rounding
    (XLA's CPU arithmetic depends on the batch shape at the 1e-13 level).
    """
    lower = jnp.asarray(lk.lower if lower is None else lower)
    upper = jnp.asarray(lk.upper if upper is None else upper)
    data, fixed = jnp.asarray(data), jnp.asarray(fixed)
    final = _start_batch(lk, data, jnp.asarray(init), fixed, lower, upper)
    rows = np.arange(data.shape[0])
    state, sub_data, sub_fixed = final, data, fixed
    for _ in range(MAX_ITER):
        running = np.flatnonzero(np.asarray(state.status) == _RUNNING)
        if running.size == 0:
            break
        if 4 * running.size <= rows.size and rows.size >= 16:
            final = _put_rows(final, rows, state)
            size = 1 << int(np.ceil(np.log2(running.size)))
            keep = np.concatenate([running, np.full(size - running.size, running[0])])
            rows, state = rows[keep], _rows(state, keep)
            sub_data, sub_fixed = data[rows], fixed[rows]
        state = _iterate_batch(lk, sub_data, sub_fixed, lower, upper, state)
    final = _put_rows(final, rows, state)
    return FitResult(final.pars, final.nll, final.status, final.iteration)
