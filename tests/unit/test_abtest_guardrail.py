"""The automatic guardrail (onerec/abtest/guardrail.py): a fake registry (aliases, an audit trail,
rollback), a real SQLite A/B store holding what each model version served, a fixed clock, and a
real local /metrics for the predictor's error rate."""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from datetime import UTC, datetime

import numpy as np
import pytest

from onerec.abtest.guardrail import REWARD_TAU_REL, GuardrailWatcher, Watch, audit_ms
from onerec.abtest.stats import msprt_p_value, ratio_lift
from onerec.abtest.store import ABStore, exposures
from onerec.config import load_config
from onerec.registry import CHAMPION, AliasMove, AuditEvent, RegistryError
from tests.abtest_data import (
    DAY_MS,
    START_MS,
    MetricsServer,
    exposition,
    unreachable_url,
)

CFG = load_config("debug").abtest              # watch_min_requests 50, watch_for_s 600, p99 250 ms, fallback 25 %
T0 = START_MS + 5 * DAY_MS + 123               # the promotion, at 2025-12-06T00:00:00.123Z
WINDOW_MS = 300_000                            # the look comes 5 minutes after it


def stamp(ms: int) -> str:
    """An audit event's time as the registry writes it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


class FakeRegistry:
    """Aliases and an audit trail; rollback records its call and moves the champion (or raises)."""

    def __init__(self, champion: str | None = "3"):
        self.aliases: dict[str, str] = {}
        self.audit: list[AuditEvent] = []
        self.rollbacks: list[tuple[str | None, str]] = []
        self.fail: str | None = None
        if champion is not None:
            self.move("register-alias", champion, T0 - DAY_MS)

    def move(self, action: str, to: str, when_ms: int, who: str = "alice", reason: str = "") -> None:
        self.audit.append(AuditEvent(stamp(when_ms), who, action, CHAMPION, self.aliases.get(CHAMPION), to, reason))
        self.aliases[CHAMPION] = to

    def promote(self, to: str, when_ms: int = T0) -> None:
        self.move("promote", to, when_ms, reason="A/B won")

    def alias_version(self, alias: str) -> str | None:
        return self.aliases.get(alias)

    def audit_trail(self) -> list[AuditEvent]:
        return list(self.audit)

    def rollback(self, to: str | None = None, *, reason: str = "", dry_run: bool = False,
                 who: str | None = None) -> AliasMove:
        self.rollbacks.append((to, reason))
        if self.fail:
            raise RegistryError(self.fail)
        before = self.aliases.get(CHAMPION)
        self.move("rollback", to, T0 + WINDOW_MS, who=who, reason=reason)
        return AliasMove("rollback", ((CHAMPION, before, to),), reason, applied=True)


class Clock:
    def __init__(self, ms: int):
        self.ms = ms

    def __call__(self) -> float:
        return self.ms / 1000


def serve(store: ABStore, version: str, start_ms: int, n: int, *, span_ms: int = 280_000, users: int = 40,
          latency_ms: float = 20.0, fallback: float = 0.0, reward: float = 0.3, seed: int = 0,
          experiment: str | None = None) -> list[dict]:
    """n exposures of a model version in [start_ms, start_ms + span_ms): 3 items each, each item's
    reward `reward` + N(0, 0.5)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        items = [int(x) for x in rng.choice(np.arange(1, 100), size=3, replace=False)]
        rewards = [float(reward + rng.normal(0, 0.5)) for _ in items]
        rows.append({"request_id": f"{version}-{start_ms}-{seed}-{i}", "experiment": experiment, "variant": "default",
                     "model_version": version, "user_id": int(rng.integers(0, users)),
                     "fallback": "popular" if rng.random() < fallback else None,
                     "served_ms": start_ms + int(rng.integers(0, span_ms)), "items": items, "rewards": rewards,
                     "reward": float(sum(rewards)), "reacted": len(items),
                     "latency_ms": float(rng.gamma(4.0, latency_ms / 4.0))})
    assert store.add_exposures(rows) == n
    return rows


@pytest.fixture
def store(tmp_path):
    s = ABStore.open(f"sqlite:///{tmp_path}/ab.db")
    yield s
    s.close()


@pytest.fixture
def world(store):
    """Champion v3 served the 5 minutes before the promotion; the watcher knows v3; the clock is
    5 minutes after T0. The test promotes v4 and serves its traffic."""
    registry, clock = FakeRegistry("3"), Clock(T0 + WINDOW_MS)
    old = serve(store, "3", T0 - WINDOW_MS + 5_000, 200, seed=1)
    watcher = GuardrailWatcher(CFG, registry, store, clock=clock)
    return registry, clock, watcher, old


