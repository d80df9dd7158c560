"""Compile a pyhf model into dense arrays: after this, nothing touches JSON or dicts.

Layout. The expected count of sample ``s`` in global bin ``b`` lives in cell ``c = s * n_bins + b``:

    rate[c] = (nominal[c] + sum_i Δ_i(α_i)[c]) * prod_i f_i(α_i)[c] * prod_k γ[slot[c, k]]

- ``α`` are the *interpolated* parameters (normsys and histosys; one name may carry both), evaluated
  densely over coefficient arrays (absent entries are neutral: f = 1, Δ = 0). A histosys varies
  per cell: ``[n_interp, cells]``. A normsys factor is one number per (sample, channel) *group*
  ``g = s * n_channels + h``: ``[n_interp, groups]``, and bins read it through ``bin_channel``.
  Groups are fewer than cells, and the Hessian's interpolated block is a product over groups;
- ``γ`` are the *linear* factors (normfactor, lumi, shapefactor, staterror, shapesys): each
  cell lists the few it is multiplied by in ``slot[c, :]``, padded with a slot that always holds 1.

Internally parameters are ordered interpolated first, then linear (``order`` maps internal index to
pyhf's index); this keeps every derivative block a dense matrix product. Constraint terms are one
entry per auxdata slot, in pyhf's auxdata order.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import jax
import numpy as np
import pyhf

from toyfarm.likelihood.interpolation import histosys_coefficients, normsys_coefficients

__all__ = ["Likelihood", "compile_model"]

_INTERPOLATED = ("normsys", "histosys")
_LINEAR = ("normfactor", "lumi", "shapefactor", "staterror", "shapesys")


@dataclass(frozen=True)
class Likelihood:
    """A HistFactory model as arrays (a JAX pytree; sizes and codes are static)."""

    nominal: np.ndarray  # [cells]
    normsys: np.ndarray  # [k, n_interp, groups] coefficients of the normsys code
    histosys: np.ndarray  # [k, n_interp, cells] coefficients of the histosys code
    linear_slot: np.ndarray  # [cells, n_slots] int, n_linear = the constant-1 pad
    linear_onehot: np.ndarray  # [cells, n_slots, n_linear] float, 0 for the pad
    bin_channel: np.ndarray  # [n_bins] int, channel of each bin
    channel_bins: np.ndarray  # [n_bins, n_channels] float, 1 where the bin is in the channel
    aux_param: np.ndarray  # [n_aux] int, internal index constrained by each auxdata slot
    aux_poisson: np.ndarray  # [n_aux] bool: Poisson (shapesys) rather than Gaussian
    aux_scale: np.ndarray  # [n_aux]: Gaussian sigma, or Poisson rate factor tau
    init: np.ndarray  # [n_pars] internal order
    lower: np.ndarray
    upper: np.ndarray
    fixed: np.ndarray  # bool
    order: np.ndarray  # [n_pars] internal index -> pyhf index
    n_samples: int
    n_bins: int
    n_channels: int
    n_interp: int
    poi: int  # internal index of the parameter of interest
    normsys_code: str
    histosys_code: str

    @property
    def n_pars(self) -> int:
        return int(self.init.shape[0])

    @property
    def n_linear(self) -> int:
        return self.n_pars - self.n_interp

    @property
    def n_groups(self) -> int:
        return self.n_samples * self.n_channels

    @property
    def n_aux(self) -> int:
        return int(self.aux_param.shape[0])

    @property
    def n_data(self) -> int:
        return self.n_bins + self.n_aux

    def to_internal(self, pars_pyhf):
        """Parameters in pyhf's order -> internal order (works on batches: last axis)."""
        return pars_pyhf[..., self.order]

    def to_pyhf(self, pars):
        inverse = np.argsort(self.order)
        return pars[..., inverse]


_STATIC = {"n_samples", "n_bins", "n_channels", "n_interp", "poi", "normsys_code", "histosys_code"}
jax.tree_util.register_dataclass(
    Likelihood,
    data_fields=[f.name for f in fields(Likelihood) if f.name not in _STATIC],
    meta_fields=sorted(_STATIC),
)


def _parameter_kinds(model: pyhf.pdf.Model) -> tuple[list[int], list[int]]:
    """pyhf indices of the interpolated and of the linear parameters."""
    kind_of: dict[str, set[str]] = {}
    for channel in model.spec["channels"]:
        for sample in channel["samples"]:
            for modifier in sample["modifiers"]:
                kind_of.setdefault(modifier["name"], set()).add(modifier["type"])
    interp, linear = [], []
    config = model.config
    for name in config.par_order:
        kinds = kind_of.get(name, set())
        indices = range(config.par_slice(name).start, config.par_slice(name).stop)
        if kinds <= set(_INTERPOLATED) and kinds:
            interp.extend(indices)
        elif kinds <= set(_LINEAR) and kinds:
            linear.extend(indices)
        else:
            raise ValueError(f"parameter {name!r} mixes modifier types {sorted(kinds)}")
    return interp, linear


