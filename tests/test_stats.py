"""toyfarm.stats vs pyhf 0.7.6 (ToyCalculator, linear_grid_scan), a loop reference, properties."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pyhf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyhf.infer.calculators import EmpiricalDistribution, ToyCalculator
from pyhf.infer.intervals import upper_limits as pyhf_upper_limits

from toyfarm.stats import (
    NORMAL_PERCENTILES,
    HypotestResult,
    expected_band,
    hypotest,
    needs_more_toys,
    upper_limit,
)

SETTINGS = settings(max_examples=60, deadline=None)


# --------------------------------------------------------------------------------------- helpers
@pytest.fixture
def pyhf_numpy(monkeypatch):
    """pyhf's numpy backend, with its percentile fixed for numpy >= 2.4.

    pyhf 0.7.6 calls ``np.percentile(..., interpolation=...)``, a keyword numpy 2.4 removed
    (``method`` replaces it, same meaning), so ``expected_pvalues`` raises TypeError unpatched.
    """
    pyhf.set_backend("numpy")
    backend = type(pyhf.tensorlib)

    def percentile(self, tensor_in, q, axis=None, interpolation="linear"):
        return np.percentile(tensor_in, q, axis=axis, method=interpolation)

    monkeypatch.setattr(backend, "percentile", percentile)
    return pyhf.tensorlib


def pyhf_toys(q_obs, q_sb, q_b):
    """(CLsb, CLb, CLs, CLs band) from pyhf's own ToyCalculator methods (they use no state)."""
    calc = ToyCalculator.__new__(ToyCalculator)
    sb, b = EmpiricalDistribution(np.asarray(q_sb)), EmpiricalDistribution(np.asarray(q_b))
    with np.errstate(divide="ignore", invalid="ignore"):  # pyhf divides by CLb = 0 as is
        clsb, clb, cls = calc.pvalues(q_obs, sb, b)
        band = calc.expected_pvalues(sb, b)[2]
    return float(clsb), float(clb), float(cls), np.array([float(v) for v in band])


def band_reference(q_sb, q_b):
    """O(N^2) loop: each b toy's CLs against both samples, then numpy percentile (as pyhf)."""
    cls = []
    for x in q_b:
        clsb = sum(1 for s in q_sb if s >= x) / len(q_sb)
        clb = sum(1 for b in q_b if b >= x) / len(q_b)
        cls.append(clsb / clb)
    return np.percentile(np.array(cls), NORMAL_PERCENTILES)


