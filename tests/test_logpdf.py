"""Parity of the compiled likelihood with pyhf (numpy backend), and of its closed-form derivatives
with JAX autodiff: random workspaces under every interpolation code, then the real workspaces."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pyhf
import pytest
from workspace_generator import random_workspace

from toyfarm.likelihood import Likelihood, compile_model, logpdf, nll_derivatives
from toyfarm.likelihood.interpolation import HISTOSYS_CODES, NORMSYS_CODES
from toyfarm.workspace import ModelSource

SETTINGS = [
    {"normsys": {"interpcode": normsys}, "histosys": {"interpcode": histosys}}
    for normsys, histosys in itertools.product(NORMSYS_CODES, HISTOSYS_CODES)
]
SETTINGS_IDS = [f"{s['normsys']['interpcode']}-{s['histosys']['interpcode']}" for s in SETTINGS]
ANALYSIS = {"normsys": {"interpcode": "code4"}, "histosys": {"interpcode": "code4p"}}
MODELSOURCE_DEFAULTS: dict = {}  # ModelSource fills in normsys code1, histosys code0

N_RANDOM = 8  # random workspaces, each compiled under every settings combination

# one compilation per likelihood shape, shared by every test in the module
_logpdf = jax.jit(logpdf)
# nll_derivatives may return more than (value, gradient, Hessian); those three are checked here
_closed_form = jax.jit(lambda lk, pars, data: nll_derivatives(lk, pars, data)[:3])


@jax.jit
def _autodiff(lk: Likelihood, pars: jax.Array, data: jax.Array):
    def nll(p: jax.Array) -> jax.Array:
        return -logpdf(lk, p, data)

    return jax.grad(nll)(pars), jax.hessian(nll)(pars)


def random_points(
    model: pyhf.pdf.Model,
    rng: np.random.Generator,
    n: int,
    alpha_max: float,
    branch_points: Sequence[float] = (-1.0, 0.0, 1.0),
) -> list[np.ndarray]:
    """n points in pyhf's order within the bounds: normsys/histosys |α| <= alpha_max (a fifth of
    them exactly on one of the branch_points), every other parameter in [0.5, 1.5]. Only points
    where pyhf expects positive counts: elsewhere both likelihoods are NaN, which tells nothing."""
    config = model.config
    interpolated = np.zeros(config.npars, dtype=bool)
    for name, kind in config.modifiers:
        if kind in ("normsys", "histosys"):
            interpolated[config.par_slice(name)] = True
    lower, upper = np.asarray(config.suggested_bounds(), dtype=float).T
    lower = np.maximum(lower, np.where(interpolated, -alpha_max, 0.5))
    upper = np.minimum(upper, np.where(interpolated, alpha_max, 1.5))
    points: list[np.ndarray] = []
    for _ in range(100 * n):
        point = rng.uniform(lower, upper)
        branch = interpolated & (rng.random(config.npars) < 0.2)
        snapped = rng.choice(branch_points, branch.sum())
        point[branch] = np.clip(snapped, lower[branch], upper[branch])
        if np.all(model.expected_actualdata(point) > 0):
            points.append(point)
        if len(points) == n:
            return points
    pytest.fail(f"fewer than {n} of {100 * n} random points give positive expected counts")


def derivative_point(
    model: pyhf.pdf.Model, lk: Likelihood, rng: np.random.Generator, alpha_max: float
) -> np.ndarray:
    """A random point, but never α = 0 under normsys code1: f = hi^|α| has a kink there, where
    autodiff (through |α|) says f' = 0 and the closed form takes the slope of the lo side."""
    branch_points = (-1.0, 1.0) if lk.normsys_code == "code1" else (-1.0, 0.0, 1.0)
    return random_points(model, rng, 1, alpha_max, branch_points)[0]


def toy_data(
    model: pyhf.pdf.Model, observed: Sequence[float], rng: np.random.Generator
) -> np.ndarray:
    """The observed main counts (zeros included) with auxdata moved as a toy's would be: Gaussian
    centres shifted by about a width, Poisson ones redrawn."""
    aux = []
    for name in model.config.auxdata_order:
        paramset = model.config.param_set(name)
        centre = np.asarray(paramset.auxdata, dtype=float)
        if paramset.pdf_type == "poisson":
            aux.append(rng.poisson(centre).astype(float))
        else:
            aux.append(centre + rng.normal(size=centre.shape) * np.asarray(paramset.width()))
    return np.concatenate([np.asarray(observed[: model.config.nmaindata], dtype=float), *aux])


def values(model: pyhf.pdf.Model, lk: Likelihood, points: list[np.ndarray], data: np.ndarray):
    """(toyfarm, pyhf) log-likelihoods at each point."""
    ours = [float(_logpdf(lk, jnp.asarray(lk.to_internal(p)), jnp.asarray(data))) for p in points]
    return np.array(ours), np.array([float(model.logpdf(p, data)[0]) for p in points])


