"""Remote engines: Dask, Parsl and a local GlobusComputeEngine fill the store bit-identically to an
in-process run with warm workers; the Globus Compute executor's batching, recovery and task-id
logic against a stand-in for the SDK (no network).

The engine runs use one worker each: with the cores to itself, a worker compiles with the same XLA
flags as this process, so all of them share the programs on disk that the reference run (or the
first engine run) compiled. Runs with two workers (flags of their own) are marked slow."""

import base64
import importlib.util
import os
import pickle
import signal
import subprocess
import sys
import threading
import uuid
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
from runs import EXAMPLE, PATCHES, assert_identical, small_config, stored

from toyfarm.cli import main
from toyfarm.config import load_config
from toyfarm.coordinator import generate
from toyfarm.executors import make_executor
from toyfarm.executors.globus import (
    ENVELOPE,
    REQUEST_LIMIT,
    GlobusComputeExecutor,
    RemoteFuture,
    result_bytes,
)
from toyfarm.plan import ToyRange
from toyfarm.store import Store
from toyfarm.task import RangeResult, Task, TaskResult
from toyfarm.workspace import InputError, ModelSource

ENDPOINT = "2a5f2a3e-8d2c-4c53-9a43-3a2c4e0f6b11"

# Parsl starts its interchange and worker pools with subprocess (fork, then exec at once), which
# JAX, loaded here, warns about: nothing runs between the two.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")


def installed(module, extra):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"{module} is not installed: pip install -e '.[{extra}]'")


needs_dask = installed("distributed", "dask")
needs_parsl = installed("parsl", "parsl")
needs_sdk = installed("globus_compute_sdk", "globus")
needs_gc_engine = installed("globus_compute_endpoint", "gc-engine")


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, xla_cache):
    cfg = small_config(tmp_path_factory.mktemp("ref"), xla_cache)
    with ThreadPoolExecutor(1) as pool:
        assert not generate(cfg, pool).failed
    return cfg


class Watched(Executor):
    """An engine's executor that counts failed tasks (each one is retried by the coordinator)."""

    def __init__(self, inner):
        self.inner, self.failures = inner, 0

    def submit(self, fn, /, *args, **kwargs):
        future = self.inner.submit(fn, *args, **kwargs)
        future.add_done_callback(self._count)
        return future

    def _count(self, future):
        self.failures += future.exception() is not None

    def shutdown(self, wait=True, *, cancel_futures=False):
        self.inner.shutdown(wait=wait, cancel_futures=cancel_futures)


def run_on(kind, workers, reference, cfg, kill=None):
    """Run ``cfg`` on the engine; the store must equal the reference's, each worker compiling
    each model at most once (a killed and restarted worker counts as another worker)."""
    executor = Watched(make_executor(kind, workers))
    killed, done = [], threading.Event()
    killer = threading.Thread(target=lambda: killed.extend(kill(executor.inner, done)),
                              daemon=True)
    try:
        if kill:
            killer.start()
        report = generate(cfg, executor)
    finally:
        done.set()
        executor.shutdown()
    if kill:
        killer.join()
    assert not report.failed
    assert_identical(stored(reference.store), stored(cfg.store))
    stats = Store.open(cfg.store).stats()
    assert stats["compiles"] <= (workers + len(killed)) * len(PATCHES)
    assert stats["compiles"] + stats["cache_hits"] == stats["tasks"] == report.tasks
    return executor, killed


@needs_dask
def test_dask(reference, tmp_path, xla_cache):
    run_on("dask", 1, reference, small_config(tmp_path, xla_cache))


@needs_parsl
def test_parsl(reference, tmp_path, xla_cache):
    run_on("parsl", 1, reference, small_config(tmp_path, xla_cache))


def kill_a_busy_worker(executor, done):
    """SIGKILL a worker of the engine's pool while it runs a task (it has loaded jaxlib: workers
    import JAX with their first task); the pids killed. The pool runs detached from this process:
    it is the one whose log folder is in the engine's folder."""
    import psutil

    while not done.wait(0.2):
        for pool in psutil.process_iter():
            try:
                if f"--logdir={executor.run_dir}" not in " ".join(pool.cmdline()):
                    continue
                for worker in pool.children():
                    if any("jaxlib" in m.path for m in worker.memory_maps()):
                        os.kill(worker.pid, signal.SIGKILL)
                        return [worker.pid]
            except psutil.Error:  # a process that ended while we looked
                continue
    return []


@needs_gc_engine
def test_gc_engine_survives_a_killed_worker(reference, tmp_path, xla_cache):
    """Tasks packed as the service packs them run on an endpoint's own engine; a worker killed
    in the middle of a task fails that task only, the coordinator retries it."""
    cfg = small_config(tmp_path, xla_cache, retries=3)
    executor, killed = run_on("gc-engine", 1, reference, cfg, kill=kill_a_busy_worker)
    assert len(killed) == 1 and executor.failures >= 1


