"""Parsl: ``ParslPoolExecutor`` (``parsl.concurrent``) over a Parsl config.

By default a ``HighThroughputExecutor`` on this machine: one block of ``workers`` worker
processes, kept for the whole run (the pool restarts a worker that dies and fails its task with
``WorkerLost``; the coordinator retries it). A config file (a Python file that defines
``config``, a ``parsl.config.Config``) runs anywhere Parsl reaches instead: Slurm, PBS, Kubernetes.
"""

from __future__ import annotations

import os
import runpy
import shlex
import shutil
import sys
import tempfile
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any

from toyfarm.executors import worker_environment
from toyfarm.workspace import InputError

__all__ = ["ParslExecutor", "load_parsl_config", "local_config", "worker_init"]

#: how often (s) managers check on their workers; a killed worker is noticed within this
HEARTBEAT_SECONDS = 5


def worker_init(workers: int) -> str:
    """Shell lines run before the worker pool starts: the local executor's worker environment."""
    return "; ".join(f"export {k}={shlex.quote(v)}" for k, v in worker_environment(workers).items())


def local_config(workers: int, run_dir: str) -> Any:
    """One local block of ``workers`` HighThroughputExecutor workers, never scaled in."""
    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor
    from parsl.executors.high_throughput.executor import DEFAULT_LAUNCH_CMD
    from parsl.providers import LocalProvider

    module = "parsl.executors.high_throughput"
    pool = f"{shlex.quote(sys.executable)} -m {module}.process_worker_pool"
    htex = HighThroughputExecutor(
        label="toyfarm",
        address="127.0.0.1",
        max_workers_per_node=workers,
        heartbeat_period=HEARTBEAT_SECONDS,
        # this interpreter, not whatever `process_worker_pool.py` is first on PATH
        interchange_launch_cmd=[sys.executable, "-m", f"{module}.interchange"],
        launch_cmd=DEFAULT_LAUNCH_CMD.replace("process_worker_pool.py", pool, 1),
        provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1,
                               worker_init=worker_init(workers)),
    )
    return Config(executors=[htex], run_dir=run_dir, strategy="none")


def load_parsl_config(path: Path) -> Any:
    """The ``config`` a Parsl config file defines."""
    from parsl.config import Config

    try:
        namespace = runpy.run_path(str(path))
    except OSError as err:
        raise InputError(f"cannot read the Parsl config {path}: {err.strerror or err}") from None
    config = namespace.get("config")
    if not isinstance(config, Config):
        raise InputError(f"the Parsl config {path} must define `config`, a parsl.config.Config")
    return config


class ParslExecutor(Executor):
    """Tasks as Parsl app futures (``concurrent.futures`` ones)."""

    def __init__(self, workers: int | None = None, config_file: Path | None = None) -> None:
        from parsl.concurrent import ParslPoolExecutor

        self._run_dir = None
        if config_file is not None:
            config = load_parsl_config(config_file)
        else:
            # Parsl's logs and keys go to a folder of their own, not runinfo/ in the cwd
            self._run_dir = tempfile.mkdtemp(prefix="toyfarm-parsl-")
            config = local_config(workers or os.cpu_count() or 1, self._run_dir)
        self._pool = ParslPoolExecutor(config=config)

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future:
        return self._pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        # Parsl cannot cancel tasks: with cancel_futures, stop without waiting for them
        self._pool.shutdown(wait=wait and not cancel_futures)
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
