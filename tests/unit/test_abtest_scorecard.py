"""The scorecard of one experiment (onerec/abtest/scorecard.py) on seeded A/B stores: its numbers
equal the estimators (onerec/abtest/stats.py) applied by hand to the seeded rows, and its verdict
follows the lift, the sample ratio, the guardrails and the amount of data."""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
from collections import defaultdict

import numpy as np
import pytest

from onerec.abtest import stats
from onerec.abtest.scorecard import (
    BUCKETS,
    MAX_BUCKETS,
    MDE_REL,
    _order,
    bucket_size,
    scorecard,
)
from onerec.abtest.store import ABStore
from onerec.config import load_config
from tests.abtest_data import DAY_MS, START_MS, seed_experiment

CFG = load_config("debug").abtest
EQUAL = {"control": 50.0, "treatment": 50.0}
HOUR_MS, MINUTE_MS = 3_600_000, 60_000


def new_store(tmp_path_factory, name: str = "ab") -> ABStore:
    return ABStore.open(f"sqlite:///{tmp_path_factory.mktemp(name)}/ab.db")


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """One store, one experiment per case (disjoint users, so the pre-periods do not mix). Over 8
    days (8 daily buckets: a quick timeline) but "flat", over 3 (36 two-hour buckets)."""
    store = new_store(tmp_path_factory)
    cases = {
        "ship": seed_experiment(store, "ship", lift=0.2, days=8, first_user=0),
        "flat": seed_experiment(store, "flat", lift=0.0, first_user=10_000, outside_events=True),
        "worse": seed_experiment(store, "worse", lift=-0.2, days=8, first_user=20_000),
        "srm": seed_experiment(store, "srm", split=(60, 40), days=8, first_user=30_000),
        "srm-unregistered": seed_experiment(store, "srm-unregistered", split=(60, 40), register=False, days=8,
                                            first_user=40_000),
        "slow": seed_experiment(store, "slow", latency_ms=(20.0, 2_000.0), days=8, first_user=50_000),
        "fallbacks": seed_experiment(store, "fallbacks", fallback_share=(0.02, 0.6), days=8, first_user=60_000),
        "small": seed_experiment(store, "small", users=30, lift=0.6, days=8, first_user=70_000),
    }
    yield store, cases
    store.close()


@pytest.fixture(scope="module")
def card(seeded):
    """card(name, cfg=CFG, weights=EQUAL, error_rate=None): each scorecard computed once per module."""
    store, _ = seeded
    cards: dict = {}

    def get(name: str, cfg=CFG, weights: dict | None = EQUAL, error_rate: float | None = None) -> dict:
        key = (name, cfg, tuple((weights or {}).items()) if weights is not None else None, error_rate)
        if key not in cards:
            cards[key] = scorecard(store, name, cfg, weights=weights, error_rate=error_rate, now_ms=START_MS)
        return copy.deepcopy(cards[key])

    return get


@pytest.fixture(scope="module")
def flat_card(card):
    return card("flat")


def hand_users(seeded_case: dict, first_ms: int, days: float = CFG.pre_period_days) -> dict[int, dict]:
    """Per user, from the seeded rows and events themselves (not the store): the sums the scorecard
    works on, and the pre-period covariates (events in [first_ms - days, first_ms))."""
    users: dict[int, dict] = defaultdict(lambda: {"exposures": 0, "items": 0, "reward": 0.0, "reacted": 0,
                                                  "watch_s": 0.0, "pre_reward": 0.0, "pre_events": 0})
    for r in seeded_case["rows"]:
        u = users[r["user_id"]]
        u["variant"] = r["variant"]
        u["exposures"] += 1
        u["items"] += len(r["items"])
        u["reward"] += r["reward"]
        u["reacted"] += r["reacted"]
        u["watch_s"] += r["watch_s"]
    start = first_ms - round(days * DAY_MS)
    for e in seeded_case["events"]:
        if e["user_id"] in users and start <= e["time_ms"] < first_ms:
            users[e["user_id"]]["pre_events"] += 1
            users[e["user_id"]]["pre_reward"] += e["reward"] or 0.0
    return dict(users)


