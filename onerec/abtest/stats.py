"""A/B test statistics with the user as the unit of analysis (users are randomized by user id).

Every function takes per-user arrays, one entry per user of a variant (lists or numpy arrays):

    est = mean_lift(reward_per_user_c, reward_per_user_t)          # mean per user: Welch
    est = ratio_lift(reward_c, exposures_c, reward_t, exposures_t)  # sum(num) / sum(den): delta method
    est, reduction = cuped_lift(y_c, y_pre_c, y_t, y_pre_t)         # variance reduced by a pre-period x
    est, reduction = cuped_ratio_lift(num_c, den_c, x_c, num_t, den_t, x_t)   # the same for a ratio
    est.diff, (est.diff_low, est.diff_high), est.rel, est.p_value, est.significant, est.as_dict()

    srm_test([n_c, n_t], weights=[0.5, 0.5])["p_value"]             # assignment healthy? (one look)
    sequential_srm(cumulative_counts_per_day, [0.5, 0.5])["p_value"]  # the same, valid under peeking
    p = min(p, msprt_p_value(est.diff, est.se, tau))                # always-valid p for a metric
    decide(est, enough_data=..., healthy=...)                       # "ship" | "stop" | "keep running"
    min_users_for(mde_rel=0.02, cv=3.0)                             # users per variant to plan for

The CIs and p-values of the lifts are fixed-horizon: valid at one planned look. For monitoring
while the experiment runs use `sequential_srm` and `msprt_p_value`, whose p-values stay valid
however often they are looked at.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
from numpy.typing import ArrayLike
from scipy import special, stats


@dataclass(frozen=True)
class Estimate:
    metric_control: float       # the metric in control (mean per user, or ratio of sums)
    metric_treatment: float
    diff: float                 # absolute lift = treatment - control, in the metric's unit
    diff_low: float             # (1 - alpha) CI of diff
    diff_high: float
    rel: float | None           # relative lift = treatment / control - 1 (None when control metric is 0)
    rel_low: float | None       # (1 - alpha) CI of rel by Fieller's theorem (None: unbounded)
    rel_high: float | None
    se: float                   # standard error of diff
    p_value: float              # two-sided, fixed horizon
    n_control: int              # users
    n_treatment: int
    alpha: float

    @property
    def significant(self) -> bool:
        return self.diff_low > 0 or self.diff_high < 0

    def as_dict(self) -> dict:
        """The fields and `significant` as plain Python values; NaN or inf become None (JSON-ready)."""
        def plain(v):
            if isinstance(v, (int, np.integer)):
                return int(v)
            return None if v is None or not math.isfinite(v) else float(v)
        return {**{k: plain(v) for k, v in asdict(self).items()}, "significant": self.significant}


def _alpha(alpha: float) -> float:
    if not 0 < alpha < 1:           # also rejects NaN
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return float(alpha)


def _users(name: str, values: ArrayLike) -> np.ndarray:
    """Per-user values as a float array (n,); at least 2 users, all finite."""
    a = np.asarray(values, dtype=float)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one value per user (1-D), got shape {a.shape}")
    if len(a) < 2:
        raise ValueError(f"{name} has {len(a)} user(s); a variance needs at least 2")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} has non-finite values (NaN or inf)")
    return a


def _paired(name_a: str, a: ArrayLike, name_b: str, b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Two per-user arrays of the same users (e.g. num and den), so of the same length."""
    a, b = _users(name_a, a), _users(name_b, b)
    if len(a) != len(b):
        raise ValueError(f"{name_a} has {len(a)} users but {name_b} has {len(b)}; they must be the same users")
    return a, b


def _estimate(mc: float, mt: float, var_c: float, var_t: float, n_c: int, n_t: int, alpha: float,
              df: float) -> Estimate:
    """The Estimate from each variant's metric and its sampling variance; quantiles of Student's
    t with df degrees of freedom (df = inf: the normal)."""
    mc, mt = float(mc), float(mt)
    diff, se = mt - mc, math.sqrt(var_c + var_t)
    crit = float(stats.t.ppf(1 - alpha / 2, df))
    # a zero se (constant metrics) makes any nonzero diff certain: p = 0, and the CI a point
    p = float(2 * stats.t.sf(abs(diff) / se, df)) if se > 0 else (0.0 if diff else 1.0)
    rel = mt / mc - 1 if mc != 0 else None
    rel_low, rel_high = fieller(mc, mt, var_c, var_t, crit)
    return Estimate(mc, mt, diff, diff - crit * se, diff + crit * se,
                    rel, rel_low, rel_high, se, p, int(n_c), int(n_t), alpha)


