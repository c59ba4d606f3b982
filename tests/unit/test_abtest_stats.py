"""onerec.abtest.stats against scipy, hand-computed cases and simulated A/A and A/B experiments."""
from __future__ import annotations

import itertools
import json
import math
import warnings
from dataclasses import replace
from statistics import NormalDist, fmean, variance

import numpy as np
import pytest
from scipy import integrate, stats

from onerec.abtest.stats import (cuped_lift, cuped_ratio_lift, decide, mean_lift, min_users_for, msprt_p_value, ratio_lift,
                                 sequential_srm, srm_test)

# Simulated experiments per check: the Monte-Carlo se of a 0.95 coverage (or a 0.05 false-positive
# rate) is sqrt(0.95 * 0.05 / 2000) = 0.0049, so the bounds [0.93, 0.97] and [0.03, 0.07] are +-4 se.
SIMS = 2000
USERS = 400             # per arm
Z95 = NormalDist().inv_cdf(0.975)


def test_mean_lift_is_welchs_t_test():
    rng = np.random.default_rng(0)
    c, t = rng.lognormal(0.0, 1.0, 300), rng.lognormal(0.2, 1.2, 250)
    ref = stats.ttest_ind(t, c, equal_var=False)
    for alpha in (0.05, 0.1):
        est = mean_lift(list(c), t, alpha)                  # lists are accepted too
        ci = ref.confidence_interval(1 - alpha)
        assert est.diff == pytest.approx(t.mean() - c.mean(), rel=1e-12)
        assert est.p_value == pytest.approx(ref.pvalue, rel=1e-9)
        assert (est.diff_low, est.diff_high) == (pytest.approx(ci.low, rel=1e-9), pytest.approx(ci.high, rel=1e-9))
        assert (est.n_control, est.n_treatment, est.alpha) == (300, 250, alpha)
        assert est.significant == (ref.pvalue < alpha)


def test_relative_lift_ci_by_hand():
    c, t = [1.0, 2.0, 3.0, 6.0], [2.0, 4.0, 5.0, 9.0]
    mc, mt = fmean(c), fmean(t)                                         # 3, 5
    se2_c, se2_t = variance(c) / 4, variance(t) / 4                     # 7/6, 13/6
    df = (se2_c + se2_t) ** 2 / (se2_c ** 2 / 3 + se2_t ** 2 / 3)       # Welch-Satterthwaite, 5.50
    crit = stats.t.ppf(0.975, df)
    rel = mt / mc - 1                                                   # 2/3
    est = mean_lift(c, t)
    assert est.rel == pytest.approx(rel, rel=1e-12)
    # Fieller: the ratios r with (mt - r mc)² = crit² (se2_t + r² se2_c), by the quadratic formula
    a, b, cc = mc ** 2 - crit ** 2 * se2_c, -2 * mt * mc, mt ** 2 - crit ** 2 * se2_t
    r_low, r_high = sorted(((-b - s * math.sqrt(b * b - 4 * a * cc)) / (2 * a)) for s in (1, -1))
    assert (est.rel_low, est.rel_high) == (pytest.approx(r_low - 1, rel=1e-12), pytest.approx(r_high - 1, rel=1e-12))
    for r in (r_low, r_high):                                           # the bounds solve the equation
        assert (mt - r * mc) ** 2 == pytest.approx(crit ** 2 * (se2_t + r * r * se2_c), rel=1e-9)


def test_relative_ci_agrees_with_the_difference_test():
    """Fieller's relative CI excludes 0 exactly when the difference's CI does (the delta method's
    symmetric interval does not: with a noisy small control mean it can straddle 0)."""
    rng = np.random.default_rng(3)
    for _ in range(200):
        c = rng.normal(rng.uniform(0.05, 2), rng.uniform(0.5, 3), 60)
        t = c[: rng.integers(30, 60)] + rng.normal(rng.uniform(-1, 1), 1, 1)
        est = mean_lift(c, t)
        if est.rel_low is None:
            continue
        assert (est.rel_low > 0 or est.rel_high < 0) == est.significant
    unbounded = mean_lift([-1.0, 1.0, -2.0, 2.5], [1.0, 2.0, 3.0, 4.0])  # control mean ~0 within its noise
    assert unbounded.rel is not None and unbounded.rel_low is unbounded.rel_high is None


