"""The CLI: generate + info on the shipped example, JSON contracts, bad input is exit 2 with one or
two lines and nothing changed."""

import io
import json
import shutil
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import zarr

from toyfarm.cli import main
from toyfarm.store import RunIdentity, Store
from toyfarm.workspace import ModelSource, _canonical

EXAMPLE = Path(__file__).parents[1] / "configs" / "example.toml"
EXAMPLE_DIR = EXAMPLE.parent / "example"
#: the run of the module's shared store; the resumption tests repeat it with one thing changed
RUN = ("--mu", "0.5", "--mu", "2", "--ntoys", "20", "--workers", "1", "--executor", "local")
ONE = ("--patch", "sig_400_0")


def run(*args):
    """``toyfarm ARGS`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, redirect_stdout(out), redirect_stderr(err):
        patch.setattr(sys, "argv", ["toyfarm", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as exit:
            code = exit.code
    return code, out.getvalue(), err.getvalue()


def snapshot(path):
    """Every file under ``path`` with its bytes: what "nothing changed" compares."""
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def error_lines(err):
    lines = err.strip().splitlines()
    assert "Traceback" not in err and 1 <= len(lines) <= 2, err
    return lines


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """A copy of the shipped example (to edit) and a small store generated from it."""
    folder = tmp_path_factory.mktemp("example")
    shutil.copy(EXAMPLE, folder / "example.toml")
    shutil.copytree(EXAMPLE_DIR, folder / "example")
    store = folder / "cli.zarr"
    code, out, err = run("generate", folder / "example.toml", "--store", store, *RUN, *ONE)
    assert code == 0, err
    return folder, store, json.loads(out)


def test_generate_info_cls_limit(example):
    _, store, summary = example
    assert summary["toys_done"] == 80 and summary["failed"] == []
    code, out, _ = run("info", store, "--json")
    info = json.loads(out)
    assert code == 0
    assert info["patches"] == ["sig_400_0"] and info["mu"] == {"sig_400_0": [0.5, 2.0]}
    assert info["toys_planned"] == info["toys_done"] == 80
    for key in ("not_converged", "tasks", "compiles", "cache_hits", "compile_seconds",
                "fit_seconds"):
        assert key in info
    assert info["compiles"] == 1 and info["tasks"] == 1
    assert info["missing"] == [] and info["missing_observed"] == {}

    code, out, _ = run("cls", store, "--json")
    table = json.loads(out)
    assert code == 0 and set(table["sig_400_0"]) == {"0.5", "2.0"}
    row = table["sig_400_0"]["2.0"]
    for key in ("CLs_obs", "CLsb_obs", "CLb_obs", "CLs_obs_error"):
        assert row[key] is None or 0 <= row[key] <= 1e9
    assert len(row["CLs_exp"]) == 5 and row["ntoys_sb"] + row["not_converged_sb"] == 20
    code, out, _ = run("cls", store, "--mu", "2")
    assert code == 0 and "sig_400_0" in out and " 2 " in out

    code, out, _ = run("limit", store, "--json")
    limits = json.loads(out)
    assert code == 0 and set(limits["sig_400_0"]) == {"obs", "exp"}
    assert len(limits["sig_400_0"]["exp"]) == 5
    code, _, err = run("cls", store, "--patch", "nope")
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
def test_bad_flags_exit_2_with_one_line(tmp_path, args, message):
    store = tmp_path / "bad.zarr"
    code, _, err = run("generate", EXAMPLE, "--store", store, *args)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not store.exists()  # nothing written


@pytest.mark.parametrize(
    ("flag", "choices"),
    [
        ("--executor", "'local', 'dask', 'parsl', 'globus-compute', 'gc-engine', 'funcx'"),
        ("--test-stat", "'qtilde', 'q', 'q0', 'ttilde', 't'"),
    ],
)
def test_usage_errors_are_the_error_and_where_to_look(tmp_path, flag, choices):
    code, out, err = run("generate", EXAMPLE, "--store", tmp_path / "s.zarr", flag, "bogus")
    assert code == 2 and out == ""
    assert err.splitlines() == [
        f"toyfarm: error: Invalid value for '{flag}': 'bogus' is not one of {choices}.",
        "(see toyfarm generate --help)",
    ]
    assert not (tmp_path / "s.zarr").exists()


def test_a_file_as_the_store_is_refused(tmp_path):
    (tmp_path / "notes").write_text("mine")
    code, _, err = run("generate", EXAMPLE, "--store", tmp_path / "notes")
    assert code == 2 and "is a file, not a store folder" in error_lines(err)[0]
    assert (tmp_path / "notes").read_text() == "mine"


def test_a_patch_name_that_cannot_name_a_store_group_is_refused_before_a_store_exists(tmp_path):
    spec = json.loads((EXAMPLE_DIR / "patchset.json").read_text())
    spec["patches"][0]["metadata"]["name"] = "sig/300"
    config = write_run(tmp_path, BACKGROUND, json.dumps(spec))
    code, _, err = run("generate", config, "--store", tmp_path / "s.zarr", "--patch", "sig/300")
    # pyhf's schema allows [a-zA-Z0-9_] in patch names: a '/' never reaches the store
    assert code == 2 and "fails pyhf's schema: 'sig/300' does not match" in error_lines(err)[0]
    assert not (tmp_path / "s.zarr").exists()


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
def test_bad_configs_exit_2(tmp_path, text, message):
    (tmp_path / "w.json").write_text("{}")
    config = tmp_path / "run.toml"
    config.write_text(text)
    code, _, err = run("generate", config, "--store", tmp_path / "s.zarr")
    assert code == 2
    assert message in err and len(err.strip().splitlines()) <= 2


@pytest.mark.parametrize(("make", "message"), [
    (lambda path: path.write_bytes(b'[workspace]\npath = "\xff.json"\n'), "is not UTF-8 text"),
    (lambda path: path.mkdir(), "is a folder"),
])
def test_unreadable_configs_exit_2(tmp_path, make, message):
    config = tmp_path / "run.toml"
    make(config)
    code, _, err = run("generate", config, "--store", tmp_path / "s.zarr")
    assert code == 2 and message in error_lines(err)[0] and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s.zarr").exists()


def write_run(tmp_path, workspace, patchset=None, extra=""):
    (tmp_path / "ws.json").write_text(workspace)
    lines = ['[workspace]', 'path = "ws.json"']
    if patchset is not None:
        (tmp_path / "ps.json").write_text(patchset)
        lines.append('patchset = "ps.json"')
    config = tmp_path / "run.toml"
    config.write_text("\n".join(lines) + "\n" + extra)
    return config


def patchset_with(extra_ops, patch="sig_500_100"):
    """The shipped patchset with operations added to one (by default the last) patch."""
    spec = json.loads((EXAMPLE_DIR / "patchset.json").read_text())
    for entry in spec["patches"]:
        if entry["metadata"]["name"] == patch:
            entry["patch"] += extra_ops
    return json.dumps(spec)


BACKGROUND = (EXAMPLE_DIR / "BkgOnly.json").read_text()


@pytest.mark.parametrize(
    ("workspace", "patchset", "message"),
    [
        ("{not json", None, "is not valid JSON"),
        ('{"channels": 3}', None, "fails pyhf's schema"),
        # the shipped patchset against another background: the digest does not match
        (BACKGROUND.replace("420.0", "421.0"), (EXAMPLE_DIR / "patchset.json").read_text(),
         "digest mismatch"),
        # a later patch that points nowhere in the workspace
        (BACKGROUND, patchset_with([{"op": "replace", "path": "/channels/7/samples/0",
                                     "value": {}}]),
         "patch 'sig_500_100' does not apply to the workspace"),
    ],
)
def test_bad_workspaces_exit_2_and_write_nothing(tmp_path, workspace, patchset, message):
    config = write_run(tmp_path, workspace, patchset)
    code, _, err = run("generate", config, "--store", tmp_path / "s.zarr")
    assert code == 2 and message in error_lines(err)[0]
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda path: path.mkdir(), "the workspace {path} is a folder: give the path of its JSON"),
        (lambda path: path.write_bytes(b'{"channels": "\xff\xfe"}'),
         "the workspace {path} is not UTF-8 text (byte 14)"),
    ],
    ids=["folder", "not-utf-8"],
)
def test_unreadable_workspace_paths_exit_2(tmp_path, make, message):
    workspace = tmp_path / "ws.json"
    make(workspace)
    config = tmp_path / "run.toml"
    config.write_text('[workspace]\npath = "ws.json"\n')
    code, _, err = run("generate", config, "--store", tmp_path / "s.zarr")
    assert code == 2
    (line,) = error_lines(err)
    assert line.startswith("toyfarm: error: " + message.format(path=workspace))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.toml", "ws.json"]


def test_mu_outside_the_bounds_a_later_patch_sets_is_refused_up_front(tmp_path):
    narrow = {"op": "replace", "path": "/measurements/0/config/parameters/1/bounds",
              "value": [[0.0, 3.0]]}
    config = write_run(tmp_path, BACKGROUND, patchset_with([narrow]))
    code, _, err = run("generate", config, "--store", tmp_path / "s.zarr", "--mu", "1",
                       "--mu", "4")
    assert code == 2
    (line,) = error_lines(err)
    assert ("mu = 4.0 is outside the bounds [0.0, 3.0] of the POI 'mu_sig' of 'sig_500_100'"
            in line)
    assert not (tmp_path / "s.zarr").exists()


def test_patches_are_applied_without_touching_the_workspace(tmp_path):
    """The up-front bounds check applies every patch sharing the workspace's unpatched parts:
    the result is jsonpatch's, and neither the workspace nor the patchset is ever changed."""
    import copy

    import jsonpatch

    ops = [{"op": "replace", "path": "/channels/1/samples/1/data/0", "value": 99.0},
           {"op": "replace", "path": "/channels/1/samples/0/data/1", "value": 7.0},  # the signal
           {"op": "move", "from": "/channels/0/samples/0/modifiers/0",
            "path": "/channels/0/samples/0/modifiers/-"},
           {"op": "copy", "from": "/channels/1/samples/1/modifiers/3",
            "path": "/channels/0/samples/0/modifiers/-"},
           {"op": "remove", "path": "/channels/0/samples/0/modifiers/2"},
           {"op": "replace", "path": "/measurements/0/config/parameters/1/bounds",
            "value": [[0.0, 3.0]]}]
    write_run(tmp_path, BACKGROUND, patchset_with(ops))
    source = ModelSource(tmp_path / "ws.json", tmp_path / "ps.json")
    before = _canonical(source.workspace_spec)
    patches = {p: copy.deepcopy(source.patchset[p].patch) for p in source.patches()}
    bounds = source.poi_bounds(source.patches())
    assert bounds["sig_500_100"] == ("mu_sig", 0.0, 3.0)
    assert {bounds[p] for p in source.patches()[:-1]} == {("mu_sig", 0.0, 10.0)}
    for patch, ops in patches.items():
        assert source.spec(patch) == jsonpatch.apply_patch(json.loads(before), copy.deepcopy(ops))
        assert source.patchset[patch].patch == ops
    assert _canonical(source.workspace_spec) == before


