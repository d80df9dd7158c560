"""Adaptive toys: ``generate --target-cls-error E [--max-toys N] [--level L]`` end to end.

The rule (``stats.needs_more_toys``) is unit-tested on constructed results; the loop
(``coordinator.more_toys``) runs for real on the shipped example's patch sig_400_0 at μ = 0.2,
1 and 2 (CLs_obs ≈ 0.7, 0.09 and 0.005), from 32 toys per hypothesis in blocks of 16, in this
process (the CLI with a thread pool in place of worker processes). Every stored (patch, μ) is
checked against the rule replayed on its stored toys: toy t is the same pseudo-dataset in every
round, so the first m stored toys are exactly what the loop judged when it held m toys.
"""

import json
import math
import sys
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from runs import assert_identical, stored

import toyfarm.executors
from toyfarm.cli import main
from toyfarm.config import load_config
from toyfarm.coordinator import generate
from toyfarm.stats import HypotestResult, hypotest, needs_more_toys
from toyfarm.store import Store
from toyfarm.workspace import InputError

EXAMPLE = Path(__file__).parents[1] / "configs" / "example"
PATCH = "sig_400_0"
MUS = (0.2, 1.0, 2.0)
START = 32  # s+b and b-only toys per μ in the first round
TARGET = 0.02


# ------------------------------------------------------------------------- the rule, exactly
def result(cls, err, n_sb=1000, n_b=1000, q_obs=1.0):
    nan = math.nan
    return HypotestResult(q_obs, cls, nan, nan, err, nan, nan, (nan,) * 5, n_sb, n_b, 0, 0)


@pytest.mark.parametrize(
    ("res", "target", "level", "more"),
    [
        # dyadic numbers, so the boundaries are exact: err == target stops
        (result(0.125, 0.0625), 0.0625, 0.05, False),
        (result(0.125, 0.0625), 0.0624, 0.05, True),
        # |CLs - level| == 3 err stops, a hair closer does not
        (result(0.5, 0.125), 0.01, 0.125, False),
        (result(0.5, 0.125), 0.01, 0.126, True),
        # the level moves the decision: CLs = 0.1 ± 0.02 is 4σ from 0.02 and 0.2, 2.5σ from 0.05
        (result(0.1, 0.02), 0.01, 0.05, True),
        (result(0.1, 0.02), 0.01, 0.2, False),
        (result(0.1, 0.02), 0.01, 0.02, False),
        # min_toys (100) on each side: below it the error is too rough to stop on
        (result(0.5, 0.001, n_sb=100, n_b=100), 0.01, 0.05, False),
        (result(0.5, 0.001, n_sb=99), 0.01, 0.05, True),
        (result(0.5, 0.001, n_b=99), 0.01, 0.05, True),
        # undefined CLs (CLb = 0) or error: only more toys can help
        (result(math.nan, math.nan), 0.01, 0.05, True),
        (result(math.inf, math.nan), 0.01, 0.05, True),
    ],
)
def test_needs_more_toys_decisions(res, target, level, more):
    assert needs_more_toys(res, target, level) is more


def test_needs_more_toys_on_counted_toys_and_level():
    """200 s+b toys, 20 of them at or above q_obs, every b-only toy above: CLs = 0.1 ± 0.0212."""
    q_sb = np.r_[np.zeros(180), np.full(20, 3.0)]
    r = hypotest(1.0, q_sb, np.full(200, 5.0))
    assert r.CLs_obs == pytest.approx(0.1) and r.CLs_obs_error == pytest.approx(0.0212, abs=1e-4)
    assert needs_more_toys(r, 0.01, level=0.05)  # 0.05 away: 2.4σ
    assert not needs_more_toys(r, 0.01, level=0.2)  # 0.1 away: 4.7σ
    assert not needs_more_toys(r, 0.025, level=0.05)  # precise enough already


def test_level_in_config_and_checked(tmp_path):
    config = tmp_path / "run.toml"
    base = '[workspace]\npath = "w.json"\n[toys]\n'
    config.write_text(base + "target_cls_error = 0.01\nmax_toys = 4096\nlevel = 0.1\n")
    cfg = load_config(config)
    assert (cfg.target_cls_error, cfg.max_toys, cfg.level) == (0.01, 4096, 0.1)
    assert load_config(config).with_overrides(level=0.32).level == 0.32
    config.write_text(base)
    assert load_config(config).level == 0.05
    for bad, message in (("1.5", r"level must be in \(0, 1\), got 1.5"),
                         ("0", r"level must be in \(0, 1\), got 0.0"),
                         ('"5%"', r"\[toys\] level must be a number")):
        config.write_text(base + f"level = {bad}\n")
        with pytest.raises(InputError, match=message):
            load_config(config)
    with pytest.raises(InputError, match="level must be in"):
        cfg.with_overrides(level=-0.05)


