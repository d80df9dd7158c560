"""The coordinator end to end on the shipped example: determinism, warm workers, resume."""

from concurrent.futures import Executor, Future, ThreadPoolExecutor

import numpy as np
import pytest
from runs import PATCHES, assert_identical, small_config, stored

from toyfarm.coordinator import generate
from toyfarm.executors.local import LocalExecutor
from toyfarm.store import Store


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, xla_cache):
    """One uninterrupted run in this process: 2 patches x 2 mu x (40 s+b + 24 b-only) toys."""
    cfg = small_config(tmp_path_factory.mktemp("ref"), xla_cache)
    with ThreadPoolExecutor(1) as pool:
        report = generate(cfg, pool)
    assert not report.failed
    return cfg, report


def test_run_fills_the_store(reference):
    cfg, report = reference
    assert report.toys_done == report.toys_planned == 2 * 2 * (40 + 24)
    store = Store.open(cfg.store)
    assert store.patches() == sorted(PATCHES)
    for patch in PATCHES:
        assert store.mus(patch).tolist() == [1.0, 2.0]
        q_obs, ok = store.observed(patch)
        assert np.isfinite(q_obs).all() and ok.all()
        for hyp, n in (("sb", 40), ("b", 24)):
            toys = store.toys(patch, hyp)
            assert toys.done.all() and toys.q.shape == (2, n)
            assert toys.converged.mean() > 0.95
            assert (toys.q[toys.converged] >= 0).all()
    assert store.patch_attrs("sig_300_0")["labels"] == {"m1": 300, "m2": 0}


def test_batch_size_and_workers_do_not_change_a_bit(reference, tmp_path, xla_cache):
    """Spawned workers, other batch size: bit-identical q; each worker compiles each model once."""
    cfg, _ = reference
    other = small_config(tmp_path, xla_cache, batch_size=64)
    executor = LocalExecutor(2)
    try:
        report = generate(other, executor)
    finally:
        executor.shutdown()
    assert not report.failed
    assert_identical(stored(cfg.store), stored(other.store))
    stats = Store.open(other.store).stats()
    assert stats["compiles"] <= 2 * len(PATCHES)
    assert stats["compiles"] + stats["cache_hits"] == stats["tasks"] == report.tasks


class FailAfter(Executor):
    """Runs tasks in this thread; every task after the first ``n`` fails (a dying run)."""

    def __init__(self, n):
        self.n = n

    def submit(self, fn, /, *args, **kwargs):
        future = Future()
        if self.n > 0:
            self.n -= 1
            future.set_result(fn(*args, **kwargs))
        else:
            future.set_exception(RuntimeError("worker lost"))
        return future


def test_an_interrupted_run_resumes_to_the_same_store(reference, tmp_path, xla_cache):
    cfg, _ = reference
    partial = small_config(tmp_path, xla_cache, retries=1)
    first = generate(partial, FailAfter(3))
    assert first.failed and first.toys_done < first.toys_planned
    assert "RuntimeError: worker lost" in first.failed[0].error
    with ThreadPoolExecutor(1) as pool:
        second = generate(partial, pool)
    assert not second.failed
    assert second.toys_planned == first.toys_planned - first.toys_done
    assert_identical(stored(cfg.store), stored(partial.store))
    with ThreadPoolExecutor(1) as pool:  # a third run has nothing left to do
        assert generate(partial, pool).toys_planned == 0


def test_more_toys_and_mu_extend_the_store(reference, tmp_path, xla_cache):
    cfg, _ = reference
    grown = small_config(tmp_path, xla_cache, ntoys=24, ntoys_b=8, mu=(1.0,))
    with ThreadPoolExecutor(1) as pool:
        generate(grown, pool)
        report = generate(small_config(tmp_path, xla_cache), pool)
    assert report.toys_planned == 2 * ((40 - 24) + (24 - 8)) + 2 * (40 + 24)
    assert_identical(stored(cfg.store), stored(grown.store))


class FakeRemote(Executor):
    """A remote engine whose service outlives the client: tasks run when sent, results wait in
    ``service`` until someone collects them (as Globus Compute keeps them). A client that will
    be stopped (``stop_after``) never hears back from its tasks."""

    task_group_id = "group-1"

    def __init__(self, service, stop_after=None):
        self.service, self.stop_after, self.sent = service, stop_after, 0

    def submit(self, fn, /, *args, **kwargs):
        if self.stop_after is not None and self.sent == self.stop_after:
            raise KeyboardInterrupt("the laptop closes")
        remote_id = f"task-{len(self.service)}"
        self.service[remote_id] = fn(*args, **kwargs)
        self.sent += 1
        future = Future()
        future.remote_task_id = remote_id
        if self.stop_after is None:  # a client that stays to hear back
            future.set_result(self.service[remote_id])
        return future

    @staticmethod
    def task_id(future):
        return getattr(future, "remote_task_id", None)

    def reattach(self, task_ids, task_group_id=None):
        assert task_group_id == self.task_group_id
        futures = {}
        for remote_id in task_ids:
            futures[remote_id] = Future()
            futures[remote_id].set_result(self.service[remote_id])
        return futures


def test_fire_and_forget_collects_earlier_tasks_first(reference, tmp_path, xla_cache):
    cfg, full = reference
    run = small_config(tmp_path, xla_cache)
    service = {}
    with pytest.raises(KeyboardInterrupt):
        generate(run, FakeRemote(service, stop_after=2))
    assert len(Store.open(run.store).submitted()) == 2  # sent, never collected
    again = FakeRemote(service)
    assert not generate(run, again).failed
    assert again.sent == full.tasks - 2  # only what was truly missing went out again
    assert Store.open(run.store).submitted() == {}
    assert_identical(stored(cfg.store), stored(run.store))
