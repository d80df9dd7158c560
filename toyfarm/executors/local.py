"""The embedded default engine: a pool of spawned worker processes on this machine.

Workers are started once per run and each keeps its ``worker_cache`` warm across tasks. They are
spawned, never forked (a forked JAX process can deadlock), and with one worker per core each is
pinned to its own core. A worker that dies (killed, out of memory) breaks a
``ProcessPoolExecutor`` for good; this executor then starts a fresh pool on the next ``submit``,
so the coordinator's retry of the lost tasks simply goes on.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import Any

from toyfarm.executors import pin_to_core, worker_environment

__all__ = ["LocalExecutor"]


def _init_worker(env: dict[str, str], started: Any, pin: bool) -> None:
    # Before JAX is imported in this process (see ``worker_environment``).
    os.environ.update(env)
    with started.get_lock():
        index, started.value = started.value, started.value + 1
    if pin:
        pin_to_core(index)


class LocalExecutor(Executor):
    """``workers`` spawned processes; ``submit`` restarts the pool once it is broken."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or os.cpu_count() or 1
        self._lock = threading.Lock()
        self._pool = self._new_pool()
        self.restarts = 0

    def _new_pool(self) -> ProcessPoolExecutor:
        context = multiprocessing.get_context("spawn")
        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=context,
            initializer=_init_worker,
            initargs=(worker_environment(self.workers), context.Value("i", 0),
                      self.workers >= (os.cpu_count() or 1)),
        )

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future:
        with self._lock:
            try:
                return self._pool.submit(fn, *args, **kwargs)
            except RuntimeError:  # BrokenProcessPool (a RuntimeError): a worker died
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()
                self.restarts += 1
                return self._pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)