def rpe_estimate(before: list[dict], after: list[dict]):
    """The reward-per-exposure lift by hand: per-user sums of the rows, the delta method."""
    def sums(rows):
        users: dict[int, list[float]] = {}
        for r in rows:
            users.setdefault(r["user_id"], [0.0, 0])
            users[r["user_id"]][0] += r["reward"]
            users[r["user_id"]][1] += 1
        ordered = [users[u] for u in sorted(users)]
        return [s for s, _ in ordered], [n for _, n in ordered]
    (num_b, den_b), (num_a, den_a) = sums(before), sums(after)
    return ratio_lift(num_b, den_b, num_a, den_a, CFG.alpha)


# ------------------------------------------------------------------ when a watch starts


def test_idle_while_the_champion_stays(world, store):
    registry, clock, watcher, _ = world
    serve(store, "3", T0 + 1_000, 100, latency_ms=2_000.0, seed=3)        # awful, but not newly promoted
    for _ in range(3):
        assert watcher.check() == {"state": "idle", "champion": "3"}
        clock.ms += 60_000
    assert watcher.watch is None and registry.rollbacks == []


def test_a_promotion_starts_a_watch(world, store):
    registry, _, watcher, _ = world
    registry.promote("4")
    serve(store, "4", T0 + 1_000, 80, seed=3)
    result = watcher.check()
    assert result["state"] == "ok" and result["champion"] == "4" and result["version"] == "4"
    assert watcher.watch == Watch(version="4", previous="3", since_ms=T0, base_counts=None)
    assert watcher.champion == "4" and registry.rollbacks == []


@pytest.mark.parametrize("action", ["rollback", "register-alias"])
def test_a_rollback_or_a_manual_move_starts_none(world, store, action):
    registry, _, watcher, _ = world
    registry.move(action, "2", T0, reason="by hand")
    serve(store, "2", T0 + 1_000, 100, latency_ms=2_000.0, seed=3)
    assert watcher.check() == {"state": "idle", "champion": "2"}
    assert watcher.watch is None and watcher.champion == "2" and registry.rollbacks == []


def test_a_manual_move_during_a_watch_ends_it(world, store):
    registry, _, watcher, _ = world
    registry.promote("4")
    serve(store, "4", T0 + 1_000, 80, seed=3)
    assert watcher.check()["state"] == "ok"
    registry.move("rollback", "3", T0 + 2_000)                              # on-call rolled it back by hand
    assert watcher.check() == {"state": "idle", "champion": "3"} and watcher.watch is None


def test_the_first_champion_is_not_watched(store):
    registry, clock = FakeRegistry(champion=None), Clock(T0 + WINDOW_MS)
    watcher = GuardrailWatcher(CFG, registry, store, clock=clock)
    assert watcher.champion is None
    registry.promote("1")
    serve(store, "1", T0 + 1_000, 100, latency_ms=2_000.0)
    assert watcher.check() == {"state": "idle", "champion": "1"} and registry.rollbacks == []


def test_a_promotion_the_trail_does_not_show_starts_none(world, store):
    """The alias moved to v5 but the trail's last champion event promoted v4: not this promotion."""
    registry, _, watcher, _ = world
    registry.promote("4")
    registry.aliases[CHAMPION] = "5"
    serve(store, "5", T0 + 1_000, 100, latency_ms=2_000.0)
    assert watcher.check() == {"state": "idle", "champion": "5"}


# ------------------------------------------------------------------ judging


def test_waiting_below_the_minimum_requests(world, store):
    registry, _, watcher, _ = world
    registry.promote("4")
    serve(store, "4", T0 - 200_000, 100, span_ms=150_000, latency_ms=2_000.0, seed=13)   # served before its promotion: not counted
    serve(store, "4", T0 + 1_000, CFG.watch_min_requests - 1, latency_ms=2_000.0, seed=3)
    assert watcher.check() == {"state": "waiting", "champion": "4", "version": "4",
                               "requests": CFG.watch_min_requests - 1}
    assert registry.rollbacks == []
    serve(store, "4", T0 + 1_000, 1, latency_ms=2_000.0, seed=14)
    assert watcher.check()["state"] == "rolled_back"                      # the 50th request: judged


