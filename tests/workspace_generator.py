"""Random valid pyhf workspace specs for the likelihood parity tests."""

from __future__ import annotations

import numpy as np


def _yields(rng: np.random.Generator, n: int, zero_prob: float = 0.0) -> list[float]:
    nominal = rng.uniform(5.0, 50.0, n)
    return np.where(rng.random(n) < zero_prob, 0.0, nominal).tolist()


def _histosys(rng: np.random.Generator, name: str, nominal: list[float]) -> dict:
    # shifts of either sign, at most 15%: one histosys per sample keeps rates > 0 up to |α| = 2
    nom = np.asarray(nominal)
    lo, hi = nom * (1 + rng.uniform(-0.15, 0.15, (2, nom.size)))
    data = {"lo_data": lo.tolist(), "hi_data": hi.tolist()}
    return {"name": name, "type": "histosys", "data": data}


def _normsys(rng: np.random.Generator, name: str) -> dict:
    # lo and hi drawn independently, so both may lie on the same side of 1
    lo, hi = rng.uniform(0.8, 1.25, 2)
    return {"name": name, "type": "normsys", "data": {"lo": float(lo), "hi": float(hi)}}


def _uncertainties(rng: np.random.Generator, nominal: list[float], zero_prob: float) -> list[float]:
    unc = np.asarray(nominal) * rng.uniform(0.05, 0.3, len(nominal))
    return np.where(rng.random(len(nominal)) < zero_prob, 0.0, unc).tolist()


def random_workspace(rng: np.random.Generator) -> dict:
    """A random pyhf workspace spec (plain dict) using every modifier type and their edge cases.

    Two or three channels of 1 to 4 bins. ``bkg_main`` is in every channel with positive yields, so
    every bin has a positive rate; ``signal`` (normfactor ``mu``, the POI) and the backgrounds
    ``bkg_a`` / ``bkg_b`` are absent from some channels, and the latter two have zero-yield bins.
    Modifiers: ``lumi`` on several samples; normsys ``shared`` on several samples and channels plus
    a histosys ``shared`` on ``bkg_main`` (one parameter); per-channel histosys; normfactor ``k_a``;
    staterror per channel or spanning the first two channels, with zero-uncertainty bins and
    zero-yield bins (parameters pyhf fixes); shapesys with zero-yield or zero-uncertainty bins;
    shapefactor shared by two samples of a channel. Observed data has zero-count bins. The
    measurement sets ``bounds``/``inits`` of normfactors, ``fixed`` of a normsys, and lumi's
    ``auxdata``/``sigmas``. Rates stay positive for |α| <= 2 and linear factors in [0.5, 1.5].
    """
    n_channels = int(rng.integers(2, 4))
    bins = [int(n) for n in rng.choice(np.arange(1, 5), n_channels, replace=False)]
    names = [f"ch{c}" for c in range(n_channels)]
    present = {
        "signal": [c == 0 or rng.random() < 0.6 for c in range(n_channels)],
        "bkg_main": [True] * n_channels,
        "bkg_a": [rng.random() < 0.6 for _ in range(n_channels)],
        "bkg_b": [rng.random() < 0.6 for _ in range(n_channels)],
    }
    # staterror names: per channel, or one name spanning channels 0 and 1; every sample carrying a
    # staterror must carry it in all of its channels (pyhf asserts equal masks)
    stat_name = [f"staterror_{name}" for name in names]
    if rng.random() < 0.5:
        stat_name[0] = stat_name[1] = "staterror_shared"
    stat_carriers: dict[str, list[str]] = {}
    for stat in set(stat_name):
        channels = [c for c in range(n_channels) if stat_name[c] == stat]
        eligible = [s for s in ("bkg_main", "bkg_a") if all(present[s][c] for c in channels)]
        stat_carriers[stat] = [s for s in eligible if rng.random() < 0.7] or eligible[:1]

    channels, observations = [], []
    for c, (name, n) in enumerate(zip(names, bins, strict=True)):
        samples: dict[str, dict] = {}
        if present["signal"][c]:
            data = _yields(rng, n)
            mods = [
                {"name": "mu", "type": "normfactor", "data": None},
                {"name": "lumi", "type": "lumi", "data": None},
                _histosys(rng, "signal_shape", data),
            ]
            if rng.random() < 0.5:
                mods.append(_normsys(rng, "shared"))
            samples["signal"] = {"data": data, "modifiers": mods}
        data = _yields(rng, n)
        mods = [_normsys(rng, "shared")]
        if rng.random() < 0.7:
            mods.append(_histosys(rng, "shared", data))
        if rng.random() < 0.5:
            mods.append({"name": "lumi", "type": "lumi", "data": None})
        samples["bkg_main"] = {"data": data, "modifiers": mods}
        if present["bkg_a"][c]:
            data = _yields(rng, n, zero_prob=0.25)
            mods = [
                {"name": "k_a", "type": "normfactor", "data": None},
                _histosys(rng, f"shape_{name}", data),
                {"name": f"sf_{name}", "type": "shapefactor", "data": None},
            ]
            if rng.random() < 0.5:
                mods.append(_normsys(rng, "shared"))
            samples["bkg_a"] = {"data": data, "modifiers": mods}
        if present["bkg_b"][c]:
            data = _yields(rng, n, zero_prob=0.25)
            mods = [
                _normsys(rng, "bkg_b_norm"),
                {"name": "lumi", "type": "lumi", "data": None},
                {
                    "name": f"shapesys_{name}",
                    "type": "shapesys",
                    "data": _uncertainties(rng, data, zero_prob=0.25),
                },
            ]
            if present["bkg_a"][c] and rng.random() < 0.5:
                mods.append({"name": f"sf_{name}", "type": "shapefactor", "data": None})
            samples["bkg_b"] = {"data": data, "modifiers": mods}

        stat = stat_name[c]
        zero_unc = rng.random(n) < 0.25
        for s in stat_carriers[stat]:
            unc = np.where(zero_unc, 0.0, _uncertainties(rng, samples[s]["data"], zero_prob=0.0))
            modifier = {"name": stat, "type": "staterror", "data": unc.tolist()}
            samples[s]["modifiers"].append(modifier)

        channels.append({"name": name, "samples": [{"name": s, **v} for s, v in samples.items()]})
        total = np.sum([v["data"] for v in samples.values()], axis=0)
        observed = np.where(rng.random(n) < 0.25, 0, rng.poisson(total))
        observations.append({"name": name, "data": observed.astype(float).tolist()})

    lumi_sigma = float(rng.uniform(0.01, 0.1))
    parameters = [
        {"name": "mu", "bounds": [[0.0, float(rng.choice([3.0, 5.0, 10.0]))]], "inits": [1.0]},
        {
            "name": "lumi",
            "auxdata": [float(rng.uniform(0.95, 1.05))],
            "sigmas": [lumi_sigma],
            "bounds": [[1 - 10 * lumi_sigma, 1 + 10 * lumi_sigma]],
            "inits": [1.0],
            "fixed": bool(rng.random() < 0.5),
        },
    ]
    if any(present["bkg_a"]):
        parameters.append(
            {"name": "k_a", "bounds": [[0.0, 4.0]], "inits": [float(rng.uniform(0.8, 1.2))]}
        )
    if any(present["bkg_b"]):
        parameters.append({"name": "bkg_b_norm", "fixed": bool(rng.random() < 0.5)})
    return {
        "channels": channels,
        "observations": observations,
        "measurements": [{"name": "meas", "config": {"poi": "mu", "parameters": parameters}}],
        "version": "1.0.0",
    }
