"""The Python API (``toyfarm.generate``, ``cls``, ``limit``, ``combine``) against the CLI, and the
CLI's result tables: brackets of every limit, the warning on toys that did not converge.

The API's stores are real runs on the shipped example's patch sig_400_0 (3 μ, 32 toys per
hypothesis in blocks of 16, tasks on a thread of this process); the table tests write stores
with the ``Store`` API and made-up q arrays (no fits: fast and exact).
"""

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import toyfarm
import toyfarm.executors
from toyfarm import api
from toyfarm.cli import main
from toyfarm.results import json_safe
from toyfarm.stats import hypotest
from toyfarm.store import RunIdentity, Store
from toyfarm.workspace import InputError

EXAMPLE = Path(__file__).parents[1] / "configs" / "example.toml"
PATCH = "sig_400_0"
MUS = [0.7, 1.0, 2.0]
NTOYS = 32


def run(monkeypatch, capsys, *args):
    """``toyfarm ARGS...`` as the console script runs it: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["toyfarm", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exit:
        code = exit.code
    out = capsys.readouterr()
    return code, out.out, out.err


def as_json(value):
    """What ``--json`` prints of a result: NaN and inf as null, tuples as lists."""
    return json.loads(json.dumps(json_safe(value)))


# --------------------------------------------------------------------- real runs via the API
@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two stores of the same toys but for the seed: (path seed 1, path seed 2, their summaries).

    Seed 1 runs on a given executor; seed 2 names its engine (``executor="local"``), which
    ``make_executor`` is stubbed to provide as a thread pool, to see what the API asks of it.
    """
    folder = tmp_path_factory.mktemp("api")
    settings = dict(patches=PATCH, mu=MUS, ntoys=NTOYS, block=16, batch_size=64,
                    compilation_cache=str(folder / "xla"))
    with ThreadPoolExecutor(1) as pool:
        first = toyfarm.generate(EXAMPLE, pool, store=folder / "a.zarr", seed=1, **settings)
    made = []

    class Engine(ThreadPoolExecutor):
        def __init__(self, kind, workers, **options):
            super().__init__(1)
            self.asked, self.closed = (kind, workers), False
            made.append(self)

        def shutdown(self, *args, **kwargs):
            self.closed = True
            super().shutdown(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(toyfarm.executors, "make_executor", Engine)
        second = toyfarm.generate(EXAMPLE, executor="local", workers=1, store=folder / "b.zarr",
                                  seed=2, **settings)
    assert [(engine.asked, engine.closed) for engine in made] == [(("local", 1), True)]
    return folder / "a.zarr", folder / "b.zarr", (first, second)


def test_generate_applies_the_overrides(stores):
    *paths, summaries = stores
    for path, seed, summary in zip(paths, (1, 2), summaries, strict=True):
        assert summary["failed"] == [] and summary["store"] == str(path)
        assert summary["toys_done"] == summary["toys_planned"] == len(MUS) * 2 * NTOYS
        store = Store.open(path)
        assert store.patches() == [PATCH] and store.mus(PATCH).tolist() == MUS
        assert store.identity["seed"] == seed and store.identity["block"] == 16
        for hyp in ("sb", "b"):
            assert store.planned(PATCH, hyp).tolist() == [NTOYS] * len(MUS)
    # other seeds, other toys
    assert not np.array_equal(Store.open(paths[0]).toys(PATCH, "b").q,
                              Store.open(paths[1]).toys(PATCH, "b").q)


def test_cls_is_the_cli_json(stores, monkeypatch, capsys):
    path = stores[0]
    result = toyfarm.cls(path)
    code, out, _ = run(monkeypatch, capsys, "cls", path, "--json")
    assert code == 0 and as_json(result) == json.loads(out)
    assert set(result[PATCH]) == {"0.7", "1.0", "2.0"}
    row = result[PATCH]["1.0"]
    assert row["ntoys_sb"] + row["not_converged_sb"] == NTOYS and len(row["CLs_exp"]) == 5
    assert 0 < row["CLs_obs"] < 1  # a real number to compare, not a null on both sides
    one = toyfarm.cls(path, patch=PATCH, mu=1.0)
    code, out, _ = run(monkeypatch, capsys, "cls", path, "--patch", PATCH, "--mu", "1", "--json")
    assert code == 0 and as_json(one) == json.loads(out) == {PATCH: {"1.0": as_json(row)}}


def test_limit_is_the_cli_json(stores, monkeypatch, capsys):
    path = stores[0]
    for level in (0.05, 0.3):
        result = toyfarm.limit(path, level=level)
        code, out, _ = run(monkeypatch, capsys, "limit", path, "--level", level, "--json")
        assert code == 0
        assert as_json({p: {"obs": r["obs"], "exp": r["exp"]} for p, r in result.items()}) \
            == json.loads(out)
        detail = result[PATCH]["detail"]
        assert len(detail["exp"]) == len(detail["status"]["exp"]) == 5
    assert toyfarm.limit(path, patch=PATCH) == toyfarm.limit(path)


def test_combine_is_the_union_of_the_toys(stores, tmp_path):
    a, b, _ = stores
    summary = toyfarm.combine([a, b], tmp_path / "ab.zarr")
    assert summary["seeds"] == [1, 2] and summary["duplicates"] == 0
    assert summary["toys"] == 2 * len(MUS) * 2 * NTOYS
    combined = toyfarm.cls(tmp_path / "ab.zarr")[PATCH]
    stores_ = [Store.open(a), Store.open(b)]
    q_obs = stores_[0].observed(PATCH)[0]
    assert np.array_equal(q_obs, stores_[1].observed(PATCH)[0])  # the same observed fit
    for i, mu in enumerate(MUS):
        sb = [s.toys(PATCH, "sb") for s in stores_]
        bo = [s.toys(PATCH, "b") for s in stores_]
        pooled = hypotest(q_obs[i], np.r_[sb[0].q[i], sb[1].q[i]], np.r_[bo[0].q[i], bo[1].q[i]],
                          np.r_[sb[0].converged[i], sb[1].converged[i]],
                          np.r_[bo[0].converged[i], bo[1].converged[i]]).as_dict()
        row = combined[str(mu)]
        assert row["ntoys_sb"] + row["not_converged_sb"] == 2 * NTOYS
        assert as_json(row) == as_json({k: pooled[k] for k in row})
    # a toy present twice counts once: a store combined with itself is itself
    again = toyfarm.combine([a, a], tmp_path / "aa.zarr")
    assert again["duplicates"] == again["toys"] == len(MUS) * 2 * NTOYS
    assert as_json(toyfarm.cls(tmp_path / "aa.zarr")) == as_json(toyfarm.cls(a))


def test_the_api_names_stay_the_api_functions():
    """No submodule shares a name of the API: importing one would rebind the package attribute
    (``toyfarm.combine`` was a module once)."""
    import toyfarm.cli  # noqa: F401 - imports every module the commands use
    import toyfarm.merge  # noqa: F401

    for name in toyfarm.__all__:
        assert getattr(toyfarm, name) is getattr(api, name)


def _bad_inputs(a: Path, tmp: Path):
    pool = ThreadPoolExecutor(1)  # nothing reaches it: every call fails first
    return {
        "not a store": (lambda: toyfarm.cls(tmp), "not a toyfarm store"),
        "unknown patch": (lambda: toyfarm.cls(a, patch="nope"), "no patch 'nope'"),
        "mu not stored": (lambda: toyfarm.cls(a, mu=5.0), "no toys at mu"),
        "limit level": (lambda: toyfarm.limit(a, level=1.5), r"level must be in \(0, 1\)"),
        "combine one": (lambda: api.combine([a], tmp / "one.zarr"), "at least two"),
        "combine into a store": (lambda: api.combine([a, a], a), "not an empty folder"),
        "mu outside bounds": (lambda: toyfarm.generate(EXAMPLE, pool, store=tmp / "x.zarr",
                                                       patches=PATCH, mu=[11.0]), "outside"),
        "ntoys": (lambda: toyfarm.generate(EXAMPLE, pool, ntoys=0), "ntoys must be positive"),
        "typo": (lambda: toyfarm.generate(EXAMPLE, pool, ntoy=5), "unknown setting 'ntoy'"),
        "engine": (lambda: toyfarm.generate(EXAMPLE, "nope"), "unknown executor 'nope'"),
        "config": (lambda: toyfarm.generate(tmp / "none.toml"), "cannot read the config"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs(Path("a"), Path("t"))))
def test_bad_input_raises_input_error(stores, tmp_path, case):
    call, message = _bad_inputs(stores[0], tmp_path)[case]
    with pytest.raises(InputError, match=message):
        call()
    assert not (tmp_path / "x.zarr").exists()


# ------------------------------------------------------------- tables of synthetic stores
IDENTITY = RunIdentity("qtilde", "lhc-conditional-mle", 0, 64, {}, None)


def synthetic_store(path, strengths, mus=(0.5, 1.0, 2.0, 4.0), n=400):
    """One patch per ``{name: k}``: s+b toys half at 0, half chi2(1); b-only toys
    (max(N(0,1) + mu k, 0))^2; observed 1.3 (mu k)^2. Larger k: smaller limits."""
    store = Store.create(path, IDENTITY, {"toyfarm": "test"})
    rng = np.random.default_rng(7)
    for patch, k in strengths.items():
        store.prepare(patch, patch * 8, {}, {(mu, h): n for mu in mus for h in ("sb", "b")})
        for mu in mus:
            q_sb = np.where(rng.random(n) < 0.5, 0.0, rng.chisquare(1, n))
            q_b = np.maximum(rng.normal(size=n) + mu * k, 0.0) ** 2
            store.write_toys(patch, mu, "sb", 0, q_sb, np.ones(n, bool))
            store.write_toys(patch, mu, "b", 0, q_b, np.ones(n, bool))
            store.write_observed(patch, mu, 1.3 * (mu * k) ** 2, True)
    return store


QUANTILES = ("-2σ", "-1σ", "median", "+1σ", "+2σ")


def brackets(rows: dict, level: float) -> list:
    """From ``cls`` rows alone: each expected quantile's (mu_lo, mu_hi) around CLs = level,
    ``(None, mu_min)`` below the scan or ``(mu_max, None)`` above it (monotone CLs here)."""
    mus = [float(mu) for mu in rows]
    out = []
    for j in range(5):
        above = [mu for mu in mus if rows[str(mu)]["CLs_exp"][j] >= level]
        if not above:
            out.append((None, mus[0]))
        elif above[-1] == mus[-1]:
            out.append((mus[-1], None))
        else:
            out.append((above[-1], mus[mus.index(above[-1]) + 1]))
    return out


def test_limit_table_names_the_brackets_of_every_quantile(monkeypatch, capsys, tmp_path):
    # weak: the +2σ limit lies above the scan; strong: the -2σ one below it
    synthetic_store(tmp_path / "s.zarr", {"strong": 1.5, "weak": 0.8})
    code, out, err = run(monkeypatch, capsys, "limit", tmp_path / "s.zarr")
    assert code == 0
    table = {patch: out.split(patch, 1)[1].split("\n  expected: ", 1)[1].split("\n", 1)[0]
             for patch in ("strong", "weak")}
    found = {}
    for patch in table:
        found[patch] = brackets(toyfarm.cls(tmp_path / "s.zarr", patch=patch)[patch], 0.05)
        for name, (lo, hi) in zip(QUANTILES, found[patch], strict=True):
            warning = f"warning: {patch}: expected {name} limit not bracketed by the grid"
            if lo is None:
                assert f"{name} < {hi:g}" in table[patch] and warning in err
            elif hi is None:
                assert f"{name} > {lo:g}" in table[patch] and warning in err
            else:
                assert f"{name} in [{lo:g}, {hi:g}]" in table[patch] and warning not in err
    # the cases this store was built for: brackets differ between quantiles, and one each is
    # outside the scan
    assert found["weak"][4] == (4.0, None) and found["strong"][0] == (None, 0.5)
    assert len(set(found["weak"][:4])) >= 2 and len(set(found["strong"][1:])) >= 2
    assert "observed: between mu = " in out and "observed limit not bracketed" not in err
    code, _, err = run(monkeypatch, capsys, "limit", tmp_path / "s.zarr", "--level", "1")
    assert code == 2 and "level must be in (0, 1), got 1.0" in err


def test_not_converged_warning_above_one_percent(monkeypatch, capsys, tmp_path):
    """400 toys per μ: 4 left out (1%) gets no warning, 5 (1.25%) does; they are left out of
    the numbers (their q = 50 would count in every tail) and counted in the JSON."""
    left_out = {1.0: (3, 1), 2.0: (2, 3)}  # s+b, b-only toys not converged
    store = Store.create(tmp_path / "s.zarr", IDENTITY, {"toyfarm": "test"})
    store.prepare("p", "p" * 8, {}, {(mu, h): 200 for mu in left_out for h in ("sb", "b")})
    q_sb, q_b = np.linspace(0, 4, 200), np.linspace(1, 9, 200)
    for mu, counts in left_out.items():
        for hyp, q, bad in (("sb", q_sb, counts[0]), ("b", q_b, counts[1])):
            converged = np.arange(200) >= bad
            store.write_toys("p", mu, hyp, 0, np.where(converged, q, 50.0), converged)
        store.write_observed("p", mu, 3.0, True)

    for args in ((), ("--json",)):
        code, out, err = run(monkeypatch, capsys, "cls", tmp_path / "s.zarr", *args)
        assert code == 0
        assert err.splitlines() == [
            "warning: p mu=2: 5 of 400 toys did not converge and are left out"]
    rows = json.loads(out)["p"]
    for mu, (bad_sb, bad_b) in left_out.items():
        row = rows[str(mu)]
        assert (row["not_converged_sb"], row["not_converged_b"]) == (bad_sb, bad_b)
        assert (row["ntoys_sb"], row["ntoys_b"]) == (200 - bad_sb, 200 - bad_b)
        clsb = np.count_nonzero(q_sb[bad_sb:] >= 3.0) / (200 - bad_sb)
        clb = np.count_nonzero(q_b[bad_b:] >= 3.0) / (200 - bad_b)
        assert (row["CLsb_obs"], row["CLb_obs"], row["CLs_obs"]) == (clsb, clb, clsb / clb)