@pytest.mark.slow
@pytest.mark.parametrize("kind", [
    pytest.param("dask", marks=needs_dask),
    pytest.param("parsl", marks=needs_parsl),
    pytest.param("gc-engine", marks=needs_gc_engine),
])
def test_two_workers(kind, reference, tmp_path, xla_cache):
    run_on(kind, 2, reference, small_config(tmp_path, xla_cache, batch_size=16))


# -- the Globus Compute executor against a stand-in for the SDK ------------------------------


class Serializer:
    """The SDK's data strategy in miniature: pickled, base64 lines; packed like the SDK's."""

    def serialize(self, value):
        return "00\n" + base64.encodebytes(pickle.dumps(value)).decode()

    def pack_buffers(self, buffers):
        return "".join(f"{len(b)}\n{b}" for b in buffers)


def new_service():
    """What the stand-in SDK executors talk to: registrations, results, and faults to inject
    (``refuse``: batches fail, which stops the SDK executor; ``hold``: tasks stay unsent;
    ``close_after``: the client's process stops after sending that many tasks)."""
    return SimpleNamespace(registrations=0, results={}, batch_sizes=[], refuse=False, hold=False,
                           runs=0, close_after=None)


def finished(value, task_id):
    future = Future()
    future.task_id = task_id
    future.set_result(value)
    return future


class FakeSDK:
    """Stands in for ``globus_compute_sdk.Executor``: runs each task at once, in this thread."""

    def __init__(self, service, endpoint_id, client, task_group_id):
        self.service, self.task_group_id, self.batch_size = service, task_group_id, 128
        self.serializer, self.functions, self.stopped = Serializer(), {}, False

    def register_function(self, fn, function_id=None):
        if self.stopped:
            raise RuntimeError(f"{self!r} is shutdown; refusing to register function")
        if function_id is None:
            self.service.registrations += 1
            function_id = str(uuid.uuid4())
        self.functions[fn] = function_id
        return function_id

    def submit(self, fn, *args, **kwargs):
        if self.stopped:
            raise RuntimeError(f"{self!r} is shutdown; no new functions may be executed")
        assert fn in self.functions  # sent by reference to a registered function
        if self.service.runs == self.service.close_after:
            raise KeyboardInterrupt("the laptop closes")
        self.service.batch_sizes.append(self.batch_size)
        future = Future()
        future.task_id = None
        if self.service.refuse:
            self.stopped = True
            future.set_exception(ConnectionError("the service refused the batch"))
        elif not self.service.hold:
            future.task_id = str(uuid.uuid4())
            self.task_group_id = self.task_group_id or str(uuid.uuid4())
            # arguments and result cross the wire pickled, as the service carries them
            args, kwargs = pickle.loads(pickle.dumps((args, kwargs)))
            self.service.results[future.task_id] = pickle.loads(pickle.dumps(fn(*args, **kwargs)))
            self.service.runs += 1
            future.set_result(self.service.results[future.task_id])
        return future

    def reload_tasks(self, task_group_id=None):
        return [finished(value, task_id) for task_id, value in self.service.results.items()]

    def shutdown(self, wait=True, *, cancel_futures=False):
        self.stopped = True


def globus(service):
    return GlobusComputeExecutor(ENDPOINT, sdk_executor=lambda **kw: FakeSDK(service, **kw))


def double(x):
    return 2 * x


def test_a_failed_batch_restarts_the_sdk_executor_without_registering_again():
    service = new_service()
    executor = globus(service)
    service.refuse = True
    with pytest.raises(ConnectionError):
        executor.submit(double, 1).result()
    service.refuse = False
    future = executor.submit(double, 2)  # the stopped SDK executor is replaced
    assert future.result() == 4 and executor.restarts == 1
    assert executor.submit(double, 3).result() == 6
    assert service.registrations == 1
    assert executor.task_id(future) in service.results and executor.task_group_id


def test_tasks_queued_in_a_stopped_sdk_executor_fail_and_are_retried():
    service = new_service()
    executor = globus(service)
    service.hold = True
    queued = [executor.submit(double, x) for x in (1, 2)]
    executor._sdk.stopped = True  # its submitter thread died without sending them
    service.hold = False
    assert executor.submit(double, 3).result() == 6
    for future in queued:
        with pytest.raises(RuntimeError, match="cancelled before it was sent"):
            future.result(timeout=1)
        assert executor.task_id(future) is None


