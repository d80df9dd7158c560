"""Plots for talks: test-statistic distributions, CLs vs μ with the Brazil band, exclusion contours.

The figure functions are pure (results and arrays in, a ``matplotlib.figure.Figure`` out) and use
no pyplot state, so they run headless (PNG files go through Agg) and in threads. ``write_plots``
reads a store through the ``Store`` API and ``toyfarm.results`` and writes, under ``output``::

    teststat_<patch>_mu<mu>.png   per (patch, μ), ``<mu>`` as ``str(float(mu))`` (cls --json keys)
    cls_<patch>.png               per patch
    contour.png                   when every plotted patch carries the same two numeric labels
                                  and 3 of them, not on one line, have a usable limit

Exclusion contour: the upper limit μ_up of each grid point, contoured at μ_up = 1 by linear
interpolation of log10(μ_up) on a Delaunay triangulation of the points (coordinates scaled to
[0, 1] first, so labels in different units triangulate alike). A limit the μ scan does not
bracket has no value; where the scan still decides the question it enters at the scan edge:
"below the scan" (CLs < level already at the smallest μ, so μ_up < μ_min) with μ_min <= 1 is
excluded and enters as μ_min; "above the scan" (CLs >= level up to μ_max, so μ_up > μ_max) with
μ_max >= 1 is not excluded and enters as μ_max. The side of 1 each such point is on is then
right; the contour between it and its neighbours is only approximate (the edge value is a bound).
Every other missing limit (below the scan with μ_min > 1, above it with μ_max < 1, no finite CLs)
leaves the point out of that contour, with a note.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.tri import LinearTriInterpolator, Triangulation, UniformTriRefiner
from numpy.typing import ArrayLike
from scipy.spatial import Delaunay, QhullError

from toyfarm.results import hypotests
from toyfarm.stats import HypotestResult, Limit, UpperLimits, upper_limit
from toyfarm.store import Store
from toyfarm.workspace import InputError

__all__ = [
    "PlotReport",
    "TEST_STAT_LABELS",
    "teststat_figure",
    "cls_figure",
    "contour_figure",
    "limits_of",
    "write_plots",
]

#: axis labels of the stored test statistics (pyhf's names in toyfarm's config)
TEST_STAT_LABELS = {
    "qtilde": r"$\tilde{q}_{\mu}$",
    "q": r"$q_{\mu}$",
    "q0": r"$q_{0}$",
    "ttilde": r"$\tilde{t}_{\mu}$",
    "t": r"$t_{\mu}$",
}

_GREEN, _YELLOW = "#00cc00", "#ffdd00"  # the colours of ATLAS/CMS Brazil bands
_DPI = 150
_SUBDIV = 4  # the ±1σ band's mesh: each grid triangle cut into 4**_SUBDIV


@dataclass
class PlotReport:
    """Files written, and notes on what could not be drawn (and why)."""

    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _pm(value: float, error: float) -> str:
    if not math.isfinite(value):
        return "undefined" if math.isnan(value) else "inf"
    return f"{value:.3g} ± {error:.2g}" if math.isfinite(error) else f"{value:.3g}"


def teststat_figure(
    q_obs: float,
    q_sb: ArrayLike,
    q_b: ArrayLike,
    converged_sb: ArrayLike,
    converged_b: ArrayLike,
    result: HypotestResult,
    test_stat: str,
    title: str = "",
    obs_converged: bool = True,
) -> Figure:
    """Histograms of the converged s+b and b-only toys' q, the observed q, CLs in the legend."""
    # NaN: not generated; not converged: left out, as in the CLs numbers in the legend
    q_sb, q_b = np.asarray(q_sb, float), np.asarray(q_b, float)
    sb = q_sb[np.asarray(converged_sb, bool) & ~np.isnan(q_sb)]
    b = q_b[np.asarray(converged_b, bool) & ~np.isnan(q_b)]
    label = TEST_STAT_LABELS.get(test_stat, test_stat)
    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = fig.add_subplot()
    every = np.concatenate([sb, b, [q_obs]])
    every = every[np.isfinite(every)]
    top = max(float(every.max()), 0.0) if every.size else 0.0
    # q >= 0; many toys sit at exactly 0 (q̃μ, qμ), so bins start there
    bins = np.linspace(0.0, top * 1.05 if top > 0 else 1.0, 41)
    for values, colour, name, p, value, err, left_out in (
        (sb, "tab:blue", "s+b toys", r"CL$_{s+b}$", result.CLsb_obs, result.CLsb_obs_error,
         result.not_converged_sb),
        (b, "tab:red", "b-only toys", r"CL$_{b}$", result.CLb_obs, result.CLb_obs_error,
         result.not_converged_b),
    ):
        count = f"{values.size}, {left_out} not converged left out" if left_out else values.size
        text = f"{name} ({count}): {p} = {_pm(value, err)}"
        if values.size:
            ax.hist(values, bins=bins, histtype="step", lw=1.6, color=colour,
                    weights=np.full(values.size, 1.0 / values.size), label=text)
        else:
            ax.plot([], [], color=colour, label=text)
    cls_text = r"CL$_s$ = " + _pm(result.CLs_obs, result.CLs_obs_error)
    failed = "" if obs_converged else " (fit did not converge)"
    if math.isfinite(q_obs):
        ax.axvline(q_obs, color="k", lw=2,
                   label=f"observed {label} = {q_obs:.3g}{failed}: {cls_text}")
    else:
        ax.plot([], [], color="k", lw=2, label=f"observed {label}: no value{failed}")
    ax.set_yscale("log")
    if sb.size == 0 and b.size == 0:
        ax.set_ylim(1e-3, 1.0)
    else:  # headroom on the log axis so the legend sits above the histograms
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi * (hi / lo) ** 0.45)
    ax.set_xlim(bins[0], bins[-1])
    ax.set_xlabel(label)
    ax.set_ylabel("fraction of toys")
    ax.set_title(title)
    # an opaque box: the observed line may run behind the legend
    ax.legend(loc="upper right", fontsize="small", framealpha=0.9, edgecolor="none")
    return fig