def fieller(mc: float, mt: float, var_c: float, var_t: float, crit: float) -> tuple[float | None, float | None]:
    """CI of the relative lift mt / mc - 1 (independent variants) by Fieller's theorem: the ratios r
    with (mt - r mc)² <= crit² (var_t + r² var_c). Unlike the delta method's symmetric interval it
    excludes 0 exactly when the CI of the difference does (r = 1 is the difference test), which
    matters when the control's mean is small against its noise. (None, None) when the set is
    unbounded: the control's mean is not significantly away from 0, so no finite relative CI exists."""
    a = mc * mc - crit * crit * var_c                 # (mt - r mc)² - crit² (var_t + r² var_c) = a r² + b r + c
    if a <= 0:
        return None, None
    b, c = -2 * mt * mc, mt * mt - crit * crit * var_t
    root = math.sqrt(max(0.0, b * b - 4 * a * c))     # >= 0 whenever a > 0 (round-off aside)
    low, high = (-b - root) / (2 * a), (-b + root) / (2 * a)
    return low - 1, high - 1


def mean_lift(y_control: ArrayLike, y_treatment: ArrayLike, alpha: float = 0.05) -> Estimate:
    """Lift of the mean per user: Welch's t-test (unequal variances, Welch-Satterthwaite df)."""
    alpha = _alpha(alpha)
    yc, yt = _users("y_control", y_control), _users("y_treatment", y_treatment)
    se2_c, se2_t = yc.var(ddof=1) / len(yc), yt.var(ddof=1) / len(yt)      # squared se of each mean
    if se2_c + se2_t > 0:
        df = (se2_c + se2_t) ** 2 / (se2_c ** 2 / (len(yc) - 1) + se2_t ** 2 / (len(yt) - 1))
    else:
        df = math.inf           # both constant: the df is 0/0, and unused as the se is 0
    return _estimate(yc.mean(), yt.mean(), se2_c, se2_t, len(yc), len(yt), alpha, df)


def _ratio(num: np.ndarray, den: np.ndarray, variant: str) -> tuple[float, float]:
    """R = Σnum / Σden over the users of a variant and its delta-method variance."""
    if den.sum() == 0:
        raise ValueError(f"den_{variant} sums to 0: the ratio is undefined")
    r = num.sum() / den.sum()
    # Var(num) - 2R Cov(num, den) + R² Var(den) is the variance of num - R den: computed so it is
    # never negative from round-off
    return float(r), float((num - r * den).var(ddof=1) / (len(num) * den.mean() ** 2))


def ratio_lift(num_control: ArrayLike, den_control: ArrayLike, num_treatment: ArrayLike,
               den_treatment: ArrayLike, alpha: float = 0.05) -> Estimate:
    """Lift of a ratio of sums (e.g. reward per exposure) with normal quantiles (large-sample).
    Users with den 0 count: they are users of the variant, adding to n and to both sums."""
    alpha = _alpha(alpha)
    nc, dc = _paired("num_control", num_control, "den_control", den_control)
    nt, dt = _paired("num_treatment", num_treatment, "den_treatment", den_treatment)
    (rc, var_c), (rt, var_t) = _ratio(nc, dc, "control"), _ratio(nt, dt, "treatment")
    return _estimate(rc, rt, var_c, var_t, len(nc), len(nt), alpha, math.inf)


def cuped_lift(y_control: ArrayLike, x_control: ArrayLike, y_treatment: ArrayLike, x_treatment: ArrayLike,
               alpha: float = 0.05) -> tuple[Estimate, float]:
    """CUPED (Deng et al. 2013): mean_lift of y - theta (x - mean x), x = each user's pre-experiment
    value of the metric, theta = Cov(y, x) / Var(x) over both variants pooled. The metric levels
    reported are the unadjusted means (the real levels); diff, rel, their CIs and p come from the
    adjusted values. Returns (estimate, variance reduction 1 - Var(y_adj) / Var(y), pooled, in [0, 1])."""
    yc, xc = _paired("y_control", y_control, "x_control", x_control)
    yt, xt = _paired("y_treatment", y_treatment, "x_treatment", x_treatment)
    y, x = np.concatenate([yc, yt]), np.concatenate([xc, xt])
    # ptp, not var > 0: a constant x (or y) can have a round-off variance of 1e-34 and a meaningless theta
    theta = float(np.cov(y, x)[0, 1] / x.var(ddof=1)) if np.ptp(x) > 0 and np.ptp(y) > 0 else 0.0
    x_mean = x.mean()
    est = mean_lift(yc - theta * (xc - x_mean), yt - theta * (xt - x_mean), alpha)
    reduction = 1 - (y - theta * (x - x_mean)).var() / y.var() if theta else 0.0
    return (replace(est, metric_control=float(yc.mean()), metric_treatment=float(yt.mean())),
            float(min(1.0, max(0.0, reduction))))


