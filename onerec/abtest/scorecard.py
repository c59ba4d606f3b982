"""The scorecard of one experiment: what the dashboard shows and its JSON API returns.

    card = scorecard(store, "demo-1a2b3c", cfg.abtest, weights={"champion": 50, "challenger": 50})
    card["health"]["ok"], card["decision"], card["comparisons"][0]["primary"]["diff_low"]

Everything comes from the A/B store (onerec/abtest/store.py): the experiment's exposures, each
with its reward, items and latency, and the users' events before it (CUPED's covariate, the
items' popularity for novelty). The user is the unit: every metric is per user or a ratio of
per-user sums (onerec/abtest/stats.py). The control is the first variant of `weights` (the A/B
file's order), else `control`, else the first variant by name.

  variants     users, exposures, the primary metric (PRIMARY: a mean per user or a ratio of per-user
               sums, each with its CUPED covariate), reward per exposure,
               reaction rate (reacted / served items), coverage and novelty of what was served,
               p99 latency and fallback rate; the model versions that served it
  comparisons  per treatment: the primary metric's lift (CUPED-adjusted when on, with the
               variance reduction achieved; the unadjusted one beside it), an always-valid p-value,
               and the secondary metrics' lifts (delta method for the ratios)
  health       sample-ratio mismatch (chi-square, and the sequential test over the time buckets),
               guardrails (per variant: p99 latency, fallback rate; overall: the predictor's error
               rate when given), minimum data (users per variant)
  decision     ship | keep running | stop, and why
  timeline     per time bucket (day, hour or minute: whichever gives a readable series), each
               variant's primary metric among the users active in it, and the cumulative lift
               with its CI at the bucket's end

It reads the experiment's exposures into memory (pandas): fine to a few million exposures; beyond
that the per-user sums belong in SQL (the store's user_frame does them there).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from onerec.abtest.stats import (Estimate, cuped_lift, cuped_ratio_lift, decide, mean_lift, min_users_for, msprt_p_value, ratio_lift,
                                 sequential_srm, srm_test)
from onerec.abtest.store import ABStore
from onerec.config import ABTestConfig

SRM_P = 0.001                 # the usual SRM alarm: at 0.05 one healthy experiment in 20 would be flagged
MDE_REL = 0.05                # the lift the minimum-sample hint plans for
MAX_BUCKETS = 60
BUCKETS = (("day", 86_400_000), ("hour", 3_600_000), ("minute", 60_000))


@dataclass(frozen=True)
class Metric:
    """A metric: a mean per user of `num`, or (den set) the ratio of sums Σnum / Σden; `pre`:
    its CUPED covariate, the same quantity over each user's events before the experiment."""
    num: str
    den: str | None
    pre: str = ""             # none: only compared without CUPED (the secondary metrics)

    def level(self, users: pd.DataFrame) -> float:
        return float(users[self.num].sum() / users[self.den].sum()) if self.den else float(users[self.num].mean())

    def lift(self, users: pd.DataFrame, control: str, treatment: str, alpha: float, cuped: bool
             ) -> tuple[Estimate, float | None]:
        """(the estimate, CUPED's variance reduction or None when off)."""
        c, t = (users[users["variant"] == v] for v in (control, treatment))
        a = [c[self.num], *([c[self.den]] if self.den else []), t[self.num], *([t[self.den]] if self.den else [])]
        if not cuped:
            return (ratio_lift(*a, alpha) if self.den else mean_lift(*a, alpha)), None
        if self.den:
            return cuped_ratio_lift(a[0], a[1], c[self.pre], a[2], a[3], t[self.pre], alpha)
        return cuped_lift(a[0], c[self.pre], a[1], t[self.pre], alpha)


PRIMARY = {"reward_per_user": Metric("reward", None, "pre_reward"),
           "watch_time_per_user": Metric("watch_s", None, "pre_events"),       # no pre-period plays: activity
           "reward_per_exposure": Metric("reward", "exposures", "pre_reward_per_event")}
SECONDARY = {"reward_per_exposure": Metric("reward", "exposures"), "reaction_rate": Metric("reacted", "items_served"),
             "exposures_per_user": Metric("exposures", None)}


def bucket_size(first_ms: int, last_ms: int) -> tuple[str, int]:
    """The largest of day / hour / minute that splits the span into at least 3 buckets."""
    for name, ms in BUCKETS:
        if (last_ms - first_ms) / ms >= 3:
            return name, ms
    return BUCKETS[-1]


def per_user(exposures: pd.DataFrame) -> pd.DataFrame:
    """exposures -> one row per (variant, user): exposures, items_served, reward, watch_s, reacted."""
    return (exposures.assign(exposures=1)
            .groupby(["variant", "user_id"], as_index=False)[["exposures", "n_items", "reward", "watch_s", "reacted"]]
            .sum().rename(columns={"n_items": "items_served"}))


def _order(names: list[str], weights: dict[str, float] | None, control: str | None) -> list[str]:
    if weights:
        listed = [v for v in weights if v in names]
        return listed + sorted(set(names) - set(listed))
    first = control if control in names else sorted(names)[0]
    return [first, *sorted(set(names) - {first})]