def test_degenerate_means_and_json():
    zero = mean_lift([0.0, 0.0, 0.0], [0.0, 1.0, 2.0])                 # control metric 0: no relative lift
    assert zero.rel is zero.rel_low is zero.rel_high is None
    d = zero.as_dict()
    json.dumps(d, allow_nan=False)
    assert d["rel"] is None and type(d["n_control"]) is int and type(d["diff"]) is float
    assert d["significant"] is zero.significant
    const = mean_lift([1.0, 1.0], [2.0, 2.0])                           # se 0: a certain difference
    assert (const.diff_low, const.diff_high, const.p_value, const.significant) == (1.0, 1.0, 0.0, True)
    assert mean_lift([1.0, 1.0], [1.0, 1.0]).p_value == 1.0


def _delta_ratio(num: list[float], den: list[float]) -> tuple[float, float]:
    """R and Var(R) ≈ (Var(num) - 2R Cov(num, den) + R² Var(den)) / (n mean(den)²), in plain Python."""
    n, r = len(num), sum(num) / sum(den)
    mn, md = fmean(num), fmean(den)
    cov = sum((a - mn) * (b - md) for a, b in zip(num, den)) / (n - 1)
    return r, (variance(num) - 2 * r * cov + r * r * variance(den)) / (n * md * md)


def test_ratio_lift_by_hand():
    num_c, den_c = [1.0, 0.0, 3.0, 2.0, 0.0], [2.0, 1.0, 4.0, 3.0, 0.0]     # the last user had no exposure
    num_t, den_t = [2.0, 1.0, 4.0, 3.0], [2.0, 2.0, 5.0, 3.0]
    (rc, vc), (rt, vt) = _delta_ratio(num_c, den_c), _delta_ratio(num_t, den_t)
    se = math.sqrt(vc + vt)
    rel = rt / rc - 1
    a, b, cc = rc ** 2 - Z95 ** 2 * vc, -2 * rt * rc, rt ** 2 - Z95 ** 2 * vt         # Fieller's quadratic
    rel_low, rel_high = ((-b + s * math.sqrt(b * b - 4 * a * cc)) / (2 * a) - 1 for s in (-1, 1))
    est = ratio_lift(num_c, den_c, num_t, den_t)
    expected = {"metric_control": rc, "metric_treatment": rt, "diff": rt - rc, "se": se,
                "diff_low": rt - rc - Z95 * se, "diff_high": rt - rc + Z95 * se,
                "p_value": 2 * (1 - NormalDist().cdf(abs(rt - rc) / se)),
                "rel": rel, "rel_low": rel_low, "rel_high": rel_high}
    got = est.as_dict()
    assert {k: got[k] for k in expected} == {k: pytest.approx(v, rel=1e-9) for k, v in expected.items()}
    # the user without exposures counts: dropping them keeps the ratio but changes n and the se
    dropped = ratio_lift(num_c[:-1], den_c[:-1], num_t, den_t)
    assert (est.n_control, dropped.n_control) == (5, 4)
    assert dropped.metric_control == est.metric_control and dropped.se != pytest.approx(est.se)


def _exposures_and_clicks(rng: np.random.Generator, shape, rate_lift: float = 1.0):
    """Per user: exposures Poisson(3) (some users 0), clicks Binomial(exposures, p_user), p_user ~ Beta(2, 8)
    times rate_lift; the true clicks per exposure is E[p_user] = 0.2 rate_lift (exposures independent of p)."""
    exposures = rng.poisson(3.0, shape)
    return rng.binomial(exposures, rng.beta(2.0, 8.0, shape) * rate_lift).astype(float), exposures.astype(float)