def _limit_text(limit: Limit, mu: np.ndarray) -> str:
    """A short legend text for a limit, saying which way the scan failed to bracket it."""
    if limit.status == "ok":
        return f"{limit.value:.3g}"
    if limit.status == "below_scan":
        return f"< {mu[limit.hi]:g} (below scan)"
    if limit.status == "above_scan":
        return f"> {mu[limit.lo]:g} (above scan)"
    return "none (no finite CLs)"


def cls_figure(
    results: Mapping[float, HypotestResult],
    limits: UpperLimits,
    level: float = 0.05,
    title: str = "",
) -> Figure:
    """CLs vs μ: observed with MC errors, expected median with ±1σ/±2σ bands, level, limits."""
    mu = np.array(sorted(results), dtype=float)
    rows = [results[m] for m in mu]
    obs = np.array([r.CLs_obs for r in rows])
    err = np.array([r.CLs_obs_error for r in rows])
    exp = np.array([r.CLs_exp for r in rows], dtype=float).reshape(mu.size, 5)
    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = fig.add_subplot()
    ok = np.isfinite(exp).all(axis=1)
    ax.fill_between(mu, exp[:, 0], exp[:, 4], where=ok, color=_YELLOW, lw=0,
                    label=r"expected $\pm 2\sigma$")
    ax.fill_between(mu, exp[:, 1], exp[:, 3], where=ok, color=_GREEN, lw=0,
                    label=r"expected $\pm 1\sigma$")
    med = np.isfinite(exp[:, 2])
    ax.plot(mu[med], exp[med, 2], "k--", lw=1.5, label=r"expected CL$_s$ (median)")
    # inf (CLb = 0) and NaN have no place on the axis; the note says where they were
    shown = np.isfinite(obs)
    ax.errorbar(mu[shown], obs[shown], yerr=np.where(np.isfinite(err), err, 0.0)[shown],
                fmt="o-", color="k", ms=4, capsize=2, label=r"observed CL$_s$ (MC error)")
    ax.axhline(level, color="tab:red", lw=1.2, label=f"CL$_s$ = {level:g}")
    obs_text = _limit_text(limits.obs, mu)
    exp_text = _limit_text(limits.exp[2], mu)
    if limits.obs.status == "ok":
        ax.axvline(limits.obs.value, color="tab:blue", lw=1.2, ls="-")
    if limits.exp[2].status == "ok":
        ax.axvline(limits.exp[2].value, color="tab:blue", lw=1.2, ls="--")
        lo, hi = limits.exp[1], limits.exp[3]
        if lo.status == hi.status == "ok":
            exp_text += f" [{lo.value:.3g}, {hi.value:.3g}]"
    handles, labels = ax.get_legend_handles_labels()
    handles += [Line2D([], [], color="tab:blue", ls="-"),
                Line2D([], [], color="tab:blue", ls="--")]
    labels += [rf"observed $\mu_{{up}}$ {obs_text}", rf"expected $\mu_{{up}}$ {exp_text}"]
    if not shown.all():
        handles.append(Line2D([], [], ls="none"))
        labels.append("no finite observed CLs at μ = "
                      + ", ".join(f"{m:g}" for m in mu[~shown]))
    ax.legend(handles, labels, loc="upper right", fontsize="small", frameon=False)
    finite = np.concatenate([obs[shown] + np.nan_to_num(err[shown]), exp[np.isfinite(exp)]])
    ax.set_ylim(0.0, max(1.05, float(finite.max()) * 1.05 if finite.size else 1.05))
    if mu.size > 1:
        ax.set_xlim(mu[0], mu[-1])
    ax.set_xlabel(r"signal strength $\mu$")
    ax.set_ylabel(r"CL$_s$")
    ax.set_title(title)
    return fig