@pytest.mark.parametrize(
    ("op", "message"),
    [
        ({"op": "remove", "path": "/measurements/0/config/parameters/0"},
         "patch 'sig_500_100' does not give a valid pyhf model (TypeError: "),
        ({"op": "remove", "path": "/measurements/0/config/poi"},
         "patch 'sig_500_100' does not give a valid model: "),
    ],
)
def test_a_later_patch_that_breaks_the_model_is_refused_up_front(tmp_path, op, message):
    config = write_run(tmp_path, BACKGROUND, patchset_with([op]))
    code, _, err = run("generate", config, "--store", tmp_path / "s.zarr")
    assert code == 2 and message in error_lines(err)[0]
    assert not (tmp_path / "s.zarr").exists()


def with_signal_changed(patch):
    """The shipped patchset with one signal yield of ``patch`` changed: another model."""
    spec = json.loads((EXAMPLE_DIR / "patchset.json").read_text())
    entry = next(e for e in spec["patches"] if e["metadata"]["name"] == patch)
    entry["patch"][0]["value"]["data"][-1] += 0.1
    return json.dumps(spec)


def edited_config(folder, config_edit=None, patchset=None):
    """A variant of the example's config: its text edited, or another patchset."""
    text = (folder / "example.toml").read_text()
    if patchset is not None:
        (folder / "example" / "edited.json").write_text(patchset)
        text = text.replace("example/patchset.json", "example/edited.json")
    if config_edit is not None:
        assert config_edit[0] in text
        text = text.replace(*config_edit)
    path = folder / "edited.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("flags", "config_edit", "patchset", "message"),
    [
        ([*ONE, "--seed", "5"], None, None, "seed = 0, this run asks for 5"),
        ([*ONE, "--test-stat", "q"], None, None, "test_stat = 'qtilde'"),
        (ONE, ('normsys = { interpcode = "code4" }', 'normsys = { interpcode = "code1" }'), None,
         "modifier_settings = {"),
        (ONE, ("[workspace]\n", '[workspace]\nmeasurement = "example"\n'), None,
         "measurement = None, this run asks for 'example'"),
        # a signal yield of sig_400_0 changed: another model; sig_300_0 (new) must not be added
        (["--patch", "sig_300_0", *ONE], None, with_signal_changed("sig_400_0"),
         "holds toys of a different model for patch 'sig_400_0'"),
    ],
    ids=["seed", "test_stat", "modifier_settings", "measurement", "model"],
)
def test_resuming_another_run_names_the_field_and_changes_nothing(
        example, tmp_path, flags, config_edit, patchset, message):
    folder, original, _ = example
    store = tmp_path / "s.zarr"
    shutil.copytree(original, store)
    before = snapshot(store)
    config = edited_config(folder, config_edit, patchset)
    code, out, err = run("generate", config, "--store", store, *RUN, *flags)
    assert code == 2 and out == ""
    assert message in error_lines(err)[0]
    assert snapshot(store) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]  # no lock left behind


