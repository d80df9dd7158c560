"""Globus Compute: tasks to a remote endpoint through the SDK's ``Executor``.

``run_task`` is registered with the service once and then sent by reference (its id); the SDK's
default code strategy pickles it by import path, so endpoints need toyfarm installed. Each task
carries its compressed workspace, so the SDK's batches (up to 128 tasks per request) are sized
here to stay under the service's 10 MB per request, and a task whose result would exceed the
10 MiB result limit is refused before it is sent.

A failed batch submission stops the SDK's executor for good and cancels what it had not sent;
those tasks fail (the coordinator retries them) and the next ``submit`` starts a fresh SDK
executor, in the same task group, without registering the function again.

For resuming after the client dies: ``task_id(future)`` is the service's id of a task once the
service accepted it, and ``reattach(task_ids, task_group_id)`` gives futures for such tasks again.
"""

from __future__ import annotations

import json
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future, InvalidStateError
from typing import Any

from toyfarm.task import Task
from toyfarm.workspace import InputError

__all__ = ["GlobusComputeExecutor", "RemoteFuture", "batch_size_for", "pack_arguments",
           "remote_error", "result_bytes"]

REQUEST_LIMIT = 10_000_000  # bytes of one submission request the service accepts
RESULT_LIMIT = 10 * 1024 * 1024  # bytes of one serialized result an endpoint may return
SDK_BATCH = 128  # the SDK's largest batch
ENVELOPE = 64 * 1024  # a request's other fields (ids, the client's runtime details): a few KB


def pack_arguments(serializer: Any, args: tuple, kwargs: dict) -> str:
    """A task's arguments as the SDK sends them (``Batch.add``): serialized, then packed."""
    return serializer.pack_buffers([serializer.serialize(args), serializer.serialize(kwargs)])


def request_bytes(packed: str) -> int:
    """What one packed task adds to a submission request: a JSON string, escapes included."""
    return len(json.dumps(packed))


