"""A/B statistics from per-arm sums agree with Welch's t-test on the raw rewards."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from onerec.ab import arm, compare, decide


def sums(x: np.ndarray) -> dict:
    return {"n": float(len(x)), "sum": float(x.sum()), "sumsq": float((x * x).sum())}


def test_sums_give_welchs_test_on_the_raw_rewards():
    rng = np.random.default_rng(0)
    control, treatment = rng.normal(0.20, 1.0, 400), rng.normal(0.45, 1.5, 300)
    result = compare(arm("control", **sums(control)), arm("treatment", **sums(treatment)))
    ref = stats.ttest_ind(treatment, control, equal_var=False)
    assert result["p_value"] == pytest.approx(ref.pvalue, rel=1e-6)
    assert result["diff"] == pytest.approx(treatment.mean() - control.mean())
    ci = ref.confidence_interval(0.95)
    assert (result["ci_low"], result["ci_high"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert result["significant"] == (ref.pvalue < 0.05)


def test_decisions():
    rng = np.random.default_rng(1)
    base = rng.normal(0.0, 1.0, 2000)
    better, worse, same = base + 0.3, base - 0.3, rng.normal(0.0, 1.0, 2000)
    c = arm("c", **sums(base))
    assert decide(compare(c, arm("t", **sums(better))), min_n=100) == "promote"
    assert decide(compare(c, arm("t", **sums(worse))), min_n=100) == "keep"
    assert decide(compare(c, arm("t", **sums(same))), min_n=100) == "wait"
    assert decide(compare(c, arm("t", **sums(better))), min_n=5000) == "wait"     # too few exposures yet


def test_constant_rewards_and_tiny_arms():
    ones, zeros = np.ones(10), np.zeros(10)
    result = compare(arm("c", **sums(zeros)), arm("t", **sums(ones)))
    assert result["significant"] and result["ci_low"] == result["ci_high"] == 1.0
    with pytest.raises(ValueError, match="at least 2"):
        arm("c", n=1, sum=1.0, sumsq=1.0)


def test_the_store_arms_are_summed_per_variant_and_compared():
    rng = np.random.default_rng(2)
    c1, c2, t = rng.normal(0, 1, 300), rng.normal(0, 1, 200), rng.normal(0.5, 1, 500)
    from onerec.ab import ab_report

    arms = {"control:3": sums(c1), "control:4": sums(c2), "treatment:5": sums(t)}
    report = ab_report(arms, min_n=100)
    assert report["n_control"] == 500 and report["mean_control"] == pytest.approx(np.concatenate([c1, c2]).mean())
    assert report["decision"] == "promote"
    assert ab_report({"control:3": sums(c1)}) is None                            # no treatment yet
