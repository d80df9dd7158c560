"""Loading pyhf workspaces and signal patches into models.

pyhf does the parsing and the schema validation; this module only adds what a batch service needs:
the background-only workspace and the patchset are validated once, each patch is applied to the
validated workspace without re-validating the whole result (that alone costs seconds per 1Lbb
patch), and every model gets a content digest that identifies it across runs, stores and workers.

A ``ModelRef`` is what travels to a worker: the compressed (background-only) workspace, the
patch's operations and the settings. It is cheap to make (no patched copy on the coordinator), and
a worker that already holds the model only needs its digest.
"""

from __future__ import annotations

import copy
import hashlib
import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import jsonpatch
import pyhf
import pyhf.exceptions
import pyhf.utils

__all__ = [
    "WORKSPACE_HYPOTHESIS",
    "InputError",
    "ModelRef",
    "ModelSource",
    "build_model",
    "normalise_modifier_settings",
]

#: The hypothesis name of a run on a full workspace (no patchset).
WORKSPACE_HYPOTHESIS = "workspace"

_INTERPCODES = {"normsys": ("code1", "code4"), "histosys": ("code0", "code2", "code4p")}
_DEFAULT_SETTINGS = {"normsys": {"interpcode": "code1"}, "histosys": {"interpcode": "code0"}}


class InputError(ValueError):
    """Bad user input: the message names what is wrong and what to do about it."""


def normalise_modifier_settings(settings: Mapping[str, Any] | None) -> dict[str, dict[str, str]]:
    """pyhf's ``modifier_settings`` with defaults filled in and the codes checked."""
    out = {kind: dict(default) for kind, default in _DEFAULT_SETTINGS.items()}
    for kind, opts in (settings or {}).items():
        if kind not in _INTERPCODES:
            raise InputError(
                f"modifier_settings: unknown modifier type {kind!r} (known: normsys, histosys)"
            )
        code = dict(opts).get("interpcode", out[kind]["interpcode"])
        if code not in _INTERPCODES[kind]:
            allowed = ", ".join(_INTERPCODES[kind])
            raise InputError(
                f"modifier_settings: {kind} interpcode {code!r} is not supported by pyhf "
                f"(choose one of {allowed})"
            )
        out[kind]["interpcode"] = code
    return out


def _read_json(path: Path, what: str) -> Any:
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise InputError(f"the {what} {path} is a folder: give the path of its JSON file") from None
    except OSError as err:
        raise InputError(f"cannot read the {what} {path}: {err.strerror or err}") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise InputError(
            f"the {what} {path} is not UTF-8 text (byte {err.start}): give a JSON file; "
            "a compressed one must be unpacked first"
        ) from None
    except json.JSONDecodeError as err:
        raise InputError(f"the {what} {path} is not valid JSON: {err}") from None


def _validated(kind: str, path: Path, build: Any, spec: Any) -> Any:
    try:
        return build(spec)
    except pyhf.exceptions.InvalidSpecification as err:
        reason = str(err).splitlines()[0]
        raise InputError(f"the {kind} {path} fails pyhf's schema: {reason}") from None
    except (TypeError, KeyError, AttributeError) as err:
        raise InputError(f"the {kind} {path} is not a pyhf {kind}: {err}") from None


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _copy_path(doc: Any, pointer: str) -> Any:
    """``doc`` with the containers from the root to ``pointer``'s parent copied (shallow): an
    operation at ``pointer`` changes only the copies."""
    root = copy.copy(doc)
    node = root
    for part in jsonpatch.JsonPointer(pointer).parts[:-1]:
        key = int(part) if isinstance(node, list) and part.isdigit() else part
        try:
            child = node[key]
        except (KeyError, IndexError, TypeError):
            break  # a bad path: the operation itself says so
        if not isinstance(child, dict | list):
            break
        node[key] = copy.copy(child)
        node = node[key]
    return root


def _patched_sharing(spec: dict, ops: list[dict], name: str) -> dict:
    """``spec`` with a patch applied, sharing every part the patch leaves alone with ``spec``:
    milliseconds where a deep copy of a 1Lbb workspace costs 0.1 s. Read it, never change it."""
    doc: Any = spec
    try:
        for op in ops:
            for pointer in (op.get("from"), op["path"]):
                if pointer is not None:
                    doc = _copy_path(doc, pointer)
            doc = jsonpatch.apply_patch(doc, [op], in_place=True)
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, KeyError) as err:
        raise InputError(f"patch {name!r} does not apply to the workspace: {err}") from None
    return doc


