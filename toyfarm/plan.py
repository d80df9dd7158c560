"""Planning: which toys go into which task. Pure functions, no I/O.

Toys are fitted in *blocks*: block ``k`` of a (patch, μ, hypothesis) stream is toys
``[k * block, (k + 1) * block)``, always fitted together in one vectorised call. A toy's result
therefore depends only on its block, never on how blocks are grouped into tasks, workers or
executors: that is what makes runs with different batch sizes bit-identical. A task is a list of
toy ranges of one patch (any μ and hypothesis) that covers at most ``batch_size`` toys' worth of
blocks, so many toy hypotests travel in one call.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["HYPOTHESES", "ToyRange", "TaskPlan", "block_segments", "plan_tasks"]

#: toys thrown under signal+background (at the tested μ) and background-only
HYPOTHESES = ("sb", "b")


@dataclass(frozen=True)
class ToyRange:
    """Toys ``start`` to ``stop - 1`` of one (μ, hypothesis) stream, inside one block."""

    mu: float
    hypothesis: str
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class TaskPlan:
    """One task: toy ranges of one patch, and the μ values whose observed statistic it computes."""

    patch: str
    ranges: tuple[ToyRange, ...]
    observed: tuple[float, ...] = ()

    @property
    def ntoys(self) -> int:
        return sum(r.size for r in self.ranges)


def block_segments(toys: np.ndarray, block: int) -> list[tuple[int, int]]:
    """Sorted toy indices -> maximal runs ``(start, stop)`` of consecutive toys within one block."""
    toys = np.asarray(toys, dtype=np.int64)
    if toys.size == 0:
        return []
    cut = np.flatnonzero((np.diff(toys) != 1) | (np.diff(toys // block) != 0)) + 1
    starts = np.concatenate([[0], cut])
    stops = np.concatenate([cut, [toys.size]])
    return [(int(toys[a]), int(toys[b - 1]) + 1) for a, b in zip(starts, stops, strict=True)]


def plan_tasks(
    patch: str,
    missing: Mapping[tuple[float, str], np.ndarray],
    observed: Iterable[float],
    batch_size: int,
    block: int,
) -> list[TaskPlan]:
    """Tasks covering every missing toy of one patch exactly once.

    ``missing[(mu, hypothesis)]`` are the toy indices still to do; ``observed`` the μ values whose
    observed test statistic is still missing. Each task holds at most ``batch_size // block``
    blocks (at least one); each observed μ rides along with the first task of that μ, or gets a
    task of its own when all its toys are done.
    """
    if block < 1 or batch_size < 1:
        raise ValueError("block and batch_size must be positive")
    blocks_per_task = max(1, batch_size // block)
    tasks: list[TaskPlan] = []
    current: list[ToyRange] = []
    current_blocks: set[tuple[float, str, int]] = set()
    for (mu, hypothesis), toys in missing.items():
        for start, stop in block_segments(np.sort(toys), block):
            key = (mu, hypothesis, start // block)
            if key not in current_blocks and len(current_blocks) == blocks_per_task:
                tasks.append(TaskPlan(patch, tuple(current)))
                current, current_blocks = [], set()
            current.append(ToyRange(float(mu), hypothesis, start, stop))
            current_blocks.add(key)
    if current:
        tasks.append(TaskPlan(patch, tuple(current)))
    return _attach_observed(patch, tasks, [float(mu) for mu in observed])


def _attach_observed(patch: str, tasks: list[TaskPlan], observed: list[float]) -> list[TaskPlan]:
    out = list(tasks)
    for mu in observed:
        first = next((i for i, t in enumerate(out) if any(r.mu == mu for r in t.ranges)), None)
        if first is None:
            out.append(TaskPlan(patch, (), (mu,)))
        else:
            task = out[first]
            out[first] = TaskPlan(patch, task.ranges, (*task.observed, mu))
    return out