def _staterror_offsets(model: pyhf.pdf.Model) -> dict[tuple[str, str], int]:
    """(staterror name, channel) -> parameter index of the channel's first bin, within the modifier.

    pyhf numbers a staterror's parameters over the bins of all the channels it appears in, in its
    channel order; the per-bin shapefactor and shapesys start at 0 in every channel.
    """
    channels_of: dict[str, set[str]] = {}
    for channel in model.spec["channels"]:
        for sample in channel["samples"]:
            for modifier in sample["modifiers"]:
                if modifier["type"] == "staterror":
                    channels_of.setdefault(modifier["name"], set()).add(channel["name"])
    offsets = {}
    for name, channels in channels_of.items():
        offset = 0
        for channel in model.config.channels:
            if channel in channels:
                offsets[name, channel] = offset
                offset += model.config.channel_nbins[channel]
    return offsets


def compile_model(model: pyhf.pdf.Model) -> Likelihood:
    """Collect every modifier of the model into dense arrays, once."""
    config = model.config
    normsys_code = config.modifier_settings["normsys"]["interpcode"]
    histosys_code = config.modifier_settings["histosys"]["interpcode"]
    samples = list(config.samples)
    n_samples, n_bins = len(samples), config.nmaindata
    interp, linear = _parameter_kinds(model)
    order = np.array(interp + linear, dtype=np.int64)
    internal = {pyhf_index: i for i, pyhf_index in enumerate(order)}
    n_interp = len(interp)

    channels = list(config.channels)
    n_channels = len(channels)
    nominal = np.zeros((n_samples, n_bins))
    ns_lo, ns_hi = np.ones((2, n_interp, n_samples, n_channels))
    hs_lo, hs_hi = np.zeros((2, n_interp, n_samples, n_bins))
    hs_set = np.zeros((n_interp, n_samples, n_bins), dtype=bool)
    slots: list[list[list[int]]] = [[[] for _ in range(n_bins)] for _ in range(n_samples)]
    staterror_offset = _staterror_offsets(model)

    bin_channel = np.zeros(n_bins, dtype=np.int64)
    for channel in model.spec["channels"]:
        bins = config.channel_slices[channel["name"]]
        h = channels.index(channel["name"])
        bin_channel[bins] = h
        for sample in channel["samples"]:
            s = samples.index(sample["name"])
            nominal[s, bins] = sample["data"]
            for modifier in sample["modifiers"]:
                start = config.par_slice(modifier["name"]).start
                kind, data = modifier["type"], modifier["data"]
                if kind == "normsys":
                    i = internal[start]
                    ns_lo[i, s, h], ns_hi[i, s, h] = data["lo"], data["hi"]
                elif kind == "histosys":
                    i = internal[start]
                    hs_lo[i, s, bins], hs_hi[i, s, bins] = data["lo_data"], data["hi_data"]
                    hs_set[i, s, bins] = True
                else:
                    per_bin = kind in ("shapefactor", "staterror", "shapesys")
                    if kind == "staterror":
                        start += staterror_offset[modifier["name"], channel["name"]]
                    for j, b in enumerate(range(bins.start, bins.stop)):
                        slots[s][b].append(internal[start + (j if per_bin else 0)] - n_interp)

    # absent histosys entries are neutral: lo = nom = hi
    hs_lo = np.where(hs_set, hs_lo, nominal)
    hs_hi = np.where(hs_set, hs_hi, nominal)

    n_linear = len(linear)
    n_slots = max(1, max(len(cell) for row in slots for cell in row))
    linear_slot = np.full((n_samples * n_bins, n_slots), n_linear, dtype=np.int64)
    for s in range(n_samples):
        for b in range(n_bins):
            linear_slot[s * n_bins + b, : len(slots[s][b])] = slots[s][b]
    linear_onehot = (linear_slot[..., None] == np.arange(n_linear)).astype(np.float64)

    aux_param, aux_poisson, aux_scale = [], [], []
    for name in config.auxdata_order:
        paramset = config.param_set(name)
        start = config.par_slice(name).start
        poisson = paramset.pdf_type == "poisson"
        scales = paramset.factors if poisson else paramset.width()
        for j in range(paramset.n_parameters):
            aux_param.append(internal[start + j])
            aux_poisson.append(poisson)
            aux_scale.append(float(scales[j]))

    cells = n_samples * n_bins
    flat = lambda a: a.reshape(a.shape[0], cells)  # noqa: E731
    bounds = np.asarray(config.suggested_bounds(), dtype=np.float64)[order]
    return Likelihood(
        nominal=nominal.reshape(cells),
        normsys=normsys_coefficients(
            normsys_code, *(a.reshape(n_interp, n_samples * n_channels) for a in (ns_lo, ns_hi))
        ),
        histosys=histosys_coefficients(
            histosys_code, flat(hs_lo), flat(np.broadcast_to(nominal, hs_lo.shape)), flat(hs_hi)
        ),
        bin_channel=bin_channel,
        channel_bins=(bin_channel[:, None] == np.arange(n_channels)).astype(np.float64),
        linear_slot=linear_slot,
        linear_onehot=linear_onehot,
        aux_param=np.array(aux_param, dtype=np.int64),
        aux_poisson=np.array(aux_poisson, dtype=bool),
        aux_scale=np.array(aux_scale, dtype=np.float64),
        init=np.asarray(config.suggested_init(), dtype=np.float64)[order],
        lower=bounds[:, 0].copy(),
        upper=bounds[:, 1].copy(),
        fixed=np.asarray(config.suggested_fixed(), dtype=bool)[order],
        order=order,
        n_samples=n_samples,
        n_bins=n_bins,
        n_channels=n_channels,
        n_interp=n_interp,
        poi=internal[config.poi_index],
        normsys_code=normsys_code,
        histosys_code=histosys_code,
    )
