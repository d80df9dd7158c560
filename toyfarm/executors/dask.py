"""Dask: a ``distributed`` cluster through ``Client.get_executor``.

Without a scheduler address, a ``LocalCluster`` of ``workers`` worker processes (one thread each,
spawned by Dask's nannies, which restart a worker that dies) is started here and stopped on
``shutdown``; with one, tasks go to that cluster, which outlives the run. Each worker process keeps
its ``worker_cache`` warm across tasks.
"""

from __future__ import annotations

import os
from concurrent.futures import Executor, Future
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from toyfarm.executors import PIN_VARIABLE, pin_to_core, worker_environment
from toyfarm.workspace import InputError

__all__ = ["DaskExecutor", "PinToCore"]


class PinToCore(WorkerPlugin):
    """Pins each worker of a ``LocalCluster`` (named 0, 1, ...) to its own core as it starts,
    a restarted one too: unpinned single-threaded workers share cores badly (see
    ``pin_to_core``)."""

    def setup(self, worker) -> None:
        pin_to_core(int(worker.name))


class DaskExecutor(Executor):
    """Tasks as Dask futures, seen as ``concurrent.futures`` ones."""

    def __init__(self, workers: int | None = None, scheduler: str | None = None) -> None:
        from distributed import Client, LocalCluster

        self.cluster = None
        if scheduler:
            try:
                self.client = Client(scheduler, timeout="30s")
            except OSError as err:
                raise InputError(f"cannot reach the Dask scheduler at {scheduler}: {err}") from None
        else:
            n = workers or os.cpu_count() or 1
            env = worker_environment(n)
            self.cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                        dashboard_address=None, env=env)
            self.client = Client(self.cluster)
            if PIN_VARIABLE in env:  # one worker per core, each on its own
                self.client.register_plugin(PinToCore())
        # pure=False: a retried task has the same arguments and must run again, not be
        # answered from the failed attempt's key
        self._executor = self.client.get_executor(pure=False)

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future:
        return self._executor.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._executor.shutdown(wait=wait and not cancel_futures)
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()