def test_ratio_lift_se_matches_the_bootstrap():
    rng = np.random.default_rng(1)
    (nc, dc), (nt, dt) = _exposures_and_clicks(rng, USERS), _exposures_and_clicks(rng, USERS, 1.1)
    est = ratio_lift(nc, dc, nt, dt)
    boot = []                                                   # 2000 user resamples per arm: (2000,)
    for num, den in ((nc, dc), (nt, dt)):
        idx = rng.integers(0, USERS, (2000, USERS))
        boot.append(num[idx].sum(axis=1) / den[idx].sum(axis=1))
    assert est.se == pytest.approx(np.std(boot[1] - boot[0]), rel=0.05)


def test_ratio_lift_with_unit_denominators_is_the_normal_approximation_of_mean_lift():
    rng = np.random.default_rng(2)
    c, t = rng.lognormal(0.0, 1.0, 500), rng.lognormal(0.15, 1.0, 500)
    ratio, mean = ratio_lift(c, np.ones(500), t, np.ones(500)), mean_lift(c, t)
    assert (ratio.diff, ratio.se) == (pytest.approx(mean.diff, rel=1e-12), pytest.approx(mean.se, rel=1e-9))
    assert ratio.p_value == pytest.approx(2 * stats.norm.sf(abs(mean.diff) / mean.se), rel=1e-9)
    assert ratio.p_value == pytest.approx(mean.p_value, abs=2e-3)              # t with ~1000 df ≈ normal
    # the CIs differ only by the quantile, z_0.975 = 1.960 against t_0.975 = 1.962
    assert ratio.diff_high - ratio.diff_low == pytest.approx(mean.diff_high - mean.diff_low, rel=2e-3)


def test_cuped_variance_reduction():
    rng = np.random.default_rng(3)
    yc, yt = rng.normal(10.0, 2.0, 5000), rng.normal(10.2, 2.0, 5000)
    assert cuped_lift(yc, yc, yt, yt)[1] == pytest.approx(1.0)                 # x = y: all variance explained
    assert cuped_lift(yc, rng.normal(size=5000), yt, rng.normal(size=5000))[1] < 0.005   # independent x
    est, reduction = cuped_lift(yc, np.ones(5000), yt, np.ones(5000))           # constant x: theta 0
    assert reduction == 0.0 and est == mean_lift(yc, yt)

    # x, y standard bivariate normal with correlation rho; treatment adds 0.05 to y
    rho, n = 0.7, 5000
    x = rng.normal(size=(2, n))
    y = rho * x + math.sqrt(1 - rho ** 2) * rng.normal(size=(2, n)) + np.array([[0.0], [0.05]])
    est, reduction = cuped_lift(y[0], x[0], y[1], x[1])
    plain = mean_lift(y[0], y[1])
    assert reduction == pytest.approx(rho ** 2, abs=0.03)
    assert est.diff_high - est.diff_low < 0.8 * (plain.diff_high - plain.diff_low)   # ≈ sqrt(1 - rho²) = 0.71
    assert (est.metric_control, est.metric_treatment) == (pytest.approx(y[0].mean()), pytest.approx(y[1].mean()))