def column(users: dict[int, dict], variant: str, key: str) -> np.ndarray:
    return np.array([u[key] for _, u in sorted(users.items()) if u["variant"] == variant], dtype=float)


def first_ms_of(case: dict) -> int:
    return min(r["served_ms"] for r in case["rows"])


def close(estimate: dict, expected: stats.Estimate, rel: float = 1e-9) -> None:
    """Every field of the card's estimate equals the hand-computed one (sums in another order: 1e-9)."""
    want = expected.as_dict()
    assert estimate.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, float):
            assert estimate[key] == pytest.approx(value, rel=rel, abs=1e-12), key
        else:
            assert estimate[key] == value, key


# ------------------------------------------------------------------ decisions


@pytest.mark.parametrize(("name", "decision", "words"), [
    ("ship", "ship", "treatment is better"),
    ("flat", "keep running", "no significant difference yet"),
    ("worse", "stop", "treatment is worse"),
])
def test_the_decision_follows_the_lift(card, name, decision, words):
    card = card(name)
    primary = card["comparisons"][0]["primary"]
    assert card["health"]["ok"] is True                    # healthy: the decision is the lift's
    assert card["decision"] == decision == card["comparisons"][0]["decision"]
    assert card["decision_reason"].startswith(words)
    assert f"{primary['diff']:+.4g}" in card["decision_reason"]
    assert primary["significant"] is (decision != "keep running")
    assert (primary["diff_low"] > 0) is (decision == "ship") and (primary["diff_high"] < 0) is (decision == "stop")


def test_the_primary_estimate_is_cuped_on_the_right_users_and_covariate(seeded, flat_card):
    _, cases = seeded
    case = cases["flat"]              # with events outside the 14-day pre-period and during the experiment
    first = first_ms_of(case)
    assert flat_card["first_ms"] == first and flat_card["control"] == "control"
    users = hand_users(case, first)
    y_c, y_t = column(users, "control", "reward"), column(users, "treatment", "reward")
    x_c, x_t = column(users, "control", "pre_reward"), column(users, "treatment", "pre_reward")
    expected, reduction = stats.cuped_lift(y_c, x_c, y_t, x_t, CFG.alpha)
    comp = flat_card["comparisons"][0]
    close(comp["primary"], expected)
    assert comp["cuped"] == {"on": True, "variance_reduction": pytest.approx(reduction, rel=1e-9)}
    close(comp["primary_unadjusted"], stats.mean_lift(y_c, y_t, CFG.alpha))
    assert comp["primary"]["n_control"] == len(y_c) and comp["primary"]["n_treatment"] == len(y_t)
    assert len(y_c) + len(y_t) == 400
    # the test can tell: every event of the user as the covariate would give another estimate
    everything = hand_users(case, first, days=1_000)
    wrong, _ = stats.cuped_lift(y_c, column(everything, "control", "pre_reward"), y_t,
                                column(everything, "treatment", "pre_reward"), CFG.alpha)
    assert abs(wrong.diff - expected.diff) > 1e-6
    # the always-valid p-value is the mSPRT's on the primary estimate
    assert comp["always_valid_p"] == pytest.approx(stats.msprt_p_value(expected.diff, expected.se, CFG.msprt_tau),
                                                   rel=1e-9)


def test_the_secondary_lifts_are_the_delta_method_ratios(seeded, flat_card):
    _, cases = seeded
    users = hand_users(cases["flat"], first_ms_of(cases["flat"]))
    sec = flat_card["comparisons"][0]["secondary"]
    assert set(sec) == {"reward_per_exposure", "reaction_rate", "exposures_per_user"}

    def ratio(num, den):
        return stats.ratio_lift(column(users, "control", num), column(users, "control", den),
                                column(users, "treatment", num), column(users, "treatment", den), CFG.alpha)

    close(sec["reward_per_exposure"], ratio("reward", "exposures"))
    close(sec["reaction_rate"], ratio("reacted", "items"))
    close(sec["exposures_per_user"], stats.mean_lift(column(users, "control", "exposures"),
                                                     column(users, "treatment", "exposures"), CFG.alpha))