def test_healthy_traffic_is_ok_with_the_figures(world, store):
    registry, _, watcher, old = world
    registry.promote("4")
    new = serve(store, "4", T0 + 1_000, 120, fallback=0.1, seed=3)
    serve(store, "4", T0 + WINDOW_MS + 10, 5, latency_ms=5_000.0, seed=13)        # after the look: not yet served
    result = watcher.check()
    assert result["state"] == "ok" and result["requests"] == 120
    assert result["p99_latency_ms"] == pytest.approx(float(np.percentile([r["latency_ms"] for r in new], 99)))
    assert result["p99_latency_ms"] < CFG.max_p99_latency_ms
    assert result["fallback_rate"] == pytest.approx(sum(r["fallback"] is not None for r in new) / 120)
    assert "error_rate" not in result                                    # no metrics URL
    expected = rpe_estimate(old, new)
    assert result["reward_per_exposure"] == {
        "before": pytest.approx(expected.metric_control), "after": pytest.approx(expected.metric_treatment),
        "diff_low": pytest.approx(expected.diff_low), "diff_high": pytest.approx(expected.diff_high),
        "always_valid_p": pytest.approx(min(1.0, msprt_p_value(expected.diff, expected.se,
                                                               REWARD_TAU_REL * expected.metric_control)))}
    assert registry.rollbacks == [] and watcher.watch is not None


def test_a_latency_breach_rolls_back(world, store, caplog):
    registry, clock, watcher, _ = world
    registry.promote("4")
    new = serve(store, "4", T0 + 1_000, 80, latency_ms=400.0, seed=3)
    p99 = float(np.percentile([r["latency_ms"] for r in new], 99))
    with caplog.at_level(logging.WARNING, logger="onerec.abtest.guardrail"):
        result = watcher.check()
    assert result["state"] == "rolled_back" and result["champion"] == "3" and result["version"] == "4"
    assert result["reason"] == f"guardrail: v4 breached p99 latency {p99:.0f} ms > 250 ms"
    assert registry.rollbacks == [("3", result["reason"])]
    assert registry.aliases[CHAMPION] == "3" and registry.audit[-1].action == "rollback"
    assert "rolled back to v3" in caplog.text
    # then idle: the rollback it made starts no watch, and the old champion is not judged
    assert watcher.watch is None and watcher.champion == "3"
    clock.ms += 60_000
    assert watcher.check() == {"state": "idle", "champion": "3"} and len(registry.rollbacks) == 1


def test_a_fallback_breach_rolls_back(world, store):
    registry, _, watcher, _ = world
    registry.promote("4")
    new = serve(store, "4", T0 + 1_000, 100, fallback=0.5, seed=3)
    rate = sum(r["fallback"] is not None for r in new) / 100
    assert rate > CFG.max_fallback_rate
    result = watcher.check()
    assert result["state"] == "rolled_back" and result["fallback_rate"] == pytest.approx(rate)
    assert result["reason"] == f"guardrail: v4 breached fallback rate {rate:.1%} > 25.0%"
    assert "p99" not in result["reason"] and registry.rollbacks == [("3", result["reason"])]


def test_a_significant_reward_drop_rolls_back(world, store):
    registry, _, watcher, old = world
    registry.promote("4")
    new = serve(store, "4", T0 + 1_000, 150, reward=-0.2, seed=3)
    expected = rpe_estimate(old, new)
    assert expected.diff_high < 0
    result = watcher.check()
    assert result["state"] == "rolled_back"
    p = msprt_p_value(expected.diff, expected.se, REWARD_TAU_REL * expected.metric_control)
    assert result["reason"] == (f"guardrail: v4 breached reward per exposure fell {expected.metric_control:.3f} -> "
                                f"{expected.metric_treatment:.3f} (always-valid p {p:.2g} < 0.05)")
    assert result["reward_per_exposure"]["diff_high"] == pytest.approx(expected.diff_high)
    assert registry.audit[-1].who == "guardrail-watcher"


def test_repeated_looks_at_identical_models_rarely_roll_back(store):
    """The reward test is always valid: many looks at a new champion as good as the old one roll it
    back at most ~alpha of the time (a fixed-horizon CI at every look: far more often)."""
    rolled = 0
    for trial in range(40):
        registry, clock = FakeRegistry("3"), Clock(T0)
        serve(store, "3", T0 - 600_000, 400, span_ms=600_000, seed=1000 + trial)
        registry.promote("4")
        watcher = GuardrailWatcher(CFG, registry, store, clock=clock)   # started after it: resumes the watch
        serve(store, "4", T0, 400, span_ms=600_000, seed=2000 + trial)
        for look in range(1, 11):                                       # every minute for 10 minutes
            clock.ms = T0 + look * 60_000
            if watcher.check()["state"] == "rolled_back":
                rolled += 1
                break
        store.engine.dispose()
        with store.engine.begin() as conn:
            conn.execute(exposures.delete())
    assert rolled <= 4                                                  # 10 %: alpha 5 % + Monte-Carlo slack


