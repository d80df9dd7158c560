"""The task a worker runs: a batch of toy hypotests of one model, self-contained.

``run_task`` is importable by module path (``toyfarm.task.run_task``), so Globus Compute, Dask,
Parsl or a local process pool can send it by reference. Everything it needs travels in the
``Task``; a worker that already holds the model (``worker_cache``) neither re-parses nor
recompiles it. It returns plain arrays and the worker's statistics; it never touches the store.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import worker_cache
from toyfarm.executors import pin_parsl_worker
from toyfarm.plan import ToyRange
from toyfarm.workspace import InputError, ModelRef

__all__ = ["Task", "RangeResult", "TaskResult", "run_task"]


@dataclass(frozen=True)
class Task:
    task_id: str
    model: ModelRef
    test_stat: str
    seed: int
    block: int
    ranges: tuple[ToyRange, ...]
    observed: tuple[float, ...] = ()
    save_toys: bool = False
    compilation_cache: str | None = None  # a folder for JAX's on-disk compilation cache

    @property
    def patch(self) -> str:
        return self.model.name

    @property
    def ntoys(self) -> int:
        return sum(r.size for r in self.ranges)


@dataclass(frozen=True)
class RangeResult:
    range: ToyRange
    q: np.ndarray
    converged: np.ndarray
    toys: np.ndarray | None = None


@dataclass(frozen=True)
class TaskResult:
    task_id: str
    ranges: tuple[RangeResult, ...]
    observed: dict[float, tuple[float, bool]]  # μ -> (q_obs, converged)
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Model:
    """What a worker keeps per model: the compiled likelihood, observed data, generation points."""

    lk: Any
    data: Any
    poi_bounds: tuple[float, float]
    generation: dict[float, Any] = field(default_factory=dict)

    def generation_pars(self, mu: float):
        from toyfarm.likelihood.run import generation_pars

        if mu not in self.generation:
            self.generation[mu] = generation_pars(self.lk, self.data, mu)
        return self.generation[mu]


def _build(model: ModelRef) -> _Model:
    import jax.numpy as jnp

    from toyfarm.likelihood import compile_model

    pyhf_model, data = model.build()
    lk = compile_model(pyhf_model)
    bounds = (float(lk.lower[lk.poi]), float(lk.upper[lk.poi]))
    return _Model(lk, jnp.asarray(data), bounds)


def run_task(task: Task) -> TaskResult:
    """Throw and fit the task's toys and its observed statistics; results and worker stats."""
    pin_parsl_worker()  # before JAX starts its threads: they inherit the core
    from toyfarm.likelihood.run import block_statistics, generation_mu, observed_statistic

    start = time.perf_counter()
    if task.compilation_cache:
        worker_cache.enable_disk_cache(task.compilation_cache)
    compiled_before = worker_cache.compile_seconds()
    key = (task.model.digest, task.test_stat, "float64", task.block)
    model, hit = worker_cache.cache.get(key, lambda: _build(task.model))
    build_seconds = 0.0 if hit else time.perf_counter() - start
    low, high = model.poi_bounds
    for mu in {r.mu for r in task.ranges} | set(task.observed):
        if not low <= mu <= high:
            raise InputError(
                f"mu = {mu} is outside the bounds [{low}, {high}] of the POI of {task.patch!r}"
            )

    results = []
    for r in task.ranges:
        mu_gen = generation_mu(task.test_stat, r.hypothesis, r.mu)
        gen = model.generation_pars(mu_gen)
        first = (r.start // task.block) * task.block
        if (r.stop - 1) // task.block != first // task.block:
            raise ValueError(f"toy range {r} crosses a block boundary")
        block = block_statistics(model.lk, task.test_stat, r.mu, gen, task.seed, task.patch,
                                 r.hypothesis, first, task.block, task.save_toys)
        part = slice(r.start - first, r.stop - first)
        toys = None if block.toys is None else block.toys[part]
        results.append(RangeResult(r, block.q[part], block.converged[part], toys))

    observed = {}
    for mu in task.observed:
        gen = model.generation_pars(generation_mu(task.test_stat, "sb", mu))
        observed[mu] = observed_statistic(model.lk, model.data, task.test_stat, mu, gen)

    total = time.perf_counter() - start
    compile_seconds = build_seconds + worker_cache.compile_seconds() - compiled_before
    stats = {
        "compiles": int(not hit),
        "cache_hits": int(hit),
        "compile_seconds": compile_seconds,
        "fit_seconds": max(total - compile_seconds, 0.0),
        "seconds": total,
        "worker": f"{socket.gethostname()}:{os.getpid()}",
        "toys": task.ntoys,
    }
    return TaskResult(task.task_id, tuple(results), observed, stats)
