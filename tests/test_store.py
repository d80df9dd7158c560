"""The Zarr store: layout, resumable writes, refusing other runs' toys, locking."""

import json
import os

import numpy as np
import pytest

from toyfarm.store import SCHEMA_VERSION, RunIdentity, Store
from toyfarm.workspace import InputError

IDENTITY = RunIdentity("qtilde", "lhc-conditional-mle", 7, 4, {"normsys": {"interpcode": "code4"}},
                       None)
NTOYS = {(mu, hyp): n for mu in (1.0, 2.0) for hyp, n in (("sb", 10), ("b", 6))}


@pytest.fixture
def store(tmp_path):
    s = Store.create(tmp_path / "s.zarr", IDENTITY, {"toyfarm": "test"})
    s.prepare("p", "d" * 64, {"m1": 300}, NTOYS)
    return s


def test_new_store_is_empty_and_plans_everything(store):
    missing = store.missing("p", NTOYS)
    assert missing[(1.0, "sb")].tolist() == list(range(10))
    assert missing[(2.0, "b")].tolist() == list(range(6))
    assert store.missing_observed("p", [1.0, 2.0]) == [1.0, 2.0]
    assert store.planned("p", "sb").tolist() == [10, 10]
    assert store.patch_attrs("p")["labels"] == {"m1": 300}


def test_written_toys_are_done_and_read_back(store):
    store.write_toys("p", 2.0, "sb", 4, np.array([1.5, np.nan, 0.0]), np.array([True, True, False]))
    toys = store.toys("p", "sb")
    assert toys.done[1].tolist() == [False] * 4 + [True] * 3 + [False] * 3
    # a fit with no finite number is never a number: +inf, not converged
    assert toys.q[1, 4:7].tolist() == [1.5, np.inf, 0.0]
    assert toys.converged[1, 4:7].tolist() == [True, False, False]
    assert np.isnan(toys.q[0]).all()
    assert store.missing("p", NTOYS)[(2.0, "sb")].tolist() == [0, 1, 2, 3, 7, 8, 9]


def test_prepare_extends_mu_and_toys_without_losing_any(store):
    store.write_toys("p", 1.0, "b", 0, np.arange(6.0), np.ones(6, bool))
    more = {(3.0, "sb"): 20, (3.0, "b"): 6, (1.0, "sb"): 20, (1.0, "b"): 6}
    store.prepare("p", "d" * 64, {"m1": 300}, more)
    assert store.mus("p").tolist() == [1.0, 2.0, 3.0]
    assert store.planned("p", "sb").tolist() == [20, 10, 20]
    assert store.toys("p", "b").q[0].tolist() == list(np.arange(6.0))
    assert store.missing("p", more)[(1.0, "b")].size == 0
    assert store.missing("p", more)[(1.0, "sb")].tolist() == list(range(20))


def test_reopening_with_other_toys_is_refused(store, tmp_path):
    other = RunIdentity(**{**IDENTITY.as_dict(), "seed": 8})
    with pytest.raises(InputError, match="seed"):
        Store.create(store.path, other, {})
    with pytest.raises(InputError, match="different model"):
        store.prepare("p", "e" * 64, {}, NTOYS)
    with pytest.raises(InputError, match="save-toys"):
        Store.create(store.path, IDENTITY, {}, save_toys=True)


def test_observed_and_stats(store):
    store.write_observed("p", 1.0, 0.25, True)
    q_obs, ok = store.observed("p")
    assert q_obs[0] == 0.25 and ok.tolist() == [True, False]
    store.add_stats({"compiles": 1, "cache_hits": 0, "compile_seconds": 2.5, "fit_seconds": 1.0})
    store.add_stats({"compiles": 0, "cache_hits": 1, "compile_seconds": 0.0, "fit_seconds": 1.0})
    reopened = Store.open(store.path)
    assert reopened.stats() == {"tasks": 2, "compiles": 1, "cache_hits": 1,
                                "compile_seconds": 2.5, "fit_seconds": 2.0}


def test_an_observed_fit_that_failed_gives_no_observed_cls(store):
    from toyfarm.results import hypotests

    for mu in (1.0, 2.0):
        store.write_toys("p", mu, "sb", 0, np.linspace(0, 2, 10), np.ones(10, bool))
        store.write_toys("p", mu, "b", 0, np.linspace(0, 1, 6), np.ones(6, bool))
    store.write_observed("p", 1.0, 0.5, True)
    store.write_observed("p", 2.0, 0.5, False)
    rows = hypotests(store)["p"]
    assert np.isfinite(rows[1.0].CLs_obs) and np.isnan(rows[2.0].CLs_obs)
    assert np.isfinite(rows[2.0].CLs_exp).all()  # the band needs no observed data


def test_a_damaged_observed_chunk_is_found_and_refitted(store):
    store.write_observed("p", 1.0, 0.25, True)
    chunk = store._chunk_file(store._group("p")["q_obs"], (0,))
    chunk.write_bytes(chunk.read_bytes()[:3])  # truncated
    damage = store.check()
    assert len(damage) == 1 and "observed" in damage[0]
    store.check(repair=True)
    assert store.check() == []
    assert store.missing_observed("p", [1.0, 2.0]) == [1.0, 2.0]


def test_saved_toys(tmp_path):
    s = Store.create(tmp_path / "t.zarr", IDENTITY, {}, save_toys=True)
    s.prepare("p", "d" * 64, {}, NTOYS)
    toys = np.arange(12.0).reshape(2, 6)
    s.write_toys("p", 1.0, "sb", 2, np.array([1.0, 2.0]), np.array([True, True]), toys)
    import zarr

    saved = zarr.open_group(tmp_path / "t.zarr", mode="r")["p/sb/toys"]
    assert saved.shape == (2, 10, 6)
    assert np.array_equal(saved[0, 2:4], toys) and np.isnan(saved[0, 0]).all()


def test_not_a_store_and_newer_schema(tmp_path, store):
    with pytest.raises(InputError, match="not a toyfarm store"):
        Store.open(tmp_path)
    meta_file = store.path / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["toyfarm"]["schema_version"] = SCHEMA_VERSION + 1
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="newer toyfarm"):
        Store.open(store.path)


def test_lock_refuses_a_second_writer_and_takes_over_a_dead_ones(store):
    with store.lock():
        with pytest.raises(InputError, match="in use by another toyfarm run"):
            with Store.open(store.path, writable=True).lock():
                pass
    lock = store.path.with_name(store.path.name + ".lock")
    assert not lock.exists()
    # a lock left by a process that no longer exists (pid beyond pid_max) is taken over
    import socket

    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 12345}))
    with store.lock():
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_check_patch_refuses_before_anything_is_written(store, tmp_path):
    files = sorted(p for p in store.path.rglob("*") if p.is_file())
    store.check_patch("p", "d" * 64)  # the model the store holds: fine
    store.check_patch("new", "e" * 64)  # a patch not in the store yet: fine
    with pytest.raises(InputError, match="different model for patch 'p'"):
        store.check_patch("p", "e" * 64)
    for name in ("a/b", ".hidden"):
        with pytest.raises(InputError, match="cannot name a store group"):
            store.check_patch(name, "d" * 64)
    assert sorted(p for p in store.path.rglob("*") if p.is_file()) == files
    assert store.patches() == ["p"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file, not a store folder"):
        Store.create(tmp_path / "file", IDENTITY, {})
