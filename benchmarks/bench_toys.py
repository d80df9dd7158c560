"""Toys per second: toyfarm against pyhf's toy loop, on the same model, in one run.

pyhf's ``ToyCalculator.distributions`` throws toys with ``Model.make_pdf(...).sample`` (broken on
numpy >= 2.4 in pyhf 0.7.6) and fits each one with ``infer.test_statistics.qmu_tilde`` on the numpy
backend with the default scipy optimizer. We time exactly that fit loop on toyfarm's own toys of
the same model (sampling is negligible beside the fits). A toy = one pseudo-dataset fully fitted
for q̃μ (a conditional and a free fit). Usage: ``python benchmarks/bench_toys.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pyhf

from toyfarm.likelihood import compile_model
from toyfarm.likelihood.run import generation_pars
from toyfarm.likelihood.sample import sample_toys, toy_keys
from toyfarm.likelihood.teststat import toy_test_statistics
from toyfarm.workspace import ModelSource

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data" / "workspaces"
SETTINGS = {"normsys": {"interpcode": "code4"}, "histosys": {"interpcode": "code4p"}}
MODELS = {  # name: (workspace, patchset, patch, verify digest, pyhf toys, toyfarm toys)
    "2-bin_1-channel": ("small/2-bin_1-channel.json", None, None, True, 40, 4096),
    "1Lbb simplified": ("1Lbb/simplified/BkgOnly.json", "1Lbb/simplified/patchset.json",
                        "C1N2_Wh_hbb_1000_0", False, 40, 4096),
    "sbottom_RegionA": ("sbottom_RegionA/BkgOnly.json", "sbottom_RegionA/patchset.json", None,
                        True, 4, 512),
    "1Lbb": ("1Lbb/BkgOnly.json", "1Lbb/patchset.json", "C1N2_Wh_hbb_1000_0", True, 2, 256),
}


def bench(name, workspace, patchset, patch, verify, n_pyhf, n_toyfarm, mu=1.0):
    source = ModelSource(SHARED / workspace, patchset and SHARED / patchset, SETTINGS,
                         verify_digest=verify)
    patch = patch or source.patches()[0]
    model, data = source.model(patch)
    lk = compile_model(model)
    gen = generation_pars(lk, data, mu)
    keys = toy_keys(0, patch, mu, "sb", np.arange(n_toyfarm))
    toy_test_statistics(lk, "qtilde", mu, keys, gen)  # compile for this batch shape
    start = time.perf_counter()
    q, ok, _ = toy_test_statistics(lk, "qtilde", mu, keys, gen)
    q.block_until_ready()
    toyfarm_rate = n_toyfarm / (time.perf_counter() - start)

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
        "toyfarm_not_converged": int((~np.asarray(ok)).sum()),
        "pyhf_toys": n_pyhf, "pyhf_toys_per_s": round(pyhf_rate, 4),
        "speedup": round(toyfarm_rate / pyhf_rate, 1),
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
