"""One hypothesis test with toys: generation fits on the observed data, then batches of toys.

Toys are thrown LHC-style: nuisance parameters at their conditional MLE on the observed data at
the hypothesis' μ (s+b: the tested μ; b-only: μ = 0, or 1 for q0 as pyhf does).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from toyfarm.likelihood.compile import Likelihood
from toyfarm.likelihood.sample import toy_keys
from toyfarm.likelihood.teststat import compute_test_statistic, conditional_fit, toy_test_statistics

__all__ = ["HypothesisToys", "generation_pars", "hypothesis_test_statistics"]


class HypothesisToys(NamedTuple):
    q_obs: float
    toys: dict[str, tuple[np.ndarray, np.ndarray]]  # "sb"/"b" -> (q, converged)


def generation_pars(lk: Likelihood, data, mu: float):
    """Conditional MLE at ``mu`` on the observed data (internal parameter order)."""
    fit = conditional_fit(lk, jnp.asarray(data)[None], mu, jnp.asarray(lk.init)[None])
    return fit.pars[0]


def hypothesis_test_statistics(lk: Likelihood, data, test_stat: str, mu: float, seed: int,
                               patch: str, toys: np.ndarray, batch: int = 256) -> HypothesisToys:
    """Observed test statistic and the toys ``toys`` of both hypotheses of one (patch, μ)."""
    data = jnp.asarray(data)
    gen_sb = generation_pars(lk, data, mu)
    observed = compute_test_statistic(lk, test_stat, data[None], mu, gen_sb[None])
    mu_b = 1.0 if test_stat == "q0" else 0.0
    results = {}
    for name, gen in (("sb", gen_sb), ("b", generation_pars(lk, data, mu_b))):
        qs, oks = [], []
        for first in range(0, len(toys), batch):
            keys = toy_keys(seed, patch, mu, name, toys[first : first + batch])
            q, ok, _ = toy_test_statistics(lk, test_stat, mu, keys, gen)
            qs.append(np.asarray(q))
            oks.append(np.asarray(ok))
        results[name] = (np.concatenate(qs), np.concatenate(oks))
    return HypothesisToys(float(observed.value[0]), results)