def cuped_ratio_lift(num_control: ArrayLike, den_control: ArrayLike, x_control: ArrayLike, num_treatment: ArrayLike,
                     den_treatment: ArrayLike, x_treatment: ArrayLike, alpha: float = 0.05) -> tuple[Estimate, float]:
    """CUPED for a ratio of sums (Deng et al. 2013, with the delta method's linearization): each
    user's influence on R = Σnum / Σden is l = (num - R den) / mean(den); theta = Cov(l, x) / Var(x)
    pooled over both variants; per variant R_adj = R - theta (mean x - pooled mean x) with variance
    Var(l - theta x) / n. Normal quantiles. The levels reported are the unadjusted ratios; returns
    (estimate, the variance reduction of the difference achieved, in [0, 1])."""
    alpha = _alpha(alpha)
    arms = []
    for variant, num, den, x in (("control", num_control, den_control, x_control),
                                 ("treatment", num_treatment, den_treatment, x_treatment)):
        n_, d_ = _paired(f"num_{variant}", num, f"den_{variant}", den)
        _, x_ = _paired(f"num_{variant}", n_, f"x_{variant}", x)
        r, var = _ratio(n_, d_, variant)
        arms.append((r, var, (n_ - r * d_) / d_.mean(), x_))
    lin, x = np.concatenate([a[2] for a in arms]), np.concatenate([a[3] for a in arms])
    theta = float(np.cov(lin, x)[0, 1] / x.var(ddof=1)) if np.ptp(x) > 0 and np.ptp(lin) > 0 else 0.0
    x_mean = x.mean()
    adjusted = [(r - theta * (xv.mean() - x_mean), float((lv - theta * xv).var(ddof=1) / len(lv)))
                for r, _, lv, xv in arms]
    (rc, vc), (rt, vt) = adjusted
    est = _estimate(rc, rt, vc, vt, len(arms[0][2]), len(arms[1][2]), alpha, math.inf)
    raw = arms[0][1] + arms[1][1]
    reduction = 1 - (vc + vt) / raw if raw > 0 and theta else 0.0
    return (replace(est, metric_control=arms[0][0], metric_treatment=arms[1][0]),
            float(min(1.0, max(0.0, reduction))))


def _counts(name: str, values: ArrayLike) -> np.ndarray:
    """Users per variant: finite, non-negative whole numbers (as floats for the arithmetic)."""
    a = np.asarray(values, dtype=float)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} has non-finite values (NaN or inf)")
    if (a < 0).any():
        raise ValueError(f"{name} has negative counts")
    if (a != np.round(a)).any():
        raise ValueError(f"{name} must be whole numbers of users")
    return a


def _weights(weights: Sequence[float], k: int) -> np.ndarray:
    """The configured traffic split normalized to probabilities (k,)."""
    w = np.asarray(weights, dtype=float)
    if k < 2:
        raise ValueError(f"an SRM test needs at least 2 variants, got {k}")
    if w.ndim != 1 or len(w) != k:
        raise ValueError(f"weights must be one per variant: got shape {w.shape} for {k} variants")
    if not (np.isfinite(w) & (w > 0)).all():
        raise ValueError(f"weights must be positive and finite, got {w.tolist()}")
    return w / w.sum()


def srm_test(counts: Sequence[int], weights: Sequence[float]) -> dict:
    """Sample-ratio mismatch at one look: Pearson's chi-square of the users per variant against the
    configured weights (normalized). A small p-value means the assignment is broken."""
    observed = _counts("counts", counts)
    if observed.ndim != 1:
        raise ValueError(f"counts must be one count per variant (1-D), got shape {observed.shape}")
    p = _weights(weights, len(observed))
    if observed.sum() == 0:
        raise ValueError("counts are all 0: no users to test")
    expected = observed.sum() * p
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    df = len(observed) - 1
    return {"chi2": chi2, "df": df, "p_value": float(stats.chi2.sf(chi2, df)),
            "expected": expected.tolist(), "observed": [int(o) for o in observed]}