def _poi_key(spec: dict) -> bytes | None:
    """What pyhf takes a POI's bounds from: the measurements (a parameter's ``bounds``) and the
    types of the modifiers named as a POI (their default bounds)."""
    measurements = spec.get("measurements", [])
    try:
        pois = {m["config"]["poi"] for m in measurements}
        types = sorted({
            (mod["name"], mod["type"])
            for channel in spec["channels"] for sample in channel["samples"]
            for mod in sample["modifiers"] if mod["name"] in pois
        })
    except (KeyError, TypeError):  # a patch broke the spec: its own group, and pyhf says why
        return None
    return _canonical([measurements, types])


def build_model(
    spec: dict, measurement: str | None, modifier_settings: dict, name: str = WORKSPACE_HYPOTHESIS
) -> tuple[pyhf.pdf.Model, list[float]]:
    """The pyhf model of an already validated spec, and its observed data (main bins, auxdata)."""
    workspace = pyhf.Workspace(spec, validate=False)
    try:
        model = workspace.model(
            measurement_name=measurement, modifier_settings=modifier_settings, validate=False
        )
        data = workspace.data(model)
    except (pyhf.exceptions.InvalidModel, pyhf.exceptions.InvalidModifier,
            pyhf.exceptions.InvalidMeasurement, pyhf.exceptions.InvalidSpecification,
            KeyError) as err:
        reason = str(err).splitlines()[0]  # a schema error goes on to dump the instance
        raise InputError(f"patch {name!r} does not give a valid model: {reason}") from None
    except (TypeError, ValueError) as err:  # pyhf's own word on a spec it cannot build
        raise InputError(f"patch {name!r} does not give a valid pyhf model "
                         f"({type(err).__name__}: {err})") from None
    if model.config.poi_index is None:
        raise InputError(f"the measurement of {name!r} has no parameter of interest")
    return model, [float(x) for x in data]


@dataclass(frozen=True)
class ModelRef:
    """One model, compact enough to send with every task, buildable on any worker.

    ``digest`` identifies the model content (workspace, patch, measurement, settings); workers
    key their caches on it and stores record it to refuse mixing different models.
    """

    name: str
    workspace_digest: str
    workspace_zlib: bytes  # the validated (background-only) workspace, compressed JSON
    patch_ops: str | None  # the patch's JSON-patch operations, or None for a full workspace
    measurement: str | None
    modifier_settings: dict[str, dict[str, str]]

    @cached_property
    def digest(self) -> str:
        content = {
            "workspace": self.workspace_digest,
            "patch": json.loads(self.patch_ops) if self.patch_ops is not None else None,
            "measurement": self.measurement,
            "modifier_settings": self.modifier_settings,
        }
        return hashlib.sha256(_canonical(content)).hexdigest()

    def spec(self) -> dict:
        spec = json.loads(zlib.decompress(self.workspace_zlib))
        if self.patch_ops is None:
            return spec
        return jsonpatch.apply_patch(spec, json.loads(self.patch_ops), in_place=True)

    def build(self) -> tuple[pyhf.pdf.Model, list[float]]:
        """The pyhf model and its observed data (no schema validation: done at the source)."""
        return build_model(self.spec(), self.measurement, self.modifier_settings, self.name)


