"""Interpolation kernels of normsys and histosys, with their first two derivatives.

Every kernel takes ``alpha`` broadcastable against coefficient arrays of shape ``[n, cells]``
(built once by ``*_coefficients`` at compile time) and returns ``(value, d1, d2)``: the fitter
needs exact second derivatives, and these closed forms cost a handful of flops per cell where
automatic differentiation of pyhf's graph costs orders of magnitude more. Branch conventions
(``>`` vs ``>=``) copy pyhf's fast path exactly, so values agree with ``pyhf.Model.logpdf`` to
rounding.

``slow_normsys`` / ``slow_histosys`` are scalar loop references; the tests check the kernels
against them and the derivatives against ``jax.grad``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

__all__ = [
    "NORMSYS_CODES",
    "HISTOSYS_CODES",
    "normsys_coefficients",
    "histosys_coefficients",
    "normsys_factor",
    "histosys_delta",
    "slow_normsys",
    "slow_histosys",
]

NORMSYS_CODES = ("code1", "code4")
HISTOSYS_CODES = ("code0", "code2", "code4p")

# pyhf's code4 polynomial coefficients for alpha0 = 1: a = A_INV @ boundary conditions.
_A_INV = np.array(
    [
        [15 / 16, -15 / 16, -7 / 16, -7 / 16, 1 / 16, -1 / 16],
        [3 / 2, 3 / 2, -9 / 16, 9 / 16, 1 / 16, 1 / 16],
        [-5 / 8, 5 / 8, 5 / 8, 5 / 8, -1 / 8, 1 / 8],
        [3 / -2, 3 / -2, -7 / -8, 7 / -8, -1 / 8, -1 / 8],
        [3 / 16, -3 / 16, -3 / 16, -3 / 16, 1 / 16, -1 / 16],
        [1 / 2, 1 / 2, -5 / 16, 5 / 16, 1 / 16, 1 / 16],
    ]
)


def normsys_coefficients(code: str, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Coefficients ``[k, n, cells]`` of multiplicative factors ``lo``/``hi`` (1 where absent)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        log_hi, log_lo = np.log(hi), np.log(lo)
    if code == "code1":
        return np.stack([log_hi, log_lo])
    if code == "code4":
        with np.errstate(invalid="ignore"):
            b = np.stack(
                [hi - 1, lo - 1, log_hi * hi, -log_lo * lo, log_hi**2 * hi, log_lo**2 * lo]
            )
        a = np.einsum("rc,c...->r...", _A_INV, b)
        return np.concatenate([np.stack([log_hi, log_lo]), a])
    raise ValueError(f"unknown normsys interpolation {code!r}")


def histosys_coefficients(code: str, lo: np.ndarray, nom: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Coefficients ``[k, n, cells]`` of additive variations (``lo = nom = hi`` where absent)."""
    up, dn = hi - nom, nom - lo
    if code == "code0":
        return np.stack([up, dn])
    if code == "code2":
        a = 0.5 * (hi + lo) - nom
        b = 0.5 * (hi - lo)
        return np.stack([a, b, b + 2 * a, b - 2 * a])
    if code == "code4p":
        return np.stack([up, dn, 0.5 * (up + dn), 0.0625 * (up - dn)])
    raise ValueError(f"unknown histosys interpolation {code!r}")


def normsys_factor(code: str, alpha, coef):
    """Multiplicative factor f and its log-derivatives ``(f, f'/f, f''/f)``."""
    log_hi, log_lo = coef[0], coef[1]
    up = alpha > 0 if code == "code1" else alpha >= 1
    rate = jnp.where(up, log_hi, -log_lo)  # d log f / d alpha outside the polynomial region
    # hi^α or lo^-α from the precomputed logs: a power costs a log and an exp, this one exp
    f_exp = jnp.exp(alpha * rate)
    if code == "code1":
        # lo^0 = 1 also where lo = 0 (log -inf)
        return jnp.where(alpha == 0, 1.0, f_exp), rate, rate**2
    a = coef[2:]
    poly = 1 + alpha * (
        a[0] + alpha * (a[1] + alpha * (a[2] + alpha * (a[3] + alpha * (a[4] + alpha * a[5]))))
    )
    d1 = a[0] + alpha * (
        2 * a[1] + alpha * (3 * a[2] + alpha * (4 * a[3] + alpha * (5 * a[4] + alpha * 6 * a[5])))
    )
    d2 = 2 * a[1] + alpha * (
        6 * a[2] + alpha * (12 * a[3] + alpha * (20 * a[4] + alpha * 30 * a[5]))
    )
    inside = (alpha < 1) & (alpha > -1)
    f = jnp.where(inside, poly, f_exp)
    return f, jnp.where(inside, d1 / poly, rate), jnp.where(inside, d2 / poly, rate**2)