@pytest.mark.parametrize("command", ["info", "cls", "limit", "plot"])
def test_commands_on_something_that_is_not_a_store(tmp_path, command):
    extra = ["--output", tmp_path / "png"] if command == "plot" else []
    code, _, err = run(command, tmp_path, *extra)
    assert code == 2 and "not a toyfarm store" in err and "Traceback" not in err


# ------------------------------------------------------------------ info on stores made directly
IDENTITY = RunIdentity("qtilde", "lhc-conditional-mle", 3, 4, {}, None)


def synthetic_store(path):
    """8 s+b and 8 b-only toys at μ = 1 and 2, every one done; q_obs computed at μ = 1."""
    store = Store.create(path, IDENTITY, {"toyfarm": "test"})
    store.prepare("p", "d" * 64, {}, {(mu, hyp): 8 for mu in (1.0, 2.0) for hyp in ("sb", "b")})
    for mu in (1.0, 2.0):
        for hyp in ("sb", "b"):
            store.write_toys("p", mu, hyp, 0, np.linspace(0, 3, 8), np.ones(8, bool))
    store.write_observed("p", 1.0, 0.5, True)
    return store


def test_info_check_names_damage_and_passes_a_sound_store(tmp_path):
    store = synthetic_store(tmp_path / "s.zarr")
    code, out, err = run("info", store.path, "--check", "--json")
    assert code == 0 and json.loads(out)["damaged"] == [] and err == ""
    code, out, _ = run("info", store.path, "--check")
    assert code == 0 and out.startswith(f"store {store.path}")

    chunk = store.path / "p/b/q/c/1/1"  # μ = 2, toys 4-7
    chunk.write_bytes(chunk.read_bytes()[:5])
    before = snapshot(store.path)
    code, out, err = run("info", store.path, "--check")
    assert code == 1 and out == ""
    assert err.splitlines() == [
        "damaged: p b mu=2 toys 4-7: the q chunk is unreadable",
        "run 'toyfarm generate' with the store's config again to regenerate them",
    ]
    assert snapshot(store.path) == before  # --check only reads: generate repairs