def test_a_small_insignificant_drop_is_ok(world, store):
    registry, _, watcher, old = world
    registry.promote("4")
    new = serve(store, "4", T0 + 1_000, 150, reward=0.27, seed=3)
    expected = rpe_estimate(old, new)
    result = watcher.check()
    rpe = result["reward_per_exposure"]
    assert rpe["after"] < rpe["before"] and rpe["diff_low"] < 0 < rpe["diff_high"]     # lower, not significantly
    assert rpe["after"] == pytest.approx(expected.metric_treatment)
    assert result["state"] == "ok" and registry.rollbacks == []


def test_the_before_window_is_as_long_as_the_after_window(world, store):
    """Only the previous champion's exposures in [since - (now - since), since) are the baseline:
    a bad hour of it before that does not excuse a drop."""
    registry, _, watcher, old = world
    serve(store, "3", T0 - 2 * WINDOW_MS + 5_000, 400, span_ms=WINDOW_MS - 10_000, reward=-1.0, seed=5)  # just before it
    serve(store, "3", T0 - 3_600_000, 400, reward=-1.0, seed=6)                                        # an hour before
    registry.promote("4")
    new = serve(store, "4", T0 + 1_000, 150, reward=-0.2, seed=3)
    result = watcher.check()
    assert result["reward_per_exposure"]["before"] == pytest.approx(rpe_estimate(old, new).metric_control)
    assert result["state"] == "rolled_back"


def test_an_error_rate_breach_from_the_predictor_metrics(store):
    registry, clock = FakeRegistry("3"), Clock(T0 + WINDOW_MS)
    serve(store, "3", T0 - WINDOW_MS + 5_000, 200, seed=1)
    with MetricsServer(exposition(requests=1_000, overloaded=1, failures=1, bad_requests=10)) as server:
        watcher = GuardrailWatcher(CFG, registry, store, metrics_url=server.url, clock=clock)
        registry.promote("4")
        serve(store, "4", T0 + 1_000, 100, seed=3)
        first = watcher.check()                              # the watch starts here: the counters' base
        assert watcher.watch.base_counts == (1_000.0, 2.0)
        assert first["state"] == "ok" and "error_rate" not in first      # no request since the base yet
        server.text = exposition(requests=1_200, overloaded=2, failures=2, bad_requests=90)   # 2 errors / 200
        second = watcher.check()
        assert second["state"] == "ok" and second["error_rate"] == pytest.approx(0.01)       # at the limit: ok
        server.text = exposition(requests=1_400, overloaded=8, failures=6, bad_requests=500)  # 12 errors / 400
        third = watcher.check()
    assert third["error_rate"] == pytest.approx(0.03) and third["state"] == "rolled_back"
    assert third["reason"] == "guardrail: v4 breached error rate 3.0% > 1.0%"     # 400s do not count
    assert registry.rollbacks == [("3", third["reason"])]


def test_an_unreachable_predictor_is_judged_without_its_error_rate(world, store):
    registry, clock, _, _ = world
    watcher = GuardrailWatcher(CFG, registry, store, metrics_url=unreachable_url(), clock=clock)
    registry.promote("4")
    serve(store, "4", T0 + 1_000, 100, latency_ms=400.0, seed=3)
    result = watcher.check()
    assert watcher.watch is None and "error_rate" not in result and result["state"] == "rolled_back"


def test_a_metrics_url_that_is_not_prometheus_is_judged_without_its_error_rate(world, store):
    """A wrong URL answering 200 with a web page: no error rate, and the other guardrails still act."""
    registry, clock, _, _ = world
    with MetricsServer("<html><body>the predictor's home page</body></html>", "text/html") as server:
        watcher = GuardrailWatcher(CFG, registry, store, metrics_url=server.url, clock=clock)
        registry.promote("4")
        serve(store, "4", T0 + 1_000, 100, latency_ms=400.0, seed=3)
        result = watcher.check()
        assert server.hits == 2                                 # at the watch's start and at the look
    assert result["state"] == "rolled_back" and "error_rate" not in result


def test_cleared_after_the_watch_window(world, store):
    registry, clock, watcher, _ = world
    registry.promote("4")
    serve(store, "4", T0 + 1_000, 100, seed=3)
    assert watcher.check()["state"] == "ok"
    clock.ms = T0 + int(CFG.watch_for_s * 1000)                          # the window's last instant: still judged
    assert watcher.check()["state"] == "ok"
    serve(store, "4", T0 + WINDOW_MS, 100, latency_ms=2_000.0, seed=13)   # too late to count
    clock.ms += 1
    assert watcher.check() == {"state": "cleared", "champion": "4", "version": "4"}
    assert watcher.watch is None
    assert watcher.check() == {"state": "idle", "champion": "4"} and registry.rollbacks == []


