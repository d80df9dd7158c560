"""Batched bounded maximum-likelihood fits: ``newton.py``'s iterations over a batch, driven from
the host: cheap Gauss-Newton iterations first, then the exact ones, which polish and decide.

Each toy is its own problem; ``minimize`` runs the iteration on all of them at once, in chunks of
rows that run one after the other inside one compiled program. Small chunks keep a chunk's
intermediates in cache (``_chunk``), let the rare work behind a ``lax.cond`` run only in the
chunks that need it, and their LAPACK calls never overlap another chunk's (see
``newton._factorize``). The loop runs on the host: it stops as soon as every fit has finished,
chunks without a running fit are skipped, and the running fits are gathered into as few chunks as
they fill, so a hard toy costs its chunk, not the batch, its extra iterations.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from toyfarm.likelihood import newton
from toyfarm.likelihood.compile import Likelihood
from toyfarm.likelihood.newton import (
    CONVERGED,
    GAUSS_NEWTON,
    MAX_ITERATIONS,
    NOT_FINITE,
    RUNNING,
)

__all__ = ["CONVERGED", "MAX_ITERATIONS", "NOT_FINITE", "FitResult", "lower_of", "minimize"]

#: iterations (Hessian evaluations) before a fit is given up
MAX_ITER = 50
_TAIL = 4  # batch size for the last stragglers
_CHUNK_BYTES = 128 * 1024  # a chunk's [P, P] matrix, in a core's cache
_CHORDS = 2  # chord steps per Hessian
#: Gauss-Newton iterations before the exact ones take over in any case
MAX_GAUSS_NEWTON = 30
#: a fit from another start is not pursued where its Gauss-Newton iterations settled within this
#: squared distance (in the metric) of the other optimum, its basin, or this far above it in -log L
_SAME_BASIN = 0.05
_ABOVE = 0.1
_SPARED = 3  # a status that never leaves ``minimize``: the other start's fit stands


class FitResult(NamedTuple):
    pars: jax.Array  # internal order
    nll: jax.Array
    status: jax.Array  # CONVERGED, MAX_ITERATIONS or NOT_FINITE
    iterations: jax.Array  # Hessian evaluations


@functools.cache
def _chunk(n_pars: int) -> int:
    """Rows per chunk. On CPU, as many (a power of two, at most 16) as keep a chunk's
    ``[P, P]`` matrices within ``_CHUNK_BYTES``: measured on one core, 1Lbb (126 parameters)
    fits 112 toys/s in chunks of 1 and 80 in chunks of 16, while the small models (3
    parameters) fit twice as fast in chunks of 16 as of 1, and sbottom_RegionA (66) is within
    4% from 1 to 16. An accelerator wants wide batches: a batch runs as one chunk up to 1024."""
    if jax.default_backend() != "cpu":
        return 1024
    rows = max(1, _CHUNK_BYTES // (8 * n_pars**2))
    return min(16, 1 << (rows.bit_length() - 1))


def _chunked(fn, batched, phase=None):
    """jit of ``fn`` vmapped over the rows of the arguments flagged in ``batched``.

    Batches larger than a chunk (``_chunk``) come in whole chunks, which run one after the
    other. With a ``phase`` (a status; the last argument is a ``newton.State``) a chunk without
    a row in that phase passes through untouched.
    """

    def run(*args):
        def per_row(*rows):
            it = iter(rows)
            return fn(*(next(it) if b else a for a, b in zip(args, batched, strict=True)))

        mapped = jax.vmap(per_row, axis_name=newton.ROWS)
        rows = tuple(a for a, b in zip(args, batched, strict=True) if b)
        n = rows[0].shape[0]
        chunk = _chunk(args[0].n_pars)
        if n <= chunk:
            return mapped(*rows)

        def body(carry, chunk):
            if phase is None:
                return carry, mapped(*chunk)
            running = jnp.any(chunk[-1].status == phase)
            return carry, jax.lax.cond(running, lambda c: mapped(*c), lambda c: c[-1], chunk)

        split = lambda a: a.reshape(n // chunk, chunk, *a.shape[1:])  # noqa: E731
        _, out = jax.lax.scan(body, None, jax.tree_util.tree_map(split, rows))
        return jax.tree_util.tree_map(lambda a: a.reshape(n, *a.shape[2:]), out)

    return jax.jit(run)


_start = _chunked(newton.start, (False, True, True, False, False))
_start_shared = _chunked(newton.start_shared, (False, True, True, True, False, False, False))
_iterate = _chunked(
    lambda *a: newton.iterate(*a, max_iter=MAX_ITER, chords=_CHORDS),
    (False, True, True, False, False, True),
    phase=RUNNING,
)


def _gauss_newton_then_spare(lk: Likelihood, data, fixed, lower, upper, rival_pars, rival_nll,
                             rival_converged, metric, state: newton.State) -> newton.State:
    """A Gauss-Newton iteration of one row, which is then spared (the exact iterations need not
    pursue it) where it reached the basin of the rival start's optimum (the same minimum: it
    would only converge to it), or settled clearly above it."""
    state = newton.gauss_newton_iterate(lk, data, fixed, lower, upper, state)
    dx = state.pars - rival_pars
    # a reduction, not a dot: its rounding must not depend on the worker's thread count
    near = jnp.sum(dx[:, None] * metric * dx[None, :]) < _SAME_BASIN
    above = state.nll > rival_nll + _ABOVE
    settled = (state.status == RUNNING) & (state.predicted < newton.HANDOVER)
    in_basin = (state.status == GAUSS_NEWTON) & near
    spared = rival_converged & (in_basin | (settled & (near | above)))
    return state._replace(status=jnp.where(spared, _SPARED, state.status))


_gauss_newton_iterate = _chunked(
    _gauss_newton_then_spare,
    (False, True, True, False, False, True, True, True, False, True),
    phase=GAUSS_NEWTON,
)


@jax.jit
def _metric_factor(metric, free):
    return jnp.linalg.cholesky(newton.masked(metric, free))


def lower_of(a: FitResult, b: FitResult) -> FitResult:
    """Per row, the fit with the lower -log L among the converged ones (``a`` if neither)."""
    a_nll = jnp.where(a.status == CONVERGED, a.nll, jnp.inf)
    b_nll = jnp.where(b.status == CONVERGED, b.nll, jnp.inf)
    take_b = b_nll < a_nll
    pick = lambda x, y: jnp.where(take_b.reshape(-1, *([1] * (x.ndim - 1))), y, x)  # noqa: E731
    return FitResult(*(pick(x, y) for x, y in zip(a, b, strict=True)))


@jax.jit
def _rows(tree, index):
    return jax.tree_util.tree_map(lambda a: a[index], tree)


@jax.jit
def _put_rows(tree, index, rows):
    return jax.tree_util.tree_map(lambda a, b: a.at[index].set(b), tree, rows)


def _regroup(running: np.ndarray, chunk: int) -> np.ndarray | None:
    """Rows to keep working on, running ones first; None to go on as is.

    The few last stragglers move to a batch of ``_TAIL`` (or one chunk): a chunk costs all its
    rows' fits. Otherwise the running rows are gathered when that empties a chunk.
    """
    count, size = int(running.sum()), running.size
    target = next((t for t in (_TAIL, chunk) if count <= t < size), size)
    if target == size:
        active = running.reshape(-1, min(size, chunk)).any(axis=1).sum()
        if active == -(-count // chunk):
            return None
    return np.argsort(~running, kind="stable")[:target]


def minimize(
    lk: Likelihood, data, init, fixed, lower=None, upper=None, metric=None,
    other: FitResult | None = None,
) -> FitResult:
    """Minimise -log L(pars | data) for a batch: ``data [n, n_data]``, ``init``/``fixed [n, P]``.

    Fixed parameters stay at their init; ``lower``/``upper`` default to the model's bounds.
    Parameters are in internal order. ``metric`` (optional, ``[P, P]`` positive definite, e.g.
    ``fisher_information`` at the point toys were thrown at) gives every row its first step: one
    factorisation for the whole batch, and no Hessian at a start point where it is often
    indefinite. It is used where every row holds the same parameters fixed.

    ``other`` (with ``metric``): fits of the same data from another start. The result is then
    per row the lower of the two (``lower_of``), and the exact iterations run only where this
    start may end lower: not where its Gauss-Newton iterations reach the basin of ``other``'s
    optimum (most rows, when the likelihood has one minimum) or settle far above it.

    Each toy's fit depends on that toy alone: every chunk runs the same program whatever its
    other rows, so regrouping changes nothing.
    """
    lower = jnp.asarray(lk.lower if lower is None else lower)
    upper = jnp.asarray(lk.upper if upper is None else upper)
    data, init, fixed = jnp.asarray(data), jnp.asarray(init), jnp.asarray(fixed)
    metric = None if metric is None else jnp.asarray(metric)
    n = data.shape[0]
    chunk = _chunk(lk.n_pars)
    size = n if n <= chunk else -(-n // chunk) * chunk
    source = np.arange(size) % n  # padding rows repeat the first ones and are dropped
    data, init, fixed = data[source], init[source], fixed[source]
    fixed_host = np.asarray(fixed)
    if metric is not None and np.all(fixed_host == fixed_host[:1]):
        factor = _metric_factor(metric, ~fixed[0])
        state = _start_shared(lk, data, init, fixed, lower, upper, factor)
    else:
        state = _start(lk, data, init, lower, upper)
    padding = source != np.arange(size)
    status = jnp.where(state.status == RUNNING, GAUSS_NEWTON, state.status)
    state = state._replace(status=jnp.where(padding, CONVERGED, status))
    # the rival start's optimum per row, padded like the rows: none (never converged) unless
    # sparing; a row in its basin is left to it
    if other is not None and metric is not None:
        # strongly typed, like the zeros below: both kinds of fit share one compiled program
        converged = (other.status == CONVERGED).astype(jnp.bool_)
        rival = _rows((other.pars, other.nll, converged), source)
    else:
        rival = (init, jnp.zeros(size, init.dtype), jnp.zeros(size, jnp.bool_))
        metric = jnp.zeros((lk.n_pars, lk.n_pars), init.dtype)
    for phase, iterations in ((GAUSS_NEWTON, MAX_GAUSS_NEWTON), (RUNNING, MAX_ITER)):
        everything, rows = state, np.arange(size)  # the rows the working state holds
        rows_data, rows_fixed, rows_rival = data, fixed, rival
        for _ in range(iterations):
            working = np.asarray(state.status) == phase
            if not working.any():
                break
            keep = _regroup(working, chunk)
            if keep is not None:
                everything = _put_rows(everything, rows, state)
                rows, state = rows[keep], _rows(state, keep)
                rows_data, rows_fixed, rows_rival = _rows((data, fixed, rival), rows)
            if phase == GAUSS_NEWTON:
                state = _gauss_newton_iterate(lk, rows_data, rows_fixed, lower, upper,
                                              *rows_rival, metric, state)
            else:
                state = _iterate(lk, rows_data, rows_fixed, lower, upper, state)
        state = _put_rows(everything, rows, state)
        # what the Gauss-Newton iterations leave goes on to the exact ones
        state = state._replace(status=jnp.where(state.status == GAUSS_NEWTON, RUNNING,
                                                state.status))
    final = _rows(state, np.arange(n))
    result = FitResult(final.pars, final.nll, final.status, final.iteration)
    return result if other is None else lower_of(other, result)