def test_info_counts_fits_without_a_number_as_not_converged(tmp_path):
    store = synthetic_store(tmp_path / "s.zarr")
    # a worker's fits that gave NaN or inf, claimed converged or not, and one finite but failed
    store.write_toys("p", 2.0, "sb", 2, np.array([np.nan, np.inf, -np.inf, 1.0]),
                     np.array([True, True, False, False]))
    store.write_observed("p", 2.0, np.nan, True)
    stored = zarr.open_group(store.path, mode="r")["p/sb/q"][1, 2:6]
    assert np.isnan(stored[:3]).all() and stored[3] == 1.0  # never written as a number

    code, out, _ = run("info", store.path, "--json")
    info = json.loads(out)
    assert code == 0
    assert info["toys_done"] == info["toys_planned"] == 32
    assert info["not_converged"] == 4
    assert (info["observed_missing"], info["observed_not_converged"]) == (0, 1)
    assert info["missing"] == [] and info["missing_observed"] == {}
    code, out, _ = run("info", store.path)
    assert "toys: 32 of 32 done, 4 not converged" in out
    assert "1 observed fits did not converge" in out and "missing:" not in out


def test_info_lists_what_is_missing(tmp_path):
    store = Store.create(tmp_path / "s.zarr", IDENTITY, {})
    store.prepare("p", "d" * 64, {}, {(1.0, "sb"): 12, (1.0, "b"): 8})
    store.write_toys("p", 1.0, "sb", 4, np.zeros(4), np.ones(4, bool))  # 0-3 and 8-11 missing
    store.write_toys("p", 1.0, "b", 0, np.zeros(8), np.ones(8, bool))
    code, out, _ = run("info", store.path, "--json")
    info = json.loads(out)
    assert info["missing"] == [{"patch": "p", "hypothesis": "sb", "mu": 1.0,
                                "toys": [[0, 4], [8, 12]]}]
    assert info["missing_observed"] == {"p": [1.0]}
    code, out, _ = run("info", store.path)
    assert code == 0
    assert out.splitlines()[-3:] == [
        "missing: p sb mu=1: toys 0-3, 8-11",
        "missing: p observed statistic at mu=1",
        "run 'toyfarm generate' with the store's config again to do what is missing",
    ]
