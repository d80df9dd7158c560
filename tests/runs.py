"""Small runs of the shipped example shared by the coordinator, engine and fault tests."""

from pathlib import Path

import numpy as np

from toyfarm.config import load_config
from toyfarm.plan import HYPOTHESES
from toyfarm.store import Store

EXAMPLE = Path(__file__).parents[1] / "configs" / "example.toml"
PATCHES = ("sig_300_0", "sig_500_100")


def small_config(tmp_path, xla_cache, **overrides):
    settings = dict(store=tmp_path / "toys.zarr", patches=PATCHES, mu=(1.0, 2.0), ntoys=40,
                    ntoys_b=24, block=16, batch_size=32, compilation_cache=xla_cache)
    settings.update(overrides)
    return load_config(EXAMPLE).with_overrides(**settings)


def stored(path):
    store = Store.open(path)
    out = {}
    for patch in store.patches():
        out[(patch, "q_obs")] = store.observed(patch)[0]
        for hyp in HYPOTHESES:
            toys = store.toys(patch, hyp)
            out[(patch, hyp, "q")] = toys.q
            out[(patch, hyp, "converged")] = toys.converged
    return out


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key], equal_nan=True), key
