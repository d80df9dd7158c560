"""Pseudo-experiments: PRNG keys per toy, and one toy from one key.

``toy_keys`` is the only place in toyfarm that derives randomness. A toy's key depends on
(seed, hypothesis name, μ, toy hypothesis, toy index) and nothing else, so toy ``t`` is the same
pseudo-dataset however the work is split into batches, tasks or executors.
"""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from toyfarm.likelihood.compile import Likelihood
from toyfarm.likelihood.logpdf import expected_rates

__all__ = ["toy_keys", "sample_toy", "sample_toys"]


def _stream_words(patch: str, mu: float, hypothesis: str) -> list[int]:
    # float.hex() is exact, so 1.0 and 1.0000000000000002 are different streams
    tag = f"{patch}\x00{float(mu).hex()}\x00{hypothesis}".encode()
    digest = hashlib.sha256(tag).digest()
    return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]


def toy_keys(seed: int, patch: str, mu: float, hypothesis: str, toys: np.ndarray) -> jax.Array:
    """Keys of toys ``toys`` (integer indices) of one (seed, patch, μ, hypothesis) stream."""
    key = jax.random.key(int(seed), impl="threefry2x32")
    for word in _stream_words(patch, mu, hypothesis):
        key = jax.random.fold_in(key, word)
    return jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.asarray(toys, dtype=jnp.uint32))


def sample_toy(lk: Likelihood, key: jax.Array, pars) -> jax.Array:
    """One pseudo-dataset at ``pars`` (internal order), in pyhf's data order: main bins, auxdata.

    Main counts are Poisson; auxdata follow their constraint pdfs (Gaussian around the parameter
    with the constraint's sigma, or Poisson with rate parameter * tau), as pyhf's ``Model.sample``.
    """
    k_main, k_gauss, k_pois = jax.random.split(key, 3)
    rates = expected_rates(lk, pars)
    main = jax.random.poisson(k_main, rates, dtype=jnp.int64).astype(pars.dtype)
    theta = pars[lk.aux_param]
    gauss = theta + lk.aux_scale * jax.random.normal(k_gauss, theta.shape, pars.dtype)
    pois = jax.random.poisson(k_pois, theta * lk.aux_scale, dtype=jnp.int64).astype(pars.dtype)
    return jnp.concatenate([main, jnp.where(lk.aux_poisson, pois, gauss)])


#: a batch of toys, one per key, all at ``pars``
sample_toys = jax.jit(jax.vmap(sample_toy, (None, 0, None)))