def test_watch_time_uses_the_pre_period_activity_as_covariate(seeded, card):
    _, cases = seeded
    card = card("flat", dataclasses.replace(CFG, primary_metric="watch_time_per_user"))
    case = cases["flat"]
    users = hand_users(case, first_ms_of(case))
    expected, _ = stats.cuped_lift(column(users, "control", "watch_s"), column(users, "control", "pre_events"),
                                   column(users, "treatment", "watch_s"), column(users, "treatment", "pre_events"),
                                   CFG.alpha)
    close(card["comparisons"][0]["primary"], expected)
    assert card["primary_metric"] == "watch_time_per_user"
    assert card["variants"][0]["primary"] == pytest.approx(column(users, "control", "watch_s").mean(), rel=1e-12)


def test_reward_per_exposure_is_a_ratio_with_the_pre_period_rate_as_covariate(seeded, card):
    _, cases = seeded
    card = card("ship", dataclasses.replace(CFG, primary_metric="reward_per_exposure"))
    case = cases["ship"]
    users = hand_users(case, first_ms_of(case))
    for u in users.values():                # the user's mean reward per event before the experiment (0: none)
        u["pre_rate"] = u["pre_reward"] / u["pre_events"] if u["pre_events"] else 0.0
    args = [column(users, v, k) for v in ("control", "treatment") for k in ("reward", "exposures", "pre_rate")]
    expected, reduction = stats.cuped_ratio_lift(*args, CFG.alpha)
    comp = card["comparisons"][0]
    close(comp["primary"], expected)
    assert comp["cuped"]["variance_reduction"] == pytest.approx(reduction, rel=1e-9) and reduction > 0
    close(comp["primary_unadjusted"], stats.ratio_lift(*args[0:2], *args[3:5], CFG.alpha))
    assert card["variants"][0]["primary"] == pytest.approx(card["variants"][0]["reward_per_exposure"], rel=1e-12)
    last = card["timeline"]["cumulative_lift"][-1]                    # the unadjusted ratio over everyone
    assert last["diff"] == pytest.approx(comp["primary_unadjusted"]["diff"], rel=1e-9)


def test_cuped_off_gives_the_unadjusted_estimate(seeded, card, flat_card):
    _, cases = seeded
    card = card("flat", dataclasses.replace(CFG, cuped=False))
    comp = card["comparisons"][0]
    users = hand_users(cases["flat"], first_ms_of(cases["flat"]))
    close(comp["primary"], stats.mean_lift(column(users, "control", "reward"), column(users, "treatment", "reward"),
                                           CFG.alpha))
    assert comp["primary"] == comp["primary_unadjusted"] == flat_card["comparisons"][0]["primary_unadjusted"]
    assert comp["cuped"] == {"on": False, "variance_reduction": None}
    assert comp["primary"] != flat_card["comparisons"][0]["primary"]


@pytest.mark.parametrize("name", ["ship", "flat", "worse"])
def test_cuped_narrows_the_ci_on_the_seeded_data(card, name):
    comp = card(name)["comparisons"][0]
    p, raw = comp["primary"], comp["primary_unadjusted"]
    assert p["diff_high"] - p["diff_low"] < raw["diff_high"] - raw["diff_low"]
    assert p["se"] < raw["se"]
    assert 0.1 < comp["cuped"]["variance_reduction"] < 1       # taste drives the pre-period and the experiment
    # the levels reported are the real (unadjusted) ones
    assert p["metric_control"] == pytest.approx(raw["metric_control"], rel=1e-12)
    assert p["metric_treatment"] == pytest.approx(raw["metric_treatment"], rel=1e-12)


# ------------------------------------------------------------------ health


