"""A/B statistics: is the treatment's mean reward per exposure different from the control's?

    arms = ab_arms(redis_client)                                  # onerec/stream/rewards.py
    result = compare(arm("control", **arms["control:3"]), arm("treatment", **arms["treatment:5"]))
    result["significant"], result["diff"], (result["ci_low"], result["ci_high"])

Each arm is summarized by n, sum and sum of squares of its per-exposure rewards (what the A/B
store keeps, so the statistics need no raw rows). Welch's t-test (unequal variances, the
Welch-Satterthwaite degrees of freedom): diff = mean_t - mean_c, se = sqrt(var_t/n_t + var_c/n_c),
the (1 - alpha) CI diff +- t_{1-alpha/2, df} se, two-sided p. `decide`: "promote" when the CI
lies above 0, "keep" (the champion) when it lies below, "wait" otherwise or before min_n
exposures per arm; it looks once per call, so a caller peeking repeatedly should use a
stricter alpha (a fixed-horizon test is only valid at its planned n).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats


@dataclass(frozen=True)
class Arm:
    name: str
    n: int
    mean: float
    var: float          # unbiased sample variance

    @property
    def se2(self) -> float:
        return self.var / self.n


def arm(name: str, n: float, sum: float, sumsq: float, **_) -> Arm:  # noqa: A002 - the store's field names
    """An arm from its sums; needs n >= 2 (a variance)."""
    n = int(n)
    if n < 2:
        raise ValueError(f"arm {name!r} has {n} exposure(s); a variance needs at least 2")
    mean = sum / n
    var = max(0.0, (sumsq - n * mean * mean) / (n - 1))     # clamp float round-off below zero
    return Arm(name, n, mean, var)


def compare(control: Arm, treatment: Arm, alpha: float = 0.05) -> dict:
    diff = treatment.mean - control.mean
    se = math.sqrt(control.se2 + treatment.se2)
    if se == 0:
        df, t_crit, p = float(control.n + treatment.n - 2), 0.0, 0.0 if diff else 1.0
    else:
        df = (control.se2 + treatment.se2) ** 2 / (control.se2 ** 2 / (control.n - 1) + treatment.se2 ** 2 / (treatment.n - 1))
        t_crit = float(stats.t.ppf(1 - alpha / 2, df))
        p = float(2 * stats.t.sf(abs(diff) / se, df))
    low, high = diff - t_crit * se, diff + t_crit * se
    return {"control": control.name, "treatment": treatment.name, "n_control": control.n, "n_treatment": treatment.n,
            "mean_control": control.mean, "mean_treatment": treatment.mean, "diff": diff,
            "lift": diff / abs(control.mean) if control.mean else None, "se": se, "df": df,
            "ci_low": low, "ci_high": high, "p_value": p, "alpha": alpha, "significant": low > 0 or high < 0}


def decide(result: dict, min_n: int) -> str:
    """promote | keep | wait (see the module doc)."""
    if min(result["n_control"], result["n_treatment"]) < min_n or not result["significant"]:
        return "wait"
    return "promote" if result["ci_low"] > 0 else "keep"


def by_variant(arms: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """A/B store arms "<variant>:<model version>" -> sums per variant (a variant whose model was
    swapped mid-experiment keeps one arm: it is what the users of that variant got)."""
    out: dict[str, dict[str, float]] = {}
    for key, sums in arms.items():
        variant = key.rsplit(":", 1)[0]
        acc = out.setdefault(variant, {"n": 0.0, "sum": 0.0, "sumsq": 0.0})
        for field in acc:
            acc[field] += sums.get(field, 0.0)
    return out


def ab_report(arms: dict[str, dict[str, float]], control: str = "control", treatment: str = "treatment",
              alpha: float = 0.05, min_n: int = 100) -> dict | None:
    """The comparison and decision for two variants of the A/B store; None until both have >= 2."""
    variants = by_variant(arms)
    if any(v not in variants or variants[v]["n"] < 2 for v in (control, treatment)):
        return None
    result = compare(arm(control, **variants[control]), arm(treatment, **variants[treatment]), alpha)
    return {**result, "decision": decide(result, min_n)}
