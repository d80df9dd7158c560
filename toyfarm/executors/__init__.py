"""Executors: adapters from an engine to ``concurrent.futures.Executor``; the coordinator only
calls ``submit`` on them (and ``shutdown`` when the run ends)."""

from __future__ import annotations

import functools
import importlib.util
import os
from concurrent.futures import Executor
from pathlib import Path

from toyfarm.workspace import InputError

__all__ = ["EXECUTORS", "make_executor", "pin_parsl_worker", "pin_to_core", "worker_environment"]

#: set in the workers' environment where they are one per core and should be pinned
PIN_VARIABLE = "TOYFARM_PIN_CORES"

#: engine names the CLI and configs accept (``funcx`` is another name for ``globus-compute``)
EXECUTORS = ("local", "dask", "parsl", "globus-compute", "gc-engine")

# the module each engine needs, and the extra that installs it
_NEEDS = {"dask": ("distributed", "dask"), "parsl": ("parsl", "parsl"),
          "globus-compute": ("globus_compute_sdk", "globus"),
          "gc-engine": ("globus_compute_endpoint", "gc-engine")}


def make_executor(kind: str, workers: int | None = None, *, scheduler: str | None = None,
                  parsl_config: str | os.PathLike[str] | None = None,
                  endpoint: str | None = None) -> Executor:
    """A started executor of the engine ``kind``; the caller shuts it down.

    ``workers`` sizes the engines that start their own workers on this machine (local, dask
    without ``scheduler``, parsl without ``parsl_config``, gc-engine); ``scheduler`` is a Dask
    scheduler address, ``parsl_config`` a Python file defining a Parsl ``config``, ``endpoint``
    a Globus Compute endpoint UUID.
    """
    kind = "globus-compute" if kind == "funcx" else kind
    if kind not in EXECUTORS:
        raise InputError(f"unknown executor {kind!r} (known: {', '.join(EXECUTORS)}, funcx)")
    if kind in _NEEDS:
        module, extra = _NEEDS[kind]
        if importlib.util.find_spec(module) is None:
            raise InputError(f"the {kind} executor needs {module.replace('_', '-')}: "
                             f"pip install 'toyfarm[{extra}]'")
    if kind == "local":
        from toyfarm.executors.local import LocalExecutor

        return LocalExecutor(workers)
    if kind == "dask":
        from toyfarm.executors.dask import DaskExecutor

        return DaskExecutor(workers, scheduler)
    if kind == "parsl":
        from toyfarm.executors.parsl import ParslExecutor

        return ParslExecutor(workers, Path(parsl_config) if parsl_config else None)
    if kind == "globus-compute":
        from toyfarm.executors.globus import GlobusComputeExecutor

        if not endpoint:
            raise InputError("the globus-compute executor needs an endpoint: --endpoint UUID "
                             "or [executor] endpoint")
        return GlobusComputeExecutor(endpoint)
    from toyfarm.executors.gc_engine import GCEngineExecutor

    return GCEngineExecutor(workers)


def worker_environment(workers: int) -> dict[str, str]:
    """Environment for ``workers`` worker processes sharing this machine's cores, as the local
    executor's workers get it: one XLA CPU thread pool per worker, sized so that the workers
    together use the cores without oversubscribing them. The same flags also give the same
    keys in JAX's on-disk compilation cache, so all local engines share its programs."""
    cores = os.cpu_count() or 1
    threads = max(1, cores // workers)
    flags = os.environ.get("XLA_FLAGS", "")
    env = {name: os.environ.get(name, str(threads))
           for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    if threads == 1 and "xla_cpu_multi_thread_eigen" not in flags:
        env["XLA_FLAGS"] = (
            f"{flags} --xla_cpu_multi_thread_eigen=false"
        ).strip()
    if workers >= cores:
        env[PIN_VARIABLE] = "1"
    return env


def pin_to_core(index: int) -> None:
    """Make this worker one of one-per-core: pinned to core ``index`` (modulo the cores it may
    use) where the OS allows it, with single-threaded BLAS.

    Two single-threaded workers left to the scheduler ran 1Lbb at 26 toys/s together here, pinned
    at 115. BLAS is limited here, not only through OMP_NUM_THREADS: a spawned worker has loaded
    scipy's OpenBLAS (which jaxlib's LAPACK calls use) before its initializer runs, and a
    multi-threaded BLAS pinned to one core spins against itself.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    if hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        core = {cores[index % len(cores)]}
        # affinity is per thread on Linux: every thread of the process, not only the caller (a
        # Dask worker pins from its event loop, its tasks run in another thread); threads
        # started later inherit it from their creator
        threads = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]
        for thread in threads:
            try:
                os.sched_setaffinity(int(thread), core)
            except OSError:  # a thread that ended meanwhile
                pass


@functools.cache
def pin_parsl_worker() -> bool:
    """Pin this process to its core if it is a Parsl worker (the parsl and gc-engine engines)
    started one per core (``worker_environment``); once per process. Whether it pinned."""
    rank = os.environ.get("PARSL_WORKER_RANK")
    if os.environ.get(PIN_VARIABLE) != "1" or rank is None:
        return False
    pin_to_core(int(rank))
    return True