def assert_close(ours, ref, scale: np.ndarray | float, rtol: float) -> None:
    """|ours - ref| <= rtol (|ref| + scale) elementwise, naming the worst entry."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    excess = np.abs(ours - ref) - rtol * (np.abs(ref) + scale)
    worst = np.unravel_index(np.argmax(excess), np.shape(excess))
    assert np.all(excess <= 0), f"entry {worst}: {ours[worst]!r} vs {ref[worst]!r}"


def assert_derivatives_match(model: pyhf.pdf.Model, lk: Likelihood, point, data) -> None:
    """nll_derivatives: its value is pyhf's -logpdf, its gradient and Hessian JAX autodiff's."""
    pars, data_j = jnp.asarray(lk.to_internal(point)), jnp.asarray(data)
    value, grad, hess = (np.asarray(x) for x in _closed_form(lk, pars, data_j))
    auto_grad, auto_hess = (np.asarray(x) for x in _autodiff(lk, pars, data_j))
    assert_close(value, -float(model.logpdf(point, data)[0]), 0.0, rtol=1e-10)
    # entries that cancel to ~0 are judged on their parameters' curvature sqrt|H_ii|, which
    # large constraint curvatures of other parameters cannot loosen
    scale = np.sqrt(np.abs(np.diag(auto_hess)))
    assert_close(grad, auto_grad, scale, rtol=1e-9)
    assert_close(hess, auto_hess, np.outer(scale, scale), rtol=1e-9)


def random_case(seed: int, settings: dict):
    """(model, compiled likelihood, toy data, rng) of the seed's random workspace."""
    rng = np.random.default_rng(seed)
    workspace = pyhf.Workspace(random_workspace(rng))
    model = workspace.model(modifier_settings=settings)
    return model, compile_model(model), toy_data(model, workspace.data(model), rng), rng


@pytest.mark.parametrize("settings", SETTINGS, ids=SETTINGS_IDS)
@pytest.mark.parametrize("seed", range(N_RANDOM))
def test_random_workspace_logpdf_matches_pyhf(seed: int, settings: dict) -> None:
    model, lk, data, rng = random_case(seed, settings)
    points = [np.asarray(model.config.suggested_init())]
    points += random_points(model, rng, 4, alpha_max=2.0)
    ours, ref = values(model, lk, points, data)
    assert_close(ours, ref, 0.0, rtol=1e-10)


# one more workspace per settings combination: each costs a jax.hessian compilation (seconds)
@pytest.mark.parametrize(
    ("seed", "settings"), [(N_RANDOM + i, s) for i, s in enumerate(SETTINGS)], ids=SETTINGS_IDS
)
def test_random_workspace_derivatives_match_autodiff(seed: int, settings: dict) -> None:
    model, lk, data, rng = random_case(seed, settings)
    assert_derivatives_match(model, lk, derivative_point(model, lk, rng, alpha_max=2.0), data)


# id -> (workspace, patchset, modifier settings, verify the patchset digest), under SHARED
REAL = {
    "1Lbb": ("1Lbb/BkgOnly.json", "1Lbb/patchset.json", ANALYSIS, True),
    "1Lbb-defaults": ("1Lbb/BkgOnly.json", "1Lbb/patchset.json", MODELSOURCE_DEFAULTS, True),
    "sbottom": ("sbottom_RegionA/BkgOnly.json", "sbottom_RegionA/patchset.json", ANALYSIS, True),
    # this patchset's digest does not match its workspace on purpose
    "1Lbb-simplified": (
        "1Lbb/simplified/BkgOnly.json",
        "1Lbb/simplified/patchset.json",
        ANALYSIS,
        False,
    ),
    "small-2bin": ("small/2-bin_1-channel.json", None, MODELSOURCE_DEFAULTS, True),
    "small-patchset": (
        "small/patchset_example_BkgOnly.json",
        "small/patchset_example_patchset.json",
        ANALYSIS,
        True,
    ),
    "small-xmlimport": ("small/xmlimport_input.json", None, MODELSOURCE_DEFAULTS, True),
}


@pytest.fixture(scope="module")
def source(shared_workspaces: Path) -> Callable[[str], ModelSource]:
    """One ModelSource per case for the whole module: it caches the validated workspace."""

    @functools.cache
    def make(case: str) -> ModelSource:
        workspace, patchset, settings, verify = REAL[case]
        return ModelSource(
            shared_workspaces / workspace,
            patchset and shared_workspaces / patchset,
            settings,
            verify_digest=verify,
        )

    return make


def real_case(src: ModelSource, patch: str, rng: np.random.Generator):
    """(model, compiled likelihood, toy data, points) of one patch: the suggested init and two
    random points with |α| <= 1, as far as large variations leave the counts positive."""
    model, observed = src.model(patch)
    points = [np.asarray(model.config.suggested_init())]
    points += random_points(model, rng, 2, alpha_max=1.0)
    return model, compile_model(model), toy_data(model, observed, rng), points


@pytest.mark.parametrize("case", list(REAL))
def test_real_workspace_matches_pyhf_and_autodiff(case: str, source) -> None:
    """Values on the first and last patch, derivatives on the first (1Lbb's Hessian is slow)."""
    src = source(case)
    patches = src.patches()
    rng = np.random.default_rng(0)
    for patch in dict.fromkeys([patches[0], patches[-1]]):
        model, lk, data, points = real_case(src, patch, rng)
        ours, ref = values(model, lk, points, data)
        assert_close(ours, ref, 0.0, rtol=1e-10)
        if patch == patches[0]:
            assert_derivatives_match(model, lk, derivative_point(model, lk, rng, 1.0), data)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["1Lbb", "sbottom", "1Lbb-simplified"])
def test_every_real_patch_matches_pyhf(case: str, source) -> None:
    src = source(case)
    rng = np.random.default_rng(1)
    mismatched = {}
    for patch in src.patches():
        model, lk, data, points = real_case(src, patch, rng)
        ours, ref = values(model, lk, points, data)
        relative = float(np.max(np.abs(ours - ref) / np.abs(ref)))
        if not relative <= 1e-10:
            mismatched[patch] = relative
    first = dict(itertools.islice(mismatched.items(), 5))
    assert not mismatched, f"{len(mismatched)} patches differ (max relative), e.g. {first}"