def test_batches_stay_under_the_request_limit():
    service = new_service()
    executor = globus(service)
    executor.submit(double, b"x")
    executor.submit(double, b"x" * 1_000_000)  # base64 and JSON escapes: ~1.37 MB a task
    executor.submit(double, b"x")
    small, big, after = service.batch_sizes
    assert small == 128 and after == big and 1_370_000 * big < REQUEST_LIMIT - ENVELOPE
    assert big == 7


def test_reattach_rebuilds_futures_from_task_ids():
    service = new_service()
    first = globus(service)
    futures = [first.submit(double, x) for x in (1, 2)]
    ids = [first.task_id(f) for f in futures]
    later = globus(service)  # another process, after the first one died
    again = later.reattach([*ids, "00000000-0000-0000-0000-000000000000"],
                           first.task_group_id)
    assert [again[i].result() for i in ids] == [2, 4]
    with pytest.raises(LookupError):
        again["00000000-0000-0000-0000-000000000000"].result()


def test_globus_compute_runs_end_to_end_and_collects_what_a_closed_laptop_left(
        reference, tmp_path, xla_cache):
    """The coordinator through the Globus Compute executor, the real task run where the service
    would run it: the store equals the in-process one. A client stopped after sending two
    tasks leaves their ids in the store; the next run collects those two from the service and
    sends only the others."""
    service = new_service()
    whole = small_config(tmp_path / "whole", xla_cache)
    report = generate(whole, globus(service))
    assert not report.failed and service.registrations == 1 and service.runs == report.tasks
    assert_identical(stored(reference.store), stored(whole.store))
    stats = Store.open(whole.store).stats()
    assert stats["compiles"] <= len(PATCHES) and stats["compiles"] + stats["cache_hits"] == \
        report.tasks

    service = new_service()
    service.close_after = 2
    cfg = small_config(tmp_path / "closed", xla_cache)
    with pytest.raises(KeyboardInterrupt):
        generate(cfg, globus(service))
    assert len(Store.open(cfg.store).submitted()) == 2
    service.close_after = None
    assert not generate(cfg, globus(service)).failed  # another process, the same service
    assert service.runs == report.tasks  # the two collected were not run again
    assert Store.open(cfg.store).submitted() == {}
    assert_identical(stored(reference.store), stored(cfg.store))


def test_a_remote_input_error_is_not_retried():
    error = Exception("remote")  # the SDK's TaskExecutionFailed carries the traceback text
    error.remote_data = ("Traceback (most recent call last):\n  ...\ntoyfarm.workspace."
                         "InputError: mu = 9.0 is outside the bounds [0, 5]\n--------")
    remote = Future()
    future = RemoteFuture(remote)
    remote.set_exception(error)
    with pytest.raises(InputError, match="outside the bounds"):
        future.result()


@pytest.fixture(scope="module")
def model():
    cfg = load_config(EXAMPLE)
    source = ModelSource(cfg.workspace, cfg.patchset, cfg.modifier_settings)
    return source.model_ref(PATCHES[0])


def test_result_size_estimate_bounds_a_real_result(model):
    n_data = len(model.build()[1])
    ranges = (ToyRange(1.0, "sb", 0, 100), ToyRange(1.0, "b", 0, 50))
    task = Task("t", model, "qtilde", 0, 128, ranges, (1.0,), save_toys=True)
    rng = np.random.default_rng(0)
    result = TaskResult("t", tuple(RangeResult(r, rng.normal(size=r.size), np.ones(r.size, bool),
                                               rng.normal(size=(r.size, n_data)))
                                   for r in ranges),
                        {1.0: (0.5, True)}, {"compiles": 1, "worker": "host:1"})
    size = len(base64.encodebytes(pickle.dumps(result)))
    assert size <= result_bytes(task, n_data) < 2 * size


def test_a_task_whose_result_is_too_large_is_refused(model):
    task = Task("t", model, "qtilde", 0, 128, (ToyRange(1.0, "sb", 0, 200_000),), save_toys=True)
    with pytest.raises(InputError, match="--batch-size"):
        globus(new_service()).submit(double, task)


@needs_sdk
def test_the_sdk_executor_is_replaced_after_a_failed_batch():
    """The real SDK Executor over a client whose batches all fail: each task fails (none
    hangs), and the function is registered once although SDK executors are replaced."""
    from globus_compute_sdk.sdk.batch import Batch
    from globus_compute_sdk.serialize import ComputeSerializer

    class Client:
        def __init__(self):
            self.fx_serializer, self.registered = ComputeSerializer(), []

        def register_function(self, fn, **_):
            self.registered.append(fn)
            return str(uuid.uuid4())

        def create_batch(self, task_group_id=None, **_):
            return Batch(task_group_id, serializer=self.fx_serializer)

        def batch_run(self, endpoint_id, batch):
            raise ConnectionError("the service refused the batch")

    client = Client()
    executor = GlobusComputeExecutor(ENDPOINT, client=client)
    try:
        for x in range(4):
            error = executor.submit(double, x).exception(timeout=30)
            assert isinstance(error, ConnectionError | RuntimeError), error
        assert executor.restarts >= 1 and client.registered == [double]
    finally:
        executor.shutdown(wait=False)


