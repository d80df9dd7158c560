"""CLs, expected bands, upper limits and the adaptive-toys rule from stored per-toy statistics.

Pure numpy on the arrays of one (patch, μ): ``q_obs``, ``q_sb [n]`` (toys thrown under s+b),
``q_b [n_b]`` (toys thrown under b-only) and their ``converged`` masks. Conventions are pyhf 0.7.6's
``ToyCalculator`` unless stated:

* Selection: a NaN ``q`` is a toy not generated yet and is ignored; a generated toy whose fits did
  not converge is left out and counted (``not_converged_*``).
* p-values count toys with ``q >= q_obs`` (``EmpiricalDistribution.pvalue``): CLsb = p_sb,
  CLb = p_b, CLs = CLsb / CLb, with IEEE semantics as numpy gives pyhf, minus the warnings:
  CLb = 0 gives CLs = NaN when CLsb = 0 too and +inf when CLsb > 0 (not excluded).
  A NaN ``q_obs`` or no usable toy on a side gives NaN.
* MC error: binomial, propagated as ROOT's ``HypoTestResult::CLsError``,
  ``sqrt(err_sb**2 + CLs**2 * err_b**2) / CLb`` (= CLs * sqrt((err_sb/CLsb)**2 + (err_b/CLb)**2)
  where CLsb > 0). Departure from ROOT: at k = 0 or k = N toys in the tail the binomial variance
  is 0, which would claim exact knowledge from a finite sample (and stop an adaptive loop on
  CLs = 0 +- 0 after a handful of toys); we use the variance of one toy instead,
  ``max(k, 1) * max(N - k, 1) / N**3``, i.e. an error of 1/N. Where CLb = 0 the error is NaN.
* Expected band: pyhf's ``expected_pvalues``: every b-only toy's q taken as observed, its CLs
  against both samples, then ``np.percentile`` (linear) at pyhf's literal normal percentiles; in
  pyhf's order (-2σ, -1σ, median, +1σ, +2σ). Done with sort + searchsorted: O(N log N), not O(N^2).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "NORMAL_PERCENTILES",
    "HypotestResult",
    "Limit",
    "UpperLimits",
    "hypotest",
    "expected_band",
    "upper_limit",
    "needs_more_toys",
]

#: pyhf 0.7.6's literal percentiles (8 decimals, not ``normal_cdf``), kept so bands agree bit-wise.
NORMAL_PERCENTILES = (2.27501319, 15.86552539, 50.0, 84.13447461, 97.72498681)


@dataclass(frozen=True)
class HypotestResult:
    """CLs of one (patch, μ); ``ntoys_*``: toys used, ``not_converged_*``: toys left out."""

    q_obs: float
    CLs_obs: float
    CLsb_obs: float
    CLb_obs: float
    CLs_obs_error: float
    CLsb_obs_error: float
    CLb_obs_error: float
    CLs_exp: tuple[float, float, float, float, float]
    ntoys_sb: int
    ntoys_b: int
    not_converged_sb: int
    not_converged_b: int

    def as_dict(self) -> dict[str, float | int | list[float]]:
        """Plain Python values (the ``cls --json`` keys and the rest), ``CLs_exp`` as a list."""
        out = dataclasses.asdict(self)
        out["CLs_exp"] = list(self.CLs_exp)
        return out


def _used(q: ArrayLike, converged: ArrayLike | None, name: str) -> tuple[NDArray, int]:
    """The toys to use (generated and converged) and the number left out as not converged."""
    q = np.asarray(q, dtype=np.float64).ravel()
    generated = ~np.isnan(q)
    if converged is None:
        return q[generated], 0
    conv = np.asarray(converged, dtype=bool).ravel()
    if conv.shape != q.shape:
        raise ValueError(f"converged mask of {name} has {conv.size} entries, q has {q.size}")
    return q[generated & conv], int(np.count_nonzero(generated & ~conv))


def _tail_counts(sorted_q: NDArray, values: NDArray | float) -> NDArray:
    """Number of toys with q >= value, for each value (``sorted_q`` ascending)."""
    return sorted_q.size - np.searchsorted(sorted_q, values, side="left")


def _binomial_error(k: int, n: int) -> float:
    """sqrt(p (1 - p) / n) with p = k / n; k = 0 or n is moved in by one toy (see module doc)."""
    if n == 0:
        return float("nan")
    return float(np.sqrt(max(k, 1) * max(n - k, 1) / n**3))


def _band(sorted_sb: NDArray, sorted_b: NDArray) -> tuple[float, float, float, float, float]:
    n_sb, n_b = sorted_sb.size, sorted_b.size
    if n_sb == 0 or n_b == 0:
        return (float("nan"),) * 5  # type: ignore[return-value]
    # Same arithmetic as pyhf (count / n, then the ratio) so values agree bit-wise; each b toy
    # counts itself, so CLb >= 1 / n_b and the division is safe.
    clsb = _tail_counts(sorted_sb, sorted_b) / n_sb
    clb = _tail_counts(sorted_b, sorted_b) / n_b
    band = np.percentile(clsb / clb, NORMAL_PERCENTILES)
    return tuple(float(v) for v in band)  # type: ignore[return-value]


def expected_band(
    q_sb: ArrayLike,
    q_b: ArrayLike,
    converged_sb: ArrayLike | None = None,
    converged_b: ArrayLike | None = None,
) -> tuple[float, float, float, float, float]:
    """Expected CLs band (-2σ, -1σ, median, +1σ, +2σ) as pyhf's ``ToyCalculator.expected_pvalues``.

    Selection as ``hypotest``; NaN where a side has no usable toy.
    """
    sb, _ = _used(q_sb, converged_sb, "q_sb")
    b, _ = _used(q_b, converged_b, "q_b")
    return _band(np.sort(sb), np.sort(b))


def hypotest(
    q_obs: float,
    q_sb: ArrayLike,
    q_b: ArrayLike,
    converged_sb: ArrayLike | None = None,
    converged_b: ArrayLike | None = None,
) -> HypotestResult:
    """Observed CLs (with MC errors) and the expected band of one (patch, μ); see the module doc."""
    q_obs = float(q_obs)
    sb, nc_sb = _used(q_sb, converged_sb, "q_sb")
    b, nc_b = _used(q_b, converged_b, "q_b")
    sorted_sb, sorted_b = np.sort(sb), np.sort(b)
    n_sb, n_b = sorted_sb.size, sorted_b.size
    nan = float("nan")

    clsb = clb = cls = err_sb = err_b = err = nan
    if not np.isnan(q_obs):
        k_sb = int(_tail_counts(sorted_sb, q_obs))
        k_b = int(_tail_counts(sorted_b, q_obs))
        if n_sb:
            clsb, err_sb = k_sb / n_sb, _binomial_error(k_sb, n_sb)
        if n_b:
            clb, err_b = k_b / n_b, _binomial_error(k_b, n_b)
        if n_sb and n_b:
            if clb > 0:
                cls = clsb / clb
                err = float(np.sqrt(err_sb**2 + cls**2 * err_b**2) / clb)
            else:
                # pyhf's numpy division without the warning: 0/0 -> NaN, x/0 -> inf; error NaN.
                cls = nan if clsb == 0 else float("inf")

    return HypotestResult(
        q_obs=q_obs,
        CLs_obs=cls,
        CLsb_obs=clsb,
        CLb_obs=clb,
        CLs_obs_error=err,
        CLsb_obs_error=err_sb,
        CLb_obs_error=err_b,
        CLs_exp=_band(sorted_sb, sorted_b),
        ntoys_sb=n_sb,
        ntoys_b=n_b,
        not_converged_sb=nc_sb,
        not_converged_b=nc_b,
    )


@dataclass(frozen=True)
class Limit:
    """One upper limit on μ where CLs crosses ``level``.

    ``status``: ``"ok"`` (``value`` interpolated between grid points ``lo`` and ``hi``; ``lo == hi``
    when CLs equals level exactly on a grid point), ``"above_scan"`` (CLs >= level up to the
    largest μ with a finite CLs, grid point ``lo``: the limit lies above the scan),
    ``"below_scan"`` (CLs < level already at the smallest such μ, grid point ``hi``), or
    ``"no_data"`` (no finite CLs). ``value`` is NaN unless status is ``"ok"``: never extrapolated.
    ``crossings`` > 1 means CLs is not monotone on the grid (toy noise); the last crossing is used.
    """

    value: float
    status: str
    lo: int | None
    hi: int | None
    crossings: int
    message: str


@dataclass(frozen=True)
class UpperLimits:
    """Observed limit and the five expected ones in pyhf's order (-2σ, -1σ, median, +1σ, +2σ)."""

    obs: Limit
    exp: tuple[Limit, Limit, Limit, Limit, Limit]