def test_cuped_ratio_lift_by_hand():
    num_c, den_c, x_c = [1.0, 0.0, 3.0, 2.0, 0.0], [2.0, 1.0, 4.0, 3.0, 0.0], [0.5, 0.1, 0.9, 0.6, 0.2]
    num_t, den_t, x_t = [2.0, 1.0, 4.0, 3.0], [2.0, 2.0, 5.0, 3.0], [0.4, 0.3, 0.8, 0.7]
    rc, rt = sum(num_c) / sum(den_c), sum(num_t) / sum(den_t)
    lin_c = [(a - rc * b) / fmean(den_c) for a, b in zip(num_c, den_c)]      # the delta method's linearization
    lin_t = [(a - rt * b) / fmean(den_t) for a, b in zip(num_t, den_t)]
    lin, x = lin_c + lin_t, x_c + x_t
    ml, mx = fmean(lin), fmean(x)
    theta = sum((a - ml) * (b - mx) for a, b in zip(lin, x)) / sum((b - mx) ** 2 for b in x)
    adj_c, adj_t = rc - theta * (fmean(x_c) - mx), rt - theta * (fmean(x_t) - mx)
    var_c = variance([a - theta * b for a, b in zip(lin_c, x_c)]) / 5
    var_t = variance([a - theta * b for a, b in zip(lin_t, x_t)]) / 4
    se = math.sqrt(var_c + var_t)
    est, reduction = cuped_ratio_lift(num_c, den_c, x_c, num_t, den_t, x_t)
    assert (est.metric_control, est.metric_treatment) == (pytest.approx(rc), pytest.approx(rt))   # real levels
    assert est.diff == pytest.approx(adj_t - adj_c, rel=1e-12) and est.se == pytest.approx(se, rel=1e-12)
    assert (est.diff_low, est.diff_high) == (pytest.approx(adj_t - adj_c - Z95 * se), pytest.approx(adj_t - adj_c + Z95 * se))
    raw = ratio_lift(num_c, den_c, num_t, den_t)
    assert reduction == pytest.approx(max(0.0, 1 - se ** 2 / raw.se ** 2), rel=1e-9)
    # a constant covariate explains nothing: the plain ratio test
    flat, none = cuped_ratio_lift(num_c, den_c, [1.0] * 5, num_t, den_t, [1.0] * 4)
    assert none == 0.0 and (flat.diff, flat.se) == (pytest.approx(raw.diff), pytest.approx(raw.se))


def test_cuped_ratio_lift_reduces_variance_when_users_carry_their_taste():
    rng = np.random.default_rng(5)
    taste = rng.normal(0.0, 1.0, (2, 2000))                               # per user: drives pre and post
    den = rng.poisson(5.0, (2, 2000)).astype(float) + 1
    num = den * (0.3 + taste + rng.normal(0, 0.5, (2, 2000)))
    pre = taste + rng.normal(0, 0.3, (2, 2000))
    est, reduction = cuped_ratio_lift(num[0], den[0], pre[0], num[1], den[1], pre[1])
    raw = ratio_lift(num[0], den[0], num[1], den[1])
    assert reduction > 0.5 and est.se < 0.7 * raw.se


# Simulated experiments: each returns SIMS estimates and the true diff of the metric. lift = 1 is an A/A test.

def _sim_mean(rng: np.random.Generator, lift: float):
    """Reward per user: 0 for 70% of users, else lognormal(log lift, 1); true mean 0.3 lift e^0.5."""
    def rewards(scale):
        return (rng.random((SIMS, USERS)) < 0.3) * rng.lognormal(math.log(scale), 1.0, (SIMS, USERS))
    c, t = rewards(1.0), rewards(lift)
    return [mean_lift(c[i], t[i]) for i in range(SIMS)], 0.3 * (lift - 1) * math.exp(0.5)


def _sim_ratio(rng: np.random.Generator, lift: float):
    (nc, dc), (nt, dt) = _exposures_and_clicks(rng, (SIMS, USERS)), _exposures_and_clicks(rng, (SIMS, USERS), lift)
    return [ratio_lift(nc[i], dc[i], nt[i], dt[i]) for i in range(SIMS)], 0.2 * (lift - 1)


def _sim_cuped(rng: np.random.Generator, lift: float):
    """User activity a ~ lognormal(0, 0.8); pre-period x ~ Poisson(4a), metric y ~ Poisson(4a lift)."""
    def users(scale):
        a = rng.lognormal(0.0, 0.8, (SIMS, USERS))
        return rng.poisson(4 * a * scale).astype(float), rng.poisson(4 * a).astype(float)
    (yc, xc), (yt, xt) = users(1.0), users(lift)
    return [cuped_lift(yc[i], xc[i], yt[i], xt[i])[0] for i in range(SIMS)], 4 * (lift - 1) * math.exp(0.32)