@dataclass(frozen=True)
class ModelSource:
    """Where the models of a run come from: a workspace, optionally a patchset, and settings.

    ``patches()`` names the hypotheses (the patch names, or ``"workspace"`` without a patchset);
    ``model(name)`` builds the pyhf model of one of them and ``digest(name)`` identifies it.
    """

    workspace_path: Path
    patchset_path: Path | None = None
    modifier_settings: dict[str, dict[str, str]] = field(default_factory=dict)
    measurement: str | None = None
    verify_digest: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "workspace_path", Path(self.workspace_path))
        if self.patchset_path is not None:
            object.__setattr__(self, "patchset_path", Path(self.patchset_path))
        object.__setattr__(
            self, "modifier_settings", normalise_modifier_settings(self.modifier_settings)
        )

    @cached_property
    def workspace_spec(self) -> dict:
        spec = _read_json(self.workspace_path, "workspace")
        ws = _validated("workspace", self.workspace_path, pyhf.Workspace, spec)
        if self.measurement is not None and self.measurement not in ws.measurement_names:
            raise InputError(
                f"the workspace has no measurement {self.measurement!r} "
                f"(it has: {', '.join(ws.measurement_names)})"
            )
        return dict(ws)

    @cached_property
    def patchset(self) -> pyhf.PatchSet | None:
        if self.patchset_path is None:
            return None
        spec = _read_json(self.patchset_path, "patchset")
        patchset = _validated("patchset", self.patchset_path, pyhf.PatchSet, spec)
        if self.verify_digest:
            try:
                patchset.verify(self.workspace_spec)
            except pyhf.exceptions.PatchSetVerificationError:
                raise InputError(
                    f"the patchset {self.patchset_path} was not made for the workspace "
                    f"{self.workspace_path} (digest mismatch); set verify_digest = false in "
                    "[workspace] of the run config to apply its patches by name"
                ) from None
        return patchset

    def patches(self) -> list[str]:
        """Every hypothesis this source offers, in the patchset's order."""
        if self.patchset is None:
            return [WORKSPACE_HYPOTHESIS]
        return [patch.name for patch in self.patchset.patches]

    def labels(self) -> dict[str, tuple]:
        """The patchset's label values of each patch (e.g. 1Lbb: m1, m2); empty without one."""
        if self.patchset is None:
            return {}
        return {patch.name: tuple(patch.values) for patch in self.patchset.patches}

    def label_names(self) -> list[str]:
        """The patchset's label names (e.g. 1Lbb: m1, m2); empty without one."""
        return [] if self.patchset is None else list(self.patchset.labels)

    def check_patches(self, names: list[str]) -> list[str]:
        known = self.patches()
        unknown = [name for name in names if name not in known]
        if unknown:
            hint = (
                "this run has no patchset, so its only hypothesis is 'workspace'"
                if self.patchset is None
                else f"the patchset has {len(known)} patches, e.g. {', '.join(known[:3])}"
            )
            raise InputError(f"unknown patch {unknown[0]!r}: {hint}")
        return list(names)

    def spec(self, patch: str) -> dict:
        """The (patched) workspace specification of one hypothesis."""
        self.check_patches([patch])
        if self.patchset is None:
            return self.workspace_spec
        # The parts were validated once; re-validating each patched copy costs seconds per patch.
        ops = self.patchset[patch].patch
        return copy.deepcopy(_patched_sharing(self.workspace_spec, ops, patch))

    def model(self, patch: str) -> tuple[pyhf.pdf.Model, list[float]]:
        """The pyhf model of one hypothesis and its observed data (main bins, then auxdata)."""
        return build_model(self.spec(patch), self.measurement, self.modifier_settings, patch)

    def poi_bounds(self, patches: list[str]) -> dict[str, tuple[str, float, float]]:
        """``{patch: (POI name, low, high)}``, from one pyhf model per group of patches whose POI
        bounds cannot differ (same measurements, same POI modifier types): a model per patch
        would cost 0.6 s each on 1Lbb's 125 patches."""
        self.check_patches(patches)
        groups: dict[bytes, list[str]] = {}
        for patch in patches:
            spec = self.workspace_spec
            if self.patchset is not None:
                spec = _patched_sharing(spec, self.patchset[patch].patch, patch)
            groups.setdefault(_poi_key(spec) or patch.encode(), []).append(patch)
        out = {}
        for members in groups.values():
            model, _ = self.model(members[0])
            low, high = model.config.suggested_bounds()[model.config.poi_index]
            out.update(dict.fromkeys(members, (model.config.poi_name, float(low), float(high))))
        return out

    @cached_property
    def _workspace_bytes(self) -> bytes:
        return _canonical(self.workspace_spec)

    @cached_property
    def _workspace_zlib(self) -> bytes:
        return zlib.compress(self._workspace_bytes, 6)

    def model_ref(self, patch: str) -> ModelRef:
        """The compact reference of one hypothesis' model, to send to workers."""
        self.check_patches([patch])
        ops = None
        if self.patchset is not None:
            ops = json.dumps(self.patchset[patch].patch, separators=(",", ":"))
        return ModelRef(
            name=patch,
            workspace_digest=hashlib.sha256(self._workspace_bytes).hexdigest(),
            workspace_zlib=self._workspace_zlib,
            patch_ops=ops,
            measurement=self.measurement,
            modifier_settings=self.modifier_settings,
        )

    def digest(self, patch: str) -> str:
        """sha256 identifying everything that determines the model: spec, measurement, settings."""
        return self.model_ref(patch).digest