def limits_of(results: Mapping[float, HypotestResult], level: float = 0.05) -> UpperLimits:
    """Upper limits of one patch, as ``results.limits`` computes them but keeping each status."""
    mu = np.array(sorted(results), dtype=float)
    obs = np.array([results[m].CLs_obs for m in mu])
    exp = np.array([results[m].CLs_exp for m in mu], dtype=float).reshape(mu.size, 5)
    return upper_limit(mu, obs, exp, level)


def _contour_value(limit: Limit, mu: np.ndarray) -> float:
    """μ_up for the contour, or NaN; the scan edge where it decides the side of 1 (module doc)."""
    if limit.status == "ok":
        return limit.value
    if limit.status == "below_scan" and mu[limit.hi] <= 1.0:
        return float(mu[limit.hi])
    if limit.status == "above_scan" and mu[limit.lo] >= 1.0:
        return float(mu[limit.lo])
    return float("nan")


def _scaled(v: np.ndarray) -> np.ndarray:
    return (v - v.min()) / (np.ptp(v) or 1.0)


def _triangulation(x: np.ndarray, y: np.ndarray) -> Triangulation | None:
    """Delaunay triangles of the points in coordinates scaled to [0, 1]; None if degenerate."""
    if x.size < 3:
        return None
    scaled = np.column_stack([_scaled(x), _scaled(y)])
    if np.linalg.matrix_rank(scaled - scaled.mean(axis=0), tol=1e-9) < 2:
        return None  # collinear: there is no area to draw a contour in
    try:
        triangles = Delaunay(scaled).simplices
    except QhullError:
        return None
    return Triangulation(x, y, triangles)


def contour_figure(
    points: Mapping[str, tuple[float, float]],
    limits: Mapping[str, UpperLimits],
    mus: Mapping[str, Sequence[float]],
    axis_labels: tuple[str, str],
    level: float = 0.05,
) -> tuple[Figure | None, list[str]]:
    """Observed and expected exclusion contours (μ_up = 1) over the signal grid, and notes.

    ``points``: patch -> (label1, label2); ``limits``: patch -> its upper limits; ``mus``: patch ->
    its μ grid (to read limits outside the scan, see the module doc). A contour that cannot be
    drawn (fewer than 3 non-collinear points with a usable limit) is left out with a note; with
    none drawable the figure is None.
    """
    names = [p for p in points if p in limits]
    x = np.array([points[p][0] for p in names], dtype=float)
    y = np.array([points[p][1] for p in names], dtype=float)
    grids = {p: np.sort(np.asarray(mus[p], dtype=float)) for p in names}

    def log_limits(k: int | None) -> np.ndarray:
        """log10 μ_up per point, NaN where unusable; ``k``: expected index, None: observed."""
        values = [_contour_value(limits[p].obs if k is None else limits[p].exp[k], grids[p])
                  for p in names]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log10(np.array(values, dtype=float))

    obs, minus, median, plus = (log_limits(k) for k in (None, 1, 2, 3))
    # The ±1σ band is where the -1σ limit excludes and the +1σ one does not; it is filled
    # where max(log μ_-1σ, -log μ_+1σ) < 0, that field's points needing both limits.
    band = np.maximum(minus, -plus)

    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = fig.add_subplot()
    notes: list[str] = []
    drawn = 0
    for name, values in (("expected ±1σ band", band), ("expected", median), ("observed", obs)):
        use = np.isfinite(values)
        left_out = [p for p, u in zip(names, use, strict=True) if not u]
        if left_out:
            notes.append(f"{name} contour: no usable limit (the μ scan does not bracket it on "
                         f"the side that decides) for {', '.join(left_out)}: left out")
        tri = _triangulation(x[use], y[use])
        drawn += tri is not None
        if tri is None:
            notes.append(f"{name} contour: needs at least 3 grid points, not all on one line, "
                         f"with a usable limit ({int(use.sum())} usable): not drawn")
        elif name == "expected ±1σ band":
            # The max of two piecewise-linear fields is not piecewise linear on the grid's
            # triangles: take it on a finer mesh of the two interpolations instead.
            refiner = UniformTriRefiner(tri)
            fine, low = refiner.refine_field(
                minus[use], LinearTriInterpolator(tri, minus[use]), subdiv=_SUBDIV)
            _, high = refiner.refine_field(
                plus[use], LinearTriInterpolator(tri, plus[use]), subdiv=_SUBDIV)
            inside = np.maximum(low, -high)
            # a finite lower level: -inf makes matplotlib compute inf - inf
            ax.tricontourf(fine, inside, levels=[min(inside.min(), 0.0) - 1.0, 0.0],
                           colors=[_YELLOW])
        else:
            style = {"colors": "k", "linestyles": "--", "linewidths": 1.8} \
                if name == "expected" else {"colors": "tab:red", "linewidths": 2.2}
            ax.tricontour(tri, values[use], levels=[0.0], **style)
            if values[use].max() < 0.0 or values[use].min() >= 0.0:
                side = "excluded" if values[use].max() < 0.0 else "not excluded"
                notes.append(f"{name} contour: every usable grid point is {side}: no line")
    if not drawn:
        return None, notes
    excluded = np.isfinite(obs) & (obs < 0.0)
    ax.scatter(x[excluded], y[excluded], marker="o", color="k", s=18, zorder=3)
    ax.scatter(x[~excluded], y[~excluded], marker="o", facecolors="none", edgecolors="k", s=18,
               zorder=3)
    handles = [
        Line2D([], [], color="tab:red", lw=2.2, label=f"observed limit ({1 - level:.0%} CL)"),
        Line2D([], [], color="k", ls="--", lw=1.8, label="expected limit"),
        Patch(color=_YELLOW, label=r"expected $\pm 1\sigma$"),
        Line2D([], [], ls="none", marker="o", color="k", ms=5, label="observed excluded"),
        Line2D([], [], ls="none", marker="o", mfc="none", mec="k", ms=5,
               label="not excluded / no limit"),
    ]
    ax.legend(handles=handles, loc="best", fontsize="small")
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.set_title(rf"Exclusion at {1 - level:.0%} CL (CL$_s$ = {level:g}): $\mu_{{up}}$ = 1")
    # contour sets take the axis limits to the data's edges; pad so edge points show whole
    for v, set_lim in ((x, ax.set_xlim), (y, ax.set_ylim)):
        if v.size:
            pad = 0.06 * (np.ptp(v) or abs(v[0]) or 1.0)
            set_lim(v.min() - pad, v.max() + pad)
    return fig, notes


