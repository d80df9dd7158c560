"""Toys per second: toyfarm against pyhf's toy loop, on the same model, in one run.

pyhf's ``ToyCalculator.distributions`` throws toys with ``Model.make_pdf(...).sample`` (broken on
numpy >= 2.4 in pyhf 0.7.6) and fits each one with ``infer.test_statistics.qmu_tilde`` on the numpy
backend with the default scipy optimizer. We time exactly that fit loop on toyfarm's own toys of
the same model (sampling is negligible beside the fits). A toy = one pseudo-dataset fully fitted
for q̃μ (conditional and free fits, from several starts).
Usage: ``python benchmarks/bench_toys.py [--quick]``.

toyfarm is measured twice: in this process (XLA's thread pool on every core), and as one spawned
process per core, each with a single-threaded XLA and pinned to its core as the local executor's
workers run, fitting at the same time (``all_cores``: the sum of their rates). Both exclude
compilation.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import time
from pathlib import Path

import numpy as np
import pyhf

from toyfarm.executors import pin_to_core, worker_environment
from toyfarm.likelihood import compile_model
from toyfarm.likelihood.run import generation_pars
from toyfarm.likelihood.sample import sample_toys, toy_keys
from toyfarm.likelihood.teststat import toy_test_statistics
from toyfarm.workspace import ModelSource

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data" / "workspaces"
SETTINGS = {"normsys": {"interpcode": "code4"}, "histosys": {"interpcode": "code4p"}}
MODELS = {  # name: (workspace, patchset, patch, verify digest, pyhf toys, toyfarm toys per core)
    "2-bin_1-channel": ("small/2-bin_1-channel.json", None, None, True, 40, 4096),
    "1Lbb simplified": ("1Lbb/simplified/BkgOnly.json", "1Lbb/simplified/patchset.json",
                        "C1N2_Wh_hbb_1000_0", False, 40, 4096),
    "sbottom_RegionA": ("sbottom_RegionA/BkgOnly.json", "sbottom_RegionA/patchset.json", None,
                        True, 8, 512),
    "1Lbb": ("1Lbb/BkgOnly.json", "1Lbb/patchset.json", "C1N2_Wh_hbb_1000_0", True, 12, 256),
}


def _prepare(spec, n_toys, seed, mu=1.0):
    """The model of ``spec`` compiled and warmed up on a batch of other toys (a warm worker:
    compilation excluded from what is timed), and the keys of the toys to time."""
    workspace, patchset, patch, verify = spec
    source = ModelSource(SHARED / workspace, patchset and SHARED / patchset, SETTINGS,
                         verify_digest=verify)
    patch = patch or source.patches()[0]
    model, data = source.model(patch)
    lk = compile_model(model)
    gen = generation_pars(lk, data, mu)
    # two batches: the straggler batches' shapes (compiled on first use) are met by then
    for other in (1000, 2000):
        warm = toy_keys(seed + other, patch, mu, "sb", np.arange(n_toys))
        toy_test_statistics(lk, "qtilde", mu, warm, gen)[0].block_until_ready()
    return model, lk, gen, toy_keys(seed, patch, mu, "sb", np.arange(n_toys)), patch


def _timed(lk, gen, keys, mu=1.0):
    """(toys/s, not converged) of toyfarm on the toys of ``keys``."""
    start = time.perf_counter()
    q, ok, _ = toy_test_statistics(lk, "qtilde", mu, keys, gen)
    q.block_until_ready()
    return keys.shape[0] / (time.perf_counter() - start), int((~np.asarray(ok)).sum())


def _worker(core, spec, n_toys, seed, barrier, results):
    # one single-threaded XLA pinned to each core, as the local executor's workers run
    os.environ.update(worker_environment(os.cpu_count() or 1))
    pin_to_core(core)
    _, lk, gen, keys, patch = _prepare(spec, n_toys, seed)
    barrier.wait()  # every core compiled and warm: they fit at the same time
    first = _timed(lk, gen, keys)
    # a second batch: a straggler shape first met in the first batch compiled inside its timing
    again = _timed(lk, gen, toy_keys(seed + 3000, patch, 1.0, "sb", np.arange(n_toys)))
    results.put(max(first, again))


def _all_cores_rate(spec, n_toys):
    """toys/s of one spawned single-threaded process per core fitting at the same time."""
    ctx = multiprocessing.get_context("spawn")
    cores = os.cpu_count() or 1
    barrier, results = ctx.Barrier(cores), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(i, spec, n_toys, 10 * i, barrier, results))
             for i in range(cores)]
    for proc in procs:
        proc.start()
    out = [results.get() for _ in procs]
    for proc in procs:
        proc.join()
    return sum(r for r, _ in out), sum(b for _, b in out), cores * n_toys


def bench(name, workspace, patchset, patch, verify, n_pyhf, n_toyfarm, mu=1.0):
    spec = (workspace, patchset, patch, verify)
    all_cores, all_bad, all_toys = _all_cores_rate(spec, n_toyfarm)
    model, lk, gen, keys, patch = _prepare(spec, n_toyfarm, 0)
    toyfarm_rate, bad = _timed(lk, gen, keys)

    toys = np.asarray(sample_toys(lk, keys[:n_pyhf], gen))
    pyhf.set_backend("numpy")
    init, bounds = model.config.suggested_init(), model.config.suggested_bounds()
    fixed = model.config.suggested_fixed()
    start = time.perf_counter()
    for toy in toys:
        pyhf.infer.test_statistics.qmu_tilde(mu, toy, model, init, bounds, fixed)
    pyhf_rate = n_pyhf / (time.perf_counter() - start)
    return {
        "model": name, "patch": patch, "parameters": lk.n_pars,
        "toyfarm_toys": n_toyfarm, "toyfarm_toys_per_s": round(toyfarm_rate, 2),
        "toyfarm_not_converged": bad,
        "all_cores_toys": all_toys, "all_cores_toys_per_s": round(all_cores, 2),
        "all_cores_not_converged": all_bad,
        "pyhf_toys": n_pyhf, "pyhf_toys_per_s": round(pyhf_rate, 4),
        "speedup": round(toyfarm_rate / pyhf_rate, 1),
        "speedup_all_cores": round(all_cores / pyhf_rate, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models only")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), help="default: all")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "toys.json")
    args = parser.parse_args()
    rows = []
    for name, spec in MODELS.items():
        if (args.quick and name in ("sbottom_RegionA", "1Lbb")) or (
                args.models and name not in args.models):
            continue
        rows.append(bench(name, *spec))
        print(json.dumps(rows[-1]), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.machine(), "cores": os.cpu_count(), "date": time.strftime("%F")}
    args.output.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