def _sim_cuped_ratio(rng: np.random.Generator, lift: float):
    """Clicks per exposure (as _sim_ratio) with each user's click rate before the experiment as x."""
    def users(scale):
        exposures = rng.poisson(3.0, (SIMS, USERS))
        p = rng.beta(2.0, 8.0, (SIMS, USERS))
        pre = rng.binomial(10, p) / 10                                      # the same user's rate, measured before
        return rng.binomial(exposures, p * scale).astype(float), exposures.astype(float), pre
    (nc, dc, xc), (nt, dt, xt) = users(1.0), users(lift)
    return [cuped_ratio_lift(nc[i], dc[i], xc[i], nt[i], dt[i], xt[i])[0] for i in range(SIMS)], 0.2 * (lift - 1)


@pytest.mark.parametrize("simulate", [_sim_mean, _sim_ratio, _sim_cuped, _sim_cuped_ratio],
                         ids=["mean", "ratio", "cuped", "cuped-ratio"])
@pytest.mark.parametrize("lift", [1.0, 1.1], ids=["A/A", "A/B"])
def test_ci_coverage_and_false_positives_by_simulation(simulate, lift):
    estimates, true_diff = simulate(np.random.default_rng(4), lift)
    coverage = np.mean([e.diff_low <= true_diff <= e.diff_high for e in estimates])
    assert 0.93 <= coverage <= 0.97
    if lift == 1.0:
        assert 0.03 <= np.mean([e.p_value < 0.05 for e in estimates]) <= 0.07


def test_srm_test_is_pearsons_chi_square():
    result = srm_test([10400, 9600], [0.5, 0.5])                       # 52/48 of 20,000 users
    ref = stats.chisquare([10400, 9600], [10000, 10000])
    assert (result["chi2"], result["p_value"]) == (pytest.approx(ref.statistic), pytest.approx(ref.pvalue))
    assert result["p_value"] < 0.001 and result["df"] == 1
    assert result["expected"] == [10000.0, 10000.0] and result["observed"] == [10400, 9600]
    json.dumps(result, allow_nan=False)
    three = srm_test(np.array([5020, 2490, 2490]), [2, 1, 1])          # weights are normalized
    assert three["p_value"] == pytest.approx(stats.chisquare([5020, 2490, 2490], [5000, 2500, 2500]).pvalue)
    assert srm_test([10030, 9970], [1, 1])["p_value"] > 0.5


def test_sequential_srm_bayes_factor_by_hand():
    # K = 3: the Dirichlet-multinomial probability of an ordered assignment sequence is the Polya urn's
    # product of (a_k + n_k) / (A + N); the multinomial's is the product of the weights
    weights, concentration = [0.5, 0.3, 0.2], 2.0
    a = [concentration * 3 * w for w in weights]                       # prior (3, 1.8, 1.2)
    sequence, looks_after = [0, 1, 0, 2, 0, 0, 1], (2, 4, 7)
    counts, mixture, null, path, bfs = [0, 0, 0], 1.0, 1.0, [], []
    for i, k in enumerate(sequence, 1):
        mixture *= (a[k] + counts[k]) / (sum(a) + sum(counts))
        null *= weights[k]
        counts[k] += 1
        if i in looks_after:
            path.append(list(counts))
            bfs.append(mixture / null)
    result = sequential_srm(path, weights, concentration)
    assert result["bayes_factor"] == pytest.approx(bfs[-1], rel=1e-9)
    assert result["max_bayes_factor"] == pytest.approx(max(bfs), rel=1e-9)
    assert result["p_value"] == pytest.approx(min(1.0, 1 / max(bfs)), rel=1e-9) and result["looks"] == 3

    # K = 2: the mixture integrated numerically over the Beta prior, one look given as a 1-D array
    n1, n2, w1 = 30, 12, 0.6
    marginal = integrate.quad(lambda p: p ** n1 * (1 - p) ** n2 * stats.beta.pdf(p, 2 * w1, 2 * (1 - w1)), 0, 1)[0]
    bf = marginal / (w1 ** n1 * (1 - w1) ** n2)
    result = sequential_srm([n1, n2], [w1, 1 - w1])
    assert result["bayes_factor"] == pytest.approx(bf, rel=1e-6) and result["p_value"] == pytest.approx(min(1, 1 / bf))