def _save(fig: Figure, path: Path, report: PlotReport) -> None:
    fig.savefig(path, dpi=_DPI)
    report.files.append(path)


def write_plots(
    store: str | os.PathLike[str],
    output: str | os.PathLike[str],
    patches: Iterable[str] | None = None,
    level: float = 0.05,
) -> PlotReport:
    """Every plot of ``store`` (or of ``patches``) as PNG files under ``output``."""
    if not 0.0 < level < 1.0:
        raise InputError(f"level must be between 0 and 1, got {level}")
    st = Store.open(store)
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise InputError(f"the output {out} exists and is not a folder")
    results = hypotests(st, patches)  # checks the patches exist before anything is written
    out.mkdir(parents=True, exist_ok=True)
    test_stat = st.identity["test_stat"]
    report = PlotReport()
    limits: dict[str, UpperLimits] = {}
    for patch, rows in results.items():
        grid = list(st.mus(patch))
        q_obs, obs_ok = st.observed(patch)
        sb, b = st.toys(patch, "sb"), st.toys(patch, "b")
        for mu, r in rows.items():
            i = grid.index(mu)
            fig = teststat_figure(q_obs[i], sb.q[i], b.q[i], sb.converged[i], b.converged[i], r,
                                  test_stat, f"{patch}, μ = {mu:g}", bool(obs_ok[i]))
            _save(fig, out / f"teststat_{patch}_mu{float(mu)}.png", report)
        if not rows:
            report.notes.append(f"{patch}: no μ tested yet: no plots")
            continue
        limits[patch] = limits_of(rows, level)
        _save(cls_figure(rows, limits[patch], level, title=patch), out / f"cls_{patch}.png",
              report)

    labels = {p: st.patch_attrs(p).get("labels", {}) for p in limits}
    names = {tuple(v) for v in labels.values()}
    if len(names) != 1 or len(next(iter(names))) != 2:
        has = "; ".join(", ".join(n) or "no labels" for n in sorted(names)) or "no patches"
        report.notes.append(f"contour: needs every patch to carry the same two labels (has: "
                            f"{has}): not drawn")
        return report
    axis_labels = next(iter(names))
    try:
        points = {p: (float(v[axis_labels[0]]), float(v[axis_labels[1]]))
                  for p, v in labels.items()}
    except (TypeError, ValueError):
        report.notes.append("contour: patch labels are not all numbers: not drawn")
        return report
    fig, notes = contour_figure(points, limits, {p: list(results[p]) for p in limits},
                                axis_labels, level)
    report.notes += notes
    if fig is not None:
        _save(fig, out / "contour.png", report)
    return report
