"""The coordinator: plan the missing toys, send tasks through an executor, stream results to the
store. It is the store's only writer.

Any ``concurrent.futures.Executor`` works: only ``submit`` is used. A bounded window of tasks is
in flight; each result is written as it arrives, so a run killed at any moment loses at most the
tasks in flight, and running the same command again plans exactly what is still missing.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import numpy as np

from toyfarm.config import RunConfig
from toyfarm.likelihood.run import GENERATION
from toyfarm.plan import TaskPlan, ToyRange, plan_tasks
from toyfarm.progress import Progress
from toyfarm.stats import needs_more_toys
from toyfarm.store import RunIdentity, Store
from toyfarm.task import Task, TaskResult, run_task
from toyfarm.workspace import InputError, ModelSource

__all__ = ["FailedTask", "RunReport", "generate", "more_toys"]

_VERSIONED = ("toyfarm", "pyhf", "jax", "jaxlib", "numpy", "zarr")
_SUMMED = ("compiles", "cache_hits", "compile_seconds", "fit_seconds")


@dataclass(frozen=True)
class FailedTask:
    task_id: str
    patch: str
    ntoys: int
    error: str  # the last attempt's traceback, remote part included


@dataclass
class RunReport:
    store: str
    toys_planned: int = 0  # this run's missing toys
    toys_done: int = 0
    tasks: int = 0
    rounds: int = 0  # more than one with adaptive toys
    seconds: float = 0.0
    first_result_seconds: float | None = None  # from the start of the run to the first write
    failed: list[FailedTask] = field(default_factory=list)
    worker_stats: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "toys_planned": self.toys_planned,
            "toys_done": self.toys_done,
            "tasks": self.tasks,
            "rounds": self.rounds,
            "seconds": round(self.seconds, 3),
            "first_result_seconds": None if self.first_result_seconds is None
            else round(self.first_result_seconds, 3),
            "toys_per_second": round(self.toys_done / self.seconds, 2) if self.seconds else 0.0,
            **{k: round(v, 3) if isinstance(v, float) else v for k, v in self.worker_stats.items()},
            "failed": [{"task": f.task_id, "patch": f.patch, "ntoys": f.ntoys,
                        "error": f.error.strip().splitlines()[-1]} for f in self.failed],
        }


def _versions() -> dict[str, str]:
    out = {}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def check_mu_bounds(source: ModelSource, patches: list[str], mus: tuple[float, ...]) -> None:
    """Refuse μ outside the POI bounds of any patch before anything runs."""
    for patch, (poi, low, high) in source.poi_bounds(patches).items():
        outside = [mu for mu in mus if not low <= mu <= high]
        if outside:
            raise InputError(
                f"mu = {outside[0]} is outside the bounds [{low}, {high}] of the POI {poi!r} of "
                f"{patch!r}; change --mu, or the bounds in the measurement (or the patch)"
            )


def generate(
    cfg: RunConfig,
    executor: Executor,
    progress: Callable[[int], Progress] | None = None,
    window: int | None = None,
) -> RunReport:
    """Fill ``cfg.store`` with the toys ``cfg`` asks for that it does not hold yet."""
    start = time.perf_counter()
    source = ModelSource(cfg.workspace, cfg.patchset, cfg.modifier_settings, cfg.measurement,
                         cfg.verify_digest)
    patches = source.check_patches(list(cfg.patches)) if cfg.patches else source.patches()
    check_mu_bounds(source, patches, cfg.mu)
    identity = RunIdentity(cfg.test_stat, GENERATION, cfg.seed, cfg.block,
                           source.modifier_settings, cfg.measurement)
    store = Store.create(cfg.store, identity, _versions(), cfg.save_toys)
    first = {(mu, hyp): n for mu in cfg.mu for hyp, n in cfg.ntoys_by_hypothesis.items()}
    targets = {patch: first for patch in patches}
    labels, names = source.labels(), source.label_names()
    report = RunReport(str(cfg.store))
    with store.lock():
        refs = {patch: source.model_ref(patch) for patch in patches}
        for patch in patches:  # all before any write: a refused run leaves the store as it was
            store.check_patch(patch, refs[patch].digest)
        for line in store.check(repair=True):
            (progress or Progress)(0).note(f"damaged, will be regenerated: {line}")
        earlier = _reattach(store, executor, source, cfg, (progress or Progress)(0))
        if earlier:  # results of tasks an earlier run sent off and never collected
            bar = (progress or Progress)(sum(t.ntoys for t in earlier.values()))
            try:
                _run([], executor, store, cfg.retries, window or 64, bar, report, start, earlier)
            finally:
                bar.close()
        while targets:  # one round, or rounds of more toys where CLs is not yet precise enough
            plans = []
            for patch, ntoys in targets.items():
                store.prepare(patch, refs[patch].digest,
                              dict(zip(names, labels.get(patch, ()), strict=True)), ntoys)
                plans += plan_tasks(patch, store.missing(patch, ntoys),
                                    store.missing_observed(patch, list(cfg.mu)), cfg.batch_size,
                                    cfg.block)
            planned = sum(p.ntoys for p in plans)
            report.toys_planned += planned
            tasks = [_task(cfg, refs[p.patch], p, f"{report.rounds}.{i}")
                     for i, p in enumerate(plans)]
            bar = (progress or Progress)(planned)
            try:
                _run(tasks, executor, store, cfg.retries, window or 64, bar, report, start)
            finally:
                bar.close()
            report.rounds += 1
            if cfg.target_cls_error is None or report.failed:
                break
            targets = more_toys(store, cfg, patches)
    report.seconds = time.perf_counter() - start
    return report


def more_toys(store: Store, cfg: RunConfig, patches: list[str]):
    """Adaptive toys: double the toys of each (patch, μ) whose CLs_obs is not yet known well
    enough (``stats.needs_more_toys``), up to ``cfg.max_toys`` s+b toys; b-only toys keep the
    configured ratio. Toys planned by an earlier run that stopped inside a round are completed
    first, and judged once done. Returns ``{patch: {(mu, hypothesis): ntoys}}`` of what to add."""
    from toyfarm.results import hypotests

    ratio = cfg.ntoys_by_hypothesis["b"] / cfg.ntoys
    targets: dict[str, dict[tuple[float, str], int]] = {}
    for patch, rows in hypotests(store, patches, cfg.mu).items():
        mus = store.mus(patch).tolist()
        planned = {hyp: dict(zip(mus, store.planned(patch, hyp).tolist(), strict=True))
                   for hyp in ("sb", "b")}
        for mu, result in rows.items():
            n_sb, n_b = planned["sb"][mu], planned["b"][mu]
            if (result.ntoys_sb + result.not_converged_sb < n_sb
                    or result.ntoys_b + result.not_converged_b < n_b):
                # doubling now would skip the judgement of toys planned but never done
                targets.setdefault(patch, {}).update({(mu, "sb"): n_sb, (mu, "b"): n_b})
                continue
            if np.isnan(result.q_obs) or n_sb >= cfg.max_toys:
                continue
            if needs_more_toys(result, cfg.target_cls_error, cfg.level):
                n_sb = min(2 * n_sb, cfg.max_toys)
                targets.setdefault(patch, {})
                targets[patch][(mu, "sb")] = n_sb
                targets[patch][(mu, "b")] = max(1, math.ceil(ratio * n_sb))
    return targets


def _task(cfg: RunConfig, ref, plan: TaskPlan, index: str) -> Task:
    return Task(
        task_id=f"{plan.patch}#{index}",
        model=ref,
        test_stat=cfg.test_stat,
        seed=cfg.seed,
        block=cfg.block,
        ranges=plan.ranges,
        observed=plan.observed,
        save_toys=cfg.save_toys,
        compilation_cache=cfg.compilation_cache,
    )


def _record(task: Task, group: str | None) -> dict[str, Any]:
    return {"task": task.task_id, "patch": task.patch, "group": group,
            "ranges": [[r.mu, r.hypothesis, r.start, r.stop] for r in task.ranges],
            "observed": list(task.observed)}


def _reattach(store: Store, executor: Executor, source: ModelSource, cfg: RunConfig,
              bar: Progress) -> dict[Future, Task]:
    """Futures of the tasks an earlier run sent to a remote engine (fire and forget)."""
    pending = store.submitted()
    if not pending:
        return {}
    if not hasattr(executor, "reattach"):
        bar.note(f"{len(pending)} tasks sent by an earlier run cannot be collected by this "
                 "executor; their toys are planned again")
        for remote_id in pending:
            store.set_submitted(remote_id, None)
        return {}
    out = {}
    for group in {record["group"] for record in pending.values()}:
        ids = [rid for rid, record in pending.items() if record["group"] == group]
        for remote_id, future in executor.reattach(ids, group).items():
            record = pending[remote_id]
            ranges = tuple(ToyRange(float(mu), hyp, start, stop)
                           for mu, hyp, start, stop in record["ranges"])
            plan = TaskPlan(record["patch"], ranges, tuple(record["observed"]))
            task = _task(cfg, source.model_ref(record["patch"]), plan, record["task"])
            out[future] = task
            future.remote_id = remote_id
    bar.note(f"collecting {len(out)} tasks sent by an earlier run")
    return out


def _track_remote(executor: Executor, store: Store, in_flight: dict[Future, Task]) -> None:
    """Record in the store the remote ids of tasks in flight, once the engine knows them."""
    task_id = getattr(executor, "task_id", None)
    if task_id is None:
        return
    for future, task in in_flight.items():
        if getattr(future, "remote_id", None) is None and (remote := task_id(future)):
            future.remote_id = remote
            store.set_submitted(remote, _record(task, getattr(executor, "task_group_id", None)))


def _run(tasks: list[Task], executor: Executor, store: Store, retries: int, window: int,
         bar: Progress, report: RunReport, start: float,
         in_flight: dict[Future, Task] | None = None) -> None:
    queue = list(reversed(tasks))
    attempts: dict[str, int] = {}
    in_flight = dict(in_flight or {})
    while queue or in_flight:
        while queue and len(in_flight) < window:
            task = queue.pop()
            in_flight[executor.submit(run_task, task)] = task
            _track_remote(executor, store, in_flight)
        _track_remote(executor, store, in_flight)
        finished, _ = wait(in_flight, timeout=5.0, return_when=FIRST_COMPLETED)
        for future in finished:
            task = in_flight.pop(future)
            if getattr(future, "remote_id", None) is not None:
                store.set_submitted(future.remote_id, None)
            error = future.exception()
            if error is None:
                result = future.result()
                _write(store, task, result)
                if report.first_result_seconds is None:
                    report.first_result_seconds = time.perf_counter() - start
                report.tasks += 1
                report.toys_done += task.ntoys
                for key in _SUMMED:
                    report.worker_stats[key] = report.worker_stats.get(key, 0) + result.stats[key]
                bar.advance(task.ntoys)
                continue
            attempts[task.task_id] = attempts.get(task.task_id, 0) + 1
            text = "".join(traceback.format_exception(error))
            if isinstance(error, InputError) or attempts[task.task_id] > retries:
                report.failed.append(FailedTask(task.task_id, task.patch, task.ntoys, text))
                bar.note(f"task {task.task_id} failed ({task.ntoys} toys left for the next "
                         f"run):\n{text.rstrip()}")
            else:
                bar.note(f"task {task.task_id} failed, retrying ({attempts[task.task_id]}/"
                         f"{retries}): {error!r}")
                queue.append(task)


def _write(store: Store, task: Task, result: TaskResult) -> None:
    for r in result.ranges:
        store.write_toys(task.patch, r.range.mu, r.range.hypothesis, r.range.start, r.q,
                         r.converged, r.toys)
    for mu, (q_obs, converged) in result.observed.items():
        store.write_observed(task.patch, mu, q_obs, converged)
    store.add_stats(result.stats)
