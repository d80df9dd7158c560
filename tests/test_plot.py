"""``toyfarm plot``: PNG files from a store of synthetic toys, limits outside the scan, bad input.

Stores are written directly with the ``Store`` API and made-up q arrays (no fits: fast).
"""

import json
import sys

import numpy as np
import pytest

from toyfarm.cli import main
from toyfarm.plot import contour_figure, limits_of, write_plots
from toyfarm.results import hypotests, limits
from toyfarm.stats import Limit, UpperLimits
from toyfarm.store import RunIdentity, Store
from toyfarm.workspace import InputError

PNG = b"\x89PNG\r\n\x1a\n"
IDENTITY = RunIdentity("qtilde", "lhc-conditional-mle", 0, 64, {}, None)
MUS = (0.25, 1.0, 4.0)
NTOYS = 200


def run(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["toyfarm", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exit:
        code = exit.code
    out = capsys.readouterr()
    return code, out.out, out.err


def make_store(path, strengths, mus=MUS, labels=("m1", "m2")):
    """One patch per ``{name: (label values, signal strength k)}``, asymptotic-like toys.

    s+b toys: half at q = 0, half chi2(1); b-only toys: (max(N(0,1) + mu k, 0))^2; observed:
    (mu k)^2, the b-only median, so the observed and expected limits sit near 1.6 / k.
    """
    store = Store.create(path, IDENTITY, {"toyfarm": "test"})
    rng = np.random.default_rng(1)
    for patch, (values, k) in strengths.items():
        store.prepare(patch, patch * 8, dict(zip(labels, values, strict=True)),
                      {(mu, hyp): NTOYS for mu in mus for hyp in ("sb", "b")})
        for mu in mus:
            q_sb = np.where(rng.random(NTOYS) < 0.5, 0.0, rng.chisquare(1, NTOYS))
            q_b = np.maximum(rng.normal(size=NTOYS) + mu * k, 0.0) ** 2
            converged = np.ones(NTOYS, bool)
            converged[:3] = False  # a few left out, as real fits do
            store.write_toys(patch, mu, "sb", 0, q_sb, converged)
            store.write_toys(patch, mu, "b", 0, q_b, converged)
            store.write_observed(patch, mu, (mu * k) ** 2, True)
    return store


GRID = {  # 2 x 2 grid: the light points are excluded at mu = 1, the heavy ones are not
    "sig_300_0": ((300, 0), 3.0),
    "sig_300_100": ((300, 100), 2.5),
    "sig_400_0": ((400, 0), 1.2),
    "sig_400_100": ((400, 100), 1.0),
}


@pytest.fixture(scope="module")
def grid_store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("plot") / "grid.zarr", GRID)


def test_cli_writes_every_plot_as_png(monkeypatch, capsys, tmp_path, grid_store):
    out = tmp_path / "plots"
    code, stdout, err = run(monkeypatch, capsys, "plot", grid_store.path, "--output", out)
    assert code == 0, err
    files = json.loads(stdout)["files"]
    expected = {f"teststat_{p}_mu{mu}.png" for p in GRID for mu in MUS}
    expected |= {f"cls_{p}.png" for p in GRID} | {"contour.png"}
    assert {p.rsplit("/", 1)[-1] for p in files} == expected
    for name in expected:
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000


def test_limits_match_results_limits(grid_store):
    rows = hypotests(grid_store)
    for patch, r in limits(grid_store).items():
        mine = limits_of(rows[patch])
        assert mine.obs.value == pytest.approx(r["obs"], nan_ok=True)
        assert [x.value for x in mine.exp] == pytest.approx(r["exp"], nan_ok=True)
    # the fixture is meant to bracket the line: some points excluded, some not
    obs = [limits_of(rows[p]).obs.value for p in GRID]
    assert min(obs) < 1 < max(obs)


def test_limits_outside_the_scan_do_not_crash(tmp_path):
    # k = 20: CLs ~ 0 everywhere (below the scan, mu_min = 0.25 <= 1: excluded);
    # k = 0.05: CLs ~ 1 everywhere (above the scan, mu_max = 4 >= 1: not excluded)
    strengths = {**GRID, "sig_300_0": ((300, 0), 20.0), "sig_400_100": ((400, 100), 0.05)}
    store = make_store(tmp_path / "edge.zarr", strengths)
    rows = hypotests(store)
    assert limits_of(rows["sig_300_0"]).obs.status == "below_scan"
    assert limits_of(rows["sig_400_100"]).obs.status == "above_scan"
    lims = {p: limits_of(r) for p, r in rows.items()}
    points = {p: values for p, (values, _) in strengths.items()}
    fig, notes = contour_figure(points, lims, {p: list(r) for p, r in rows.items()}, ("m1", "m2"))
    assert not any("observed contour" in note for note in notes)  # both usable
    fig.savefig(tmp_path / "contour.png")
    assert (tmp_path / "contour.png").read_bytes().startswith(PNG)


def _limit(status, value=float("nan"), lo=None, hi=None):
    return Limit(value, status, lo, hi, 0, status)


def test_contour_leaves_out_undecided_points_and_skips_degenerate_grids():
    ok = UpperLimits(_limit("ok", 0.8, 0, 1), (_limit("ok", 0.9, 0, 1),) * 5)
    # below a scan that starts at mu = 2: mu_up < 2 does not say whether mu = 1 is excluded
    undecided = UpperLimits(_limit("below_scan", hi=0), (_limit("ok", 0.9, 0, 1),) * 5)
    mus = {p: [0.5, 1.0, 2.0] for p in "abcd"} | {"d": [2.0, 3.0]}
    points = {"a": (0, 0), "b": (1, 0), "c": (0, 1), "d": (1, 1)}
    lims = {"a": ok, "b": ok, "c": ok, "d": undecided}
    fig, notes = contour_figure(points, lims, mus, ("m1", "m2"))
    assert fig is not None
    assert any(n.startswith("observed contour: no usable limit") and n.endswith("for d: left out")
               for n in notes)
    # three points on one line: nothing to contour, no figure, and a note saying why
    line = {"a": (0, 0), "b": (1, 1), "c": (2, 2)}
    fig, notes = contour_figure(line, lims, mus, ("m1", "m2"))
    assert fig is None
    assert any("not all on one line" in n for n in notes)


def test_no_contour_without_two_labels(monkeypatch, capsys, tmp_path):
    store = make_store(tmp_path / "one.zarr", {"sig_1": ((300,), 2.0)}, labels=("m1",))
    code, stdout, err = run(monkeypatch, capsys, "plot", store.path, "--output", tmp_path / "p")
    assert code == 0, err
    names = {p.rsplit("/", 1)[-1] for p in json.loads(stdout)["files"]}
    assert "contour.png" not in names and "cls_sig_1.png" in names
    assert "same two labels" in err


def test_patch_selection(monkeypatch, capsys, tmp_path, grid_store):
    code, stdout, err = run(monkeypatch, capsys, "plot", grid_store.path, "--output", tmp_path,
                            "--patch", "sig_400_0", "--patch", "sig_300_100")
    assert code == 0, err
    names = {p.rsplit("/", 1)[-1] for p in json.loads(stdout)["files"]}
    assert "cls_sig_400_0.png" in names and "cls_sig_300_0.png" not in names
    assert "contour.png" not in names and "at least 3 grid points" in err


@pytest.mark.parametrize(
    ("what", "message"),
    [("not_a_store", "is not a toyfarm store"), ("unknown_patch", "no patch 'nope'")],
)
def test_bad_input_is_exit_2(monkeypatch, capsys, tmp_path, grid_store, what, message):
    store = tmp_path if what == "not_a_store" else grid_store.path
    extra = ["--patch", "nope"] if what == "unknown_patch" else []
    code, _, err = run(monkeypatch, capsys, "plot", store, "--output", tmp_path / "p", *extra)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "p").exists()  # nothing written
    with pytest.raises(InputError, match=message):
        write_plots(store, tmp_path / "p", extra[1:] or None)
