"""The Zarr store of a run: the only code in toyfarm that touches Zarr.

Layout (zarr v3), one group per hypothesis (patch name, or ``workspace``)::

    <patch>/mu            float64 [n_mu]          tested signal strengths, in order of first use
    <patch>/q_obs         float64 [n_mu]          observed test statistic (NaN: not computed yet)
    <patch>/q_obs_converged  bool [n_mu]
    <patch>/{sb,b}/q         float64 [n_mu, n_toys]  per-toy test statistic (NaN: not generated,
                                                     or a fit that gave no finite number)
    <patch>/{sb,b}/converged bool    [n_mu, n_toys]
    <patch>/{sb,b}/done      bool    [n_mu, n_toys]  written last: the toy is complete
    <patch>/{sb,b}/planned   int64   [n_mu]          toys asked for so far
    <patch>/{sb,b}/toys      float64 [n_mu, n_toys, n_data]  with --save-toys, pyhf's data order

Chunks along the toy axis are exactly one fit block, so a block's result is written into chunks
no other block shares. zarr's LocalStore writes every chunk atomically (temporary file and
rename) and ``done`` is written after the data, so a run killed at any moment leaves only whole
blocks marked done; the next run redoes exactly the others.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from toyfarm.lockfile import exclusive
from toyfarm.plan import HYPOTHESES
from toyfarm.workspace import InputError

__all__ = ["SCHEMA_VERSION", "RunIdentity", "Store", "ToyArrays"]

SCHEMA_VERSION = 1
_STAT_KEYS = ("tasks", "compiles", "cache_hits", "compile_seconds", "fit_seconds")
_MU_CHUNK = 256


@dataclass(frozen=True)
class RunIdentity:
    """What makes toys of two runs the same toys: stores refuse to mix runs that differ here."""

    test_stat: str
    generation: str  # how toys are thrown, e.g. "lhc-conditional-mle"
    seed: int
    block: int
    modifier_settings: dict[str, dict[str, str]]
    measurement: str | None

    def as_dict(self) -> dict[str, Any]:
        return {field: getattr(self, field) for field in self.__dataclass_fields__}


@dataclass(frozen=True)
class ToyArrays:
    """Stored toys of one (patch, hypothesis), over the μ grid, ready for the statistics code.

    ``q`` is NaN where a toy is not done; a done toy whose fit gave no number is +inf with
    ``converged`` False, so it is counted as not converged, never used.
    """

    q: np.ndarray  # [n_mu, n_toys]
    converged: np.ndarray
    done: np.ndarray


class Store:
    """A toyfarm store on the local file system (open with ``Store.create`` or ``Store.open``)."""

    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path = path
        self._root = group

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], writable: bool = False) -> Store:
        """An existing store; a clear ``InputError`` for anything that is not one."""
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise InputError(f"{path} is not a toyfarm store (no zarr.json in it)")
        try:
            group = zarr.open_group(path, mode="r+" if writable else "r")
            meta = group.attrs.get("toyfarm")
        except Exception as err:  # noqa: BLE001 - zarr raises many kinds on a damaged store
            raise InputError(f"{path} is not a readable Zarr store: {err}") from None
        if not isinstance(meta, dict) or "schema_version" not in meta:
            raise InputError(f"{path} is a Zarr store but not a toyfarm store")
        if meta["schema_version"] > SCHEMA_VERSION:
            raise InputError(
                f"{path} was written by a newer toyfarm (store schema {meta['schema_version']}, "
                f"this toyfarm reads up to {SCHEMA_VERSION}); upgrade toyfarm to read it"
            )
        return cls(path, group)

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        identity: RunIdentity,
        versions: Mapping[str, str],
        save_toys: bool = False,
    ) -> Store:
        """A new store, or the existing one at ``path`` when it holds the same kind of toys."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise InputError(f"the store {path} is a file, not a store folder: choose another path")
        if path.exists() and any(path.iterdir()):
            store = cls.open(path, writable=True)
            store.check_identity(identity)
            if store.meta["save_toys"] != save_toys:
                saves = "saves" if store.meta["save_toys"] else "does not save"
                raise InputError(
                    f"the store {path} {saves} the toys themselves; run with the same "
                    "--save-toys choice as the run that made it"
                )
            return store
        group = zarr.open_group(path, mode="w")
        group.attrs["toyfarm"] = {
            "schema_version": SCHEMA_VERSION,
            "save_toys": save_toys,
            "run": identity.as_dict(),
            "versions": dict(versions),
            "stats": dict.fromkeys(_STAT_KEYS, 0),
        }
        return cls(path, group)

    @property
    def meta(self) -> dict[str, Any]:
        return self._root.attrs["toyfarm"]

    @property
    def identity(self) -> dict[str, Any]:
        return self.meta["run"]

    def check_identity(self, identity: RunIdentity) -> None:
        stored = self.identity
        for field, value in identity.as_dict().items():
            if _normal(stored.get(field)) != _normal(value):
                raise InputError(
                    f"the store {self.path} holds toys with {field} = {stored.get(field)!r}, this "
                    f"run asks for {value!r}; use another store (stores of different runs can be "
                    "combined with 'toyfarm combine' when they describe the same toys)"
                )

    def lock(self) -> AbstractContextManager[None]:
        """Exclusive use by one writing process (``STORE.lock`` beside the store)."""
        return exclusive(self.path.with_name(self.path.name + ".lock"), f"the store {self.path}")

    # -- layout ------------------------------------------------------------------------------

    def patches(self) -> list[str]:
        return sorted(self._root.group_keys())

    def has_patch(self, patch: str) -> bool:
        return patch in self._root.group_keys()

    def patch_attrs(self, patch: str) -> dict[str, Any]:
        return dict(self._group(patch).attrs)

    def check_patch(self, patch: str, digest: str) -> None:
        """Refuse a patch whose name cannot be a group, or whose model differs from the one the
        store holds toys of (checked for every patch before a run writes anything)."""
        if "/" in patch or patch.startswith("."):
            raise InputError(f"patch name {patch!r} cannot name a store group ('/' or leading '.')")
        stored = self.patch_attrs(patch)["digest"] if self.has_patch(patch) else digest
        if stored != digest:
            raise InputError(
                f"the store {self.path} holds toys of a different model for patch {patch!r} "
                f"(model digest {stored[:12]}..., this run: {digest[:12]}...); the workspace, "
                "patch, measurement or modifier settings changed: use another store"
            )

    def prepare(
        self,
        patch: str,
        digest: str,
        labels: Mapping[str, Any],
        ntoys: Mapping[tuple[float, str], int],
    ) -> None:
        """Room for ``ntoys[(mu, hypothesis)]`` toys: extends the μ grid and toys, never shrinks."""
        self.check_patch(patch, digest)
        block = int(self.identity["block"])
        if not self.has_patch(patch):
            group = self._root.create_group(patch)
            group.attrs.update({"digest": digest, "labels": dict(labels)})
            for name, dtype, fill in (
                ("mu", "float64", np.nan),
                ("q_obs", "float64", np.nan),
                ("q_obs_converged", "bool", False),
            ):
                group.create_array(name, shape=(0,), chunks=(_MU_CHUNK,), dtype=dtype,
                                   fill_value=fill)
            for hyp in HYPOTHESES:
                sub = group.create_group(hyp)
                sub.create_array("planned", shape=(0,), chunks=(_MU_CHUNK,), dtype="int64",
                                 fill_value=0)
                for name, dtype, fill in (("q", "float64", np.nan), ("converged", "bool", False),
                                          ("done", "bool", False)):
                    sub.create_array(name, shape=(0, 0), chunks=(1, block), dtype=dtype,
                                     fill_value=fill)
        group = self._group(patch)
        known = list(group["mu"][:])
        new = list(dict.fromkeys(mu for mu, _ in ntoys if mu not in known))
        grid = known + new
        n_mu = len(grid)
        for hyp in HYPOTHESES:
            sub = group[hyp]
            wanted = [n for (_, h), n in ntoys.items() if h == hyp]
            n_toys = max(sub["q"].shape[1], *wanted, 0)
            planned = np.zeros(n_mu, dtype=np.int64)
            planned[: len(known)] = sub["planned"][: len(known)]
            for (mu, h), n in ntoys.items():
                if h == hyp:
                    planned[grid.index(mu)] = max(planned[grid.index(mu)], n)
            for name in ("q", "converged", "done", "toys"):
                if name in sub.array_keys():
                    shape = sub[name].shape
                    sub[name].resize((n_mu, n_toys, *shape[2:]))
            sub["planned"].resize((n_mu,))
            sub["planned"][:] = planned
        group["q_obs"].resize((n_mu,))
        group["q_obs_converged"].resize((n_mu,))
        group["mu"].resize((n_mu,))  # last: the μ grid is what readers trust
        group["mu"][len(known):] = np.asarray(new, dtype=np.float64)

    # -- reading -----------------------------------------------------------------------------

    def mus(self, patch: str) -> np.ndarray:
        return self._group(patch)["mu"][:]

    def missing(
        self, patch: str, ntoys: Mapping[tuple[float, str], int]
    ) -> dict[tuple[float, str], np.ndarray]:
        """``{(mu, hypothesis): toy indices not done}`` among the first ``ntoys[(mu, hyp)]``."""
        group = self._group(patch)
        known = list(group["mu"][:])
        return {
            (mu, hyp): np.flatnonzero(~group[hyp]["done"][known.index(mu), :n])
            for (mu, hyp), n in ntoys.items()
        }

    def missing_observed(self, patch: str, mus: list[float]) -> list[float]:
        group = self._group(patch)
        known = list(group["mu"][:])
        q_obs = group["q_obs"][:]
        return [mu for mu in mus if np.isnan(q_obs[known.index(mu)])]

    def observed(self, patch: str) -> tuple[np.ndarray, np.ndarray]:
        group = self._group(patch)
        n_mu = group["mu"].shape[0]
        with self._damage_is_input_error(f"{patch}/q_obs"):
            return group["q_obs"][:n_mu], group["q_obs_converged"][:n_mu]

    def toys(self, patch: str, hypothesis: str) -> ToyArrays:
        group = self._group(patch)
        n_mu = group["mu"].shape[0]
        sub = group[hypothesis]
        with self._damage_is_input_error(f"{patch}/{hypothesis}"):
            done = sub["done"][:n_mu]
            q = np.where(done, np.nan_to_num(sub["q"][:n_mu], nan=np.inf), np.nan)
            converged = sub["converged"][:n_mu] & done
        return ToyArrays(q, converged, done)

    @contextmanager
    def _damage_is_input_error(self, where: str) -> Iterator[None]:
        try:
            yield
        except Exception as err:  # noqa: BLE001 - a damaged chunk fails in the codec
            raise InputError(
                f"the store {self.path} is damaged at {where} ({type(err).__name__}); run "
                f"'toyfarm info --check {self.path}', then generate again to regenerate it"
            ) from None

    def planned(self, patch: str, hypothesis: str) -> np.ndarray:
        group = self._group(patch)
        return group[hypothesis]["planned"][: group["mu"].shape[0]]

    def saved_toys(self, patch: str, hypothesis: str) -> np.ndarray | None:
        """The toys themselves ``[n_mu, n_toys, n_data]`` where the run saved them, else None."""
        group = self._group(patch)
        sub = group[hypothesis]
        return sub["toys"][: group["mu"].shape[0]] if "toys" in sub.array_keys() else None

    def segments(self, patch: str, hypothesis: str) -> list[tuple[int, int, int]]:
        """Where each seed's toys sit on the toy axis: ``(seed, offset, length)``.

        A generated store holds one seed from offset 0; a combined store several side by side.
        """
        sub = self._group(patch)[hypothesis]
        if "segments" in sub.attrs:
            return [tuple(s) for s in sub.attrs["segments"]]
        return [(int(self.identity["seed"]), 0, sub["q"].shape[1])]

    def set_segments(self, patch: str, hypothesis: str, segments) -> None:
        self._group(patch)[hypothesis].attrs["segments"] = [list(s) for s in segments]

    def stats(self) -> dict[str, float]:
        return dict(self.meta["stats"])

    # -- writing (the coordinator is the only writer) ----------------------------------------

    def write_toys(self, patch: str, mu: float, hypothesis: str, start: int, q: np.ndarray,
                   converged: np.ndarray, toys: np.ndarray | None = None,
                   done: np.ndarray | None = None) -> None:
        """Results of toys ``start .. start + len(q) - 1``; ``done`` (default: all) last."""
        group = self._group(patch)
        i = list(group["mu"][:]).index(mu)
        sub = group[hypothesis]
        stop = start + len(q)
        q = np.where(np.isfinite(q), q, np.nan)
        if toys is not None:
            if "toys" not in sub.array_keys():  # a toy's length is known once one is made
                n_mu, n_toys = sub["q"].shape
                sub.create_array("toys", shape=(n_mu, n_toys, toys.shape[1]),
                                 chunks=(1, int(self.identity["block"]), toys.shape[1]),
                                 dtype="float64", fill_value=np.nan)
            sub["toys"][i, start:stop] = toys
        sub["converged"][i, start:stop] = np.asarray(converged, dtype=bool) & ~np.isnan(q)
        sub["q"][i, start:stop] = q
        sub["done"][i, start:stop] = True if done is None else done

    def write_observed(self, patch: str, mu: float, q_obs: float, converged: bool) -> None:
        group = self._group(patch)
        i = list(group["mu"][:]).index(mu)
        group["q_obs_converged"][i] = bool(converged and np.isfinite(q_obs))
        group["q_obs"][i] = q_obs if np.isfinite(q_obs) else np.inf

    def submitted(self) -> dict[str, dict[str, Any]]:
        """Tasks sent to a remote engine whose results are not written yet, by remote task id."""
        return dict(self.meta.get("submitted", {}))

    def set_submitted(self, remote_id: str, record: dict[str, Any] | None) -> None:
        """Remember a remote task (fire and forget), or forget it (``None``) once written."""
        meta = self.meta
        pending = meta.setdefault("submitted", {})
        if record is None:
            pending.pop(remote_id, None)
        else:
            pending[remote_id] = record
        self._root.attrs["toyfarm"] = meta

    def add_stats(self, stats: Mapping[str, float], tasks: int = 1) -> None:
        """Add worker statistics (one task's, or another store's totals) to the store's."""
        meta = self.meta
        totals = meta["stats"]
        totals["tasks"] += tasks
        for key in _STAT_KEYS[1:]:
            totals[key] += stats.get(key, 0)
        self._root.attrs["toyfarm"] = meta

    # -- integrity ---------------------------------------------------------------------------

    def check(self, repair: bool = False) -> list[str]:
        """Blocks whose done toys lost data (a chunk deleted or unreadable), one line each.

        With ``repair`` those blocks are marked not done, so the next run regenerates exactly
        them, and temporary files of writes cut short are removed.
        """
        damage = []
        for patch in self.patches():
            group = self._group(patch)
            n_mu = group["mu"].shape[0]
            for name in ("q_obs", "q_obs_converged"):
                for k in range(-(-n_mu // _MU_CHUNK)):
                    if self._readable(group[name], (k,)):
                        continue
                    damage.append(f"{patch} observed statistics ({name}, chunk {k}): "
                                  "unreadable; refitted by the next run")
                    if repair:  # both arrays of the chunk: the observed fit is redone whole
                        for both in ("q_obs", "q_obs_converged"):
                            self._chunk_file(group[both], (k,)).unlink(missing_ok=True)
            for hyp in HYPOTHESES:
                sub = group[hyp]
                data = [sub[name] for name in ("q", "converged", "toys") if name in sub]
                n_blocks = -(-sub["done"].shape[1] // sub["done"].chunks[1])
                for i in range(n_mu):
                    for k in range(n_blocks):
                        reason = self._block_damage(sub["done"], data, (i, k))
                        if reason is None:
                            continue
                        mu = float(group["mu"][i])
                        damage.append(f"{patch} {hyp} mu={mu:g} toys {k * sub['done'].chunks[1]}"
                                      f"-{(k + 1) * sub['done'].chunks[1] - 1}: {reason}")
                        if repair:  # a partial block's rewrite reads its chunk: drop them all
                            for array in [sub["done"], *data]:
                                where = (i, k) + (0,) * (array.ndim - 2)
                                self._chunk_file(array, where).unlink(missing_ok=True)
        if repair:
            for partial in self.path.rglob("*.partial"):
                partial.unlink(missing_ok=True)
        return damage

    def _block_damage(self, done: zarr.Array, data: list[zarr.Array], block: tuple) -> str | None:
        if not self._readable(done, block):
            return "the done flags are unreadable"
        any_done = self._chunk_file(done, block).exists() and done.blocks[block].any()
        for array in data:
            where = block + (0,) * (array.ndim - 2)
            if any_done and not self._chunk_file(array, where).exists():
                return f"the {array.basename} chunk is missing"
            if not self._readable(array, where):
                return f"the {array.basename} chunk is unreadable"
        return None

    def _chunk_file(self, array: zarr.Array, block: tuple) -> Path:
        return self.path / array.path / "c" / "/".join(map(str, block))

    @staticmethod
    def _readable(array: zarr.Array, block: tuple) -> bool:
        try:
            array.blocks[block]
        except Exception:  # noqa: BLE001 - a damaged chunk fails in the codec, whichever it is
            return False
        return True

    def _group(self, patch: str) -> zarr.Group:
        try:
            return self._root[patch]
        except KeyError:
            raise InputError(
                f"the store {self.path} has no patch {patch!r} (it has: "
                f"{', '.join(self.patches()[:5]) or 'none'})"
            ) from None


def _normal(value: Any) -> Any:
    """JSON round trip, so stored attrs and fresh values compare alike (tuples vs lists)."""
    return json.loads(json.dumps(value))