def test_a_failed_rollback_is_reported_not_raised(world, store, caplog):
    registry, _, watcher, _ = world
    registry.promote("4")
    serve(store, "4", T0 + 1_000, 100, latency_ms=400.0, seed=3)
    registry.fail = "version 3 is already the champion"
    with caplog.at_level(logging.WARNING, logger="onerec.abtest.guardrail"):
        result = watcher.check()
    assert result["state"] == "rollback_failed" and result["champion"] == "4"
    assert result["error"] == "version 3 is already the champion" and result["p99_latency_ms"] > 250
    assert "rollback of v4 failed" in caplog.text
    assert registry.aliases[CHAMPION] == "4" and watcher.watch is not None     # still watching: it tries again
    registry.fail = None
    assert watcher.check()["state"] == "rolled_back" and len(registry.rollbacks) == 2


# ------------------------------------------------------------------ the loop


def test_run_looks_until_stopped_and_survives_a_failed_look(world, store, monkeypatch, caplog):
    registry, _, watcher, _ = world
    watcher.cfg = dataclasses.replace(CFG, watch_interval_s=0.001)
    registry.promote("4")
    serve(store, "4", T0 + 1_000, 100, seed=3)
    real_check, calls, looks = watcher.check, [], []
    stop = threading.Event()

    def flaky_check():
        calls.append(len(calls))
        if len(calls) == 2:
            raise ConnectionError("MLflow is briefly down")
        return real_check()

    def on_look(result):
        looks.append(result)
        if len(looks) == 3:
            stop.set()

    monkeypatch.setattr(watcher, "check", flaky_check)
    thread = threading.Thread(target=watcher.run, args=(stop,), kwargs={"on_look": on_look}, daemon=True)
    with caplog.at_level(logging.WARNING, logger="onerec.abtest.guardrail"):
        thread.start()
        thread.join(10)
    assert not thread.is_alive() and stop.is_set()
    assert len(calls) == 4 and [r["state"] for r in looks] == ["ok", "ok", "ok"]     # the 2nd look raised
    assert "guardrail look failed: MLflow is briefly down" in caplog.text


def test_run_returns_at_once_when_already_stopped(world):
    _, _, watcher, _ = world
    stop = threading.Event()
    stop.set()
    looks = []
    watcher.run(stop, on_look=looks.append)
    assert looks == []


# ------------------------------------------------------------------ audit times


@pytest.mark.parametrize(("text", "ms"), [
    ("2026-12-01T17:38:05.123Z", 1_796_146_685_123),
    ("2026-12-01T17:38:05.000Z", 1_796_146_685_000),
    ("2026-12-01T17:38:05Z", 1_796_146_685_000),
    ("2026-12-01T17:38:05.5Z", 1_796_146_685_500),          # ISO 8601's fraction of a second, not ms
    ("2026-12-01T17:38:05.123456Z", 1_796_146_685_123),
    ("1970-01-01T00:00:00.001Z", 1),
    ("2024-02-29T23:59:59.999Z", int(datetime(2024, 2, 29, 23, 59, 59, tzinfo=UTC).timestamp()) * 1000 + 999),
])
def test_audit_ms(text, ms):
    assert audit_ms(text) == ms


def test_audit_ms_reads_the_registry_stamps():
    """The registry's own format (Registry.move), at arbitrary instants."""
    for now in (T0 / 1000, 1_796_146_685.0, 1_796_146_685.999, 1_000_000_000.042):
        written = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
        assert audit_ms(written) == int(now * 1000)
    assert audit_ms(stamp(T0)) == T0


def test_a_watcher_started_after_a_promotion_resumes_its_watch(store):
    registry, clock = FakeRegistry("3"), Clock(T0 + WINDOW_MS)
    serve(store, "3", T0 - WINDOW_MS + 5_000, 200, seed=1)
    registry.promote("4")
    serve(store, "4", T0 + 1_000, 80, latency_ms=400.0, seed=3)
    watcher = GuardrailWatcher(CFG, registry, store, clock=clock)       # a restarted watcher
    assert watcher.watch == Watch(version="4", previous="3", since_ms=T0, base_counts=None)
    assert watcher.check()["state"] == "rolled_back" and registry.aliases[CHAMPION] == "3"
