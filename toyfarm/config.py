"""Run configs: TOML files (schema in DESIGN.md) normalised into one ``RunConfig``.

Paths are relative to the config file; command-line flags override the file (``with_overrides``).
Every problem is an ``InputError`` naming the key, before anything runs.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toyfarm.likelihood.teststat import TEST_STATISTICS
from toyfarm.workspace import InputError, normalise_modifier_settings

__all__ = ["EXECUTOR_KINDS", "RunConfig", "load_config"]

EXECUTOR_KINDS = ("local", "dask", "parsl", "globus-compute", "gc-engine")
_ALIASES = {"funcx": "globus-compute"}

DEFAULT_COMPILATION_CACHE = "~/.cache/toyfarm/xla"

#: toys fitted together in one vectorised call (see toyfarm.plan); results depend on it
DEFAULT_BLOCK = 128

_SCHEMA: dict[str, set[str]] = {
    "workspace": {"path", "patchset", "patches", "modifier_settings", "measurement",
                  "verify_digest"},
    "toys": {"test_stat", "mu", "ntoys", "ntoys_b", "seed", "batch_size", "block",
             "target_cls_error", "max_toys", "level"},
    "executor": {"kind", "workers", "compilation_cache", "retries", "scheduler", "parsl_config",
                 "endpoint"},
    "output": {"store", "save_toys"},
}


@dataclass(frozen=True)
class RunConfig:
    workspace: Path
    patchset: Path | None = None
    patches: tuple[str, ...] = ()  # empty: every patch of the patchset
    modifier_settings: dict[str, dict[str, str]] = field(default_factory=dict)
    measurement: str | None = None
    verify_digest: bool = True
    test_stat: str = "qtilde"
    mu: tuple[float, ...] = (1.0,)
    ntoys: int = 1000
    ntoys_b: int | None = None  # b-only toys per μ; default: as many as s+b
    seed: int = 0
    # adaptive toys: add toys where the MC error of CLs_obs exceeds this (None: a fixed ntoys)
    target_cls_error: float | None = None
    max_toys: int = 20000  # cap on s+b toys per (patch, μ) for adaptive toys
    level: float = 0.05  # adaptive toys: the CLs threshold "3 errors from the threshold" refers to
    batch_size: int = 512
    block: int = DEFAULT_BLOCK
    executor: str = "local"
    workers: int | None = None  # default: the cores
    scheduler: str | None = None  # dask: a scheduler's address (default: a local cluster)
    parsl_config: Path | None = None  # parsl: a Python file defining `config` (default: local)
    endpoint: str | None = None  # globus-compute: the endpoint's UUID
    # worker-side folder for JAX's on-disk compilation cache ("~" expands on the worker); "" = off
    compilation_cache: str = DEFAULT_COMPILATION_CACHE
    retries: int = 2
    store: Path = Path("toys.zarr")
    save_toys: bool = False

    def __post_init__(self) -> None:
        _check(self)

    @property
    def ntoys_by_hypothesis(self) -> dict[str, int]:
        return {"sb": self.ntoys, "b": self.ntoys if self.ntoys_b is None else self.ntoys_b}

    def with_overrides(self, **flags: Any) -> RunConfig:
        """A copy with the given (non-None) values replaced; checked again.

        ``mu`` and ``patches`` take one value or several (the Python API's ``mu=1.0``)."""
        changes = {k: v for k, v in flags.items() if v is not None and v != ()}
        known = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(known))
        if unknown:
            raise InputError(f"unknown setting {unknown[0]!r} (known: {', '.join(known)})")
        if "executor" in changes:
            changes["executor"] = _ALIASES.get(changes["executor"], changes["executor"])
        for key in ("mu", "patches"):
            if key in changes:
                value = changes[key]
                # a lone name must not become a tuple of its letters
                changes[key] = (value,) if isinstance(value, str | int | float) else tuple(value)
        if "parsl_config" in changes:
            changes["parsl_config"] = Path(changes["parsl_config"])
        return dataclasses.replace(self, **changes)


def _check(cfg: RunConfig) -> None:
    if cfg.test_stat not in TEST_STATISTICS:
        raise InputError(
            f"unknown test statistic {cfg.test_stat!r} (known: {', '.join(TEST_STATISTICS)})"
        )
    if cfg.executor not in EXECUTOR_KINDS:
        raise InputError(
            f"unknown executor {cfg.executor!r} (known: {', '.join(EXECUTOR_KINDS)}, funcx)"
        )
    if cfg.target_cls_error is not None and not 0 < cfg.target_cls_error < 1:
        raise InputError(f"target_cls_error must be in (0, 1), got {cfg.target_cls_error}")
    if not 0 < cfg.level < 1:
        raise InputError(f"level must be in (0, 1), got {cfg.level}")
    for name in ("ntoys", "batch_size", "block", "max_toys"):
        if getattr(cfg, name) <= 0:
            raise InputError(f"{name} must be positive, got {getattr(cfg, name)}")
    if cfg.ntoys_b is not None and cfg.ntoys_b <= 0:
        raise InputError(f"ntoys_b must be positive, got {cfg.ntoys_b}")
    if cfg.workers is not None and cfg.workers <= 0:
        raise InputError(f"workers must be positive, got {cfg.workers}")
    if cfg.retries < 0:
        raise InputError(f"retries must be 0 or more, got {cfg.retries}")
    if not cfg.mu:
        raise InputError("no mu values to test: give [toys] mu or --mu")
    if len(set(cfg.mu)) != len(cfg.mu):
        raise InputError(f"mu values repeat: {list(cfg.mu)}")
    if not 0 <= cfg.seed < 2**32:
        raise InputError(f"seed must be in [0, 2**32), got {cfg.seed}")
    normalise_modifier_settings(cfg.modifier_settings)