def test_sequential_srm_is_valid_under_daily_peeking_and_detects_a_mismatch():
    rng = np.random.default_rng(5)
    weights, days = np.array([2.0, 1.0, 1.0]), 28
    p = weights / weights.sum()
    paths = rng.multinomial(200, p, size=(SIMS, days)).cumsum(axis=1)          # (SIMS, days, 3) cumulative
    fpr = np.mean([sequential_srm(path, weights)["p_value"] < 0.05 for path in paths])
    assert fpr <= 0.065                                                        # 0.05 + 3 Monte-Carlo se
    # the same peeking with the fixed-horizon chi-square rejects far more often than 5%
    expected = paths.sum(axis=2, keepdims=True) * p
    naive_p = stats.chi2.sf(((paths - expected) ** 2 / expected).sum(axis=2), df=2)   # (SIMS, days)
    assert np.mean(naive_p.min(axis=1) < 0.05) > 0.1

    skewed = rng.multinomial(200, [0.55, 0.45], size=days).cumsum(axis=0)      # 55/45 against 50/50
    assert sequential_srm(skewed, [1, 1])["p_value"] < 0.001
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                         # no overflow warning
        gross = sequential_srm([[1_000_000, 0]], [1, 1])
    assert gross["p_value"] == 0.0 and gross["bayes_factor"] == math.inf


def test_msprt_p_value():
    se, tau = 0.5, 1.0
    ps = [msprt_p_value(d, se, tau) for d in np.linspace(0, 4, 41)]
    assert ps[0] == 1.0 and all(a >= b for a, b in itertools.pairwise(ps)) and ps[-1] < 1e-3
    assert msprt_p_value(-2.0, se, tau) == msprt_p_value(2.0, se, tau)
    lam = math.sqrt(se ** 2 / (se ** 2 + tau ** 2)) * math.exp(tau ** 2 * 2.0 ** 2 / (2 * se ** 2 * (se ** 2 + tau ** 2)))
    assert msprt_p_value(2.0, se, tau) == pytest.approx(1 / lam, rel=1e-12)


def test_msprt_running_minimum_is_valid_under_repeated_looks():
    # per-user outcomes N(0, 1) (sd known), a look every 100 users per arm, 30 looks
    rng = np.random.default_rng(6)
    n = 100 * np.arange(1, 31)                                                 # users per arm at each look
    se = np.sqrt(2 / n)

    def running_min_p(effect):
        sums = rng.normal(0.0, 10.0, (SIMS, 30, 2)).cumsum(axis=1)     # (SIMS, looks, arm): sums of 100-user batches
        diff = (sums[..., 1] - sums[..., 0]) / n + effect              # treatment gets +effect per user
        return np.array([min(msprt_p_value(d, s, 0.1) for d, s in zip(row, se)) for row in diff]), diff

    p_min, diff = running_min_p(0.0)
    assert np.mean(p_min < 0.05) <= 0.065
    assert np.mean((2 * stats.norm.sf(np.abs(diff) / se)).min(axis=1) < 0.05) > 0.1   # naive peeking inflates
    assert np.mean(running_min_p(0.15)[0] < 0.05) > 0.9                        # and a real effect is found


def _estimate(low: float, high: float):
    return replace(mean_lift([0.0, 1.0], [0.0, 1.0]), diff_low=low, diff_high=high)


def test_decide_branches():
    up, down, flat = _estimate(0.1, 0.3), _estimate(-0.3, -0.1), _estimate(-0.1, 0.1)
    assert decide(up, enough_data=False, healthy=False) == "stop"              # a broken experiment stops at once
    assert decide(up, enough_data=False, healthy=True) == "keep running"       # no verdict before enough data
    assert decide(up, enough_data=True, healthy=False) == "stop"               # SRM or a guardrail
    assert decide(down, enough_data=True, healthy=True) == "stop"
    assert decide(up, enough_data=True, healthy=True) == "ship"
    assert decide(flat, enough_data=True, healthy=True) == "keep running"
    assert decide(down, enough_data=True, healthy=True, higher_is_better=False) == "ship"
    assert decide(up, enough_data=True, healthy=True, higher_is_better=False) == "stop"