def no_warnings(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


# Samples with many ties: integer-valued, or q̃μ-like with a lump of exact zeros.
tied_values = st.one_of(
    st.integers(0, 6).map(float),
    st.sampled_from([0.0, 0.0, 0.0, 0.5, 1.5]),
    st.floats(0, 20, allow_nan=False),
)
samples = st.lists(tied_values, min_size=1, max_size=40).map(np.array)


def random_case(rng, kind, n_sb, n_b):
    if kind == "continuous":
        return rng.chisquare(1, n_sb), rng.chisquare(1, n_b) + rng.exponential(2, n_b)
    if kind == "integer":
        return rng.integers(0, 8, n_sb).astype(float), rng.integers(0, 12, n_b).astype(float)
    # qtilde-like: half the toys exactly 0
    sb = np.where(rng.random(n_sb) < 0.5, 0.0, rng.chisquare(1, n_sb))
    b = np.where(rng.random(n_b) < 0.2, 0.0, rng.chisquare(1, n_b) + 2.0)
    return sb, b


# ------------------------------------------------------------------------------ against pyhf
@pytest.mark.parametrize("kind", ["continuous", "integer", "zeros"])
@pytest.mark.parametrize("seed", range(4))
def test_matches_pyhf_toycalculator(pyhf_numpy, kind, seed):
    rng = np.random.default_rng(seed)
    q_sb, q_b = random_case(rng, kind, 150 + 17 * seed, 120 + 23 * seed)
    # observed values on toys (ties), at zero, in between, and beyond every toy (CLb = 0)
    q_obs_values = [*rng.choice(q_sb, 3), *rng.choice(q_b, 3), 0.0, 1.7, 1e9]
    for q_obs in q_obs_values:
        clsb, clb, cls, band = pyhf_toys(q_obs, q_sb, q_b)
        r = no_warnings(hypotest, q_obs, q_sb, q_b)
        np.testing.assert_allclose(
            [r.CLsb_obs, r.CLb_obs, r.CLs_obs], [clsb, clb, cls], rtol=1e-12, atol=0
        )
        np.testing.assert_allclose(r.CLs_exp, band, rtol=1e-12, atol=1e-15)
        assert (r.ntoys_sb, r.ntoys_b) == (q_sb.size, q_b.size)


# the fixture's patch holds no per-example state, so sharing it across examples is fine
@settings(SETTINGS, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(q_sb=samples, q_b=samples, q_obs=tied_values)
def test_matches_pyhf_property(pyhf_numpy, q_sb, q_b, q_obs):
    clsb, clb, cls, band = pyhf_toys(q_obs, q_sb, q_b)
    r = no_warnings(hypotest, q_obs, q_sb, q_b)
    np.testing.assert_allclose([r.CLsb_obs, r.CLb_obs, r.CLs_obs], [clsb, clb, cls], rtol=1e-12)
    np.testing.assert_allclose(r.CLs_exp, band, rtol=1e-12, atol=1e-15)


def test_cls_when_no_b_toy_reaches_q_obs():
    # CLb = 0: 0/0 -> NaN, x/0 -> inf (what numpy gives pyhf), without warnings; error NaN
    r = no_warnings(hypotest, 10.0, [1.0, 2.0], [0.0, 1.0])
    assert (r.CLsb_obs, r.CLb_obs) == (0.0, 0.0)
    assert math.isnan(r.CLs_obs) and math.isnan(r.CLs_obs_error)
    r = no_warnings(hypotest, 10.0, [11.0, 2.0], [0.0, 1.0])
    assert r.CLs_obs == math.inf and math.isnan(r.CLs_obs_error)


# --------------------------------------------------------------------------- band kernel
@SETTINGS
@given(q_sb=samples, q_b=samples)
def test_fast_band_equals_loop_reference(q_sb, q_b):
    np.testing.assert_allclose(expected_band(q_sb, q_b), band_reference(q_sb, q_b), rtol=1e-12)


def test_band_order_and_empty_side():
    rng = np.random.default_rng(1)
    band = expected_band(rng.chisquare(1, 500), rng.chisquare(1, 500) + 1)
    assert list(band) == sorted(band)  # -2σ is the smallest CLs
    assert all(math.isnan(v) for v in expected_band([np.nan], [1.0]))


# ------------------------------------------------------------------------------ properties
@SETTINGS
@given(q_sb=samples, q_b=samples, a=tied_values, b=tied_values)
def test_pvalues_monotone_in_q_obs(q_sb, q_b, a, b):
    lo, hi = hypotest(min(a, b), q_sb, q_b), hypotest(max(a, b), q_sb, q_b)
    assert lo.CLsb_obs >= hi.CLsb_obs and lo.CLb_obs >= hi.CLb_obs


@SETTINGS
@given(q_sb=samples, q_b=samples, q_obs=tied_values, data=st.data())
def test_nan_toys_ignored(q_sb, q_b, q_obs, data):
    def with_nans(q):
        n_nan = data.draw(st.integers(0, 5))
        out = np.concatenate([q, np.full(n_nan, np.nan)])
        perm = data.draw(st.permutations(range(out.size)))
        # not generated toys are ignored whatever their converged flag says
        conv = data.draw(st.lists(st.booleans(), min_size=out.size, max_size=out.size))
        conv = np.where(np.isnan(out), conv, True)
        return out[list(perm)], conv[list(perm)]

    sb, conv_sb = with_nans(q_sb)
    b, conv_b = with_nans(q_b)
    got, ref = hypotest(q_obs, sb, b, conv_sb, conv_b), hypotest(q_obs, q_sb, q_b)
    np.testing.assert_equal(got.as_dict(), ref.as_dict())


@SETTINGS
@given(q_sb=samples, q_b=samples, q_obs=tied_values, data=st.data())
def test_not_converged_left_out_and_counted(q_sb, q_b, q_obs, data):
    conv_sb = np.array(data.draw(st.lists(st.booleans(), min_size=q_sb.size, max_size=q_sb.size)))
    conv_b = np.array(data.draw(st.lists(st.booleans(), min_size=q_b.size, max_size=q_b.size)))
    r = hypotest(q_obs, q_sb, q_b, conv_sb, conv_b)
    ref = hypotest(q_obs, q_sb[conv_sb], q_b[conv_b])
    assert (r.not_converged_sb, r.not_converged_b) == ((~conv_sb).sum(), (~conv_b).sum())
    assert (r.ntoys_sb, r.ntoys_b) == (conv_sb.sum(), conv_b.sum())
    fields = [f for f in HypotestResult.__dataclass_fields__ if not f.startswith("not_conv")]
    np.testing.assert_equal([getattr(r, f) for f in fields], [getattr(ref, f) for f in fields])


@SETTINGS
@given(sb1=samples, sb2=samples, b1=samples, b2=samples, q_obs=tied_values, seed=st.integers(0, 9))
def test_pooling_equals_concatenation(sb1, sb2, b1, b2, q_obs, seed):
    r1, r2 = hypotest(q_obs, sb1, b1), hypotest(q_obs, sb2, b2)
    pooled = hypotest(q_obs, np.concatenate([sb1, sb2]), np.concatenate([b1, b2]))
    assert pooled.ntoys_sb == r1.ntoys_sb + r2.ntoys_sb
    k_sb = round(r1.CLsb_obs * r1.ntoys_sb) + round(r2.CLsb_obs * r2.ntoys_sb)
    k_b = round(r1.CLb_obs * r1.ntoys_b) + round(r2.CLb_obs * r2.ntoys_b)
    assert pooled.CLsb_obs == k_sb / pooled.ntoys_sb and pooled.CLb_obs == k_b / pooled.ntoys_b
    # order of the pooled toys (which store or batch came first) does not matter
    rng = np.random.default_rng(seed)
    sb, b = np.concatenate([sb2, sb1]), np.concatenate([b2, b1])
    shuffled = hypotest(q_obs, rng.permutation(sb), rng.permutation(b))
    np.testing.assert_equal(shuffled.as_dict(), pooled.as_dict())


# ---------------------------------------------------------------------------------- errors
def test_error_is_roots_binomial_propagation():
    q_sb, q_b = np.arange(100.0), np.arange(-90.0, 110.0)  # 40/100 and 50/200 reach q_obs = 60
    r = hypotest(60.0, q_sb, q_b)
    clsb, clb = 0.4, 0.25
    e_sb, e_b = math.sqrt(clsb * (1 - clsb) / 100), math.sqrt(clb * (1 - clb) / 200)
    cls = clsb / clb
    assert r.CLs_obs == pytest.approx(cls, rel=1e-15)
    assert (r.CLsb_obs_error, r.CLb_obs_error) == pytest.approx((e_sb, e_b), rel=1e-14)
    assert r.CLs_obs_error == pytest.approx(cls * math.hypot(e_sb / clsb, e_b / clb), rel=1e-14)


def test_error_floor_at_zero_and_all_toys():
    # CLsb = 0: binomial error would be 0; one-toy floor gives 1/N_sb, so err(CLs) = 1/(N_sb CLb)
    r = hypotest(60.0, np.arange(50.0), np.arange(200.0))
    assert r.CLs_obs == 0.0 and r.CLsb_obs_error == pytest.approx(1 / 50)
    assert r.CLs_obs_error == pytest.approx(1 / (50 * 0.7))
    r = hypotest(0.0, np.zeros(40), np.arange(80.0))  # q_obs = 0: CLsb = CLb = 1
    assert r.CLs_obs == 1.0
    assert r.CLs_obs_error == pytest.approx(math.hypot(1 / 40, 1 / 80))


def test_nan_q_obs_and_empty_sides():
    r = no_warnings(hypotest, np.nan, [1.0], [2.0])
    assert all(math.isnan(v) for v in (r.CLs_obs, r.CLsb_obs, r.CLb_obs, r.CLs_obs_error))
    assert not math.isnan(r.CLs_exp[2])
    r = no_warnings(hypotest, 1.0, [np.nan, np.nan], [2.0], [False, True], [True])
    assert r.ntoys_sb == 0 and r.not_converged_sb == 0 and math.isnan(r.CLs_obs)
    assert r.CLb_obs == 1.0
    with pytest.raises(ValueError, match="converged mask of q_b"):
        hypotest(1.0, [1.0], [1.0, 2.0], None, [True])


# ---------------------------------------------------------------------------- upper limits
def synthetic_curves(mu):
    """Monotone decreasing CLs curves: observed and five expected (-2σ lowest CLs)."""
    obs = np.exp(-1.7 * mu)
    exp = np.stack([np.exp(-(2.6 - 0.4 * k) * mu) for k in range(5)], axis=1)
    return obs, exp


def test_upper_limit_matches_pyhf_linear_grid_scan(pyhf_numpy, monkeypatch):
    mu = np.linspace(0.1, 5.0, 23)
    obs, exp = synthetic_curves(mu)
    table = {float(m): (obs[i], exp[i]) for i, m in enumerate(mu)}

    def fake_hypotest(poi, data, model, return_expected_set=False, **kwargs):
        o, e = table[float(poi)]
        return np.asarray(o), [np.asarray(v) for v in e]

    monkeypatch.setattr(pyhf_upper_limits, "hypotest", fake_hypotest)
    for level in (0.05, 0.1, 0.32):
        ref_obs, ref_exp = pyhf_upper_limits.linear_grid_scan(None, None, mu, level=level)
        res = upper_limit(mu, obs, exp, level=level)
        assert res.obs.value == pytest.approx(float(ref_obs), rel=1e-12)
        assert [e.value for e in res.exp] == pytest.approx([float(v) for v in ref_exp], rel=1e-12)
        assert all(lim.status == "ok" for lim in (res.obs, *res.exp))
        assert [e.value for e in res.exp] == sorted(e.value for e in res.exp)


@SETTINGS
@given(
    cls=st.lists(st.floats(0, 1), min_size=1, max_size=12),
    level=st.sampled_from([0.05, 0.1, 0.5]),
    monotone=st.booleans(),
)
def test_limit_brackets_or_reports(cls, level, monotone):
    cls = np.array(sorted(cls, reverse=True) if monotone else cls)
    mu = np.arange(cls.size) * 0.5 + 0.25
    lim = upper_limit(mu, cls, np.tile(cls[:, None], 5), level=level).obs
    if lim.status == "ok":
        assert cls[lim.lo] >= level and mu[lim.lo] <= lim.value <= mu[lim.hi]
        assert lim.hi == lim.lo + 1 and cls[lim.hi] < level or lim.hi == lim.lo
        assert (cls[lim.hi + 1 :] < level).all()  # nothing above the limit is allowed
        assert lim.crossings >= 1 or lim.hi == lim.lo
        if monotone:
            assert lim.crossings <= 1
    elif lim.status == "above_scan":
        assert math.isnan(lim.value) and lim.lo == cls.size - 1 and cls[-1] > level
    else:
        assert lim.status == "below_scan" and math.isnan(lim.value)
        assert lim.hi == 0 and (cls < level).all()


def test_limit_edge_cases():
    mu = np.array([0.0, 1.0, 2.0, 3.0])
    lim = upper_limit(mu, [0.5, 0.02, np.nan, 0.01], np.zeros((4, 5))).obs
    assert lim.value == pytest.approx(1 - 0.03 / 0.48) and (lim.lo, lim.hi) == (0, 1)
    # NaN and inf points are skipped; the bracket spans them and indexes the original grid
    lim = upper_limit(mu, [0.5, np.nan, np.inf, 0.01], np.zeros((4, 5))).obs
    assert (lim.lo, lim.hi) == (0, 3) and "skipped" in lim.message
    # non-monotone: the last downward crossing is used and reported
    lim = upper_limit(mu, [0.5, 0.01, 0.2, 0.01], np.zeros((4, 5))).obs
    assert (lim.lo, lim.hi, lim.crossings) == (2, 3, 2) and "2 times" in lim.message
    # exactly at level on the last point is a limit, not an extrapolation
    lim = upper_limit(mu, [0.5, 0.2, 0.1, 0.05], np.zeros((4, 5))).obs
    assert (lim.value, lim.status, lim.lo, lim.hi) == (3.0, "ok", 3, 3)
    res = upper_limit(mu, [np.nan] * 4, np.full((4, 5), 0.5))
    assert res.obs.status == "no_data" and all(e.status == "above_scan" for e in res.exp)
    assert all(math.isnan(e.value) for e in res.exp)
    with pytest.raises(ValueError, match="strictly increasing"):
        upper_limit([1.0, 1.0], [0.1, 0.01], np.zeros((2, 5)))
    with pytest.raises(ValueError, match="shape"):
        upper_limit([1.0, 2.0], [0.1, 0.01], np.zeros((2, 4)))


# ----------------------------------------------------------------------------- adaptive toys
def fake_result(cls, err, n=1000, q_obs=1.0):
    nan = math.nan
    return HypotestResult(q_obs, cls, nan, nan, err, nan, nan, (nan,) * 5, n, n, 0, 0)


@pytest.mark.parametrize(
    ("cls", "err", "n", "more"),
    [
        (0.06, 0.004, 1000, False),  # error reached the target
        (0.06, 0.006, 1000, True),  # near level, error above target
        (0.20, 0.04, 1000, False),  # 3.75σ above level: clearly not excluded
        (0.001, 0.0005, 1000, False),  # clearly excluded
        (0.06, 0.001, 50, True),  # too few toys for the error to mean anything
        (math.nan, math.nan, 1000, True),  # CLb = 0: only more b toys can define CLs
        (math.inf, math.nan, 1000, True),
    ],
)
def test_needs_more_toys(cls, err, n, more):
    assert needs_more_toys(fake_result(cls, err, n), target_error=0.005) is more


def test_needs_more_toys_on_real_counts_and_nan_q_obs():
    rng = np.random.default_rng(3)
    q_sb, q_b = rng.chisquare(1, 5000), rng.chisquare(1, 5000) + 8.0
    r = hypotest(12.0, q_sb, q_b)
    assert r.CLs_obs < 0.05 - 3 * r.CLs_obs_error and r.CLs_obs_error > 0.005  # excluded
    assert not needs_more_toys(r, target_error=0.005)
    # 10 toys, none of the s+b reaches q_obs: CLs = 0 but the one-toy error floor keeps going
    r = hypotest(12.0, np.zeros(10), np.full(10, 20.0))
    assert r.CLs_obs == 0.0 and r.CLs_obs_error == pytest.approx(0.1)
    assert needs_more_toys(r, 0.005, min_toys=1)
    with pytest.raises(ValueError, match="NaN"):
        needs_more_toys(hypotest(np.nan, q_sb, q_b), target_error=0.005)


# ------------------------------------------------- reliability: p-value and quantile properties
# (the reliability issue's block: general properties of any input, beyond agreement with pyhf)
@SETTINGS
@given(q_sb=samples, q_b=samples, q_obs=tied_values, seed=st.integers(0, 9))
def test_pvalues_are_fractions_and_cls_their_ratio(q_sb, q_b, q_obs, seed):
    r = hypotest(q_obs, q_sb, q_b)
    assert 0 <= r.CLsb_obs <= 1 and 0 <= r.CLb_obs <= 1
    assert r.CLsb_obs == np.count_nonzero(q_sb >= q_obs) / q_sb.size
    assert r.CLsb_obs_error >= 0 and r.CLb_obs_error >= 0
    if r.CLb_obs > 0:
        assert r.CLs_obs == r.CLsb_obs / r.CLb_obs and r.CLs_obs_error >= 0
    # the order the toys are stored in never matters
    rng = np.random.default_rng(seed)
    np.testing.assert_equal(hypotest(q_obs, rng.permutation(q_sb), rng.permutation(q_b)).as_dict(),
                            r.as_dict())


@SETTINGS
@given(q_sb=samples, q_b=samples)
def test_band_is_ordered_quantiles_of_the_per_toy_cls(q_sb, q_b):
    band = np.array(expected_band(q_sb, q_b))
    assert np.all(np.diff(band) >= 0)  # -2σ <= -1σ <= median <= +1σ <= +2σ
    per_toy = [hypotest(x, q_sb, q_b).CLs_obs for x in q_b]  # each b toy taken as observed
    assert min(per_toy) <= band[0] and band[-1] <= max(per_toy)
    assert np.array_equal(band, expected_band(q_sb[::-1], q_b[::-1]))
