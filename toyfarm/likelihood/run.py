"""Hypothesis tests with toys: where toys are thrown, the observed statistic, one block of toys.

Toys are thrown LHC-style: nuisance parameters at their conditional MLE on the observed data at
the hypothesis' μ (s+b: the tested μ; b-only: μ = 0, or μ = 1 for q0, as pyhf does).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from toyfarm.likelihood.compile import Likelihood
from toyfarm.likelihood.sample import toy_keys
from toyfarm.likelihood.teststat import compute_test_statistic, conditional_fit, toy_test_statistics

__all__ = [
    "GENERATION",
    "BlockResult",
    "generation_mu",
    "generation_pars",
    "observed_statistic",
    "block_statistics",
]

#: how toys are thrown, recorded in stores: stores of different modes never combine
GENERATION = "lhc-conditional-mle"


class BlockResult(NamedTuple):
    q: np.ndarray  # [block]
    converged: np.ndarray  # [block] bool
    toys: np.ndarray | None  # [block, n_data] when kept


def generation_mu(test_stat: str, hypothesis: str, mu: float) -> float:
    """The μ toys of ``hypothesis`` ("sb" or "b") are thrown at, for a test of ``mu``."""
    if hypothesis == "sb":
        return float(mu)
    return 1.0 if test_stat == "q0" else 0.0


def generation_pars(lk: Likelihood, data, mu: float):
    """Conditional MLE at ``mu`` on the observed data (internal parameter order)."""
    fit = conditional_fit(lk, jnp.asarray(data)[None], mu, jnp.asarray(lk.init)[None])
    return fit.pars[0]


def observed_statistic(
    lk: Likelihood, data, test_stat: str, mu: float, gen_sb
) -> tuple[float, bool]:
    """The observed test statistic at ``mu`` (fits start at the s+b generation point)."""
    stat = compute_test_statistic(lk, test_stat, jnp.asarray(data)[None], mu, gen_sb[None])
    return float(stat.value[0]), bool(stat.converged[0])


def block_statistics(lk: Likelihood, test_stat: str, mu: float, gen_pars, seed: int, patch: str,
                     hypothesis: str, first: int, block: int, keep_toys: bool) -> BlockResult:
    """Toys ``first .. first + block - 1`` of one (seed, patch, μ, hypothesis) stream, fitted."""
    keys = toy_keys(seed, patch, mu, hypothesis, np.arange(first, first + block))
    q, ok, toys = toy_test_statistics(lk, test_stat, mu, keys, gen_pars, keep_toys)
    return BlockResult(np.asarray(q), np.asarray(ok), None if toys is None else np.asarray(toys))