def _crossing(mu: NDArray, cls: NDArray, level: float) -> Limit:
    finite = np.flatnonzero(np.isfinite(cls))  # NaN (undefined) and inf (CLb = 0) are skipped
    skipped = mu.size - finite.size
    note = f"; {skipped} grid point(s) without a finite CLs skipped" if skipped else ""
    if finite.size == 0:
        return Limit(float("nan"), "no_data", None, None, 0, "no grid point has a finite CLs")
    m, c = mu[finite], cls[finite]
    above = c >= level
    crossings = int(np.count_nonzero(above[:-1] & ~above[1:]))
    if not above.any():
        msg = f"CLs < {level} already at the smallest mu = {m[0]:g}: limit below the scan"
        return Limit(float("nan"), "below_scan", None, int(finite[0]), 0, msg + note)
    # The limit is the largest μ where the linearly interpolated CLs(μ) is still >= level.
    i = int(np.flatnonzero(above)[-1])
    if i == c.size - 1:
        if c[i] == level:
            msg = f"CLs = {level} exactly at mu = {m[i]:g}"
            return Limit(float(m[i]), "ok", int(finite[i]), int(finite[i]), crossings, msg + note)
        msg = f"CLs >= {level} up to the largest mu = {m[i]:g}: limit above the scan"
        return Limit(float("nan"), "above_scan", int(finite[i]), None, crossings, msg + note)
    # np.interp on the two bracketing points, reversed, is the arithmetic of pyhf's
    # linear_grid_scan (np.interp(level, cls[::-1], mu[::-1])) on a monotone curve.
    value = float(np.interp(level, [c[i + 1], c[i]], [m[i + 1], m[i]]))
    msg = f"between mu = {m[i]:g} (CLs {c[i]:.4g}) and mu = {m[i + 1]:g} (CLs {c[i + 1]:.4g})"
    if crossings > 1:
        msg += f"; CLs crosses {level} {crossings} times, the last crossing is used"
    return Limit(value, "ok", int(finite[i]), int(finite[i + 1]), crossings, msg + note)