def test_a_sample_ratio_mismatch_stops_the_experiment(seeded, card):
    _, cases = seeded
    card = card("srm")
    srm = card["health"]["srm"]
    counts = [v["users"] for v in card["variants"]]
    assert counts == [sum(v == "control" for v in cases["srm"]["variant"].values()),
                      sum(v == "treatment" for v in cases["srm"]["variant"].values())]
    assert counts[0] > 1.3 * counts[1]                     # seeded 60/40
    one_look = stats.srm_test(counts, [50.0, 50.0])
    assert srm["chi2"] == pytest.approx(one_look["chi2"]) and srm["p_value"] == pytest.approx(one_look["p_value"])
    assert srm["p_value"] < 0.001 and srm["ok"] is False
    assert srm["weights"] == [50.0, 50.0] and srm["weights_from"] == "A/B config"
    assert card["health"]["ok"] is False and card["decision"] == "stop"
    assert "sample-ratio" in card["decision_reason"]
    assert all(g["ok"] is not False for g in card["health"]["guardrails"])    # the SRM alone stops it


def test_a_healthy_split_passes_the_srm_checks(flat_card):
    srm = flat_card["health"]["srm"]
    assert srm["ok"] is True and srm["p_value"] > 0.001 and srm["sequential_p_value"] > 0.001


def test_without_registered_weights_they_are_assumed_equal(seeded, card):
    store, _ = seeded
    assert store.experiment_config("srm-unregistered") is None
    card = card("srm-unregistered", weights=None)      # what the dashboard passes: nothing registered
    srm = card["health"]["srm"]
    assert srm["weights_from"] == "assumed equal" and srm["weights"] == [1.0, 1.0]
    assert srm["ok"] is False and card["decision"] == "stop"
    assert [v["weight"] for v in card["variants"]] == [None, None]


def test_the_srm_follows_the_configured_weights(card):
    """The 60/40 experiment is healthy when 60/40 is what was configured."""
    srm = card("srm", weights={"control": 60.0, "treatment": 40.0})["health"]["srm"]
    assert srm["ok"] is True and srm["weights"] == [60.0, 40.0]


def test_a_variant_the_config_does_not_weight_has_no_srm_test(card):
    """The store saw "treatment" but the weights name only "control": no test, the same keys."""
    srm = card("flat", weights={"control": 50.0})["health"]["srm"]
    assert srm == {"weights": [50.0, 0.0], "weights_from": "A/B config", "chi2": None, "p_value": None,
                   "sequential_p_value": None, "ok": None}


def test_a_slow_treatment_breaches_the_latency_guardrail(seeded, card):
    _, cases = seeded
    card = card("slow")
    checks = {(g["name"], g["variant"]): g for g in card["health"]["guardrails"]}
    assert set(checks) == {("p99_latency_ms", "control"), ("p99_latency_ms", "treatment"),
                           ("fallback_rate", "control"), ("fallback_rate", "treatment"), ("error_rate", None)}
    for variant, ok in (("control", True), ("treatment", False)):
        latencies = [r["latency_ms"] for r in cases["slow"]["rows"] if r["variant"] == variant]
        check = checks["p99_latency_ms", variant]
        assert check["value"] == pytest.approx(float(np.percentile(latencies, 99)), rel=1e-12)
        assert check["limit"] == CFG.max_p99_latency_ms and check["ok"] is ok
    assert checks["p99_latency_ms", "treatment"]["value"] > CFG.max_p99_latency_ms
    assert card["health"]["ok"] is False and card["decision"] == "stop"
    assert card["decision_reason"] == "guardrail breached: p99_latency_ms (treatment)"