# -- choosing and configuring engines ------------------------------------------------------------


def test_executor_options_in_configs(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(EXAMPLE.read_text().replace("example/", str(EXAMPLE.parent / "example") + "/")
                      .replace('kind = "local"', 'kind = "funcx"\nendpoint = "' + ENDPOINT + '"\n'
                               'scheduler = "tcp://sched:8786"\nparsl_config = "site.py"'))
    cfg = load_config(config)
    assert (cfg.executor, cfg.endpoint, cfg.scheduler) == ("globus-compute", ENDPOINT,
                                                           "tcp://sched:8786")
    assert cfg.parsl_config == tmp_path / "site.py"
    assert cfg.with_overrides(parsl_config="other.py").parsl_config.name == "other.py"


def test_engine_options_are_checked(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["toyfarm", "generate", str(EXAMPLE), "--executor", "funcx"])
    with pytest.raises(SystemExit) as stop:  # no endpoint: one line, exit 2, before any work
        main()
    assert stop.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    with pytest.raises(InputError, match="UUID|globus-compute-sdk"):
        make_executor("funcx", 1, endpoint="not-a-uuid")
    with pytest.raises(InputError, match="unknown executor"):
        make_executor("ray", 1)
    if importlib.util.find_spec("parsl"):
        (tmp_path / "site.py").write_text("executors = []\n")
        with pytest.raises(InputError, match="must define `config`"):
            make_executor("parsl", parsl_config=tmp_path / "site.py")
        with pytest.raises(InputError, match="cannot read"):
            make_executor("parsl", parsl_config=tmp_path / "missing.py")


@needs_gc_engine
@pytest.mark.parametrize("name", ["local.yaml", "slurm-gpu.yaml"])
def test_endpoint_configs_load_and_keep_workers_warm(name):
    from globus_compute_endpoint.endpoint.config.utils import load_config_yaml

    config = load_config_yaml((EXAMPLE.parent / "endpoints" / name).read_text())
    engine, init = config.engine, config.engine.provider.worker_init
    assert type(engine).__name__ == "GlobusComputeEngine" and config.idle_heartbeats_soft == 0
    assert engine.provider.min_blocks >= 1 and engine._job_status_kwargs["max_idletime"] >= 3600
    assert "pip install" in init and "toyfarm" in init


def test_importing_toyfarm_starts_no_jax_backend():
    """Workers set XLA_FLAGS (one thread each) after the task's modules are imported: an import
    that ran JAX code would start the backend first and leave every worker multi-threaded."""
    code = ("import toyfarm.cli, toyfarm.task, toyfarm.likelihood.teststat\n"
            "from jax._src import xla_bridge\n"
            "print(bool(xla_bridge._backends))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_workers_one_per_core_are_pinned_by_rank_or_name(monkeypatch):
    """Parsl workers (parsl, gc-engine) pin from their rank at their first task, Dask's
    LocalCluster workers from their name as they start; only where they are one per core."""
    import toyfarm.executors as executors

    cores = os.cpu_count() or 1
    assert executors.PIN_VARIABLE in executors.worker_environment(cores)
    assert executors.PIN_VARIABLE not in executors.worker_environment(max(1, cores // 2)) or \
        cores == 1
    pinned = []
    monkeypatch.setattr(executors, "pin_to_core", pinned.append)
    for env, expected in [({}, False), ({executors.PIN_VARIABLE: "1"}, False),
                          ({"PARSL_WORKER_RANK": "1"}, False),
                          ({executors.PIN_VARIABLE: "1", "PARSL_WORKER_RANK": "1"}, True)]:
        monkeypatch.delenv(executors.PIN_VARIABLE, raising=False)
        monkeypatch.delenv("PARSL_WORKER_RANK", raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        executors.pin_parsl_worker.cache_clear()
        assert executors.pin_parsl_worker() is expected
    executors.pin_parsl_worker.cache_clear()
    assert pinned == [1]
    if importlib.util.find_spec("distributed"):
        import toyfarm.executors.dask as dask_executor

        monkeypatch.setattr(dask_executor, "pin_to_core", pinned.append)
        dask_executor.PinToCore().setup(SimpleNamespace(name=0))
        assert pinned == [1, 0]