def histosys_delta(code: str, alpha, coef):
    """Additive variation Δ and its derivatives ``(Δ, Δ', Δ'')``."""
    if code == "code0":
        slope = jnp.where(alpha > 0, coef[0], coef[1])
        return alpha * slope, slope, jnp.zeros_like(slope)
    if code == "code2":
        # pyhf's fast code2 (the one Model.logpdf uses) evaluates (b+2a)(α-1) above +1 and
        # α(b-2a) below -1; its own _slow_code2 says (b-2a)(α+1) there. We follow what pyhf
        # computes.
        a, b, bp, bm = coef
        inside = alpha * (a * alpha + b), 2 * a * alpha + b, 2 * a
        value = jnp.where(
            alpha > 1, bp * (alpha - 1), jnp.where(alpha >= -1, inside[0], alpha * bm)
        )
        d1 = jnp.where(alpha > 1, bp, jnp.where(alpha >= -1, inside[1], bm))
        d2 = jnp.where((alpha > 1) | (alpha < -1), 0.0, inside[2])
        return value, d1, d2
    if code == "code4p":
        up, dn, s, a = coef
        a2 = alpha * alpha
        poly = alpha * s + a2 * (15 + a2 * (-10 + 3 * a2)) * a
        d1 = s + alpha * (30 + a2 * (-40 + 18 * a2)) * a
        d2 = (30 + a2 * (-120 + 90 * a2)) * a
        value = jnp.where(alpha < -1, alpha * dn, jnp.where(alpha > 1, alpha * up, poly))
        grad = jnp.where(alpha < -1, dn, jnp.where(alpha > 1, up, d1))
        curv = jnp.where((alpha < -1) | (alpha > 1), 0.0, d2)
        return value, grad, curv
    raise ValueError(f"unknown histosys interpolation {code!r}")


def slow_normsys(code: str, alpha: float, lo: float, hi: float) -> float:
    """Scalar reference of one normsys factor (pyhf's definitions, alpha0 = 1)."""
    if code == "code1" or alpha >= 1 or alpha <= -1:
        up = alpha > 0 if code == "code1" else alpha >= 1
        return math.pow(hi if up else lo, abs(alpha))
    b = [
        hi - 1,
        lo - 1,
        math.log(hi) * hi,
        -math.log(lo) * lo,
        math.log(hi) ** 2 * hi,
        math.log(lo) ** 2 * lo,
    ]
    coefs = [sum(_A_INV[r][c] * b[c] for c in range(6)) for r in range(6)]
    return 1 + sum(coefs[i] * alpha ** (i + 1) for i in range(6))


def slow_histosys(code: str, alpha: float, lo: float, nom: float, hi: float) -> float:
    """Scalar reference of one histosys variation Δ (pyhf's fast-path definitions)."""
    up, dn = hi - nom, nom - lo
    if code == "code0":
        return alpha * (up if alpha > 0 else dn)
    if code == "code2":
        a, b = 0.5 * (hi + lo) - nom, 0.5 * (hi - lo)
        if alpha > 1:
            return (b + 2 * a) * (alpha - 1)
        if alpha >= -1:
            return a * alpha * alpha + b * alpha
        return (b - 2 * a) * alpha
    if alpha > 1:
        return alpha * up
    if alpha < -1:
        return alpha * dn
    s, a = 0.5 * (up + dn), 0.0625 * (up - dn)
    return alpha * (s + alpha * a * (15 + alpha * alpha * (-10 + alpha * alpha * 3)))