def test_a_fallback_heavy_treatment_breaches_the_fallback_guardrail(seeded, card):
    _, cases = seeded
    card = card("fallbacks")
    checks = {(g["name"], g["variant"]): g for g in card["health"]["guardrails"]}
    for variant, ok in (("control", True), ("treatment", False)):
        rows = [r for r in cases["fallbacks"]["rows"] if r["variant"] == variant]
        rate = sum(r["fallback"] is not None for r in rows) / len(rows)
        assert checks["fallback_rate", variant]["value"] == pytest.approx(rate, rel=1e-12)
        assert checks["fallback_rate", variant]["ok"] is ok
    assert checks["p99_latency_ms", "treatment"]["ok"] is True
    assert card["decision"] == "stop" and card["decision_reason"] == "guardrail breached: fallback_rate (treatment)"


def test_the_error_rate_guardrail(card):
    def error_check(card):
        (check,) = [g for g in card["health"]["guardrails"] if g["name"] == "error_rate"]
        return check

    unknown = card("ship")                                      # no predictor metrics: unknown
    assert error_check(unknown) == {"name": "error_rate", "variant": None, "value": None,
                                    "limit": CFG.max_error_rate, "ok": None}
    assert unknown["health"]["ok"] is True and unknown["decision"] == "ship"     # unknown does not block
    at_limit = card("ship", error_rate=CFG.max_error_rate)
    assert error_check(at_limit)["ok"] is True and at_limit["decision"] == "ship"
    high = card("ship", error_rate=CFG.max_error_rate * 2)
    assert error_check(high)["ok"] is False and error_check(high)["value"] == CFG.max_error_rate * 2
    assert high["health"]["ok"] is False and high["decision"] == "stop"
    assert high["decision_reason"] == "guardrail breached: error_rate"


def test_too_few_users_keeps_it_running(seeded, card):
    _, cases = seeded
    card = card("small")
    counts = [v["users"] for v in card["variants"]]
    assert sum(counts) == 30 and min(counts) < CFG.min_users
    assert card["comparisons"][0]["primary"]["significant"]       # a lift that would ship with enough users
    md = card["health"]["min_data"]
    assert md["users_per_variant"] == min(counts) and md["needed"] == CFG.min_users and md["ok"] is False
    assert card["health"]["ok"] is False and card["decision"] == "keep running"
    assert card["decision_reason"] == f"{min(counts)} users in the smallest variant, {CFG.min_users} needed"
    y = np.array([u["reward"] for u in hand_users(cases["small"], first_ms_of(cases["small"])).values()
                  if u["variant"] == "control"])
    assert md["users_for_5pct_lift"] == stats.min_users_for(MDE_REL, float(y.std(ddof=1) / abs(y.mean())), CFG.alpha)


def test_an_unhealthy_small_experiment_says_why_it_stops(tmp_path_factory):
    """SRM and too few users: the decision is "stop" (decide: health first), and so is the reason."""
    store = new_store(tmp_path_factory)
    seed_experiment(store, "tiny-srm", users=60, split=(90, 10), seed=3)
    card = scorecard(store, "tiny-srm", CFG, weights=EQUAL)
    assert card["health"]["min_data"]["ok"] is False and card["health"]["srm"]["ok"] is False
    assert card["decision"] == "stop" and "sample-ratio" in card["decision_reason"]
    store.close()


def test_a_single_variant_experiment_has_no_comparison(tmp_path_factory):
    store = new_store(tmp_path_factory)
    seed_experiment(store, "solo", users=50, split=(1, 0), register=False)
    card = scorecard(store, "solo", CFG)
    assert [v["name"] for v in card["variants"]] == ["control"] and card["comparisons"] == []
    assert card["decision"] == "keep running"
    assert card["decision_reason"] == "only one variant has enough users to compare"
    assert card["health"]["srm"]["ok"] is None and card["health"]["srm"]["p_value"] is None
    assert all("diff" not in p for p in card["timeline"]["cumulative_lift"])
    assert card["timeline"]["users_so_far"]["control"][-1] == 50
    store.close()


# ------------------------------------------------------------------ variants


