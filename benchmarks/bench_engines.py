"""Engines: what each executor adds per task, and toys per second with 1 and 2 workers.

On 1Lbb (patch C1N2_Wh_hbb_1000_0, 126 parameters, normsys code4 / histosys code4p; blocks of
64 toys, about a second of fitting on one core) or, with ``--model example``, the shipped example
(patch sig_300_0, blocks of 128 toys), for each engine and worker count:
- ``start_s``: starting the executor; ``first_task_s``: a first real task on each worker (model
  build, and XLA programs traced and loaded from the on-disk compilation cache, or compiled);
- per-task overhead: tasks sent one at a time, round trip minus the seconds the task itself took
  on its worker (``stats["seconds"]``), for a near-empty task (one observed μ, no toys) and a real
  batch (one block of toys); medians;
- throughput: 8 real batches (24 on the example) submitted at once, toys per second from first
  submit to last result, the best of 3 passes; the same batches ran once before, so the workers
  are warm.
``thread`` is the zero-overhead baseline: tasks run in this process. Globus Compute itself needs
the service and is not measured; ``gc-engine`` is its worker path (an endpoint's own engine).
Usage: ``python benchmarks/bench_engines.py [--engines thread,local,...] [--model 1Lbb|example]
[--quick]`` (1Lbb needs ``../shared/data``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

from toyfarm.config import DEFAULT_COMPILATION_CACHE, load_config
from toyfarm.executors import make_executor
from toyfarm.plan import ToyRange
from toyfarm.task import Task, run_task
from toyfarm.workspace import ModelSource

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent / "configs" / "example.toml"
SHARED = HERE.parent.parent / "shared" / "data" / "workspaces"
SETTINGS = {"normsys": {"interpcode": "code4"}, "histosys": {"interpcode": "code4p"}}
MU = 1.0
MODELS = {  # name: (patch, toys per block, throughput tasks)
    "1Lbb": ("C1N2_Wh_hbb_1000_0", 64, 8),
    "example": ("sig_300_0", 128, 24),
}
ENGINES = ("thread", "local", "dask", "parsl", "gc-engine")


def model_ref(name: str):
    """The model of ``name`` as tasks carry it."""
    if name == "1Lbb":
        source = ModelSource(SHARED / "1Lbb" / "BkgOnly.json", SHARED / "1Lbb" / "patchset.json",
                             SETTINGS)
    else:
        cfg = load_config(EXAMPLE)
        source = ModelSource(cfg.workspace, cfg.patchset, cfg.modifier_settings)
    return source.model_ref(MODELS[name][0])


def tasks(ref, block: int, first: int, count: int, toys: bool = True,
          observed: bool = False) -> list[Task]:
    """``count`` tasks of one block of toys each (blocks ``first``, ...) and/or the observed
    statistic at μ = 1 (alone: the near-empty task)."""
    return [Task(f"bench.{first + i}", ref, "qtilde", 0, block,
                 (ToyRange(MU, "sb", (first + i) * block, (first + i + 1) * block),) if toys
                 else (), (MU,) if observed else (), compilation_cache=DEFAULT_COMPILATION_CACHE)
            for i in range(count)]


def round_trips(executor, batch: list[Task]) -> tuple[float, float]:
    """Median round trip and median engine overhead (round trip - time on the worker), s."""
    trips, overheads = [], []
    for task in batch:
        start = time.perf_counter()
        result = executor.submit(run_task, task).result()
        trips.append(time.perf_counter() - start)
        overheads.append(trips[-1] - result.stats["seconds"])
    return statistics.median(trips), statistics.median(overheads)


def warm_up(executor, ref, block: int, workers: int) -> tuple[float, int]:
    """Real tasks, ``workers`` at a time, until that many distinct workers have run one."""
    start, seen, first = time.perf_counter(), set(), 10_000
    for _ in range(5):
        futures = [executor.submit(run_task, t)
                   for t in tasks(ref, block, first, workers, observed=True)]
        seen |= {f.result().stats["worker"] for f in futures}
        first += workers
        if len(seen) >= workers:
            break
    return time.perf_counter() - start, len(seen)


def run_all(executor, batch: list[Task]) -> float:
    """Seconds to run ``batch``, all submitted at once."""
    start = time.perf_counter()
    done, _ = wait([executor.submit(run_task, t) for t in batch])
    assert all(f.exception() is None for f in done)
    return time.perf_counter() - start


def bench(kind: str, workers: int, ref, block: int, n_tasks: int, n_trips: int) -> dict:
    start = time.perf_counter()
    executor = ThreadPoolExecutor(1) if kind == "thread" else make_executor(kind, workers)
    started = time.perf_counter() - start
    batch = tasks(ref, block, 0, n_tasks)
    try:
        first, warm = warm_up(executor, ref, block, workers)
        # a first pass compiles what these blocks need beyond the first task (the programs
        # for a block's slow-to-converge toys); the timed pass repeats it
        run_all(executor, batch)
        empty = tasks(ref, block, 0, n_trips, toys=False, observed=True)
        empty_trip, empty_overhead = round_trips(executor, empty)
        batch_trip, batch_overhead = round_trips(executor, batch[:n_trips])
        seconds = min(run_all(executor, batch) for _ in range(3))  # others share the cores
    finally:
        executor.shutdown(wait=True)
    return {
        "engine": kind, "workers": workers, "warm_workers": warm,
        "start_s": round(started, 2), "first_task_s": round(first, 2),
        "empty_task_round_trip_ms": round(1e3 * empty_trip, 1),
        "empty_task_overhead_ms": round(1e3 * empty_overhead, 1),
        "batch_task_round_trip_ms": round(1e3 * batch_trip, 1),
        "batch_task_overhead_ms": round(1e3 * batch_overhead, 1),
        "throughput_tasks": n_tasks, "throughput_toys": n_tasks * block,
        "throughput_toys_per_s": round(n_tasks * block / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help=f"comma-separated, of {', '.join(ENGINES)}")
    parser.add_argument("--model", choices=MODELS, default="1Lbb")
    parser.add_argument("--quick", action="store_true", help="fewer tasks")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "engines.json")
    args = parser.parse_args()
    patch, block, n_tasks = MODELS[args.model]
    ref = model_ref(args.model)
    n_tasks, n_trips = (max(2, n_tasks // 3), 3) if args.quick else (n_tasks, 5)
    rows = []
    for kind in args.engines.split(","):
        for workers in (1,) if kind == "thread" else (1, 2):
            rows.append(bench(kind, workers, ref, block, n_tasks, n_trips))
            print(json.dumps(rows[-1]), flush=True)
    meta = {"machine": platform.machine(), "cores": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "date": time.strftime("%Y-%m-%d"), "model": f"{args.model} {patch}",
            "block": block}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
