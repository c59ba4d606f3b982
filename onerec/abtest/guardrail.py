"""The automatic guardrail: a newly promoted champion that breaches a guardrail is rolled back.

    watcher = GuardrailWatcher(cfg.abtest, registry, store, metrics_url="http://predictor/metrics")
    watcher.check()          # one look -> {"state": idle | waiting | ok | rolled_back | cleared, ...}
    watcher.run(stop_event)  # a look every abtest.watch_interval_s (`onerec guardrail watch`)

A watch starts when the champion alias moves by a `promote` (the audit trail's last champion
event says so; a rollback or a manual `--to` starts none), or when the watcher starts while such a
promotion is the last one (a restarted watcher resumes; the error-rate baseline is then its first
look's). From then, for abtest.watch_for_s, each look
judges the new champion on what it served since its promotion (the A/B store's exposures of that
model version), once it served abtest.watch_min_requests of them:
  - p99 latency above abtest.max_p99_latency_ms,
  - fallback rate above abtest.max_fallback_rate,
  - the predictor's error rate since the promotion above abtest.max_error_rate (from its
    Prometheus counters, when a metrics URL is given),
  - reward per exposure significantly below the previous champion's over the same length of
    time before the promotion: the delta-method difference, tested with an always-valid (mSPRT)
    p-value whose running minimum over the looks is below abtest.alpha. A fixed-horizon CI checked
    at every look would roll back healthy champions far more often than alpha (18 % in a
    simulation of 120 looks); the mixture's scale is REWARD_TAU_REL of the level before.
A breach rolls the champion back to the version it replaced, with the reason in the audit trail
(`onerec model list --audit`, who: guardrail-watcher), and ends the watch; so does the window
passing without one (`cleared`).
The before/after comparison of rewards is confounded by time (a weekend, a campaign): it is a
tripwire for a broken model, not a substitute for the A/B test that promoted it.
"""
from __future__ import annotations

import calendar
import logging
import threading
import time
import urllib.request
from dataclasses import dataclass

import numpy as np

from onerec.abtest.scorecard import per_user
from onerec.abtest.stats import msprt_p_value, ratio_lift
from onerec.abtest.store import ABStore
from onerec.config import ABTestConfig, Config, ConfigError
from onerec.registry import CHAMPION, RegistryError

log = logging.getLogger(__name__)
ACTOR = "guardrail-watcher"
REWARD_TAU_REL = 0.2      # the reward test is most sensitive to drops of about 20 % of the level before


@dataclass
class Watch:
    version: str               # the newly promoted champion
    previous: str              # the champion it replaced: where a breach rolls back to
    since_ms: int              # when it was promoted
    base_counts: tuple[float, float] | None   # the predictor's (requests, errors) at the start
    min_reward_p: float = 1.0  # the running minimum of the reward test's always-valid p-value


def audit_ms(stamp: str) -> int:
    """An audit event's time ("2026-12-01T17:38:05.123Z") -> epoch ms."""
    seconds, _, frac = stamp.rstrip("Z").partition(".")
    # the fraction's first three digits are the ms, however many it has (".5" is 500 ms, not 5)
    return calendar.timegm(time.strptime(seconds, "%Y-%m-%dT%H:%M:%S")) * 1000 + int(frac[:3].ljust(3, "0"))