def test_per_variant_metrics_equal_hand_computations(seeded, flat_card):
    _, cases = seeded
    case = cases["flat"]
    first = first_ms_of(case)
    popularity: dict[int, int] = defaultdict(int)      # over the whole store: every event before the experiment
    for e in (e for c in cases.values() for e in c["events"]):
        if e["time_ms"] < first:
            popularity[e["item_id"]] += 1
    served = {i for r in case["rows"] for i in r["items"]}
    catalogue = len(set(popularity) | served)
    total = sum(popularity.values()) + len(popularity) + 1
    assert [v["name"] for v in flat_card["variants"]] == ["control", "treatment"]
    for v, version in zip(flat_card["variants"], ("3", "4")):
        rows = [r for r in case["rows"] if r["variant"] == v["name"]]
        items = [i for r in rows for i in r["items"]]
        rewards = {}
        for r in rows:
            rewards[r["user_id"]] = rewards.get(r["user_id"], 0.0) + r["reward"]
        assert v["users"] == len(rewards) and v["exposures"] == len(rows) and v["items_served"] == len(items)
        assert v["weight"] == 50.0 and v["model_versions"] == [version]
        assert v["primary"] == pytest.approx(sum(rewards.values()) / len(rewards), rel=1e-12)
        assert v["reward_per_exposure"] == pytest.approx(sum(r["reward"] for r in rows) / len(rows), rel=1e-12)
        assert v["reaction_rate"] == pytest.approx(sum(r["reacted"] for r in rows) / len(items), rel=1e-12)
        assert v["distinct_items"] == len(set(items))
        assert v["coverage"] == pytest.approx(len(set(items)) / catalogue, rel=1e-12)
        novelty = sum(-math.log2((popularity.get(i, 0) + 1) / total) for i in items) / len(items)
        assert v["novelty_bits"] == pytest.approx(novelty, rel=1e-12)
        assert v["fallback_rate"] == pytest.approx(sum(r["fallback"] is not None for r in rows) / len(rows), rel=1e-12)


def test_the_control_is_the_first_weighted_variant(card):
    card = card("small", weights={"treatment": 50.0, "control": 50.0})
    assert card["control"] == "treatment" and [v["name"] for v in card["variants"]] == ["treatment", "control"]
    assert card["comparisons"][0]["treatment"] == "control"


@pytest.mark.parametrize(("weights", "control", "order"), [
    ({"b": 1, "a": 1}, "a", ["b", "a", "c"]),          # the A/B file's order first, the rest by name
    ({"zz": 1, "c": 1}, None, ["c", "a", "b"]),        # weighted variants the store never saw are dropped
    (None, "b", ["b", "a", "c"]), (None, "nope", ["a", "b", "c"]), (None, None, ["a", "b", "c"]),
])
def test_the_variants_order(weights, control, order):
    assert _order(["a", "b", "c"], weights, control) == order


# ------------------------------------------------------------------ timeline


@pytest.mark.parametrize(("span_ms", "unit"), [
    (10 * DAY_MS, "day"), (3 * DAY_MS, "day"), (3 * DAY_MS - 1, "hour"), (3 * HOUR_MS, "hour"),
    (3 * HOUR_MS - 1, "minute"), (3 * MINUTE_MS, "minute"), (MINUTE_MS, "minute"), (0, "minute"),
])
def test_bucket_size(span_ms, unit):
    assert bucket_size(START_MS, START_MS + span_ms) == (unit, dict(BUCKETS)[unit])


@pytest.mark.parametrize(("days", "unit"), [(3, "hour"), (8, "day"), (0.05, "minute")])
def test_the_timeline_buckets(tmp_path_factory, days, unit):
    store = new_store(tmp_path_factory)
    seed_experiment(store, "t", users=60, days=days)
    card = scorecard(store, "t", CFG, weights=EQUAL)
    tl = card["timeline"]
    assert tl["unit"] == unit == bucket_size(card["first_ms"], card["last_ms"])[0]
    unit_ms = dict(BUCKETS)[unit]
    assert tl["bucket_ms"] % unit_ms == 0 and len(tl["ends_ms"]) <= MAX_BUCKETS
    assert tl["ends_ms"] == [card["first_ms"] + (b + 1) * tl["bucket_ms"] for b in range(len(tl["ends_ms"]))]
    assert tl["ends_ms"][-2] <= card["last_ms"] < tl["ends_ms"][-1]
    store.close()


