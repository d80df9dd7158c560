"""The Globus Compute worker path, offline: an endpoint's own ``GlobusComputeEngine``
(Parsl high-throughput workers) started here, fed tasks exactly as the service delivers them.

A task goes in as the service sends it to an endpoint: a messagepack ``Task`` whose buffer is the
function as registered by the SDK (its code strategy) followed by the arguments as the SDK packs
them; it comes back as the endpoint publishes it: a messagepack ``Result`` carrying the result in
the SDK's data strategy, or the remote traceback. So this runs the same serializers, the same
``execute_task`` and the same warm workers as a real endpoint, without the service.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile
import threading
import uuid
from concurrent.futures import Executor, Future
from concurrent.futures import wait as wait_for
from typing import Any

from toyfarm.executors.globus import RemoteFuture, pack_arguments
from toyfarm.executors.parsl import HEARTBEAT_SECONDS, worker_init

__all__ = ["GCEngineExecutor"]

_PYTHON_EXEC = "globus-compute-endpoint python-exec"


class GCEngineExecutor(Executor):
    """One local block of ``workers`` GlobusComputeEngine workers, kept for the whole run.

    ``engine`` is the started engine, ``run_dir`` its folder (logs, keys; removed on shutdown).
    A worker that dies is restarted by its manager and its task fails with ``WorkerLost`` (the
    coordinator retries it)."""

    def __init__(self, workers: int | None = None) -> None:
        from globus_compute_endpoint.engines import GlobusComputeEngine
        from globus_compute_sdk.serialize import ComputeSerializer
        from parsl.providers import LocalProvider

        n = workers or os.cpu_count() or 1
        self.run_dir = tempfile.mkdtemp(prefix="toyfarm-gc-engine-")
        self.engine = GlobusComputeEngine(
            address="127.0.0.1",
            max_workers_per_node=n,
            heartbeat_period=HEARTBEAT_SECONDS,
            provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1,
                                   worker_init=worker_init(n)),
            job_status_kwargs={"strategy": "none"},
        )
        htex = self.engine.executor
        # `globus-compute-endpoint python-exec M` runs `python -m M`: do that with this
        # interpreter directly, so the engine starts whether or not the venv is on PATH
        htex.interchange_launch_cmd = [sys.executable, "-m", htex.interchange_launch_cmd[-1]]
        htex.launch_cmd = htex.launch_cmd.replace(_PYTHON_EXEC,
                                                  f"{shlex.quote(sys.executable)} -m", 1)
        self.engine.start(endpoint_id=uuid.uuid4(), run_dir=self.run_dir)
        self.serializer = ComputeSerializer()
        self._functions: dict[Any, tuple[uuid.UUID, str]] = {}  # fn -> (id, code) "registered"
        self._lock = threading.Lock()
        self._pending: set[Future] = set()

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future:
        from globus_compute_common import messagepack
        from globus_compute_common.messagepack.message_types import Task
        from globus_compute_endpoint.engines.base import GCFuture

        with self._lock:
            if fn not in self._functions:  # what Client.register_function uploads
                code = self.serializer.pack_buffers([self.serializer.serialize(fn)])
                self._functions[fn] = (uuid.uuid4(), code)
            function_id, code = self._functions[fn]
        task_id = uuid.uuid4()
        # the service joins the registered code and the submitted arguments into one buffer
        buffer = code + pack_arguments(self.serializer, args, kwargs)
        body = messagepack.pack(Task(task_id=task_id, task_buffer=buffer))
        remote = GCFuture(task_id, function_id=function_id)
        future = RemoteFuture(remote, self._unpack)
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._done)
        self.engine.submit(remote, body, resource_specification={}, result_serializers=[])
        return future

    def _unpack(self, packed: bytes) -> Any:
        """A packed ``Result`` -> the task's value, or its remote error raised as the SDK does."""
        from globus_compute_common import messagepack
        from globus_compute_sdk.errors import TaskExecutionFailed

        result = messagepack.unpack(packed)
        if result.is_error:
            raise TaskExecutionFailed(result.data, task_details=result.details)
        return self.serializer.deserialize(result.data)

    def _done(self, future: Future) -> None:
        with self._lock:
            self._pending.discard(future)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            pending = list(self._pending)
        if cancel_futures:
            for future in pending:
                future.cancel()
        elif wait:
            wait_for(pending)
        self.engine.shutdown()
        shutil.rmtree(self.run_dir, ignore_errors=True)
