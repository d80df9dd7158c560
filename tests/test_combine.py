"""Combining stores: the union of toys, each (seed, toy index) once; commutative, associative;
CLs of the combined store equals CLs of the pooled toys; incompatible stores are refused.

Stores are written directly through the store API with synthetic statistics (no fits): a toy's
q is a function of its identity, as in real runs, and of the fit block in its last bits, as real
fits are (toyfarm.plan: results depend on the block).
"""

import itertools
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toyfarm.merge import combine
from toyfarm.plan import HYPOTHESES
from toyfarm.results import hypotests
from toyfarm.stats import hypotest
from toyfarm.store import RunIdentity, Store
from toyfarm.workspace import InputError

MUS = (1.0, 2.0)
PATCHES = ("p", "r")
PROPERTY = settings(max_examples=25, deadline=None)


def digest_of(patch):
    return patch[0] * 64


def q_of(seed, patch, mu, hyp, index, block=8):
    rng = np.random.default_rng([seed, PATCHES.index(patch), int(mu * 10), hyp == "sb", index])
    q = float(rng.chisquare(1)) if rng.random() > 0.3 else 0.0
    return q + block * 1e-13


def converged_of(index):
    return index % 17 != 5


def q_obs_of(patch, mu):
    return 0.8 * mu + 0.3 * PATCHES.index(patch)


def make_store(path, seed, rows, block=8, observed=True, test_stat="qtilde", digest=None,
               modifier_settings=None, generation="lhc-conditional-mle"):
    """``rows[(patch, mu, hyp)]``: the toy indices done; q_obs at each μ when ``observed``."""
    identity = RunIdentity(test_stat, generation, seed, block, modifier_settings or {}, None)
    store = Store.create(path, identity, {})
    for patch in sorted({patch for patch, _, _ in rows}):
        mine = {(mu, hyp): idx for (p, mu, hyp), idx in rows.items() if p == patch}
        n = {key: max(idx, default=0) + 1 for key, idx in mine.items()}
        store.prepare(patch, digest or digest_of(patch), {"m1": 1}, n)
        for (mu, hyp), idx in mine.items():
            done = np.zeros(n[(mu, hyp)], bool)
            done[list(idx)] = True
            q = np.array([q_of(seed, patch, mu, hyp, i, block) for i in range(done.size)])
            conv = np.array([converged_of(i) for i in range(done.size)])
            store.write_toys(patch, mu, hyp, 0, q, conv, done=done)
        for mu in dict.fromkeys(mu for mu, _ in mine):
            if observed:
                store.write_observed(patch, mu, q_obs_of(patch, mu), True)
    return store.path


def contents(path):
    """A store as {toy identity: (q, converged)} and {(patch, mu): q_obs}: what it holds,
    whatever the layout (μ order, where each seed's toys sit on the toy axis)."""
    store = Store.open(path)
    toys, observed = {}, {}
    for patch in store.patches():
        mus = [float(mu) for mu in store.mus(patch)]
        q_obs, _ = store.observed(patch)
        observed.update({(patch, mu): q for mu, q in zip(mus, q_obs, strict=True)
                         if not np.isnan(q)})
        for hyp in HYPOTHESES:
            arrays = store.toys(patch, hyp)
            for seed, start, length in store.segments(patch, hyp):
                for j, mu in enumerate(mus):
                    for i in np.flatnonzero(arrays.done[j, start:start + length]):
                        toys[(patch, mu, hyp, seed, int(i))] = (
                            float(arrays.q[j, start + i]), bool(arrays.converged[j, start + i]))
    return toys, observed, dict(store.identity)


def pooled(inputs):
    """The expected union of the inputs' toys, each once; where inputs fitted a toy in different
    blocks, the smallest block's value (the order-independent choice)."""
    toys, observed = {}, {}
    for seed, block, rows, with_observed in sorted(inputs, key=lambda s: s[1]):
        for (patch, mu, hyp), idx in rows.items():
            for i in idx:
                toys.setdefault((patch, mu, hyp, seed, i),
                                (q_of(seed, patch, mu, hyp, i, block), converged_of(i)))
            if with_observed:
                observed[(patch, mu)] = q_obs_of(patch, mu)
    return toys, observed


rows = st.dictionaries(
    st.tuples(st.sampled_from(PATCHES), st.sampled_from(MUS), st.sampled_from(HYPOTHESES)),
    st.frozensets(st.integers(0, 23), max_size=12), min_size=1, max_size=5)


def inputs(blocks=(8, 16)):
    """(seed, block, rows, observed) of one input; seeds and blocks repeat across inputs."""
    return st.tuples(st.integers(0, 1), st.sampled_from(blocks), rows, st.booleans())