def test_the_timeline_series_and_cumulative_lift(seeded, flat_card):
    _, cases = seeded
    rows = cases["flat"]["rows"]
    tl = flat_card["timeline"]
    assert tl["unit"] == "hour" and len(tl["ends_ms"]) == len(tl["cumulative_lift"])
    users = hand_users(cases["flat"], flat_card["first_ms"])
    # the cumulative lift at the end is the unadjusted lift over every user
    last = tl["cumulative_lift"][-1]
    overall = stats.mean_lift(column(users, "control", "reward"), column(users, "treatment", "reward"), CFG.alpha)
    assert last["end_ms"] == tl["ends_ms"][-1]
    for key in ("diff", "diff_low", "diff_high"):
        assert last[key] == pytest.approx(getattr(overall, key), rel=1e-9)
        assert last[key] == pytest.approx(flat_card["comparisons"][0]["primary_unadjusted"][key], rel=1e-9)
    # the users so far: nondecreasing, ending at each variant's users
    for v in flat_card["variants"]:
        path = tl["users_so_far"][v["name"]]
        assert len(path) == len(tl["ends_ms"]) and all(a <= b for a, b in itertools.pairwise(path))
        assert path[-1] == v["users"]
    # one bucket's series: the mean reward per user among the users active in it, from the rows
    b = len(tl["ends_ms"]) // 2
    lo, hi = tl["ends_ms"][b] - tl["bucket_ms"], tl["ends_ms"][b]
    for variant in ("control", "treatment"):
        per_user: dict[int, float] = defaultdict(float)
        for r in rows:
            if r["variant"] == variant and lo <= r["served_ms"] < hi:
                per_user[r["user_id"]] += r["reward"]
        assert tl["series"][variant][b] == pytest.approx(sum(per_user.values()) / len(per_user), rel=1e-12)
        # and the users who had arrived by then
        arrived = {r["user_id"] for r in rows if r["variant"] == variant and r["served_ms"] < hi}
        assert tl["users_so_far"][variant][b] == len(arrived)


# ------------------------------------------------------------------ the card itself


def test_an_unknown_experiment_raises_key_error(seeded):
    store, _ = seeded
    with pytest.raises(KeyError, match="nope"):
        scorecard(store, "nope", CFG)


def test_exposures_outside_any_experiment_are_not_an_experiment(tmp_path_factory):
    store = new_store(tmp_path_factory)
    data = seed_experiment(store, "x", users=10, register=False)
    store2 = new_store(tmp_path_factory)
    store2.add_exposures([{**r, "experiment": None} for r in data["rows"]])
    with pytest.raises(KeyError):
        scorecard(store2, "x", CFG)
    store.close()
    store2.close()


def plain(value, where: str = "card") -> None:
    """Only JSON's own Python types, all the way down; finite floats."""
    assert type(value) in (dict, list, str, int, float, bool, type(None)), f"{where}: {type(value).__name__}"
    if isinstance(value, float):
        assert math.isfinite(value), where
    elif isinstance(value, dict):
        for k, v in value.items():
            assert type(k) is str, where
            plain(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            plain(v, f"{where}[{i}]")


@pytest.mark.parametrize("name", ["flat", "srm-unregistered", "small", "slow"])
def test_the_card_is_plain_json(card, name):
    card = card(name, weights=EQUAL if name != "srm-unregistered" else None)
    plain(card)
    assert json.loads(json.dumps(card, allow_nan=False)) == card
    assert card["generated_ms"] == START_MS and "_estimate" not in card["comparisons"][0]


def test_generated_ms_defaults_to_now(seeded, monkeypatch):
    store, _ = seeded
    monkeypatch.setattr("onerec.abtest.scorecard.time.time", lambda: 1_234.5678)
    assert scorecard(store, "small", CFG)["generated_ms"] == 1_234_567