# ---------------------------------------------------------------------------- the loop, run
@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla"))


def write_config(folder: Path, xla_cache: str, extra: str = "") -> Path:
    """sig_400_0 at MUS, START toys in blocks of 16, in-process-sized tasks; ``extra`` [toys]."""
    config = folder / "run.toml"
    config.write_text("\n".join([
        "[workspace]",
        f"path = {json.dumps(str(EXAMPLE / 'BkgOnly.json'))}",
        f"patchset = {json.dumps(str(EXAMPLE / 'patchset.json'))}",
        f"patches = [{json.dumps(PATCH)}]",
        "[workspace.modifier_settings]",
        'normsys = { interpcode = "code4" }',
        'histosys = { interpcode = "code4p" }',
        "[toys]",
        f"mu = {list(MUS)}", f"ntoys = {START}", "block = 16", "batch_size = 64", extra,
        "[executor]", f"compilation_cache = {json.dumps(xla_cache)}", "retries = 0",
        "[output]", 'store = "adaptive.zarr"',
    ]) + "\n")
    return config


@pytest.fixture
def cli(monkeypatch, capsys):
    """``toyfarm ARGS...`` in this process, tasks on a thread: (exit code, stdout, stderr)."""
    monkeypatch.setattr(toyfarm.executors, "make_executor", lambda *a, **k: ThreadPoolExecutor(1))

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["toyfarm", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as exit:
            code = exit.code
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def test_bad_level_flag_exits_2(cli, tmp_path, xla_cache):
    config = write_config(tmp_path, xla_cache)
    code, _, err = cli("generate", config, "--target-cls-error", TARGET, "--level", 1.5)
    assert code == 2 and err.strip() == "toyfarm: error: level must be in (0, 1), got 1.5"
    assert not (tmp_path / "adaptive.zarr").exists()


def replay(path: Path, target: float, cap: int, level: float = 0.05) -> dict[float, tuple]:
    """Check a store against the rule; ``{mu: (s+b toys, whether the rule still asks more)}``.

    Each μ must hold START, 2 START, 4 START, ... toys (the last step cut at ``cap``), every one
    of them done and none beyond; the rule must have asked for more at every earlier step and
    be satisfied at the last one unless the cap stopped it.
    """
    store = Store.open(path)
    q_obs, _ = store.observed(PATCH)
    sb, b = store.toys(PATCH, "sb"), store.toys(PATCH, "b")
    out = {}
    for i, mu in enumerate(store.mus(PATCH)):
        n = int(store.planned(PATCH, "sb")[i])
        assert store.planned(PATCH, "b")[i] == n  # b-only toys keep the 1:1 ratio
        for toys in (sb, b):
            assert toys.done[i, :n].all() and toys.done[i].sum() == n
        steps = [START]
        while steps[-1] < n:
            steps.append(min(2 * steps[-1], cap))
        assert steps[-1] == n, (mu, steps, n)
        more = [needs_more_toys(hypotest(q_obs[i], sb.q[i, :m], b.q[i, :m], sb.converged[i, :m],
                                         b.converged[i, :m]), target, level) for m in steps]
        assert all(more[:-1]), (mu, steps, more)
        assert n == cap or not more[-1], (mu, steps, more)
        out[float(mu)] = (n, more[-1])
    return out


@pytest.fixture(scope="module")
def capped(tmp_path_factory, xla_cache):
    """A config for the CLI's adaptive runs, and the store they fill: (config, store)."""
    folder = tmp_path_factory.mktemp("capped")
    config = write_config(folder, xla_cache)
    return config, folder / "adaptive.zarr"


def test_toys_double_until_precise_or_capped(cli, capped):
    config, store = capped
    flags = ("--target-cls-error", TARGET, "--max-toys", 256)
    code, out, err = cli("generate", config, *flags)
    assert code == 0, err
    summary = json.loads(out)
    counts = replay(store, TARGET, cap=256)
    # μ = 0.2: CLs ≈ 0.7 is 3σ from 0.05 once 100 toys allow a decision (128); μ = 2: error
    # 0.013 <= 0.02 at 128; μ = 1: CLs ≈ 0.1 ± 0.025 at 256 still wants more, the cap stops it
    assert counts == {0.2: (128, False), 1.0: (256, True), 2.0: (128, False)}
    assert summary["failed"] == [] and summary["rounds"] == 4  # 32, 64, 128, 256
    assert summary["toys_done"] == summary["toys_planned"] == 2 * (128 + 256 + 128)

    # what is stored is what was done: info and cls count the same toys
    code, out, _ = cli("info", store, "--json")
    info = json.loads(out)
    assert info["toys_planned"] == info["toys_done"] == summary["toys_done"]
    assert info["missing"] == []
    code, out, _ = cli("cls", store, "--json")
    for mu, row in json.loads(out)[PATCH].items():
        n = counts[float(mu)][0]
        assert row["ntoys_sb"] + row["not_converged_sb"] == row["ntoys_b"] + row[
            "not_converged_b"] == n

    # the same command again: the criterion (or the cap) is met everywhere, nothing is added
    before = stored(store)
    code, out, err = cli("generate", config, *flags)
    assert code == 0, err
    again = json.loads(out)
    assert again["toys_planned"] == again["toys_done"] == again["tasks"] == 0
    assert again["rounds"] == 1
    assert_identical(before, stored(store))

    # a higher cap goes on where the cap stopped, and only there
    code, out, err = cli("generate", config, "--target-cls-error", TARGET, "--max-toys", 1024)
    assert code == 0, err
    assert json.loads(out)["toys_done"] == 2 * (512 - 256)
    assert replay(store, TARGET, cap=1024) == {0.2: (128, False), 1.0: (512, False),
                                                2.0: (128, False)}
    assert_identical({k: v[:, :256] if v.ndim == 2 else v for k, v in stored(store).items()},
                     before)


def test_level_from_the_config(cli, tmp_path, xla_cache):
    """``level = 0.2`` in [toys]: CLs ≈ 0.08 ± 0.03 at μ = 1 is 3σ from it at 128 toys."""
    config = write_config(tmp_path, xla_cache,
                          f"target_cls_error = {TARGET}\nmax_toys = 1024\nlevel = 0.2")
    code, out, err = cli("generate", config)
    assert code == 0, err
    counts = replay(tmp_path / "adaptive.zarr", TARGET, cap=1024, level=0.2)
    assert counts == {0.2: (128, False), 1.0: (128, False), 2.0: (128, False)}
    # the flag overrides the config: at 0.05 the same store needs more toys at μ = 1
    code, out, err = cli("generate", config, "--level", 0.05)
    assert code == 0, err
    assert replay(tmp_path / "adaptive.zarr", TARGET, cap=1024)[1.0] == (512, False)


class FailAfter(Executor):
    """Runs tasks in this thread; every task after the first ``n`` fails (a run that dies)."""

    def __init__(self, n):
        self.n = n

    def submit(self, fn, /, *args, **kwargs):
        future = Future()
        if self.n > 0:
            self.n -= 1
            future.set_result(fn(*args, **kwargs))
        else:
            future.set_exception(RuntimeError("worker lost"))
        return future


def test_an_interrupted_adaptive_run_resumes_where_it_stopped(tmp_path, xla_cache):
    """Stopped in the third round (to 128 toys), the same run again must first complete the 128
    and judge them, not double again: it ends as an uninterrupted run does."""
    cfg = load_config(write_config(tmp_path, xla_cache)).with_overrides(
        target_cls_error=TARGET, max_toys=1024)
    # rounds of 3, 3 and 6 tasks (64 toys each): 8 tasks stop the run inside the third
    first = generate(cfg, FailAfter(8))
    assert first.failed and first.rounds == 3
    store = Store.open(cfg.store)
    assert store.planned(PATCH, "sb").tolist() == [128] * 3
    assert not store.toys(PATCH, "sb").done[:, :128].all()
    with ThreadPoolExecutor(1) as pool:
        second = generate(cfg, pool)
    assert not second.failed
    assert first.toys_done + second.toys_done == 2 * (128 + 512 + 128)
    assert replay(cfg.store, TARGET, cap=1024) == {0.2: (128, False), 1.0: (512, False),
                                                    2.0: (128, False)}
