"""Faults lose nothing and count nothing twice: a killed coordinator, a killed worker, a damaged
store, a task that keeps failing. Each run ends in a store identical to an uninterrupted run's."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import Executor, ThreadPoolExecutor

import numpy as np
import pytest
from runs import EXAMPLE, assert_identical, small_config, stored

from toyfarm.coordinator import generate
from toyfarm.executors.local import LocalExecutor
from toyfarm.progress import Progress
from toyfarm.store import Store

RUN = """
import json, sys
from concurrent.futures import ThreadPoolExecutor
from toyfarm.config import load_config
from toyfarm.coordinator import generate
cfg = load_config(sys.argv[1]).with_overrides(**json.loads(sys.argv[2]))
from toyfarm.progress import Progress
with ThreadPoolExecutor(1) as pool:  # a line on stderr for every task: the test waits for one
    generate(cfg, pool, progress=lambda n: Progress(n, every=0))
"""


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, xla_cache):
    cfg = small_config(tmp_path_factory.mktemp("ref"), xla_cache, batch_size=16)
    with ThreadPoolExecutor(1) as pool:
        assert not generate(cfg, pool).failed
    return cfg


def test_sigkill_of_the_coordinator_at_random_moments(reference, tmp_path, xla_cache):
    """Kill the run (SIGKILL) again and again while it writes; the last run completes it."""
    store = tmp_path / "killed.zarr"
    flags = json.dumps({"store": str(store), "patches": ["sig_300_0", "sig_500_100"],
                        "mu": [1.0, 2.0], "ntoys": 40, "ntoys_b": 24, "block": 16,
                        "batch_size": 16, "compilation_cache": xla_cache})
    rng = np.random.default_rng(2)
    kills = 0
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", RUN, str(EXAMPLE), flags],
                                stderr=subprocess.PIPE, text=True)
        # wait until it writes toys, then kill it at a random moment of the writing
        for line in proc.stderr:
            if line.lstrip("[0123456789:] ").startswith("toys"):
                break
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2
    final = subprocess.run([sys.executable, "-c", RUN, str(EXAMPLE), flags], capture_output=True,
                           text=True)
    assert final.returncode == 0, final.stderr
    assert_identical(stored(reference.store), stored(store))
    assert Store.open(store).check() == []


class KillAWorker(Executor):
    """A local pool that SIGKILLs one of its worker processes after a few tasks went out."""

    def __init__(self, workers, after):
        self.inner = LocalExecutor(workers)
        self.after = after

    def submit(self, fn, /, *args, **kwargs):
        future = self.inner.submit(fn, *args, **kwargs)
        self.after -= 1
        if self.after == 0:
            time.sleep(3)  # let the workers start on their tasks
            os.kill(next(iter(self.inner._pool._processes)), signal.SIGKILL)
        return future

    def shutdown(self, wait=True, *, cancel_futures=False):
        self.inner.shutdown(wait=wait, cancel_futures=cancel_futures)


def test_a_killed_worker_costs_nothing(reference, tmp_path, xla_cache):
    cfg = small_config(tmp_path, xla_cache, batch_size=16, retries=3)
    executor = KillAWorker(2, after=4)
    try:
        report = generate(cfg, executor, window=4)
    finally:
        executor.shutdown()
    assert not report.failed
    assert executor.inner.restarts >= 1
    assert_identical(stored(reference.store), stored(cfg.store))


def test_a_damaged_store_is_found_and_exactly_regenerated(reference, tmp_path, xla_cache):
    copy = tmp_path / "damaged.zarr"
    shutil.copytree(reference.store, copy)
    (copy / "sig_300_0/sb/q/c/1/1").unlink()  # toys 16-31 of mu = 2
    chunk = copy / "sig_500_100/b/converged/c/0/0"  # toys 0-15 of mu = 1
    chunk.write_bytes(chunk.read_bytes()[:3])
    damage = Store.open(copy).check()
    assert damage == ["sig_300_0 sb mu=2 toys 16-31: the q chunk is missing",
                      "sig_500_100 b mu=1 toys 0-15: the converged chunk is unreadable"]
    cfg = small_config(tmp_path, xla_cache, store=copy)
    with ThreadPoolExecutor(1) as pool:
        report = generate(cfg, pool)
    assert report.toys_planned == 16 + 16
    assert_identical(stored(reference.store), stored(copy))


def test_a_second_run_on_the_same_store_is_refused(reference, tmp_path, xla_cache):
    from toyfarm.workspace import InputError

    cfg = small_config(tmp_path, xla_cache)
    Store.create(cfg.store, *_identity_of(reference))
    with Store.open(cfg.store, writable=True).lock():
        with ThreadPoolExecutor(1) as pool, pytest.raises(InputError, match="in use"):
            generate(cfg, pool)


def _identity_of(cfg):
    from toyfarm.store import RunIdentity

    ident = Store.open(cfg.store).identity
    return RunIdentity(**ident), {}


def _broken_task(task):
    """What a worker bug looks like from the coordinator: the task raises on every attempt."""
    raise RuntimeError(f"injected fault in {task.task_id}")


class FailOneTask(Executor):
    """One worker thread; the chosen task raises on the worker, every time it is sent."""

    def __init__(self, chosen):
        self.inner = ThreadPoolExecutor(1)
        self.chosen = chosen
        self.sent = []  # the chosen task, once per attempt

    def submit(self, fn, task):
        if self.chosen(task) and (not self.sent or task.task_id == self.sent[0].task_id):
            self.sent.append(task)
            return self.inner.submit(_broken_task, task)
        return self.inner.submit(fn, task)

    def shutdown(self, wait=True, *, cancel_futures=False):
        self.inner.shutdown(wait=wait, cancel_futures=cancel_futures)


def test_a_task_that_keeps_failing_is_reported_and_exactly_redone(reference, tmp_path,
                                                                   xla_cache):
    from toyfarm.cli.store import store_info

    cfg = small_config(tmp_path, xla_cache, retries=2)
    # a task of the second patch that also computes an observed statistic
    executor = FailOneTask(lambda task: task.patch == "sig_500_100" and 2.0 in task.observed)
    log = io.StringIO()
    try:
        report = generate(cfg, executor, progress=lambda n: Progress(n, stream=log))
    finally:
        executor.shutdown()
    assert len(executor.sent) == cfg.retries + 1  # bounded retries, then given up
    task = executor.sent[0]
    assert all(t == task for t in executor.sent)  # the same task every time
    name = task.task_id
    assert [f.task_id for f in report.failed] == [task.task_id]
    failed = report.failed[0]
    assert (failed.patch, failed.ntoys) == ("sig_500_100", task.ntoys)
    assert "Traceback" in failed.error and "in _broken_task" in failed.error
    assert failed.error.rstrip().endswith(f"RuntimeError: injected fault in {name}")
    # the user sees the retries, then the whole traceback, not just its last line
    assert log.getvalue().count(f"task {name} failed, retrying") == cfg.retries
    assert (f"task {name} failed ({task.ntoys} toys left for the next run):\n"
            f"{failed.error.rstrip()}") in log.getvalue()
    assert report.as_dict()["failed"] == [{"task": name, "patch": "sig_500_100",
                                           "ntoys": task.ntoys,
                                           "error": f"RuntimeError: injected fault in {name}"}]
    # every other task completed, and the store says exactly what is missing
    assert report.toys_done == report.toys_planned - task.ntoys
    info = store_info(Store.open(cfg.store))
    missing = {(m["patch"], m["hypothesis"], m["mu"], start, stop)
               for m in info["missing"] for start, stop in m["toys"]}
    assert missing == {("sig_500_100", r.hypothesis, r.mu, r.start, r.stop) for r in task.ranges}
    assert info["missing_observed"] == {"sig_500_100": list(task.observed)}
    assert info["toys_planned"] - info["toys_done"] == task.ntoys

    with ThreadPoolExecutor(1) as pool:
        again = generate(cfg, pool)
    assert not again.failed
    assert (again.toys_planned, again.tasks) == (task.ntoys, 1)  # exactly the missing toys
    assert_identical(stored(reference.store), stored(cfg.store))
    assert Store.open(cfg.store).stats()["tasks"] == report.tasks + again.tasks  # once each