def test_min_users_for_by_hand_and_its_power():
    z = NormalDist().inv_cdf(0.975) + NormalDist().inv_cdf(0.8)              # 2.8016
    assert min_users_for(0.1, 1.0) == math.ceil(2 * z * z * 1.0 / 0.01) == 1570
    assert min_users_for(-0.02, 3.0) == math.ceil(2 * z * z * 9.0 / 0.0004)
    assert min_users_for(0.1, 1.0, alpha=0.01, power=0.9) > 1570

    # at that n a 10% lift of a metric with mean 1 and sd 1 is found with power ≈ 0.8 (MC se 0.009)
    rng, n = np.random.default_rng(7), 1570
    hits = [mean_lift(rng.normal(1.0, 1.0, n), rng.normal(1.1, 1.0, n)).p_value < 0.05 for _ in range(SIMS)]
    assert np.mean(hits) == pytest.approx(0.8, abs=0.03)


OK = [1.0, 2.0, 3.0]


@pytest.mark.parametrize("call, message", [
    (lambda: mean_lift([1.0], OK), "at least 2"),
    (lambda: mean_lift(OK, [1.0, np.nan, 2.0]), "non-finite"),
    (lambda: mean_lift([[1.0, 2.0], [3.0, 4.0]], OK), "1-D"),
    (lambda: mean_lift(OK, OK, alpha=0.0), "alpha"),
    (lambda: mean_lift(OK, OK, alpha=1.0), "alpha"),
    (lambda: mean_lift(OK, OK, alpha=math.nan), "alpha"),
    (lambda: ratio_lift(OK, [1.0, 2.0], OK, OK), "same users"),
    (lambda: ratio_lift(OK, OK, OK, [1.0, math.inf, 1.0]), "non-finite"),
    (lambda: ratio_lift(OK, [0.0, 0.0, 0.0], OK, OK), "sums to 0"),
    (lambda: ratio_lift(OK, OK, OK, OK, alpha=1.5), "alpha"),
    (lambda: cuped_lift(OK, [1.0, 2.0], OK, OK), "same users"),
    (lambda: cuped_lift(OK, OK, [1.0], [1.0]), "at least 2"),
    (lambda: srm_test([10, -1], [1, 1]), "negative"),
    (lambda: srm_test([10, 1.5], [1, 1]), "whole"),
    (lambda: srm_test([10, math.nan], [1, 1]), "non-finite"),
    (lambda: srm_test([10, 10], [1, 0]), "positive"),
    (lambda: srm_test([10, 10], [1, math.inf]), "positive"),
    (lambda: srm_test([10, 10], [1, 1, 1]), "one per variant"),
    (lambda: srm_test([10], [1]), "at least 2 variants"),
    (lambda: srm_test([[10, 10]], [1, 1]), "1-D"),
    (lambda: srm_test([0, 0], [1, 1]), "all 0"),
    (lambda: sequential_srm([[5, 5], [4, 6]], [1, 1]), "cumulative"),
    (lambda: sequential_srm([[5, -1]], [1, 1]), "negative"),
    (lambda: sequential_srm([[5, 5, 5]], [1, 1]), "one per variant"),
    (lambda: sequential_srm(np.ones((2, 2, 2)), [1, 1]), "looks, variants"),
    (lambda: sequential_srm([[5, 5]], [1, 1], concentration=0.0), "concentration"),
    (lambda: msprt_p_value(math.nan, 1.0, 1.0), "diff"),
    (lambda: msprt_p_value(1.0, 0.0, 1.0), "se and tau"),
    (lambda: msprt_p_value(1.0, 1.0, -1.0), "se and tau"),
    (lambda: min_users_for(0.0, 1.0), "mde_rel"),
    (lambda: min_users_for(0.1, 0.0), "cv"),
    (lambda: min_users_for(0.1, 1.0, power=1.0), "power"),
    (lambda: min_users_for(0.1, 1.0, alpha=0.0), "alpha"),
])
def test_invalid_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call()
