"""The interpolation kernels against their scalar references, pyhf's interpolators and autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pyhf
import pytest

import toyfarm.likelihood  # noqa: F401  (switches JAX to 64 bit)
from toyfarm.likelihood.interpolation import (
    HISTOSYS_CODES,
    NORMSYS_CODES,
    histosys_coefficients,
    histosys_delta,
    normsys_coefficients,
    normsys_factor,
    slow_histosys,
    slow_normsys,
)

# exactly on and 1e-9 either side of the branch points 0 and ±1, inside and beyond ±1
ALPHAS = np.array(
    sorted(
        [point + shift for point in (-1.0, 0.0, 1.0) for shift in (-1e-9, 0.0, 1e-9)]
        + [sign * size for sign in (-1, 1) for size in (0.3, 0.7, 1.5, 2.0, 3.0)]
    )
)
# derivatives are only defined away from the branch points
SMOOTH_ALPHAS = ALPHAS[np.min(np.abs(np.abs(ALPHAS[:, None]) - [0.0, 1.0]), axis=1) > 1e-3]

# normsys (lo, hi): symmetric, asymmetric, both on one side of 1, neutral
NORMSYS = np.array([(0.9, 1.1), (0.8, 1.3), (0.6, 1.05), (1.05, 1.2), (0.7, 0.95), (1.0, 1.0)])
# histosys (lo, nom, hi): same kinds of shapes, plus an empty bin
HISTOSYS = np.array(
    [
        (9.0, 10.0, 11.0),
        (7.0, 10.0, 14.0),
        (10.5, 10.0, 12.0),
        (8.0, 10.0, 9.5),
        (10.0, 10.0, 10.0),
        (0.0, 0.0, 0.0),
    ]
)
PYHF_CODES = {"code0": 0, "code1": 1, "code2": 2, "code4": 4, "code4p": "4p"}


def _normsys(code: str, alpha: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(f, f', f'') for every (alpha, NORMSYS) pair; alpha has shape [A, 1, cells] or [A, 1, 1]."""
    coef = normsys_coefficients(code, NORMSYS[None, :, 0], NORMSYS[None, :, 1])
    f, dlog, d2log = normsys_factor(code, alpha, coef)
    return f, f * dlog, f * d2log


def _histosys(code: str, alpha: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(Δ, Δ', Δ'') for every (alpha, HISTOSYS) pair."""
    lo, nom, hi = (HISTOSYS[None, :, i] for i in range(3))
    return histosys_delta(code, alpha, histosys_coefficients(code, lo, nom, hi))


KERNELS = [("normsys", code) for code in NORMSYS_CODES] + [
    ("histosys", code) for code in HISTOSYS_CODES
]


def _kernel(kind: str, code: str, alpha: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    return (_normsys if kind == "normsys" else _histosys)(code, alpha)


def _reference(kind: str, code: str) -> np.ndarray:
    """The scalar reference on the ALPHAS x cells grid."""
    if kind == "normsys":
        return np.array([[slow_normsys(code, a, lo, hi) for lo, hi in NORMSYS] for a in ALPHAS])
    return np.array([[slow_histosys(code, a, *cell) for cell in HISTOSYS] for a in ALPHAS])


def _pyhf(kind: str, code: str) -> np.ndarray:
    """pyhf's own (tensorized) interpolator on the same grid: one set, one histogram per cell."""
    cells = [[lo, 1.0, hi] for lo, hi in NORMSYS] if kind == "normsys" else HISTOSYS.tolist()
    histogramssets = [[[[lo], [nom], [hi]] for lo, nom, hi in cells]]
    interpolator = pyhf.interpolators.get(PYHF_CODES[code])(histogramssets, subscribe=False)
    return np.asarray(interpolator(pyhf.tensorlib.astensor([ALPHAS])))[0, :, :, 0].T


@pytest.mark.parametrize(("kind", "code"), KERNELS)
def test_kernel_matches_slow_reference_and_pyhf(kind: str, code: str) -> None:
    value = np.asarray(_kernel(kind, code, jnp.asarray(ALPHAS)[:, None, None])[0])[:, 0, :]
    reference = _reference(kind, code)
    # histosys deltas vanish at alpha = 0: compare on the scale of the variations
    atol = 1e-12 * np.max(np.abs(reference))
    np.testing.assert_allclose(value, reference, rtol=1e-12, atol=atol)
    np.testing.assert_allclose(value, _pyhf(kind, code), rtol=1e-12, atol=atol)


@pytest.mark.parametrize(("kind", "code"), KERNELS)
def test_kernel_derivatives_match_autodiff(kind: str, code: str) -> None:
    # one alpha per (point, cell), so the derivative of the sum is the elementwise derivative
    alpha = jnp.broadcast_to(jnp.asarray(SMOOTH_ALPHAS)[:, None, None], (len(SMOOTH_ALPHAS), 1, 6))
    _, d1, d2 = _kernel(kind, code, alpha)

    def first(a: jax.Array) -> jax.Array:
        return jax.grad(lambda b: jnp.sum(_kernel(kind, code, b)[0]))(a)

    auto_d1 = first(alpha)
    auto_d2 = jax.grad(lambda a: jnp.sum(first(a)))(alpha)
    np.testing.assert_allclose(d1, auto_d1, rtol=1e-10, atol=1e-12 * np.max(np.abs(auto_d1)))
    np.testing.assert_allclose(d2, auto_d2, rtol=1e-10, atol=1e-12 * np.max(np.abs(auto_d2)))