def _served_metrics(frame: pd.DataFrame, popularity: pd.Series, catalogue: int) -> dict:
    """Coverage and novelty of a variant's served items; its latency and fallbacks."""
    items = pd.Series([i for row in frame["items"] for i in row], dtype="int64")
    total = float(popularity.sum()) + len(popularity) + 1
    # novelty: mean self-information of a served item under the pre-experiment popularity (add-one)
    novelty = float((-np.log2((popularity.reindex(items).fillna(0).to_numpy() + 1) / total)).mean()) if len(items) else None
    latency = frame["latency_ms"].dropna()
    return {"coverage": items.nunique() / catalogue if catalogue else None, "distinct_items": int(items.nunique()),
            "novelty_bits": novelty, "p99_latency_ms": float(np.percentile(latency, 99)) if len(latency) else None,
            "fallback_rate": float(frame["fallback"].notna().mean()), "model_versions": sorted(frame["model_version"].unique())}


def _guardrails(variants: list[dict], cfg: ABTestConfig, error_rate: float | None) -> list[dict]:
    checks = []
    for v in variants:
        for name, value, limit in (("p99_latency_ms", v["p99_latency_ms"], cfg.max_p99_latency_ms),
                                   ("fallback_rate", v["fallback_rate"], cfg.max_fallback_rate)):
            checks.append({"name": name, "variant": v["name"], "value": value, "limit": limit,
                           "ok": None if value is None else bool(value <= limit)})
    checks.append({"name": "error_rate", "variant": None, "value": error_rate, "limit": cfg.max_error_rate,
                   "ok": None if error_rate is None else bool(error_rate <= cfg.max_error_rate)})
    return checks


def _arrays(users: pd.DataFrame, variant: str, column: str) -> np.ndarray:
    return users.loc[users["variant"] == variant, column].to_numpy(dtype=float)


def _comparison(users: pd.DataFrame, control: str, treatment: str, metric: Metric, cfg: ABTestConfig) -> dict:
    raw, _ = metric.lift(users, control, treatment, cfg.alpha, cuped=False)
    primary, reduction = metric.lift(users, control, treatment, cfg.alpha, cfg.cuped)
    secondary = {name: m.lift(users, control, treatment, cfg.alpha, cuped=False)[0] for name, m in SECONDARY.items()}
    return {"control": control, "treatment": treatment, "primary": primary.as_dict(),
            "significant": primary.significant, "primary_unadjusted": raw.as_dict(),
            "cuped": {"on": cfg.cuped, "variance_reduction": reduction},
            "always_valid_p": msprt_p_value(primary.diff, primary.se, cfg.msprt_tau) if primary.se > 0 else None,
            "secondary": {k: e.as_dict() for k, e in secondary.items()}, "_estimate": primary}


def _timeline(exposures: pd.DataFrame, order: list[str], metric: Metric, cfg: ABTestConfig) -> dict:
    first, last = int(exposures["served_ms"].min()), int(exposures["served_ms"].max())
    unit, ms = bucket_size(first, last)
    ms = max(ms, math.ceil((last - first + 1) / MAX_BUCKETS / ms) * ms)
    bucket = (exposures["served_ms"] - first) // ms
    ends = [first + (b + 1) * ms for b in range(int(bucket.max()) + 1)]
    series = {v: [] for v in order}
    lift: list[dict] = []
    for b, end in enumerate(ends):
        active = per_user(exposures[bucket == b])
        for v in order:
            in_bucket = active[active["variant"] == v]
            series[v].append(metric.level(in_bucket) if len(in_bucket) else None)
        so_far = per_user(exposures[bucket <= b])
        point = {"end_ms": end}
        if len(order) >= 2 and all((so_far["variant"] == v).sum() >= 2 for v in order[:2]):
            est, _ = metric.lift(so_far, order[0], order[1], cfg.alpha, cuped=False)
            point.update(diff=est.diff, diff_low=est.diff_low, diff_high=est.diff_high)
        lift.append(point)
    first_bucket = exposures.assign(bucket=bucket).groupby(["variant", "user_id"])["bucket"].min()
    users_so_far = {v: [int((first_bucket.get(v, pd.Series(dtype="int64")) <= b).sum()) for b in range(len(ends))]
                    for v in order}
    return {"unit": unit, "bucket_ms": ms, "ends_ms": ends, "series": series, "cumulative_lift": lift,
            "users_so_far": users_so_far}