def written(folder, store_inputs):
    return [make_store(folder / f"in{k}.zarr", seed, r, block, observed)
            for k, (seed, block, r, observed) in enumerate(store_inputs)]


def cls_of_result(r):
    """A result as a comparable tuple (NaN equal to NaN: an undefined CLs is the same result)."""
    return tuple(np.nan_to_num(np.asarray(v, float), nan=-1.0).tolist()
                 for v in r.as_dict().values())


def pooled_cls(toys, observed, patch, mu):
    q, conv = {}, {}
    for hyp in HYPOTHESES:
        mine = [v for k, v in sorted(toys.items()) if k[:3] == (patch, mu, hyp)]
        q[hyp] = np.array([v[0] for v in mine])
        conv[hyp] = np.array([v[1] for v in mine], bool)
    return hypotest(observed.get((patch, mu), np.nan), q["sb"], q["b"], conv["sb"], conv["b"])


@settings(max_examples=20, deadline=None)
@given(st.lists(inputs(), min_size=2, max_size=3), st.data())
def test_the_combined_store_is_the_pooled_toys_in_any_order(store_inputs, data):
    """Commutative, each (seed, toy) once, and CLs equal to CLs of the pooled toys."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = written(folder, store_inputs)
        summary = combine(paths, folder / "one.zarr")
        combine(data.draw(st.permutations(paths)), folder / "other.zarr")
        toys, observed, identity = contents(folder / "one.zarr")
        assert contents(folder / "other.zarr") == (toys, observed, identity)
        assert (toys, observed) == pooled(store_inputs)
        held = sum(len(idx) for _, _, r, _ in store_inputs for idx in r.values())
        assert summary["toys"] == len(toys) and summary["duplicates"] == held - len(toys)
        assert identity["block"] == min(block for _, block, _, _ in store_inputs)
        seeds = sorted({seed for seed, *_ in store_inputs})
        assert identity["seed"] == (seeds if len(seeds) > 1 else seeds[0])
        for patch, results in hypotests(folder / "one.zarr").items():
            for mu, got in results.items():  # bit for bit: the same toys, each counted once
                assert cls_of_result(got) == cls_of_result(pooled_cls(toys, observed, patch, mu))


@settings(max_examples=10, deadline=None)
@given(st.sampled_from([8, 16]).flatmap(lambda block: st.lists(inputs((block,)), min_size=3,
                                                                max_size=3)))
def test_associative(store_inputs):
    """(a + b) + c = a + (b + c) = a + b + c, for inputs fitted in one block size (see the
    module docstring of toyfarm.merge on toys of one seed fitted in several)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        a, b, c = written(folder, store_inputs)
        combine([a, b], folder / "ab.zarr")
        combine([folder / "ab.zarr", c], folder / "ab_c.zarr")
        combine([b, c], folder / "bc.zarr")
        combine([a, folder / "bc.zarr"], folder / "a_bc.zarr")
        combine([a, b, c], folder / "abc.zarr")
        left = contents(folder / "ab_c.zarr")
        assert contents(folder / "a_bc.zarr") == left == contents(folder / "abc.zarr")
        assert left[:2] == pooled(store_inputs)


def test_a_store_combined_with_itself_is_itself(tmp_path):
    a = make_store(tmp_path / "a.zarr", 0, {("p", 1.0, "sb"): {0, 3, 9}, ("p", 2.0, "b"): {1}})
    summary = combine([a, a], tmp_path / "aa.zarr")
    assert summary["toys"] == summary["duplicates"] == 4 and summary["differing_duplicates"] == 0
    assert contents(tmp_path / "aa.zarr") == contents(a)


@pytest.mark.parametrize(("change", "message"), [
    ({"test_stat": "q"}, "test_stat differs"),
    ({"digest": "e" * 64}, "different model"),
    ({"modifier_settings": {"normsys": {"interpcode": "code1"}}}, "modifier_settings differs"),
    ({"generation": "asimov"}, "generation differs"),
])
def test_incompatible_stores_are_refused_untouched(tmp_path, change, message):
    toys = {("p", mu, hyp): {0, 1} for mu, hyp in itertools.product(MUS, HYPOTHESES)}
    a = make_store(tmp_path / "a.zarr", 0, toys)
    b = make_store(tmp_path / "b.zarr", 1, toys, **change)
    with pytest.raises(InputError, match=message):
        combine([a, b], tmp_path / "out.zarr")
    assert not (tmp_path / "out.zarr").exists()
    with pytest.raises(InputError, match="not an empty folder"):
        combine([a, a], b)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not an empty folder"):
        combine([a, a], tmp_path / "file")