def sequential_srm(count_path: ArrayLike, weights: Sequence[float], concentration: float = 1.0) -> dict:
    """Anytime-valid sample-ratio mismatch (Lindon & Malek 2020): the Bayes factor of a
    Dirichlet-multinomial mixture, prior Dirichlet(concentration * K * weights), against the
    multinomial with the configured weights. count_path (T, K): CUMULATIVE users per variant at T
    successive looks (a 1-D array is one look). p = min(1, 1 / max_t BF_t) is a valid p-value
    however often it is looked at (Ville's inequality)."""
    path = np.atleast_2d(_counts("count_path", count_path))
    if path.ndim != 2:
        raise ValueError(f"count_path must be (looks, variants), got shape {path.shape}")
    p = _weights(weights, path.shape[1])
    if (np.diff(path, axis=0) < 0).any():
        raise ValueError("count_path must be cumulative: counts cannot decrease from one look to the next")
    if not (math.isfinite(concentration) and concentration > 0):
        raise ValueError(f"concentration must be positive and finite, got {concentration}")
    a = concentration * len(p) * p                                           # prior (K,)
    n = path.sum(axis=1)                                                     # users at each look (T,)
    # log BF_t = log DirMult(counts_t | a) - log Mult(counts_t | p); the multinomial coefficients cancel
    log_bf = (special.gammaln(a.sum()) - special.gammaln(a.sum() + n)
              + (special.gammaln(a + path) - special.gammaln(a)).sum(axis=1) - (path * np.log(p)).sum(axis=1))
    with np.errstate(over="ignore"):        # a gross mismatch overflows the BF to inf (and p to 0)
        bf = np.exp(log_bf)
    return {"p_value": float(min(1.0, np.exp(-log_bf.max()))), "bayes_factor": float(bf[-1]),
            "max_bayes_factor": float(bf.max()), "looks": len(path)}


def msprt_p_value(diff: float, se: float, tau: float) -> float:
    """Always-valid p-value of the normal-mixture sequential probability ratio test (Johari et al.
    2017) at one look: estimate diff with standard error se, mixture N(0, tau²) over the true diff
    (tau: the size of effects expected, in the unit of diff). The caller keeps the running minimum
    over looks; that minimum is valid under continuous monitoring."""
    if not math.isfinite(diff):
        raise ValueError(f"diff must be finite, got {diff}")
    if not (math.isfinite(se) and se > 0) or not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"se and tau must be positive and finite, got se={se}, tau={tau}")
    v, t2 = se * se, tau * tau
    log_lr = 0.5 * math.log(v / (v + t2)) + t2 * diff * diff / (2 * v * (v + t2))   # log Λ, no overflow
    return min(1.0, math.exp(-log_lr))


def decide(primary: Estimate, enough_data: bool, healthy: bool, higher_is_better: bool = True) -> str:
    """A decision hint: "stop" as soon as it is not healthy (SRM or a guardrail breached: the
    sequential SRM test and the guardrails are valid at any look, and a broken experiment should
    not collect more users); else "keep running" until enough_data; then "stop" when the primary
    metric is significantly worse, "ship" when significantly better, else "keep running"."""
    if not healthy:
        return "stop"
    if not enough_data:
        return "keep running"
    better, worse = primary.diff_low > 0, primary.diff_high < 0
    if not higher_is_better:
        better, worse = worse, better
    if worse:
        return "stop"
    return "ship" if better else "keep running"


def min_users_for(mde_rel: float, cv: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Users per variant to detect a relative lift mde_rel (e.g. 0.02 = 2%) of a per-user metric with
    coefficient of variation cv (sd / mean), two-sided normal approximation:
    n = 2 (z_{1-alpha/2} + z_power)² cv² / mde_rel², rounded up."""
    alpha = _alpha(alpha)
    if not 0 < power < 1:
        raise ValueError(f"power must be in (0, 1), got {power}")
    if not (math.isfinite(mde_rel) and mde_rel != 0):
        raise ValueError(f"mde_rel must be finite and nonzero, got {mde_rel}")
    if not (math.isfinite(cv) and cv > 0):
        raise ValueError(f"cv must be positive and finite, got {cv}")
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return math.ceil(2 * z * z * cv * cv / (mde_rel * mde_rel))
