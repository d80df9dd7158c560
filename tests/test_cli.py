"""The CLI: generate + info on the shipped example, JSON contracts, bad input is exit 2."""

import json
import sys
from pathlib import Path

import pytest

from toyfarm.cli import main

EXAMPLE = Path(__file__).parents[1] / "configs" / "example.toml"


def run(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["toyfarm", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exit:
        code = exit.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_info_cls_limit(monkeypatch, capsys, tmp_path):
    store = tmp_path / "cli.zarr"
    code, out, err = run(monkeypatch, capsys, "generate", EXAMPLE, "--store", store, "--patch",
                         "sig_400_0", "--mu", "0.5", "--mu", "2", "--ntoys", "20", "--workers",
                         "1", "--executor", "local")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["toys_done"] == 80 and summary["failed"] == []
    code, out, _ = run(monkeypatch, capsys, "info", store, "--json")
    info = json.loads(out)
    assert code == 0
    assert info["patches"] == ["sig_400_0"] and info["mu"] == {"sig_400_0": [0.5, 2.0]}
    assert info["toys_planned"] == info["toys_done"] == 80
    for key in ("not_converged", "tasks", "compiles", "cache_hits", "compile_seconds",
                "fit_seconds"):
        assert key in info
    assert info["compiles"] == 1 and info["tasks"] == 1

    code, out, _ = run(monkeypatch, capsys, "cls", store, "--json")
    table = json.loads(out)
    assert code == 0 and set(table["sig_400_0"]) == {"0.5", "2.0"}
    row = table["sig_400_0"]["2.0"]
    for key in ("CLs_obs", "CLsb_obs", "CLb_obs", "CLs_obs_error"):
        assert row[key] is None or 0 <= row[key] <= 1e9
    assert len(row["CLs_exp"]) == 5 and row["ntoys_sb"] + row["not_converged_sb"] == 20
    code, out, _ = run(monkeypatch, capsys, "cls", store, "--mu", "2")
    assert code == 0 and "sig_400_0" in out and " 2 " in out

    code, out, _ = run(monkeypatch, capsys, "limit", store, "--json")
    limits = json.loads(out)
    assert code == 0 and set(limits["sig_400_0"]) == {"obs", "exp"}
    assert len(limits["sig_400_0"]["exp"]) == 5
    code, _, err = run(monkeypatch, capsys, "cls", store, "--patch", "nope")
    assert code == 2 and "no patch 'nope'" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mu", "11"], "outside the bounds"),
        (["--patch", "sig_999_0"], "unknown patch 'sig_999_0'"),
        (["--ntoys", "0"], "ntoys must be positive"),
        (["--executor", "nope"], "nope"),
    ],
)
def test_bad_flags_exit_2_with_one_line(monkeypatch, capsys, tmp_path, args, message):
    store = tmp_path / "bad.zarr"
    code, _, err = run(monkeypatch, capsys, "generate", EXAMPLE, "--store", store, *args)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not store.exists()  # nothing written


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[workspace\npath = 1", "not valid TOML"),
        ('[workspace]\npath = "x.json"\ncolour = "red"', "unknown key 'colour'"),
        ('[workspace]\npath = "missing.json"', "cannot read the workspace"),
        ('[workspace]\npath = "w.json"\n[toys]\nntoys = "many"', "ntoys must be an integer"),
        ('[workspace]\npath = "w.json"\n[toys]\ntest_stat = "z"', "unknown test statistic"),
        ('[toys]\nntoys = 3', "needs [workspace] path"),
    ],
)
def test_bad_configs_exit_2(monkeypatch, capsys, tmp_path, text, message):
    (tmp_path / "w.json").write_text("{}")
    config = tmp_path / "run.toml"
    config.write_text(text)
    code, _, err = run(monkeypatch, capsys, "generate", config, "--store", tmp_path / "s.zarr")
    assert code == 2
    assert message in err and len(err.strip().splitlines()) <= 2


def write_run(tmp_path, workspace, patchset=None, extra=""):
    (tmp_path / "ws.json").write_text(workspace)
    lines = ['[workspace]', 'path = "ws.json"']
    if patchset is not None:
        (tmp_path / "ps.json").write_text(patchset)
        lines.append('patchset = "ps.json"')
    config = tmp_path / "run.toml"
    config.write_text("\n".join(lines) + "\n" + extra)
    return config


EXAMPLE_DIR = EXAMPLE.parent / "example"


@pytest.mark.parametrize(
    ("workspace", "patchset", "message"),
    [
        ("{not json", None, "is not valid JSON"),
        ('{"channels": 3}', None, "fails pyhf's schema"),
        # the shipped patchset against another background: the digest does not match
        ((EXAMPLE_DIR / "BkgOnly.json").read_text().replace("420.0", "421.0"),
         (EXAMPLE_DIR / "patchset.json").read_text(), "digest mismatch"),
    ],
)
def test_bad_workspaces_exit_2_and_write_nothing(monkeypatch, capsys, tmp_path, workspace,
                                                 patchset, message):
    config = write_run(tmp_path, workspace, patchset)
    code, _, err = run(monkeypatch, capsys, "generate", config, "--store", tmp_path / "s.zarr")
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "s.zarr").exists()


def test_resuming_with_other_settings_names_the_field(monkeypatch, capsys, tmp_path):
    store = tmp_path / "s.zarr"
    args = ("generate", EXAMPLE, "--store", store, "--patch", "sig_400_0", "--ntoys", "8",
            "--workers", "1")
    assert run(monkeypatch, capsys, *args)[0] == 0
    before = sorted(p.name for p in store.rglob("*"))
    code, _, err = run(monkeypatch, capsys, *args, "--seed", "5")
    assert code == 2 and "seed = 0" in err
    code, _, err = run(monkeypatch, capsys, *args, "--test-stat", "q")
    assert code == 2 and "test_stat" in err
    assert sorted(p.name for p in store.rglob("*")) == before


@pytest.mark.parametrize("command", ["info", "cls", "limit", "plot"])
def test_commands_on_something_that_is_not_a_store(monkeypatch, capsys, tmp_path, command):
    extra = ["--output", tmp_path / "png"] if command == "plot" else []
    code, _, err = run(monkeypatch, capsys, command, tmp_path, *extra)
    assert code == 2 and "not a toyfarm store" in err and "Traceback" not in err
