"""``toyfarm generate``: throw and fit the toys a run config asks for, into a Zarr store."""

from __future__ import annotations

import json
from pathlib import Path

import click

from toyfarm.config import EXECUTOR_KINDS, load_config
from toyfarm.likelihood.teststat import TEST_STATISTICS


@click.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--store", type=click.Path(path_type=Path), help="Zarr store to fill (resumes).")
@click.option("--patch", "patches", multiple=True, help="Patch to run (repeatable).")
@click.option("--mu", multiple=True, type=float, help="Signal strength to test (repeatable).")
@click.option("--ntoys", type=int, help="Toys per hypothesis (s+b and b-only each).")
@click.option("--ntoys-b", type=int, help="b-only toys, when fewer than s+b are enough.")
@click.option("--seed", type=int)
@click.option("--test-stat", type=click.Choice(TEST_STATISTICS))
@click.option("--batch-size", type=int, help="Toys per task.")
@click.option("--target-cls-error", type=float,
              help="Adaptive: add toys until the MC error of CLs_obs is at most this (or CLs is "
              "3 errors from the threshold).")
@click.option("--max-toys", type=int, help="Adaptive: cap on s+b toys per (patch, μ).")
@click.option("--level", type=float,
              help="Adaptive: the CLs threshold of that rule (default 0.05, as `limit`).")
@click.option("--executor", type=click.Choice([*EXECUTOR_KINDS, "funcx"]))
@click.option("--workers", type=int, help="Worker processes of the engines that start them on "
              "this machine: local, dask and parsl by default, gc-engine (default: the cores).")
@click.option("--scheduler", metavar="ADDRESS",
              help="dask: the scheduler of a running cluster (default: a local cluster).")
@click.option("--parsl-config", type=click.Path(path_type=Path), metavar="FILE",
              help="parsl: a Python file defining `config` (default: workers on this machine).")
@click.option("--endpoint", metavar="UUID", help="globus-compute: the endpoint to run on.")
@click.option("--save-toys", is_flag=True, default=None, help="Store the toys themselves too.")
@click.option("--compilation-cache", help="Workers' folder for JAX's on-disk compilation cache "
              "(default ~/.cache/toyfarm/xla; '' turns it off).")
def generate(config: Path, **flags) -> None:
    """Fill a store with the toys CONFIG asks for; flags override the config.

    Running the same command again completes an interrupted run; a summary goes to stdout as JSON.
    """
    from toyfarm.coordinator import generate as run
    from toyfarm.executors import make_executor

    cfg = load_config(config).with_overrides(**flags)
    executor = make_executor(cfg.executor, cfg.workers, scheduler=cfg.scheduler,
                             parsl_config=cfg.parsl_config, endpoint=cfg.endpoint)
    try:
        report = run(cfg, executor)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
    click.echo(json.dumps(report.as_dict(), indent=2))
    if report.failed:
        raise SystemExit(1)
