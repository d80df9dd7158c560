"""Warm workers and the coordinator on 1Lbb: cold vs warm task latency, time to first result,
and the seed workload (125 signal points x 1000 s+b + 1000 b-only toys at μ = 1).

    python benchmarks/bench_coordinator.py [--patches N] [--ntoys N] [--workers 2]

1. Task latency, each in a fresh spawned process with the on-disk XLA cache off (cold) or
   primed (cold, disk cache): the first task of a 1Lbb model (parse, compile, fit) and a second
   task of another block of toys of the same model (warm); the warm task's overhead is its
   wall time minus the time of the same fits called directly.
2. ``toyfarm generate`` on the first ``--patches`` signal points of configs/1Lbb.toml with
   ``--ntoys`` toys per hypothesis and local workers: time to first result, toys/s, compiles and
   cache hits; the seed workload's time is extrapolated from the measured toys/s (said so).
Writes results/coordinator.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "configs" / "1Lbb.toml"


def _latency(disk_cache: str, block: int) -> dict:
    """In a fresh process: cold task, warm task, and the same fits called directly."""
    import numpy as np

    from toyfarm.config import load_config
    from toyfarm.plan import ToyRange
    from toyfarm.task import Task, run_task
    from toyfarm.workspace import ModelSource

    cfg = load_config(CONFIG)
    source = ModelSource(cfg.workspace, cfg.patchset, cfg.modifier_settings)
    ref = source.model_ref(source.patches()[0])

    def task(first: int) -> Task:
        return Task(f"t{first}", ref, "qtilde", 0, block,
                    (ToyRange(1.0, "sb", first, first + block),), (), False, disk_cache)

    t0 = time.perf_counter()
    cold = run_task(task(0))
    cold_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm = run_task(task(block))
    warm_s = time.perf_counter() - t0

    import worker_cache
    from toyfarm.likelihood.run import block_statistics

    model, _ = worker_cache.cache.get((ref.digest, "qtilde", "float64", block), lambda: None)
    gen = model.generation_pars(1.0)
    t0 = time.perf_counter()
    direct = block_statistics(model.lk, "qtilde", 1.0, gen, 0, ref.name, "sb", block, block,
                              False)
    fit_s = time.perf_counter() - t0
    assert np.array_equal(direct.q, warm.ranges[0].q, equal_nan=True)
    return {"cold_task_s": cold_s, "warm_task_s": warm_s, "direct_fit_s": fit_s,
            "warm_overhead_s": warm_s - fit_s, "cold_stats": cold.stats, "warm_stats": warm.stats}


def latency(disk_cache: str, block: int) -> dict:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_latency, disk_cache, block).result()


def seed_workload(patches: int, ntoys: int, workers: int, disk_cache: str) -> dict:
    from toyfarm.config import load_config
    from toyfarm.coordinator import generate
    from toyfarm.executors.local import LocalExecutor
    from toyfarm.workspace import ModelSource

    cfg = load_config(CONFIG)
    names = ModelSource(cfg.workspace, cfg.patchset).patches()[:patches]
    with tempfile.TemporaryDirectory() as tmp:
        run = cfg.with_overrides(store=Path(tmp) / "seed.zarr", patches=names, ntoys=ntoys,
                                 workers=workers, compilation_cache=disk_cache)
        executor = LocalExecutor(workers)
        try:
            report = generate(run, executor).as_dict()
        finally:
            executor.shutdown()
    rate = report["toys_per_second"]
    report["seed_workload_toys"] = 125 * 2000
    report["seed_workload_extrapolated_s"] = round(125 * 2000 / rate, 1) if rate else None
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=4)
    parser.add_argument("--ntoys", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--block", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as disk:
        results = {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "load_before": os.getloadavg()},
            "cold_no_disk_cache": latency("", args.block),
            "cold_disk_cache_primed": None,
        }
        latency(disk, args.block)  # primes the disk cache
        results["cold_disk_cache_primed"] = latency(disk, args.block)
        results["generate"] = seed_workload(args.patches, args.ntoys, args.workers, disk)
    results["machine"]["load_after"] = os.getloadavg()
    out = HERE / "results" / "coordinator.json"
    out.write_text(json.dumps(results, indent=2, default=float))
    cold, warm = results["cold_no_disk_cache"], results["cold_no_disk_cache"]["warm_task_s"]
    print(f"cold task {cold['cold_task_s']:.1f} s, warm task {warm:.1f} s "
          f"(cold/warm {cold['cold_task_s'] / warm:.1f}x), warm overhead "
          f"{cold['warm_overhead_s']:.2f} s of {cold['direct_fit_s']:.1f} s fits")
    primed = results["cold_disk_cache_primed"]
    print(f"cold task with a primed disk cache {primed['cold_task_s']:.1f} s")
    gen = results["generate"]
    print(f"generate: {gen['toys_done']} toys in {gen['seconds']} s ({gen['toys_per_second']} "
          f"toys/s), first result after {gen['first_result_seconds']} s, compiles "
          f"{gen['compiles']}, cache hits {gen['cache_hits']}; seed workload extrapolated "
          f"{gen['seed_workload_extrapolated_s']} s")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