def upper_limit(
    mu: ArrayLike, cls_obs: ArrayLike, cls_exp: ArrayLike, level: float = 0.05
) -> UpperLimits:
    """Observed and expected upper limits on a grid: ``mu [n]`` increasing, ``cls_obs [n]``,
    ``cls_exp [n, 5]``; linear interpolation between the bracketing grid points (see ``Limit``)."""
    mu = np.asarray(mu, dtype=np.float64)
    obs = np.asarray(cls_obs, dtype=np.float64)
    exp = np.asarray(cls_exp, dtype=np.float64)
    if mu.ndim != 1 or mu.size == 0 or np.any(np.diff(mu) <= 0) or not np.isfinite(mu).all():
        raise ValueError("mu must be a non-empty, finite, strictly increasing 1-d grid")
    if obs.shape != mu.shape or exp.shape != (mu.size, 5):
        raise ValueError(
            f"cls_obs must have shape {mu.shape} and cls_exp {(mu.size, 5)}, "
            f"got {obs.shape} and {exp.shape}"
        )
    return UpperLimits(
        obs=_crossing(mu, obs, level),
        exp=tuple(_crossing(mu, exp[:, k], level) for k in range(5)),  # type: ignore[arg-type]
    )


def needs_more_toys(
    result: HypotestResult, target_error: float, level: float = 0.05, min_toys: int = 100
) -> bool:
    """Whether to throw more toys for this (patch, μ), like Combine's ``--clsAcc``.

    Stop (False) once both sides have at least ``min_toys`` used toys (below that a binomial error
    is too rough for a 3σ rule) and either ``CLs_obs_error <= target_error`` or
    ``|CLs_obs - level| >= 3 * CLs_obs_error``. An undefined CLs (CLb = 0: no b-only toy reaches
    q_obs) returns True: only more b-only toys can define it, so the caller must cap the toys.
    A NaN ``q_obs`` raises ValueError: no number of toys can help.
    """
    if np.isnan(result.q_obs):
        raise ValueError("observed test statistic is NaN: more toys cannot define CLs")
    if result.ntoys_sb < min_toys or result.ntoys_b < min_toys:
        return True
    cls, err = result.CLs_obs, result.CLs_obs_error
    if not (np.isfinite(cls) and np.isfinite(err)):
        return True
    return not (err <= target_error or abs(cls - level) >= 3 * err)
