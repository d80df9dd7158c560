"""Executors: adapters from an engine to ``concurrent.futures.Executor``; the coordinator only
calls ``submit`` on them."""

from __future__ import annotations

from concurrent.futures import Executor

from toyfarm.workspace import InputError

__all__ = ["EXECUTORS", "make_executor"]

#: engine names the CLI and configs accept (``funcx`` is another name for ``globus-compute``)
EXECUTORS = ("local",)


def make_executor(kind: str, workers: int | None = None) -> Executor:
    """A started executor of the engine ``kind``; the caller shuts it down."""
    if kind == "local":
        from toyfarm.executors.local import LocalExecutor

        return LocalExecutor(workers)
    raise InputError(f"unknown executor {kind!r} (known: {', '.join(EXECUTORS)})")
