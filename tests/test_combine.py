"""Combining stores: the union of toys, each (seed, toy index) once; commutative, associative;
CLs of the combined store equals CLs of the pooled toys; incompatible stores are refused."""

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toyfarm.combine import combine
from toyfarm.results import hypotests
from toyfarm.stats import hypotest
from toyfarm.store import RunIdentity, Store
from toyfarm.workspace import InputError

MUS = (1.0, 2.0)
DIGEST = "d" * 64


def q_of(seed, mu, hyp, index):
    """A toy's statistic is a function of its identity, as in real runs."""
    rng = np.random.default_rng([seed, int(mu * 10), hyp == "sb", index])
    return float(rng.chisquare(1)) if rng.random() > 0.3 else 0.0


def make_store(path, seed, toys, test_stat="qtilde", digest=DIGEST, modifier_settings=None,
               generation="lhc-conditional-mle"):
    """``toys[(mu, hyp)]``: toy indices done (a toy ``% 17 == 5`` did not converge)."""
    identity = RunIdentity(test_stat, generation, seed, 8, modifier_settings or {}, None)
    store = Store.create(path, identity, {})
    n = {key: (max(idx) + 1 if len(idx) else 1) for key, idx in toys.items()}
    store.prepare("p", digest, {"m1": 1}, n)
    for (mu, hyp), idx in toys.items():
        done = np.zeros(n[(mu, hyp)], bool)
        done[list(idx)] = True
        q = np.array([q_of(seed, mu, hyp, i) for i in range(done.size)])
        store.write_toys("p", mu, hyp, 0, q, np.arange(done.size) % 17 != 5, done=done)
    for mu in MUS:
        store.write_observed("p", mu, 0.8 * mu, True)
    return store


def pooled(*sets):
    """The union of toy identities of several (seed, toys) inputs."""
    out = {}
    for seed, toys in sets:
        for (mu, hyp), idx in toys.items():
            out.setdefault((mu, hyp), set()).update((seed, i) for i in idx)
    return out


toy_sets = st.fixed_dictionaries({
    (mu, hyp): st.sets(st.integers(0, 40), max_size=30) for mu in MUS for hyp in ("sb", "b")
})


def cls_of_result(r):
    """A result as a comparable tuple (NaN equal to NaN: an undefined CLs is the same result)."""
    return tuple(np.nan_to_num(np.asarray(v, float), nan=-1.0).tolist()
                 for v in r.as_dict().values())


def cls_of(path):
    return {mu: cls_of_result(r) for mu, r in hypotests(path)["p"].items()}


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 2), toy_sets), min_size=2, max_size=3))
def test_combined_store_is_the_pooled_toys(tmp_path_factory, inputs):
    tmp = tmp_path_factory.mktemp("c")
    paths = [make_store(tmp / f"in{i}.zarr", seed, toys).path
             for i, (seed, toys) in enumerate(inputs)]
    summary = combine(paths, tmp / "out.zarr")
    union = pooled(*inputs)
    assert summary["toys"] == sum(len(v) for v in union.values())
    results = cls_of(tmp / "out.zarr")
    for mu in MUS:
        q = {hyp: np.array([q_of(s, mu, hyp, i) for s, i in sorted(union[(mu, hyp)])])
             for hyp in ("sb", "b")}
        ok = {hyp: np.array([i % 17 != 5 for _, i in sorted(union[(mu, hyp)])], bool)
              for hyp in ("sb", "b")}
        expected = hypotest(0.8 * mu, q["sb"], q["b"], ok["sb"], ok["b"])
        assert results[mu] == cls_of_result(expected)  # bit for bit: same toys, counted once


def test_commutative_associative_and_idempotent(tmp_path):
    rng = np.random.default_rng(1)
    inputs = [(seed, {(mu, hyp): set(rng.choice(30, 12, replace=False).tolist())
                      for mu in MUS for hyp in ("sb", "b")}) for seed in (0, 1, 0)]
    a, b, c = (make_store(tmp_path / f"{name}.zarr", seed, toys).path
               for name, (seed, toys) in zip("abc", inputs, strict=True))
    combine([a, b], tmp_path / "ab.zarr")
    combine([b, a], tmp_path / "ba.zarr")
    assert cls_of(tmp_path / "ab.zarr") == cls_of(tmp_path / "ba.zarr")
    combine([tmp_path / "ab.zarr", c], tmp_path / "ab_c.zarr")
    combine([b, c], tmp_path / "bc.zarr")
    combine([a, tmp_path / "bc.zarr"], tmp_path / "a_bc.zarr")
    assert cls_of(tmp_path / "ab_c.zarr") == cls_of(tmp_path / "a_bc.zarr")
    summary = combine([a, a], tmp_path / "aa.zarr")  # the same toys twice count once
    assert summary["duplicates"] == summary["toys"] and summary["differing_duplicates"] == 0
    assert cls_of(tmp_path / "aa.zarr") == cls_of(a)


@pytest.mark.parametrize(("change", "message"), [
    ({"test_stat": "q"}, "test_stat differs"),
    ({"digest": "e" * 64}, "different model"),
    ({"modifier_settings": {"normsys": {"interpcode": "code1"}}}, "modifier_settings differs"),
    ({"generation": "asimov"}, "generation differs"),
])
def test_incompatible_stores_are_refused_untouched(tmp_path, change, message):
    toys = {(mu, hyp): {0, 1} for mu, hyp in itertools.product(MUS, ("sb", "b"))}
    a = make_store(tmp_path / "a.zarr", 0, toys).path
    b = make_store(tmp_path / "b.zarr", 1, toys, **change).path
    with pytest.raises(InputError, match=message):
        combine([a, b], tmp_path / "out.zarr")
    assert not (tmp_path / "out.zarr").exists()
    with pytest.raises(InputError, match="not an empty folder"):
        combine([a, a], b)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not an empty folder"):
        combine([a, a], tmp_path / "file")
