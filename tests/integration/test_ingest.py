"""Streaming ingestion on the real broker and Redis: the oracle, bad input, crashes, outages."""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import redis

from onerec import stack
from onerec.config import load_config
from onerec.data import load_dataset, online_split
from onerec.data.events import UserEvent
from onerec.endpoints import read_env_file
from onerec.features import store as feast_store
from onerec.features.backfill import backfill
from onerec.features.schema import CREATED_TS, EVENT_TS, ITEM_STATS, USER_AGGREGATES, USER_SEQUENCE, VIEWS
from onerec.features.state import FeatureState
from onerec.stream.ingest import open_ingestor
from onerec.stream.replay import interaction_events, publish
from tests.conftest import stack_config
from tests.oracle import assert_rows_match, expected_features

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    cfg = stack_config(tmp_path_factory.mktemp("stack"))
    stack.up(cfg)
    try:
        yield cfg
    finally:
        stack.down(cfg)


@dataclasses.dataclass
class Env:
    cfg: object
    bootstrap: str
    redis: redis.Redis
    args: list[str]  # the same config as CLI arguments, for subprocesses


@pytest.fixture
def env(running, tmp_path, monkeypatch):
    """The running stack with a fresh topic, group, feature state and Feast dir for this test."""
    tag = uuid.uuid4().hex[:8]
    monkeypatch.setenv(feast_store.FEAST_DIR_VAR, str(tmp_path / "feast"))
    overrides = [f"stack.state_dir={running.stack.state_dir}",
                 *(f"stack.{p}_port={getattr(running.stack, p + '_port')}" for p in ("kafka", "redis", "mlflow")),
                 f"kafka.user_events.name=events-{tag}", f"kafka.dlq.name=dlq-{tag}", f"ingest.group_id=ingest-{tag}"]
    cfg = load_config("debug", overrides)
    endpoints = read_env_file(Path(cfg.stack.state_dir) / "stack.env")
    stack.kafka_topics_ready(endpoints["KAFKA_BOOTSTRAP"], cfg.kafka)
    client = redis.Redis.from_url(endpoints["REDIS_URL"])
    client.flushdb()
    feast_store.apply_repo(cfg)
    args = ["--config", "debug", *[a for o in overrides for a in ("--set", o)]]
    return Env(cfg, endpoints["KAFKA_BOOTSTRAP"], client, args)


def online_rows(cfg, users: list[int], items: list[int]) -> dict[str, pd.DataFrame]:
    store = feast_store.open_store(cfg)
    out = {}
    for view, ids in ((USER_SEQUENCE, users), (USER_AGGREGATES, users), (ITEM_STATS, items)):
        refs = [f"{view.name}:{name}" for name in view.feature_names]
        rows = store.get_online_features(features=refs, entity_rows=[{view.join_key: i} for i in ids]).to_df()
        out[view.name] = rows
    return out


def assert_online_equals_oracle(cfg, events: list[UserEvent]) -> None:
    expected = expected_features(events, cfg.features.sequence_length, cfg.features.popularity_window_s)
    actual = online_rows(cfg, sorted(expected["user_aggregates"].index), sorted(expected["item_stats"].index))
    for view in VIEWS:
        assert not actual[view.name][view.feature_names].isna().any().any(), f"{view.name}: missing online rows"
        assert_rows_match(actual[view.name], expected[view.name], view.feature_names, view.join_key)


def real_events(cfg) -> tuple[list[UserEvent], list[UserEvent]]:
    """(history, live) of the debug slice of MovieLens, in the order each path sends them."""
    ds = load_dataset(cfg.data)
    split = online_split(ds.interactions, cfg.data)
    history = split.history.sort_values("timestamp", kind="stable")
    return list(interaction_events(history, ds.name)), list(interaction_events(split.live, ds.name))


def synthetic_events(n_users: int = 7, n_items: int = 11, n: int = 400, seed: int = 3) -> list[UserEvent]:
    """Every event type, with durations and ratings, in per-user time order."""
    import random
    rng = random.Random(seed)
    events, t = [], 1_700_000_000_000
    for k in range(n):
        t += rng.randint(0, 2_000_000_000)  # up to ~23 days apart: exercises the popularity window
        etype = rng.choice(["impression", "click", "play", "like", "skip", "rate"])
        play = round(rng.uniform(0, 600), 3) if etype in ("play", "skip") else None
        events.append(UserEvent(
            event_id=f"syn-{k}", user_id=rng.randrange(n_users), item_id=rng.randrange(n_items),
            event_type=etype, event_time_ms=t, play_duration_s=play,
            item_duration_s=round(rng.uniform(60, 900), 3) if play is not None or rng.random() < 0.3 else None,
            rating=float(rng.randint(1, 5)) if etype == "rate" else None))
    return events


