"""The Python API for notebooks, mirroring the CLI: ``toyfarm.generate``, ``toyfarm.cls``,
``toyfarm.limit``, ``toyfarm.combine``. Same inputs, same outputs as the commands' JSON."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor
from typing import Any

from toyfarm.config import RunConfig, load_config

__all__ = ["generate", "cls", "limit", "combine"]

PathLike = str | os.PathLike[str]


def generate(config: PathLike | RunConfig, executor: Executor | str | None = None,
             **overrides: Any) -> dict[str, Any]:
    """Fill a store as ``toyfarm generate`` does; keyword arguments override the config with
    ``RunConfig``'s names (``store=``, ``patches=``, ``mu=[...]``, ``ntoys=``, ``workers=``,
    ``target_cls_error=``, ``endpoint=``, ...). ``executor`` is an engine's name, as
    ``--executor``, or any ``Executor`` to use instead of the configured engine. Returns the run
    summary; bad input raises ``InputError``."""
    from toyfarm.coordinator import generate as run
    from toyfarm.executors import make_executor

    if isinstance(executor, str):
        overrides["executor"], executor = executor, None
    cfg = config if isinstance(config, RunConfig) else load_config(config)
    cfg = cfg.with_overrides(**overrides)
    if executor is not None:
        return run(cfg, executor).as_dict()
    own = make_executor(cfg.executor, cfg.workers, scheduler=cfg.scheduler,
                        parsl_config=cfg.parsl_config, endpoint=cfg.endpoint)
    try:
        return run(cfg, own).as_dict()
    finally:
        own.shutdown(wait=True, cancel_futures=True)


def cls(store: PathLike, patch: str | Iterable[str] | None = None,
        mu: float | Iterable[float] | None = None) -> dict[str, dict[str, Any]]:
    """The ``cls --json`` contract: ``{patch: {str(mu): {"CLs_obs", ..., "CLs_exp", ...}}}``."""
    from toyfarm.results import cls_table, hypotests

    patches = [patch] if isinstance(patch, str) else patch
    mus = [mu] if isinstance(mu, int | float) else mu
    return cls_table(hypotests(store, patches, mus))


def limit(store: PathLike, patch: str | Iterable[str] | None = None,
          level: float = 0.05) -> dict[str, dict[str, Any]]:
    """``{patch: {"obs", "exp": [5], "detail"}}``; NaN where the μ grid does not bracket CLs."""
    from toyfarm.results import limits

    return limits(store, [patch] if isinstance(patch, str) else patch, level)


def combine(stores: Sequence[PathLike], output: PathLike) -> dict[str, Any]:
    """Merge stores of separate runs into ``output``; returns what was combined."""
    from toyfarm.merge import combine as run

    return run(stores, output)
