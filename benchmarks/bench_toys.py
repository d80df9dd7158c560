"""Toys per second: toyfarm against pyhf's toy loop, on the same model, in one run.

pyhf's ``ToyCalculator.distributions`` throws toys with ``Model.make_pdf(...).sample`` (broken on
numpy >= 2.4 in pyhf 0.7.6) and fits each one with ``infer.test_statistics.qmu_tilde`` on the numpy
backend with the default scipy optimizer. We time exactly that fit loop on toyfarm's own toys of
the same model (sampling is negligible beside the fits). A toy = one pseudo-dataset fully fitted
for q̃μ (a conditional and a free fit). Usage: ``python benchmarks/bench_toys.py [--quick]``.

toyfarm is measured twice: in this process (XLA's thread pool on every core), and as one spawned
process per core, each with a single-threaded XLA as the local executor's workers run, fitting
at the same time (``all_cores``: the sum of their rates). Both exclude compilation.
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

from toyfarm.executors import worker_environment
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
                        True, 4, 512),
    "1Lbb": ("1Lbb/BkgOnly.json", "1Lbb/patchset.json", "C1N2_Wh_hbb_1000_0", True, 2, 256),
}


def _toyfarm_rate(spec, n_toys, seed, mu=1.0):
    """(toys/s, not converged, patch, parameters) of toyfarm on ``n_toys`` toys of ``spec``,
    after a warm-up batch of other toys (a warm worker's figure: compilation excluded)."""
    workspace, patchset, patch, verify = spec
    source = ModelSource(SHARED / workspace, patchset and SHARED / patchset, SETTINGS,
                         verify_digest=verify)
    patch = patch or source.patches()[0]
    model, data = source.model(patch)
    lk = compile_model(model)
    gen = generation_pars(lk, data, mu)
    warm = toy_keys(seed + 1000, patch, mu, "sb", np.arange(n_toys))
    toy_test_statistics(lk, "qtilde", mu, warm, gen)[0].block_until_ready()
    keys = toy_keys(seed, patch, mu, "sb", np.arange(n_toys))
    start = time.perf_counter()
    q, ok, _ = toy_test_statistics(lk, "qtilde", mu, keys, gen)
    q.block_until_ready()
    rate = n_toys / (time.perf_counter() - start)
    return rate, int((~np.asarray(ok)).sum()), patch, lk.n_pars, model, lk, gen, keys


def _worker(spec, n_toys, seed, barrier, results):
    # one single-threaded XLA per core, as the local executor's workers run
    os.environ.update(worker_environment(os.cpu_count() or 1))
    _toyfarm_rate(spec, 8, seed + 1)  # compile and warm up on this core's own
    barrier.wait()  # both cores fit at once
    rate, bad = _toyfarm_rate(spec, n_toys, seed)[:2]
    results.put((rate, bad))


def _all_cores_rate(spec, n_toys):
    """toys/s of one spawned single-threaded process per core fitting at the same time."""
    ctx = multiprocessing.get_context("spawn")
    cores = os.cpu_count() or 1
    barrier, results = ctx.Barrier(cores), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(spec, n_toys, 10 * i, barrier, results))
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
    toyfarm_rate, bad, patch, n_pars, model, lk, gen, keys = _toyfarm_rate(spec, n_toyfarm, 0)

    toys = np.asarray(sample_toys(lk, keys[:n_pyhf], gen))
    pyhf.set_backend("numpy")
    init, bounds = model.config.suggested_init(), model.config.suggested_bounds()
    fixed = model.config.suggested_fixed()
    start = time.perf_counter()
    for toy in toys:
        pyhf.infer.test_statistics.qmu_tilde(mu, toy, model, init, bounds, fixed)
    pyhf_rate = n_pyhf / (time.perf_counter() - start)
    return {
        "model": name, "patch": patch, "parameters": n_pars,
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
    parser.add_argument("--output", type=Path, default=HERE / "results" / "toys.json")
    args = parser.parse_args()
    rows = []
    for name, spec in MODELS.items():
        if args.quick and name in ("sbottom_RegionA", "1Lbb"):
            continue
        rows.append(bench(name, *spec))
        print(json.dumps(rows[-1]), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.machine(), "cores": os.cpu_count(), "date": time.strftime("%F")}
    args.output.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