def predictor_counts(metrics_url: str, timeout_s: float = 2.0) -> tuple[float, float] | None:
    """The predictor's (requests, refused + failed requests) so far, from its Prometheus
    counters; None when unreadable. Bad requests (400) are the client's: not counted."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout_s) as resp:
            text = resp.read().decode()
    except (OSError, ValueError):
        return None
    totals: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    except ValueError:          # not a Prometheus exposition (a wrong URL's HTML page): unreadable too
        return None
    errors = totals.get("onerec_serving_overloaded_total", 0.0) + totals.get("onerec_serving_failures_total", 0.0)
    return totals.get("onerec_serving_request_seconds_count", 0.0), errors


class GuardrailWatcher:
    def __init__(self, cfg: ABTestConfig, registry, store: ABStore, metrics_url: str | None = None, clock=time.time):
        self.cfg, self.registry, self.store, self.metrics_url, self.clock = cfg, registry, store, metrics_url, clock
        self.champion = registry.alias_version(CHAMPION)
        self.watch: Watch | None = self._watch_for(self.champion)

    def _counts(self) -> tuple[float, float] | None:
        return predictor_counts(self.metrics_url) if self.metrics_url else None

    def _watch_for(self, champion: str | None) -> Watch | None:
        """A watch when the champion's last move was its promotion from an earlier champion."""
        moved = next((e for e in reversed(self.registry.audit_trail()) if e.alias == CHAMPION), None)
        if champion is None or moved is None or moved.action != "promote" or moved.to_version != champion \
                or moved.from_version is None:
            return None
        return Watch(champion, moved.from_version, audit_ms(moved.when), self._counts())

    def check(self) -> dict:
        current = self.registry.alias_version(CHAMPION)
        if current != self.champion:
            self.watch, self.champion = self._watch_for(current), current
        if self.watch is None:
            return {"state": "idle", "champion": current}
        w, now_ms = self.watch, int(self.clock() * 1000)
        if now_ms - w.since_ms > self.cfg.watch_for_s * 1000:
            self.watch = None
            return {"state": "cleared", "champion": current, "version": w.version}
        breaches, figures = self.judge(w, now_ms)
        if figures["requests"] < self.cfg.watch_min_requests:
            return {"state": "waiting", "champion": current, **figures}
        if not breaches:
            return {"state": "ok", "champion": current, **figures}
        reason = f"guardrail: v{w.version} breached " + "; ".join(breaches)
        try:
            self.registry.rollback(to=w.previous, reason=reason, who=ACTOR)
        except RegistryError as exc:        # someone moved it meanwhile: theirs is the newer decision
            log.warning("guardrail rollback of v%s failed: %s", w.version, exc)
            return {"state": "rollback_failed", "champion": current, "error": str(exc), **figures}
        self.watch, self.champion = None, w.previous
        log.warning("%s; rolled back to v%s", reason, w.previous)
        return {"state": "rolled_back", "champion": w.previous, "version": w.version, "reason": reason, **figures}

    def judge(self, w: Watch, now_ms: int) -> tuple[list[str], dict]:
        """-> (the breaches, in words; the figures judged)."""
        new = self.store.model_exposures(w.version, w.since_ms, now_ms + 1)
        figures: dict = {"version": w.version, "requests": int(len(new))}
        if len(new) < self.cfg.watch_min_requests:
            return [], figures
        breaches = []
        latency = new["latency_ms"].dropna()
        if len(latency):
            figures["p99_latency_ms"] = p99 = float(np.percentile(latency, 99))
            if p99 > self.cfg.max_p99_latency_ms:
                breaches.append(f"p99 latency {p99:.0f} ms > {self.cfg.max_p99_latency_ms:.0f} ms")
        figures["fallback_rate"] = fallback = float(new["fallback"].notna().mean())
        if fallback > self.cfg.max_fallback_rate:
            breaches.append(f"fallback rate {fallback:.1%} > {self.cfg.max_fallback_rate:.1%}")
        counts = self._counts()
        if counts is not None and w.base_counts is not None and counts[0] > w.base_counts[0]:
            figures["error_rate"] = rate = (counts[1] - w.base_counts[1]) / (counts[0] - w.base_counts[0])
            if rate > self.cfg.max_error_rate:
                breaches.append(f"error rate {rate:.1%} > {self.cfg.max_error_rate:.1%}")
        before = self.store.model_exposures(w.previous, 2 * w.since_ms - now_ms, w.since_ms)
        old_users, new_users = per_user(before), per_user(new)
        if len(old_users) >= 2 and len(new_users) >= 2:
            est = ratio_lift(old_users["reward"], old_users["exposures"], new_users["reward"], new_users["exposures"],
                             self.cfg.alpha)
            tau = REWARD_TAU_REL * abs(est.metric_control) or self.cfg.msprt_tau
            if est.se > 0:
                w.min_reward_p = min(w.min_reward_p, msprt_p_value(est.diff, est.se, tau))
            figures["reward_per_exposure"] = {"before": est.metric_control, "after": est.metric_treatment,
                                              "diff_low": est.diff_low, "diff_high": est.diff_high,
                                              "always_valid_p": w.min_reward_p}
            if w.min_reward_p < self.cfg.alpha and est.diff < 0:
                breaches.append(f"reward per exposure fell {est.metric_control:.3f} -> {est.metric_treatment:.3f} "
                                f"(always-valid p {w.min_reward_p:.2g} < {self.cfg.alpha:g})")
        return breaches, figures

    def run(self, stop: threading.Event, on_look=None) -> None:
        """A look every watch_interval_s until stop is set; a failed look is logged, not fatal."""
        while not stop.is_set():
            try:
                result = self.check()
                if on_look is not None:
                    on_look(result)
            except Exception as exc:  # noqa: BLE001 - MLflow or the store briefly down: look again later
                log.warning("guardrail look failed: %s", exc)
            stop.wait(self.cfg.watch_interval_s)


def open_watcher(cfg: Config, metrics_url: str | None = None) -> GuardrailWatcher:
    """The watcher on the configured registry and A/B store; refuses when abtest.watch is off."""
    from onerec.endpoints import MLFLOW_TRACKING_URI, ab_store_url, resolve_endpoints
    from onerec.registry import Registry

    if not cfg.abtest.watch:
        raise ConfigError("abtest.watch: the automatic guardrail is off in this config (--set abtest.watch=true)")
    registry = Registry.connect(resolve_endpoints(cfg.stack.state_dir).require(MLFLOW_TRACKING_URI), cfg.registry.model_name)
    return GuardrailWatcher(cfg.abtest, registry, ABStore.open(ab_store_url(cfg.stack.state_dir)), metrics_url)
