"""worker_cache: bounded LRU, one build per key under concurrency, honest statistics."""

import threading
import time

import pytest

import worker_cache
from worker_cache import ModelCache


def test_hits_misses_and_lru_eviction():
    cache = ModelCache(maxsize=2)
    builds = []

    def build(key):
        return lambda: builds.append(key) or key * 10

    assert cache.get(1, build(1)) == (10, False)
    assert cache.get(1, build(1)) == (10, True)
    cache.get(2, build(2))
    cache.get(1, build(1))  # 1 is now the most recent
    cache.get(3, build(3))  # evicts 2
    assert cache.get(1, build(1)) == (10, True)
    assert cache.get(2, build(2)) == (20, False)
    assert builds == [1, 2, 3, 2]
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["size"]) == (3, 4, 2)


def test_concurrent_requests_build_once():
    cache = ModelCache()
    calls = []

    def slow_build():
        calls.append(1)
        time.sleep(0.2)
        return "model"

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("k", slow_build)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(hit for _, hit in results) == [False] + [True] * 7


def test_a_failed_build_is_not_cached():
    cache = ModelCache()
    with pytest.raises(RuntimeError):
        cache.get("k", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert cache.get("k", lambda: 1) == (1, False)


def test_compile_seconds_counts_jax_compilation():
    import jax
    import jax.numpy as jnp

    before = worker_cache.compile_seconds()
    jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.2345)(jnp.arange(7.0)).block_until_ready()
    assert worker_cache.compile_seconds() > before