# ----------------------------------------------------------------------------------------- tests

def test_feature_state_matches_the_oracle_on_every_event_type(env):
    events = synthetic_events()
    state = FeatureState(env.redis, env.cfg.features)
    assert state.apply(events[:150]).applied == 150
    assert state.apply(events[100:]).applied == len(events) - 150  # overlap: redelivery skipped
    rows = state.rows({e.user_id for e in events}, {e.item_id for e in events})
    expected = expected_features(events, env.cfg.features.sequence_length, env.cfg.features.popularity_window_s)
    for view in VIEWS:
        assert_rows_match(rows[view.name], expected[view.name], view.feature_names, view.join_key)


def test_an_event_that_breaks_the_scripts_line_format_fails_the_batch_before_any_write(env):
    events = synthetic_events(n=20)
    bad = dataclasses.replace(events[10], event_id="has\ttab")  # parse_event never lets one through
    state = FeatureState(env.redis, env.cfg.features)
    with pytest.raises(redis.ResponseError, match="malformed event line"):
        state.apply([*events[:10], bad, *events[11:]])
    assert env.redis.dbsize() == 0  # not even the first events' `seen` marks
    assert state.apply(events).applied == len(events)


def test_backfill_then_stream_equals_the_oracle_online_and_offline(env):
    history, live = real_events(env.cfg)
    result = backfill(env.cfg, env.redis, progress=False)
    assert result["history_events"] == result["applied"] == len(history)
    # after backfill alone, online features are the history's (materialized from the offline store)
    assert_online_equals_oracle(env.cfg, history)

    assert publish(live, env.bootstrap, env.cfg.kafka.user_events.name, progress=False) == len(live)
    # small batches interleave the partitions: an item's events then arrive out of event-time
    # order, which once left its online row stale (Feast drops rows that are not newer)
    small_batches = dataclasses.replace(env.cfg, ingest=dataclasses.replace(env.cfg.ingest, max_poll_records=50))
    ingestor = open_ingestor(small_batches)
    stats = ingestor.run(idle_exit_s=3)
    assert stats.consumed == stats.written == len(live) and stats.dlq == 0 and stats.duplicates == 0
    assert_online_equals_oracle(env.cfg, history + live)

    # offline: the latest row per entity is the online value
    expected = expected_features(history + live, env.cfg.features.sequence_length, env.cfg.features.popularity_window_s)
    for view in VIEWS:
        offline = pd.read_parquet(feast_store.feast_dir(env.cfg) / "offline" / view.name)
        latest = offline.sort_values(["event_timestamp", "created"]).groupby(view.join_key).tail(1)
        assert_rows_match(latest, expected[view.name], view.feature_names, view.join_key)
    observed = ingestor.metrics.registry.get_sample_value("onerec_ingest_freshness_seconds_count")
    assert observed == stats.written == len(live), f"freshness observed {observed} times; {stats.as_dict()}"


BAD_PAYLOADS = {
    b"{not json": "malformed_json",
    b'{"schema_version":1,"event_id":"x1","user_id":1,"item_id":2,"event_type":"click"}': "missing_field",
    b'{"schema_version":1,"event_id":"x2","user_id":1,"item_id":2,"event_type":"click","event_time_ms":900000000000,"extra":1}': "unknown_field",
    b'{"schema_version":1,"event_id":"x3","user_id":"1","item_id":2,"event_type":"click","event_time_ms":900000000000}': "wrong_type",
    b'{"schema_version":1,"event_id":"x4","user_id":1,"item_id":2,"event_type":"play","event_time_ms":900000000000,"play_duration_s":-3}': "out_of_range",
    b'{"schema_version":1,"event_id":"x5","user_id":1,"item_id":2,"event_type":"click","event_time_ms":99999999999999}': "out_of_range",
    b'{"pad":"' + b"x" * 20000 + b'"}': "too_large",
}


def test_bad_events_go_to_the_dlq_with_their_reason_and_ingestion_goes_on(env):
    from kafka import KafkaConsumer, KafkaProducer

    _, live = real_events(env.cfg)
    good = live[:300]
    producer = KafkaProducer(bootstrap_servers=env.bootstrap)
    topic = env.cfg.kafka.user_events.name
    for i, event in enumerate(good):
        producer.send(topic, key=str(event.user_id).encode(), value=event.to_json())
        if i % 50 == 0:  # interleave the bad ones
            for payload in BAD_PAYLOADS:
                producer.send(topic, key=str(event.user_id).encode(), value=payload)
    producer.flush()
    producer.close()
    n_bad = len(BAD_PAYLOADS) * 6

    stats = open_ingestor(env.cfg).run(idle_exit_s=3)
    assert stats.consumed == stats.written + stats.dlq == len(good) + n_bad
    assert stats.dlq == n_bad and stats.written == len(good)
    assert stats.dlq_reasons == {reason: 6 * list(BAD_PAYLOADS.values()).count(reason)
                                 for reason in set(BAD_PAYLOADS.values())}
    assert_online_equals_oracle(env.cfg, good)

    consumer = KafkaConsumer(env.cfg.kafka.dlq.name, bootstrap_servers=env.bootstrap,
                             auto_offset_reset="earliest", consumer_timeout_ms=5000)
    dead = list(consumer)
    consumer.close()
    assert len(dead) == n_bad
    for record in dead:
        headers = dict(record.headers)
        assert headers["dlq.reason"].decode() == BAD_PAYLOADS[record.value]
        assert headers["dlq.message"] and "source.offset" in headers