def _typed(section: str, key: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # TOML booleans are Python ints: `ntoys = true` must not pass as 1
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise InputError(f"[{section}] {key} must be {_kind_name(kinds)}, got {value!r}")
    return value


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               list: "a list", dict: "a table"}


def _kind_name(kinds: tuple[type, ...]) -> str:
    if set(kinds) == {int, float}:  # TOML's 1 is an int: to a reader both are "a number"
        return "a number"
    return " or ".join(_KIND_NAMES[k] for k in kinds)


def load_config(path: str | os.PathLike[str]) -> RunConfig:
    """Read and check a run config; relative paths are taken from the config's folder."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_bytes().decode("utf-8"))
    except IsADirectoryError:
        raise InputError(f"the config {path} is a folder: give the path of a TOML file") from None
    except OSError as err:
        raise InputError(f"cannot read the config {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise InputError(f"the config {path} is not UTF-8 text (byte {err.start})") from None
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"the config {path} is not valid TOML: {err}") from None
    for section, table in raw.items():
        if section not in _SCHEMA:
            raise InputError(
                f"the config {path} has an unknown section [{section}] "
                f"(known: {', '.join(f'[{s}]' for s in _SCHEMA)})"
            )
        if not isinstance(table, dict):
            raise InputError(f"the config {path}: {section} must be a [{section}] table")
        unknown = set(table) - _SCHEMA[section]
        if unknown:
            raise InputError(
                f"the config {path} has an unknown key {sorted(unknown)[0]!r} in [{section}] "
                f"(known: {', '.join(sorted(_SCHEMA[section]))})"
            )
    base = path.parent
    ws, toys = raw.get("workspace", {}), raw.get("toys", {})
    ex, out = raw.get("executor", {}), raw.get("output", {})
    if "path" not in ws:
        raise InputError(f"the config {path} needs [workspace] path")

    def rel(p: str) -> Path:
        return base / Path(p).expanduser()

    values: dict[str, Any] = {"workspace": rel(_typed("workspace", "path", ws["path"], str))}
    if "patchset" in ws:
        values["patchset"] = rel(_typed("workspace", "patchset", ws["patchset"], str))
    if "patches" in ws:
        patches = _typed("workspace", "patches", ws["patches"], list)
        values["patches"] = tuple(_typed("workspace", "patches", p, str) for p in patches)
    if "modifier_settings" in ws:
        values["modifier_settings"] = _typed("workspace", "modifier_settings",
                                             ws["modifier_settings"], dict)
    if "measurement" in ws:
        values["measurement"] = _typed("workspace", "measurement", ws["measurement"], str)
    if "verify_digest" in ws:
        values["verify_digest"] = _typed("workspace", "verify_digest", ws["verify_digest"], bool)
    if "mu" in toys:
        mus = toys["mu"] if isinstance(toys["mu"], list) else [toys["mu"]]
        values["mu"] = tuple(float(_typed("toys", "mu", m, (int, float))) for m in mus)
    if "test_stat" in toys:
        values["test_stat"] = _typed("toys", "test_stat", toys["test_stat"], str)
    for key in ("ntoys", "ntoys_b", "seed", "batch_size", "block", "max_toys"):
        if key in toys:
            values[key] = _typed("toys", key, toys[key], int)
    for key in ("target_cls_error", "level"):
        if key in toys:
            values[key] = float(_typed("toys", key, toys[key], (int, float)))
    if "kind" in ex:
        kind = _typed("executor", "kind", ex["kind"], str)
        values["executor"] = _ALIASES.get(kind, kind)
    for key in ("workers", "retries"):
        if key in ex:
            values[key] = _typed("executor", key, ex[key], int)
    for key in ("scheduler", "endpoint"):
        if key in ex:
            values[key] = _typed("executor", key, ex[key], str)
    if "parsl_config" in ex:
        values["parsl_config"] = rel(_typed("executor", "parsl_config", ex["parsl_config"], str))
    if "compilation_cache" in ex:
        cache = _typed("executor", "compilation_cache", ex["compilation_cache"], str)
        values["compilation_cache"] = str(rel(cache)) if cache else ""
    if "store" in out:
        values["store"] = rel(_typed("output", "store", out["store"], str))
    if "save_toys" in out:
        values["save_toys"] = _typed("output", "save_toys", out["save_toys"], bool)
    return RunConfig(**values)
