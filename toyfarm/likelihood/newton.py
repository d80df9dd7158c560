"""One bounded Newton iteration of one fit; ``fit.py`` vmaps it over a batch and drives the loop.

Written for one problem (optimistix style): nothing raises inside, every fit carries a status.
An iteration evaluates the exact Hessian at the current point and factorises it once (the
Gauss-Newton matrix where the Hessian is not positive definite: far from the minimum the curvature
of the rates can make it indefinite). The fresh factor gives the convergence test, the Newton step,
and then ``chords`` more steps that reuse it with only a new gradient (a chord step: Newton with a
Hessian one step old converges at order three per Hessian). The factor never leaves the
iteration: the state is a few numbers per fit.

Every step is line-searched on -log L alone (a fraction of a gradient's cost) at a few lengths,
inside a radius on the largest parameter move: far from the minimum the quadratic model
overshoots, and a rejected length then costs no derivatives. The radius grows after full steps and
shrinks to what was taken otherwise. Bounds are handled by projection: a parameter on a bound
with the gradient pushing outwards is held, trial points are clipped to the box.

Expected counts stay >= 0 (see ``_Model``): an empty bin whose count the step would drive below
zero is held at the edge through a Lagrange multiplier, and the next Hessian is the Lagrangian's.
Work that few fits need (the Gauss-Newton fallback, a refactorisation when bounds bind, the edge
solves) runs under a ``lax.cond`` on a flag reduced over the batch axis ``ROWS``, so a chunk of
rows that needs none of it skips it.

Before that, a fit takes cheap Gauss-Newton steps (``gauss_newton_iterate``): the Gauss-Newton
matrix is a diagonal (the constraint terms) plus ``J diag(w) Jᵀ`` of rank n_bins, so its step is
a Woodbury solve of size n_bins (14 on 1Lbb) instead of a factorisation of size P (126), from the
gradient alone. It converges linearly and cannot see saddles or the edge: it hands over to the
exact iterations once its model predicts little, which then only polish and decide convergence.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from toyfarm.likelihood.compile import Likelihood
from toyfarm.likelihood.logpdf import Derivatives, expected_rates, nll_derivatives

CONVERGED, MAX_ITERATIONS, NOT_FINITE = 0, 1, 2
RUNNING = -1  # in the exact (Newton) iterations
GAUSS_NEWTON = -2  # in the Gauss-Newton iterations that come first
#: the name of the batch axis the iterations and starts are vmapped over (``fit.py``)
ROWS = "rows"

#: converged when the Newton step predicts less than this decrease of -log L (q moves 2x that)
NLL_TOLERANCE = 1e-9
#: the Gauss-Newton iterations hand over once their model predicts less than this decrease
HANDOVER = 1e-3
#: damping of parameters no constraint term curves (normfactors, the POI), relative to their
#: data curvature: Woodbury needs a positive diagonal
_DAMPING = 1e-3
#: a fit whose steps no longer lower -log L has converged if its model predicts less than this
STALL_TOLERANCE = 1e-6
_RADIUS_START = 2.0
#: steps shrunk below this (in parameter units) end the fit: against the edge of the region where
#: the model predicts non-negative counts, or numerically flat
_RADIUS_MIN = 1e-8
_RIDGE = 1e-10  # relative diagonal shift: keeps singular free directions solvable
_TRIALS = (1.0, 0.3)
#: an empty bin held at the edge keeps this fraction of its count per step (to first order): a
#: step to exactly 0 would end just below it, where the model is undefined, for rounding
_EDGE_KEEP = 1e-3
_CORRECTIONS = 2  # second-order corrections back to the edge per trial point


class State(NamedTuple):
    pars: jax.Array
    nll: jax.Array
    radius: jax.Array  # largest allowed move of any parameter
    iteration: jax.Array
    status: jax.Array  # GAUSS_NEWTON, RUNNING, CONVERGED, MAX_ITERATIONS or NOT_FINITE
    #: [n_bins] multipliers of the counts held at the edge by the last step: the next Hessian is
    #: the Lagrangian's, which makes the steps along the (curved) edge Newton steps
    multipliers: jax.Array
    predicted: jax.Array  # the decrease of -log L the last model predicted (inf before any)


def _value(lk: Likelihood, pars, data):
    return nll_derivatives(lk, pars, data)[0]  # XLA keeps only what the value needs


def _settled(predicted):
    """A model predicting less than the tolerance (a step onto a bound or the edge may predict
    an increase: past ``STALL_TOLERANCE`` that is an inconsistent model, not a converged fit)."""
    return (predicted < NLL_TOLERANCE) & (predicted > -STALL_TOLERANCE)


def _free(x, g, fixed, lower, upper):
    """Parameters that may move: not fixed, not on a bound the gradient pushes against."""
    return ~(fixed | ((x <= lower) & (g > 0)) | ((x >= upper) & (g < 0)))


def masked(h, free):
    """``h`` on the free parameters, identity elsewhere, with a tiny ridge."""
    both = free[:, None] & free[None, :]
    ridge = _RIDGE * jnp.maximum(jnp.abs(jnp.diagonal(h)), 1e-12)
    return jnp.where(both, h, 0.0) + jnp.diag(jnp.where(free, ridge, 1.0))


def _in_any_row(flag) -> jax.Array:
    """Whether ``flag`` holds in any row of the batch: the same for every row, so a
    ``lax.cond`` on it stays a branch under vmap and rare work costs nothing where no row needs
    it (a branch on a per-row flag would run both sides for every row)."""
    return jax.lax.pmax(flag.astype(jnp.int32), ROWS) > 0


def _factorize(hess, gauss_newton, free):
    """Cholesky factor of the Hessian on ``free``, or of the Gauss-Newton matrix where the
    Hessian is indefinite; and whether it is the Hessian's.

    One factorisation after the other: jaxlib 0.10 on CPU deadlocks when two LAPACK calls of
    one program may run concurrently on a small thread pool.
    """
    factor = jnp.linalg.cholesky(masked(hess, free))
    exact = jnp.all(jnp.isfinite(factor))

    def fallback(factor):
        return jnp.where(exact, factor, jnp.linalg.cholesky(masked(gauss_newton, free)))

    return jax.lax.cond(_in_any_row(~exact), fallback, lambda f: f, factor), exact


class _Model(NamedTuple):
    """The quadratic model of one iteration, restricted to the active constraints.

    Two kinds of constraint bind at a bounded minimum: parameter bounds, and non-negative expected
    counts (pyhf's -log L has no minimum beyond them: in an empty bin it is λ and decreases as
    λ < 0). Clipping a step at them ruins the other parameters' steps, which assumed the clipped
    ones move freely, and the fit only creeps towards the edge. So (projected Newton, Bertsekas)
    the parameters the plain step pushes through a bound move to the bound and are held there;
    and the empty bins whose linearised count the step would make negative are kept at
    ``_EDGE_KEEP`` of their count, to first order, through Lagrange multipliers (a Schur complement
    with one column per bin). The factorisations run one after another, never concurrently.
    """

    metric: jax.Array  # [P, P] Hessian, or Gauss-Newton where the Hessian is indefinite
    face: jax.Array  # [P] parameters that move freely
    factor: jax.Array  # Cholesky factor of the metric on the face
    to_bound: jax.Array  # [P] moves of the parameters pushed onto a bound
    edge: jax.Array  # [n_bins] empty bins held at the edge
    jacobian: jax.Array  # [P, n_bins] of the counts
    solved: jax.Array  # [P, n_bins] metric⁻¹ jacobian on the face, edge bins only
    schur: jax.Array  # Cholesky factor of jacobianᵀ solved on the edge bins
    face_step: jax.Array  # [P] the step on the face at the model's own point, edge aside


def _solve(factor, face, rhs):
    return jnp.where(face, -jax.scipy.linalg.cho_solve((factor, True), jnp.where(face, rhs, 0)), 0)


def _model(factor, metric, x, d, multipliers, free, lower, upper, empty, radius) -> _Model:
    step, _ = _newton_step(factor, d.grad, free)
    # bounds are crossed by the step along the edge, as the last multipliers draw it
    along_edge = jax.lax.cond(
        _in_any_row(jnp.any(multipliers != 0)),
        lambda s: _newton_step(factor, d.grad - d.jacobian @ multipliers, free)[0],
        lambda s: s,
        step,
    )
    # the parameters held on a bound are those the step as far as it may go (the radius) pushes
    # through it: a long Newton step in a flat direction would otherwise hold most of them
    reach = jnp.minimum(1.0, radius / jnp.maximum(jnp.max(jnp.abs(along_edge)), 1e-300))
    target = x + reach * along_edge
    cross = free & ((target < lower) | (target > upper))
    to_bound = jnp.where(cross, jnp.where(target < lower, lower, upper) - x, 0.0)
    face = free & ~cross

    def refactor(step):
        factor = jnp.linalg.cholesky(masked(metric, face))
        return factor, to_bound + _solve(factor, face, d.grad + metric @ to_bound)

    # where no row crosses a bound, the face is the free set and the plain step stands
    factor, step = jax.lax.cond(
        _in_any_row(jnp.any(cross)), refactor, lambda step: (factor, step), step
    )
    counts = d.rates + d.jacobian.T @ step
    edge = empty & (counts < _EDGE_KEEP * jnp.maximum(d.rates, 0.0))

    def held_at(edge):
        solved = -_solve(factor, face[:, None], jnp.where(edge, d.jacobian, 0.0))
        both = edge[:, None] & edge[None, :]
        schur = jnp.where(both, d.jacobian.T @ solved, 0.0) + jnp.diag(jnp.where(edge, 0.0, 1.0))
        return solved, jnp.linalg.cholesky(schur + _RIDGE * jnp.diag(jnp.abs(jnp.diagonal(schur))))

    def at_edge(edge):
        solved, schur = held_at(edge)
        # an edge bin whose multiplier comes out negative is not held by the edge but pulled
        # down to it (several bins coupled): let it go, and hold the others (active set)
        miss = jnp.where(edge, _EDGE_KEEP * jnp.maximum(d.rates, 0.0) - counts, 0.0)
        released = edge & (jax.scipy.linalg.cho_solve((schur, True), miss) < 0)
        edge = edge & ~released
        solved, schur = jax.lax.cond(
            _in_any_row(jnp.any(released)), held_at, lambda _: (solved, schur), edge
        )
        return edge, solved, schur

    def no_edge(edge):
        return edge, jnp.zeros_like(d.jacobian), jnp.eye(d.rates.shape[0], dtype=x.dtype)

    edge, solved, schur = jax.lax.cond(_in_any_row(jnp.any(edge)), at_edge, no_edge, edge)
    return _Model(metric, face, factor, to_bound, edge, d.jacobian, solved, schur, step)


def _step(model: _Model, grad, rates, at_model: bool = False):
    """The step of ``model`` for the gradient and counts at the current point (``at_model``:
    the model's own point, whose face step is known), the decrease of -log L it predicts, and
    the multipliers of its edge bins."""
    if at_model:
        step = model.face_step
    else:
        rhs = grad + model.metric @ model.to_bound
        step = model.to_bound + _solve(model.factor, model.face, rhs)
    aim = _EDGE_KEEP * jnp.maximum(rates, 0.0)  # a count rounded below zero aims back at it
    miss = jnp.where(model.edge, aim - rates - model.jacobian.T @ step, 0.0)
    multipliers = jax.lax.cond(
        _in_any_row(jnp.any(model.edge)),
        lambda m: jnp.where(model.edge, jax.scipy.linalg.cho_solve((model.schur, True), m), 0),
        jnp.zeros_like,
        miss,
    )
    step = step + model.solved @ multipliers
    return step, -(jnp.dot(grad, step) + 0.5 * jnp.dot(step, model.metric @ step)), multipliers


def _newton_step(factor, g, free):
    """``-M⁻¹ g`` on the free parameters and the decrease ``g M⁻¹ g / 2`` its model predicts."""
    g_free = jnp.where(free, g, 0.0)
    step = jnp.where(free, -jax.scipy.linalg.cho_solve((factor, True), g_free), 0.0)
    return step, -0.5 * jnp.dot(g_free, step)


def _back_to_edge(lk: Likelihood, model: _Model, rates, trial, t):
    """``trial`` (``t`` of a step of ``model``) moved back to where that step's edge bins keep
    the count it aimed at: second-order corrections (Nocedal & Wright 18.3). The edge is
    curved, and a step along its tangent ends below it, where the model is undefined; one
    correction leaves a miss of second order in the step, which can still be below zero."""
    aim = jnp.maximum(rates, 0.0) * (1.0 - t * (1.0 - _EDGE_KEEP))
    for _ in range(_CORRECTIONS):
        miss = jnp.where(model.edge, aim - expected_rates(lk, trial), 0.0)
        trial = trial + model.solved @ jax.scipy.linalg.cho_solve((model.schur, True), miss)
    return trial


def _line_search(lk: Likelihood, data, lower, upper, x, nll, step, predicted, radius,
                 model: _Model | None = None, rates=None):
    """The best of the trial lengths if it lowers -log L (else x stays), the new radius, and
    whether the search failed. Trials of a ``model`` step are corrected back to its edge.

    A step that predicts less than the tolerance may find nothing lower (rounding): that is no
    failure, the next iteration's fresh Hessian decides convergence.
    """
    length = jnp.max(jnp.abs(step))
    ts = jnp.minimum(1.0, radius / jnp.maximum(length, 1e-300)) * jnp.asarray(_TRIALS)
    trials = x + ts[:, None] * step
    if model is not None:
        trials = jax.lax.cond(
            _in_any_row(jnp.any(model.edge)),
            lambda p: jax.vmap(lambda p, t: _back_to_edge(lk, model, rates, p, t))(p, ts),
            lambda p: p,
            trials,
        )
    trials = jnp.clip(trials, lower, upper)
    values = jax.vmap(lambda p: _value(lk, p, data))(trials)
    best = jnp.argmin(jnp.where(jnp.isfinite(values), values, jnp.inf))
    better = values[best] < nll
    # a model predicting an increase (a far step held on bounds) fails too: shorter, it may not
    failed = ~better & ((predicted >= NLL_TOLERANCE) | (predicted < 0))
    taken = ts[best] * length
    radius = jnp.where(
        better,
        jnp.where(best == 0, jnp.maximum(radius, 4 * taken), 2 * taken),
        jnp.where(failed, 0.25 * ts[-1] * length, radius),
    )
    x = jnp.where(better, trials[best], x)
    return x, jnp.where(better, values[best], nll), radius, failed


def _state(lk: Likelihood, x, nll, radius) -> State:
    status = jnp.where(jnp.isfinite(nll), RUNNING, NOT_FINITE)
    no_edge = jnp.zeros(lk.n_bins, x.dtype)
    return State(x, nll, jnp.asarray(radius, x.dtype), jnp.asarray(0), status, no_edge,
                 jnp.asarray(jnp.inf, x.dtype))


def start(lk: Likelihood, data, init, lower, upper) -> State:
    x0 = jnp.clip(init, lower, upper)
    return _state(lk, x0, _value(lk, x0, data), _RADIUS_START)


def start_shared(lk: Likelihood, data, init, fixed, lower, upper, factor) -> State:
    """Start with one step of a factor shared by the batch, built for the parameters not fixed."""
    x0 = jnp.clip(init, lower, upper)
    nll0, g0 = nll_derivatives(lk, x0, data)[:2]
    step, predicted = _newton_step(factor, g0, _free(x0, g0, fixed, lower, upper))
    step = jnp.where(jnp.all(jnp.isfinite(step)), step, 0.0)
    x1, nll1, radius, _ = _line_search(
        lk, data, lower, upper, x0, nll0, step, predicted, _RADIUS_START
    )
    return _state(lk, x1, jnp.where(jnp.isfinite(nll0), nll1, nll0), radius)


def _gauss_newton_step(d: Derivatives, free):
    """``-M⁻¹ g`` on the free parameters for the Gauss-Newton matrix ``M = D + Z Zᵀ``,
    ``Z = J diag(√w)``, by Woodbury: ``M⁻¹ = D⁻¹ - D⁻¹ Z (I + Zᵀ D⁻¹ Z)⁻¹ Zᵀ D⁻¹``, one
    factorisation of size n_bins. Returns the step and the decrease its model predicts."""
    z = jnp.where(free[:, None], d.jacobian * jnp.sqrt(d.weight), 0.0)  # [P, n_bins]
    damped = jnp.maximum(d.curvature, _DAMPING * jnp.sum(z**2, axis=1))
    # held parameters: identity, a zero row of z and a zero gradient, so a zero step
    diag_inv = 1.0 / jnp.where(free, jnp.maximum(damped, 1e-300), 1.0)
    g = jnp.where(free, d.grad, 0.0)
    dz = diag_inv[:, None] * z
    # sums over parameters as reductions, not dots: XLA's CPU dot splits a long contraction over
    # its threads, and the rounding would then depend on how many a worker has
    inner = jnp.eye(z.shape[1], dtype=z.dtype) + jnp.sum(z[:, :, None] * dz[:, None, :], axis=0)
    rhs = jnp.sum(dz * g[:, None], axis=0)
    u = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(inner), True), rhs)
    step = jnp.where(free, dz @ u - diag_inv * g, 0.0)
    return step, -0.5 * jnp.dot(g, step)


def gauss_newton_iterate(lk: Likelihood, data, fixed, lower, upper, state: State) -> State:
    """One line-searched Gauss-Newton step of a fit in the ``GAUSS_NEWTON`` phase; it hands
    over (status ``RUNNING``) once its model predicts less than ``HANDOVER`` or a step fails:
    near the edge of non-negative counts, or on bounds, only the exact iterations make
    progress. Other fits pass through unchanged."""
    d = nll_derivatives(lk, state.pars, data)
    free = _free(state.pars, d.grad, fixed, lower, upper)
    step, predicted = _gauss_newton_step(d, free)
    finite = jnp.all(jnp.isfinite(step))
    step = jnp.where(finite, step, 0.0)
    x, nll, radius, failed = _line_search(
        lk, data, lower, upper, state.pars, state.nll, step, predicted, state.radius
    )
    working = state.status == GAUSS_NEWTON
    handover = ~finite | failed | (predicted < HANDOVER)
    keep = lambda new, old: jnp.where(working, new, old)  # noqa: E731
    return state._replace(
        pars=keep(x, state.pars),
        nll=keep(nll, state.nll),
        radius=keep(radius, state.radius),
        status=jnp.where(working & handover, RUNNING, state.status),
        predicted=keep(jnp.where(finite, predicted, jnp.inf), state.predicted),
    )


def iterate(lk: Likelihood, data, fixed, lower, upper, state: State, max_iter: int,
            chords: int) -> State:
    """One factorisation, its Newton step and ``chords`` chord steps; a finished fit passes
    through unchanged."""
    x, nll, radius = state.pars, state.nll, state.radius
    d = nll_derivatives(lk, x, data, state.multipliers)
    # on the edge, whether a bound holds a parameter is the Lagrangian's gradient to say
    free = _free(x, d.grad - d.jacobian @ state.multipliers, fixed, lower, upper)
    factor, exact = _factorize(d.hess, d.gauss_newton, free)
    metric = jnp.where(exact, d.hess, d.gauss_newton)
    model = _model(factor, metric, x, d, state.multipliers, free, lower, upper,
                   data[: lk.n_bins] == 0, radius)
    step, predicted, multipliers = _step(model, d.grad, d.rates, at_model=True)
    finite = jnp.all(jnp.isfinite(step))
    # an indefinite Hessian at a point where the step vanishes is a saddle, unless counts are on
    # the edge: there only the curvature along the edge matters
    done = finite & (exact | jnp.any(model.edge)) & _settled(predicted)
    # a positive definite Hessian one short step old (its model predicted < HANDOVER) decides
    # as well as a fresh one, where the same parameters are free and no count is on the edge:
    # a chord step predicting less than the tolerance ends the fit without another Hessian
    polishing = finite & exact & ~jnp.any(model.edge) & (predicted < HANDOVER)
    polished = jnp.zeros_like(done)
    for chord in range(chords + 1):
        if chord:
            d = nll_derivatives(lk, x, data)
            step, predicted, multipliers = _step(model, d.grad, d.rates)
            same_face = jnp.all(_free(x, d.grad, fixed, lower, upper) == model.face)
            polished = polished | (polishing & same_face & jnp.all(jnp.isfinite(step))
                                   & _settled(predicted))
        x, nll, radius, failed = _line_search(
            lk, data, lower, upper, x, nll, step, predicted, radius, model, d.rates
        )
    running = state.status == RUNNING
    iteration = state.iteration + running
    # no shorter step lowers -log L any more: rounding, most often of counts on the edge
    stalled = failed & (radius < _RADIUS_MIN)
    status = jnp.where(
        ~finite,
        NOT_FINITE,
        jnp.where(
            done | polished,
            CONVERGED,
            jnp.where(
                stalled & (jnp.abs(predicted) < STALL_TOLERANCE),
                CONVERGED,
                jnp.where(stalled | (iteration >= max_iter), MAX_ITERATIONS, RUNNING),
            ),
        ),
    )
    moved = running & finite & ~done
    keep = lambda new, old: jnp.where(moved, new, old)  # noqa: E731
    return State(
        keep(x, state.pars),
        keep(nll, state.nll),
        keep(radius, state.radius),
        iteration,
        jnp.where(running, status, state.status),
        keep(multipliers, state.multipliers),
        jnp.where(running, predicted, state.predicted),
    )