def _ingest_process(env, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "onerec.cli", "ingest", *env.args, *extra],
                            env={**os.environ}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _applied(env) -> int:
    return sum(1 for _ in env.redis.scan_iter("onerec:fs:seen:*", count=1000))


def test_sigkill_mid_stream_then_restart_loses_nothing_and_counts_nothing_twice(env):
    _, live = real_events(env.cfg)
    topic = env.cfg.kafka.user_events.name
    # The last fifth is held back until the kill, so the kill lands mid-stream however the
    # ingestor's batches happen to fall (one batch can take everything published so far).
    held_back, killed = len(live) * 4 // 5, threading.Event()

    def send():
        for i in range(100, len(live), 50):
            if i >= held_back:
                killed.wait(timeout=120)
            publish(live[i:i + 50], env.bootstrap, topic, progress=False)
            time.sleep(0.1)

    proc = _ingest_process(env)
    try:
        publish(live[:100], env.bootstrap, topic, progress=False)
        wait_for(lambda: _applied(env) >= 100, "the ingestor to start")  # joined and writing
        sender = threading.Thread(target=send)
        sender.start()
        wait_for(lambda: _applied(env) >= len(live) // 2, "half of the stream")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert _applied(env) < len(live), "the kill must land mid-stream"
    finally:
        proc.kill()
        killed.set()
    sender.join(timeout=120)
    restarted = _ingest_process(env, "--idle-exit", "3")
    out, _ = restarted.communicate(timeout=240)
    assert restarted.returncode == 0, out
    assert _applied(env) == len(live)
    assert_online_equals_oracle(env.cfg, live)


def test_redis_outage_is_retried_without_committing_and_caught_up(env):
    _, live = real_events(env.cfg)
    topic = env.cfg.kafka.user_events.name
    ingestor = open_ingestor(env.cfg)
    result = {}
    worker = threading.Thread(target=lambda: result.update(stats=ingestor.run(idle_exit_s=4)), daemon=True)
    worker.start()
    try:
        publish(live[:500], env.bootstrap, topic, progress=False)
        wait_for(lambda: _applied(env) >= 500, "the first 500 events")
        os.killpg(stack.status(env.cfg)[1].pid, signal.SIGKILL)  # Redis gone; its AOF keeps what it had
        publish(live[500:], env.bootstrap, topic, progress=False)
        wait_for(lambda: ingestor.stats.retries >= 3, "the ingestor to retry")
        stack.up(env.cfg)  # brings back only the part that is down, on the same port
        worker.join(timeout=120)
        assert not worker.is_alive()
    finally:
        ingestor.stop.set()  # never leave a retrying ingestor behind a failed assertion
    stats = result["stats"]
    assert stats.written == stats.consumed >= len(live) and stats.dlq == 0
    env.redis.connection_pool.disconnect()
    assert _applied(env) == len(live)
    assert_online_equals_oracle(env.cfg, live)


def test_online_rows_are_the_tuples_feasts_own_conversion_makes(env):
    """OnlineWriter builds Feast's online-write tuples itself; they equal Feast's `ingest_df` path."""
    _, live = real_events(env.cfg)
    state = FeatureState(env.redis, env.cfg.features)
    state.apply(live[:300])
    rows = state.rows({e.user_id for e in live[:300]}, {e.item_id for e in live[:300]})
    writer = feast_store.OnlineWriter(feast_store.open_store(env.cfg))
    for view in VIEWS:
        frame = rows[view.name]
        assert len(frame) > 0, view.name
        ours = feast_store.online_rows(view, frame)
        theirs = writer.provider._prep_rows_to_write_for_ingestion(
            writer.views[view.name], frame[view.columns].assign(**{EVENT_TS: frame[CREATED_TS]}))
        assert len(ours) == len(theirs), view.name
        for (key, values, ts, created), (key_t, values_t, ts_t, created_t) in zip(ours, theirs):
            assert key == key_t and values == values_t, (view.name, key, values, values_t)
            assert ts == ts_t.replace(tzinfo=None) and created == created_t.replace(tzinfo=None), view.name
