"""Combining stores of separate runs (other seeds, other sites) into one, exactly.

A toy is identified by (seed, toy index) within a (patch, μ, hypothesis): the combined store holds
the union of the inputs' toys, each seed's toys side by side on the toy axis (the store's
``segments``), and a toy present in several inputs is kept once. Inputs must describe the same
toys: same model digest per patch, modifier settings, measurement, test statistic and generation
mode; anything else is refused before the output is created.

The result does not depend on the order of the inputs. Seeds and fit blocks may differ; a toy
that two inputs fitted in different blocks may differ in its last bits (``differing_duplicates``
counts them) and the smallest block's is kept. A store records one block, so for such toys
combining in steps, (a + b) + c, may keep another of the copies than a + (b + c) does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from toyfarm.plan import HYPOTHESES
from toyfarm.store import RunIdentity, Store
from toyfarm.workspace import InputError

__all__ = ["COMBINABLE", "combine"]

#: identity fields that must agree; seeds and fit blocks may differ
COMBINABLE = ("test_stat", "generation", "modifier_settings", "measurement")


def _seeds(identity: dict[str, Any]) -> list[int]:
    seed = identity["seed"]
    return list(seed) if isinstance(seed, list) else [seed]


def _check(stores: list[Store]) -> None:
    first = stores[0]
    for other in stores[1:]:
        for field in COMBINABLE:
            if first.identity[field] != other.identity[field]:
                raise InputError(
                    f"cannot combine {first.path} and {other.path}: their {field} differs "
                    f"({first.identity[field]!r} vs {other.identity[field]!r})"
                )
        for patch in set(first.patches()) & set(other.patches()):
            if first.patch_attrs(patch)["digest"] != other.patch_attrs(patch)["digest"]:
                raise InputError(
                    f"cannot combine {first.path} and {other.path}: patch {patch!r} is a "
                    "different model in each (model digests differ)"
                )


def combine(inputs: Sequence[str | os.PathLike[str]], output: str | os.PathLike[str]) -> dict:
    """Write the union of the toys of ``inputs`` to the new store ``output``; a summary back."""
    if len(inputs) < 2:
        raise InputError("combine needs at least two stores")
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise InputError(f"the output {output} exists and is not an empty folder; choose a new "
                         "path")
    stores = [Store.open(path) for path in inputs]
    _check(stores)
    # The same result whatever the order of the inputs: a toy fitted in different blocks by two
    # inputs may differ in its last bits, and the one kept is the smallest block's (as is the
    # output's block); the sort is stable, and inputs equal in both hold bit-identical toys.
    stores.sort(key=lambda s: (int(s.identity["block"]), _seeds(s.identity)))
    ident = stores[0].identity
    seeds = sorted({seed for s in stores for seed in _seeds(s.identity)})
    identity = RunIdentity(ident["test_stat"], ident["generation"],
                           seeds if len(seeds) > 1 else seeds[0], ident["block"],
                           ident["modifier_settings"], ident["measurement"])
    save_toys = all(s.meta["save_toys"] for s in stores)
    out = Store.create(output, identity, stores[0].meta["versions"], save_toys)
    summary = {"store": str(output), "inputs": [str(Path(p)) for p in inputs], "seeds": seeds,
               "toys": 0, "duplicates": 0, "differing_duplicates": 0}
    with out.lock():
        for patch in sorted({p for s in stores for p in s.patches()}):
            _combine_patch(out, [s for s in stores if s.has_patch(patch)], patch, save_toys,
                           summary)
        for store in stores:
            out.add_stats(store.stats(), tasks=int(store.stats()["tasks"]))
    return summary


def _layout(stores: list[Store], patch: str, hyp: str) -> list[tuple[int, int, int]]:
    """Output segments: each seed once, as long as its longest input, side by side."""
    lengths: dict[int, int] = {}
    for store in stores:
        for seed, _, length in store.segments(patch, hyp):
            lengths[seed] = max(lengths.get(seed, 0), length)
    out, offset = [], 0
    for seed in sorted(lengths):
        out.append((seed, offset, lengths[seed]))
        offset += lengths[seed]
    return out


class _Row:
    """The combined toys of one (patch, μ, hypothesis), filled input by input."""

    def __init__(self, n: int) -> None:
        self.q = np.full(n, np.nan)
        self.converged = np.zeros(n, bool)
        self.done = np.zeros(n, bool)
        self.toys: np.ndarray | None = None

    def merge(self, dst: np.ndarray, q, converged, done, toys, summary: dict) -> None:
        """Toys at output positions ``dst``; one already there is counted, never added again."""
        again = done & self.done[dst]
        summary["duplicates"] += int(again.sum())
        summary["differing_duplicates"] += int((again & (self.q[dst] != q)).sum())
        new = done & ~self.done[dst]
        self.q[dst[new]] = q[new]
        self.converged[dst[new]] = converged[new]
        self.done[dst[new]] = True
        if toys is not None:
            if self.toys is None:
                self.toys = np.full((self.q.size, toys.shape[1]), np.nan)
            self.toys[dst[new]] = toys[new]


def _combine_patch(out: Store, stores: list[Store], patch: str, save_toys: bool,
                   summary: dict) -> None:
    grid = list(dict.fromkeys(float(mu) for s in stores for mu in s.mus(patch)))
    layout = {hyp: _layout(stores, patch, hyp) for hyp in HYPOTHESES}
    size = {hyp: sum(length for *_, length in layout[hyp]) for hyp in HYPOTHESES}
    attrs = stores[0].patch_attrs(patch)
    out.prepare(patch, attrs["digest"], attrs.get("labels", {}),
                {(mu, hyp): size[hyp] for mu in grid for hyp in HYPOTHESES})
    for hyp in HYPOTHESES:
        out.set_segments(patch, hyp, layout[hyp])
        offset = {seed: start for seed, start, _ in layout[hyp]}
        rows = {mu: _Row(size[hyp]) for mu in grid}
        for store in stores:
            arrays = store.toys(patch, hyp)
            saved = store.saved_toys(patch, hyp) if save_toys else None
            for j, mu in enumerate(store.mus(patch)):
                for seed, start, length in store.segments(patch, hyp):
                    src = slice(start, start + length)
                    rows[float(mu)].merge(
                        np.arange(length) + offset[seed], arrays.q[j, src],
                        arrays.converged[j, src], arrays.done[j, src],
                        None if saved is None else saved[j, src], summary)
        for mu, row in rows.items():
            summary["toys"] += int(row.done.sum())
            out.write_toys(patch, mu, hyp, 0, row.q, row.converged, row.toys, done=row.done)
    for store in stores:
        q_obs, ok = store.observed(patch)
        for mu, value, good in zip(store.mus(patch), q_obs, ok, strict=True):
            if np.isnan(out.observed(patch)[0][grid.index(float(mu))]) and not np.isnan(value):
                out.write_observed(patch, float(mu), float(value), bool(good))
