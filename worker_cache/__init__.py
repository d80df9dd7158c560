"""A worker-side, process-global cache of compiled models, and the JAX compilation cost it saves.

Function-as-a-service workers (Globus Compute, Parsl, Dask) run many tasks in one long-lived
process. Whatever a task builds for a model (parsed spec, dense arrays, compiled XLA programs)
stays here for the next task of the same model, so only the first task on a worker pays for it.

This package knows nothing about toyfarm or any coordinator: keys are opaque hashable tuples and
values are whatever the builder returns. XLA programs themselves live in JAX's own per-process
caches (keyed by array shapes, so structurally identical models share them); ``compile_seconds``
measures what JAX spent tracing and compiling, and ``enable_disk_cache`` lets a fresh process
reuse compilations from an earlier one.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

__all__ = ["ModelCache", "cache", "compile_seconds", "enable_disk_cache", "DEFAULT_SIZE"]

T = TypeVar("T")

#: models kept per worker (override with TOYFARM_CACHE_SIZE); a 1Lbb model is a few MB
DEFAULT_SIZE = int(os.environ.get("TOYFARM_CACHE_SIZE", "32"))

# JAX's monitoring events for the three stages of turning a traced function into a program
_COMPILE_EVENTS = frozenset(
    {
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    }
)


class ModelCache:
    """A bounded, thread-safe LRU map from keys to built values, with hit/miss statistics.

    A value is built at most once per key while it stays cached, even when several threads ask
    for it at once (the others wait for the first builder).
    """

    def __init__(self, maxsize: int = DEFAULT_SIZE) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        self._values: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[Hashable, threading.Lock] = {}
        self.hits = 0
        self.misses = 0
        self.build_seconds = 0.0

    def get(self, key: Hashable, build: Callable[[], T]) -> tuple[T, bool]:
        """The value of ``key``, built by ``build()`` on a miss; returns (value, was_hit)."""
        while True:
            with self._lock:
                if key in self._values:
                    self._values.move_to_end(key)
                    self.hits += 1
                    return self._values[key], True
                gate = self._building.get(key)
                if gate is None:
                    gate = self._building[key] = threading.Lock()
                    gate.acquire()
                    break
            with gate:  # another thread builds this key: wait, then look again
                pass
        try:
            start = time.perf_counter()
            value = build()
            seconds = time.perf_counter() - start
            with self._lock:
                self._values[key] = value
                self.misses += 1
                self.build_seconds += seconds
                while len(self._values) > self.maxsize:
                    self._values.popitem(last=False)
            return value, False
        finally:
            with self._lock:
                del self._building[key]
            gate.release()

    def stats(self) -> dict[str, float | int]:
        with self._lock:
            return {
                "hits": self.hits,
                "misses": self.misses,
                "size": len(self._values),
                "build_seconds": self.build_seconds,
            }

    def clear(self) -> None:
        with self._lock:
            self._values.clear()


#: the process-global cache every task on this worker shares
cache = ModelCache()

_compile_lock = threading.Lock()
_compile_total = [0.0]
_listening = [False]


def _on_duration(event: str, duration: float, **_: Any) -> None:
    if event in _COMPILE_EVENTS:
        with _compile_lock:
            _compile_total[0] += duration


def compile_seconds() -> float:
    """Seconds JAX has spent tracing and compiling in this process since the first call.

    Take the difference of two readings around a task. Tasks running concurrently in threads of
    one process share the counter.
    """
    import jax.monitoring

    with _compile_lock:
        if not _listening[0]:
            jax.monitoring.register_event_duration_secs_listener(_on_duration)
            _listening[0] = True
        return _compile_total[0]


def enable_disk_cache(path: str | os.PathLike[str]) -> None:
    """Keep XLA compilations in ``path`` so a fresh worker process reuses earlier ones."""
    import jax

    path = os.path.expanduser(os.fspath(path))
    if jax.config.jax_compilation_cache_dir == path:
        return
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