def batch_size_for(task_bytes: int) -> int:
    """Tasks per SDK batch so that a request of tasks this large stays under the limit."""
    return max(1, min(SDK_BATCH, (REQUEST_LIMIT - ENVELOPE) // max(task_bytes, 1)))


def result_bytes(task: Task, n_data: int = 0) -> int:
    """An upper estimate of the serialized result of ``task``: per toy a float64 statistic and
    a flag (and, saving toys, ``n_data`` float64s), pickled, then base64 (4/3, plus newlines)."""
    raw = task.ntoys * (9 + 8 * n_data * task.save_toys) + 2048 * (len(task.ranges) + 2)
    return raw * 4 // 3 * 77 // 76


def remote_error(error: BaseException) -> BaseException:
    """A remote toyfarm ``InputError`` arrives as traceback text; make it an ``InputError`` again,
    so the coordinator does not retry a task that cannot succeed. Other errors pass unchanged."""
    prefix = f"{InputError.__module__}.{InputError.__qualname__}: "
    text = getattr(error, "remote_data", None)
    for line in reversed(text.splitlines() if isinstance(text, str) else []):
        if line.startswith(prefix):
            converted = InputError(line[len(prefix):])
            converted.__cause__ = error
            return converted
    return error


class RemoteFuture(Future):
    """The future of a task run by an engine; ``remote`` is the engine's own future.

    ``unpack`` turns the engine's result into the task's; an engine's future that is cancelled
    (never sent) fails this one, since the coordinator can only retry failed tasks."""

    def __init__(self, remote: Future, unpack: Callable[[Any], Any] | None = None) -> None:
        super().__init__()
        self.remote = remote
        self._unpack = unpack
        remote.add_done_callback(self._settle)

    def _settle(self, remote: Future) -> None:
        try:
            if remote.cancelled():
                raise RuntimeError("the task was cancelled before it was sent: its executor "
                                   "stopped after a failed submission")
            value = remote.result()
            if self._unpack is not None:
                value = self._unpack(value)
        except Exception as err:
            self._set(self.set_exception, remote_error(err))
        else:
            self._set(self.set_result, value)

    @staticmethod
    def _set(setter: Callable[[Any], None], value: Any) -> None:
        try:
            setter(value)
        except InvalidStateError:  # cancelled by shutdown(cancel_futures=True)
            pass


class GlobusComputeExecutor(Executor):
    """Tasks to the endpoint ``endpoint`` through ``globus_compute_sdk.Executor``.

    ``client`` and ``sdk_executor`` (the SDK's ``Client`` and ``Executor`` by default) are
    parameters so that the logic here can be tested without the service."""

    def __init__(self, endpoint: str, *, client: Any = None,
                 sdk_executor: Callable[..., Any] | None = None) -> None:
        try:
            self.endpoint = str(uuid.UUID(str(endpoint)))
        except ValueError:
            raise InputError(f"the endpoint must be a UUID, got {endpoint!r}") from None
        if sdk_executor is None:
            from globus_compute_sdk import Client
            from globus_compute_sdk import Executor as SDKExecutor

            sdk_executor, client = SDKExecutor, client or Client()
        self._client = client  # one client (one login) for every SDK executor
        self._sdk_executor = sdk_executor
        self._lock = threading.Lock()
        self._function_ids: dict[Any, str] = {}
        self._task_bytes = 0
        self._n_data: dict[str, int] = {}
        self._sdk = self._new_sdk(None)
        self._sent: weakref.WeakSet[Future] = weakref.WeakSet()  # via the current SDK executor
        self.restarts = 0

    def _new_sdk(self, task_group_id: str | None) -> Any:
        sdk = self._sdk_executor(endpoint_id=self.endpoint, client=self._client,
                                 task_group_id=task_group_id)
        for fn, function_id in self._function_ids.items():
            sdk.register_function(fn, function_id=function_id)  # known id: no request
        return sdk

    def _restart(self) -> Any:
        # what the stopped executor queued but never sent is never sent: fail it
        for remote in list(self._sent):
            if getattr(remote, "task_id", None) is None and not remote.done():
                remote.cancel()
        self._sent = weakref.WeakSet()
        self._sdk = self._new_sdk(self._sdk.task_group_id)
        self.restarts += 1
        return self._sdk

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future:
        with self._lock:
            sdk = self._sdk
            size = request_bytes(pack_arguments(sdk.serializer, args, kwargs))
            if size > REQUEST_LIMIT - ENVELOPE:
                raise InputError(f"a task of {size / 1e6:.1f} MB does not fit in a Globus "
                                 f"Compute request ({REQUEST_LIMIT / 1e6:.0f} MB)")
            for task in args:
                if isinstance(task, Task):
                    self._check_result(task)
            self._task_bytes = max(self._task_bytes, size)
            try:
                try:
                    remote = self._send(sdk, fn, args, kwargs)
                except RuntimeError:  # "is shutdown": a failed batch submission stopped it
                    remote = self._send(self._restart(), fn, args, kwargs)
            except Exception as err:  # e.g. registration refused: fail the task; it is retried
                remote = Future()
                remote.set_exception(err)
        return RemoteFuture(remote)

    def _send(self, sdk: Any, fn: Any, args: tuple, kwargs: dict) -> Future:
        if fn not in self._function_ids:
            self._function_ids[fn] = sdk.register_function(fn)
        sdk.batch_size = batch_size_for(self._task_bytes)  # read as the SDK starts a batch
        remote = sdk.submit(fn, *args, **kwargs)
        self._sent.add(remote)
        return remote

    def _check_result(self, task: Task) -> None:
        n_data = 0
        if task.save_toys:
            if task.model.digest not in self._n_data:
                self._n_data[task.model.digest] = len(task.model.build()[1])
            n_data = self._n_data[task.model.digest]
        size = result_bytes(task, n_data)
        if size > RESULT_LIMIT:
            fitting = task.ntoys * RESULT_LIMIT // size
            raise InputError(f"a task of {task.ntoys} toys would return about "
                             f"{size / 2**20:.1f} MiB, over Globus Compute's 10 MiB result "
                             f"limit: use --batch-size {fitting} or less")

    @property
    def task_group_id(self) -> str | None:
        """The service's task group of this executor's tasks (set once a batch is accepted)."""
        group = self._sdk.task_group_id
        return None if group is None else str(group)

    @staticmethod
    def task_id(future: Future) -> str | None:
        """The service's id of the task behind ``future``; None until the service accepted it."""
        task_id = getattr(getattr(future, "remote", None), "task_id", None)
        return None if task_id is None else str(task_id)

    def reattach(self, task_ids: Iterable[str],
                 task_group_id: str | None = None) -> dict[str, Future]:
        """Futures for tasks submitted earlier (by this process or an earlier one): finished
        ones resolve at once, running ones when their results arrive. A task the service does
        not know any more gets a failed future, so that the coordinator submits it again."""
        with self._lock:
            known = {str(f.task_id): f for f in self._sdk.reload_tasks(task_group_id)}
        futures = {}
        for task_id in map(str, task_ids):
            remote = known.get(task_id)
            if remote is None:
                remote = Future()
                remote.set_exception(LookupError(f"Globus Compute knows no task {task_id}"))
            futures[task_id] = RemoteFuture(remote)
        return futures

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._sdk.shutdown(wait=wait, cancel_futures=cancel_futures)