def scorecard(store: ABStore, experiment: str, cfg: ABTestConfig, *, weights: dict[str, float] | None = None,
              control: str | None = None, error_rate: float | None = None, now_ms: int | None = None) -> dict:
    exposures = store.exposure_frame(experiment)
    if exposures.empty:
        raise KeyError(f"experiment {experiment!r} has no exposures in the A/B store")
    metric = PRIMARY[cfg.primary_metric]
    first_ms = int(exposures["served_ms"].min())
    order = _order(sorted(exposures["variant"].unique()), weights, control)
    users = store.user_frame(experiment)                     # per-user sums in SQL
    pre = store.pre_period(users["user_id"].unique().tolist(), first_ms, cfg.pre_period_days)
    pre = pre.assign(pre_reward=pre["reward"], pre_events=pre["events"].astype(float),
                     pre_reward_per_event=(pre["reward"] / pre["events"].where(pre["events"] > 0)).fillna(0.0))
    users = users.merge(pre[["user_id", "pre_reward", "pre_events", "pre_reward_per_event"]], on="user_id", how="left")

    popularity = store.item_popularity(before_ms=first_ms)
    served_items = {i for row in exposures["items"] for i in row}
    catalogue = len(set(popularity.index) | served_items)
    variants = []
    for v in order:
        u, frame = users[users["variant"] == v], exposures[exposures["variant"] == v]
        variants.append({"name": v, "users": int(len(u)), "exposures": int(u["exposures"].sum()),
                         "items_served": int(u["items_served"].sum()), "primary": metric.level(u),
                         "reward_per_exposure": float(u["reward"].sum() / u["exposures"].sum()),
                         "reaction_rate": float(u["reacted"].sum() / max(1, u["items_served"].sum())),
                         "weight": (weights or {}).get(v), **_served_metrics(frame, popularity, catalogue)})

    comparisons = [_comparison(users, order[0], t, metric, cfg) for t in order[1:]
                   if min((users["variant"] == v).sum() for v in (order[0], t)) >= 2]
    timeline = _timeline(exposures, order, metric, cfg)

    counts = [v["users"] for v in variants]
    shares = [float((weights or {}).get(v, 0.0)) for v in order] if weights else [1.0] * len(order)
    srm = {"weights": shares, "weights_from": "A/B config" if weights else "assumed equal"}
    if len(order) >= 2 and all(s > 0 for s in shares):
        one_look = srm_test(counts, shares)
        path = np.array([timeline["users_so_far"][v] for v in order]).T          # (buckets, variants)
        sequential = sequential_srm(path, shares)
        srm.update(chi2=one_look["chi2"], p_value=one_look["p_value"], sequential_p_value=sequential["p_value"],
                   ok=bool(one_look["p_value"] >= SRM_P and sequential["p_value"] >= SRM_P))
    else:                       # one variant, or one the config gives no weight: no test (the same keys, None)
        srm.update(chi2=None, p_value=None, sequential_p_value=None, ok=None)
    guardrails = _guardrails(variants, cfg, error_rate)
    min_users = min(counts)
    control_y = _arrays(users, order[0], metric.num)          # the per-user spread (of the numerator)
    cv = float(control_y.std(ddof=1) / abs(control_y.mean())) if len(control_y) >= 2 and control_y.mean() else None
    min_data = {"users_per_variant": min_users, "needed": cfg.min_users, "ok": min_users >= cfg.min_users,
                "users_for_5pct_lift": min_users_for(MDE_REL, cv, cfg.alpha) if cv else None}
    healthy = srm["ok"] is not False and all(c["ok"] is not False for c in guardrails)
    health = {"ok": bool(healthy and min_data["ok"]), "srm": srm, "guardrails": guardrails, "min_data": min_data}

    decision, reason = "keep running", "only one variant has enough users to compare"
    for comp in comparisons:
        est: Estimate = comp.pop("_estimate")
        comp["decision"] = decide(est, enough_data=min_data["ok"], healthy=healthy)
    if comparisons:
        decision = comparisons[0]["decision"]
        reason = _reason(decision, comparisons[0], health)
    return {"experiment": experiment, "first_ms": first_ms, "last_ms": int(exposures["served_ms"].max()),
            "generated_ms": now_ms if now_ms is not None else int(time.time() * 1000),
            "primary_metric": cfg.primary_metric, "alpha": cfg.alpha, "control": order[0], "variants": variants,
            "comparisons": comparisons, "health": health, "decision": decision, "decision_reason": reason,
            "timeline": timeline}


def _reason(decision: str, comp: dict, health: dict) -> str:
    p = comp["primary"]
    lift = f"{p['diff']:+.4g} [{p['diff_low']:+.4g}, {p['diff_high']:+.4g}]"
    # in decide's order: an unhealthy experiment is stopped whatever its size, so its reason comes first
    if health["srm"]["ok"] is False:
        return "sample-ratio mismatch: the split is not what was configured; the comparison cannot be trusted"
    breached = [f"{c['name']}" + (f" ({c['variant']})" if c["variant"] else "") for c in health["guardrails"]
                if c["ok"] is False]
    if breached:
        return "guardrail breached: " + ", ".join(breached)
    if not health["min_data"]["ok"]:
        return f"{health['min_data']['users_per_variant']} users in the smallest variant, {health['min_data']['needed']} needed"
    return {"ship": f"{comp['treatment']} is better: {lift}",
            "stop": f"{comp['treatment']} is worse: {lift}"}.get(decision, f"no significant difference yet: {lift}")
