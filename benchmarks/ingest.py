"""Ingestion benchmark: Kafka -> validate -> feature state (Redis) -> Feast online + offline.

    .venv/bin/python benchmarks/ingest.py [--preset small] [--events N] [--rate 1000]
                                          [--seconds 20] [--samples 200] [--json PATH]

Starts its own embedded stack (free loopback ports, temporary state and Feast directories),
always stops it at the end, and measures on the same MovieLens 100K events:

  (a) baseline: a bare kafka-python consumer (fresh group, the ingestor's consumer settings),
      no processing: events/s from the first non-empty poll to the last record (the group
      join excluded; the first batch, fetched before the interval, is not counted);
  (b) ours: `Ingestor` (fresh group) over the same topic, from the first non-empty poll to the
      moment every event is in Feast online (and to the end of its offline flush): events/s,
      and the ratio (b)/(a);
  (c) freshness: a producer publishes new events at --rate events/s for --seconds while an
      ingestor (its own process, as `onerec ingest` runs) consumes them; for --samples events
      spread over the run, the time from produce to the value being readable through
      `get_online_features` (p50/p99), plus the ingestor's own freshness (Kafka record time ->
      pushed online).

After (b) and after (c) it also checks the online store against the feature state: every user's
online `event_count` and every item's online `interactions` should equal the state's counts.

Prints a table, then, as the last line of stdout, one JSON line with every figure.
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import platform
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when run as a script

from onerec import stack  # noqa: E402
from onerec.cli import emit_figures  # noqa: E402
from onerec.config import load_config  # noqa: E402
from onerec.endpoints import KAFKA_BOOTSTRAP, MLFLOW_TRACKING_URI, REDIS_URL, read_env_file  # noqa: E402
from onerec.features import store as feast_store  # noqa: E402

WARMUP_EVENTS = 200          # (c): events sent (and seen online) before the timed run starts
WARMUP_SKIP_S = 2.0          # (c): no samples in the first seconds of the timed run
VISIBLE_TIMEOUT_S = 15.0     # (c): a sample not visible this long after the end counts as lost
JOIN_TIMEOUT_S = 60.0        # any consumer-group join
POLL_INTERVAL_S = 0.005      # (c): the reader's pause between online lookups (the resolution)
CHILD_START_TIMEOUT_S = 120.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def quantile_ms(values_s: list[float], q: float) -> float | None:
    if not values_s:
        return None
    ordered = sorted(values_s)
    index = min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))
    return round(ordered[index] * 1000.0, 1)


def config_for(base_overrides: list[str], preset: str, **extra: str):
    overrides = [*base_overrides, *(f"{k}={v}" for k, v in extra.items())]
    return load_config(preset, overrides)


# --------------------------------------------------------------------------- events

def movielens_events(cfg, limit: int | None):
    """MovieLens interactions in event-time order (ties: user, file order), as user events."""
    from onerec.data import load_dataset
    from onerec.stream.replay import interaction_events

    dataset = load_dataset(cfg.data)
    df = dataset.interactions.sort_values(["timestamp", "user_id"], kind="stable").reset_index(drop=True)
    if limit:
        df = df.iloc[:limit]
    return dataset.name, list(interaction_events(df, dataset.name))


# --------------------------------------------------------------------------- (a) raw consumer

def raw_consume(cfg, bootstrap: str, topic: str, n: int, timeout_s: float) -> dict:
    from kafka import KafkaConsumer

    from onerec.stream.ingest import GROUP_TIMEOUTS

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=f"bench-raw-{uuid.uuid4().hex[:8]}",
                             enable_auto_commit=False, auto_offset_reset="earliest",
                             max_poll_records=cfg.ingest.max_poll_records, client_id="bench-raw",
                             **GROUP_TIMEOUTS)
    consumer.subscribe([topic])
    started, first, count, byte_count, first_batch, polls = time.monotonic(), None, 0, 0, 0, 0
    deadline = started + timeout_s
    try:
        while count < n and time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=cfg.ingest.poll_timeout_ms)
            if batch and first is None:
                first = time.monotonic()
                first_batch = sum(len(r) for r in batch.values())
            polls += 1 if batch else 0
            for records in batch.values():
                count += len(records)
                byte_count += sum(len(r.value) for r in records)
        last = time.monotonic()
        # a member that leaves in the middle of its join leaves the group stuck on Tansu
        join_deadline = time.monotonic() + 15
        while not consumer.assignment() and time.monotonic() < join_deadline:
            consumer.poll(timeout_ms=100)
    finally:
        consumer.close()
    if count < n:
        raise RuntimeError(f"raw consumer read {count}/{n} records within {timeout_s:.0f}s")
    # the interval [first poll returned, last poll returned] holds the fetches of every batch but
    # the first, so the first batch's records are not counted (needs more than one batch)
    seconds = last - first
    rate = round((count - first_batch) / seconds) if polls > 1 and seconds > 0 else None
    return {"records": count, "bytes": byte_count, "join_s": round(first - started, 2), "batches": polls,
            "first_batch": first_batch, "seconds": round(seconds, 3), "events_per_s": rate}


# --------------------------------------------------------------------------- (b) the ingestor

def ingest_throughput(cfg, n: int, timeout_s: float) -> dict:
    from onerec.stream.ingest import open_ingestor

    ingestor = open_ingestor(cfg)
    marks: dict[str, float] = {}
    process, push, flush = ingestor._process, ingestor._push_online, ingestor._flush

    def timed_process(batch, consumer, dlq):  # called right after a poll that returned records
        marks.setdefault("first", time.monotonic())
        process(batch, consumer, dlq)

    def timed_push(consumer):
        push(consumer)
        if ingestor.stats.written >= n and "online" not in marks:  # every event pushed to Feast online
            marks["online"] = time.monotonic()

    def timed_flush(consumer, dlq):
        flush(consumer, dlq)
        if "online" in marks:
            marks["flushed"] = time.monotonic()

    ingestor._process, ingestor._push_online, ingestor._flush = timed_process, timed_push, timed_flush
    started = time.monotonic()
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(stats=ingestor.run(idle_exit_s=30, max_records=n)),
                              name="ingestor", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        ingestor.stop.set()
        thread.join(30)
        raise RuntimeError(f"ingestor did not finish {n} events within {timeout_s:.0f}s "
                           f"(stats {ingestor.stats.as_dict()})")
    stats = ingestor.stats
    if "online" not in marks:
        raise RuntimeError(f"ingestor stopped before writing all {n} events: {stats.as_dict()}")
    online_s, flushed_s = marks["online"] - marks["first"], marks["flushed"] - marks["first"]
    fresh = ingestor.metrics.freshness
    return {"stats": stats.as_dict(), "join_s": round(marks["first"] - started, 2),
            "seconds": round(online_s, 3), "events_per_s": round(n / online_s),
            "seconds_with_flush": round(flushed_s, 3), "events_per_s_with_flush": round(n / flushed_s),
            "batches": stats.batches, "freshness_hist": fresh, "ingestor": ingestor}


def online_vs_state(store, client) -> dict:
    """Online rows against the feature state in Redis: every user's `event_count` and every item's
    `interactions` should equal the state's counts once the ingestor has written its batches."""
    from onerec.features.state import PREFIX

    def compare(kind, state_key, field, feature, join_key):
        ids = sorted(int(k.rsplit(b":", 1)[1]) for k in client.scan_iter(f"{PREFIX}{state_key}:*", count=1000))
        pipe = client.pipeline(transaction=False)
        for i in ids:
            pipe.hget(f"{PREFIX}{state_key}:{i}", field)
        state = [int(v or 0) for v in pipe.execute()]
        online = store.get_online_features(features=[feature], entity_rows=[{join_key: i} for i in ids]).to_dict()
        stale = [(i, s, o) for i, s, o in zip(ids, state, online[feature.split(":")[1]]) if o != s]
        return {f"{kind}": len(ids), f"stale_{kind}": len(stale), f"{kind}_examples": stale[:3]}

    return {**compare("users", "u", "events", "user_aggregates:event_count", "user_id"),
            **compare("items", "i", "interactions", "item_stats:interactions", "item_id")}


# --------------------------------------------------------------------------- (c) freshness

def _ingestor_child(overrides: list[str], preset: str, env: dict, results, stop_evt, total: int) -> None:
    """The ingestor in its own process, as `onerec ingest` runs: reports stats and raw freshness."""
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us through stop_evt
    try:
        from onerec.stream.ingest import open_ingestor

        cfg = load_config(preset, overrides)
        ingestor = open_ingestor(cfg)
        observed: list[tuple[float, float]] = []
        hist = ingestor.metrics.freshness

        class Recording:  # the library's histogram, plus the raw values for exact quantiles
            def observe_many(self, values):
                now = time.time()
                observed.extend((now, float(v)) for v in values)
                hist.observe_many(values)

        ingestor.metrics.freshness = Recording()
        def watch_stop():  # polls: a process that dies inside Event.wait() leaves Event.set() hanging
            while not stop_evt.is_set():
                time.sleep(0.1)
            ingestor.stop.set()

        threading.Thread(target=watch_stop, daemon=True).start()
        results.put(("ready", None))
        stats = ingestor.run(idle_exit_s=None, max_records=total)
        results.put(("done", {"stats": stats.as_dict(), "observed": observed}))
    except BaseException as exc:  # noqa: BLE001 (reported to the parent)
        results.put(("error", f"{type(exc).__name__}: {exc}"))


def freshness(cfg, overrides: list[str], preset: str, bootstrap: str, events, rate: float,
              seconds: float, samples: int) -> dict:
    from kafka import KafkaProducer

    topic = cfg.kafka.user_events.name
    n_timed = int(rate * seconds)
    total = WARMUP_EVENTS + n_timed
    tag = uuid.uuid4().hex[:8]
    ctx = mp.get_context("spawn")
    results, stop_evt = ctx.Queue(), ctx.Event()
    env = {k: os.environ[k] for k in (KAFKA_BOOTSTRAP, REDIS_URL, MLFLOW_TRACKING_URI, feast_store.FEAST_DIR_VAR)}
    child = ctx.Process(target=_ingestor_child, args=(overrides, preset, env, results, stop_evt, total),
                        name="bench-ingestor", daemon=True)
    child.start()
    store = feast_store.open_store(cfg)
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, retries=5)
    last_ms: dict[int, int] = {}

    def fresh_event(i: int):
        e = events[i % len(events)]
        t = max(int(time.time() * 1000), last_ms.get(e.user_id, 0) + 1)  # strictly increasing per user
        last_ms[e.user_id] = t
        return dataclasses.replace(e, event_id=f"live-{tag}-{i}", event_time_ms=t)

    def send(event):
        producer.send(topic, key=str(event.user_id).encode(), value=event.to_json())

    def read_last_active(users: list[int]) -> dict[int, int | None]:
        out = store.get_online_features(features=["user_aggregates:last_active_ms"],
                                        entity_rows=[{"user_id": u} for u in users]).to_dict()
        return dict(zip(out["user_id"], out["last_active_ms"]))

    try:
        kind, payload = results.get(timeout=CHILD_START_TIMEOUT_S)
        if kind != "ready":
            raise RuntimeError(f"ingestor process failed to start: {payload}")
        # warm-up: the group join and first batches happen before the timed run
        warm = [fresh_event(i) for i in range(WARMUP_EVENTS)]
        for e in warm:
            send(e)
        producer.flush(timeout=30)
        deadline, target = time.monotonic() + JOIN_TIMEOUT_S, warm[-1]
        while (read_last_active([target.user_id]).get(target.user_id) or 0) < target.event_time_ms:
            if time.monotonic() > deadline or not child.is_alive():
                raise RuntimeError("(c) warm-up events never became visible online "
                                   f"(ingestor alive: {child.is_alive()})")
            time.sleep(0.05)
        log(f"(c) warm-up visible; producing {n_timed} events at {rate:g}/s for {seconds:g}s")

        pending: list[tuple[int, int, float]] = []  # (user, marker, produced at, monotonic)
        lock = threading.Lock()
        latencies: list[float] = []
        producing_done = threading.Event()
        reads = [0]

        def poller():
            end_by = None
            while True:
                with lock:
                    todo = list(pending)
                if not todo:
                    if producing_done.is_set():
                        return
                    time.sleep(0.001)
                    continue
                if producing_done.is_set():
                    end_by = end_by or time.monotonic() + VISIBLE_TIMEOUT_S
                    if time.monotonic() > end_by:
                        return
                values = read_last_active(sorted({u for u, _, _ in todo}))
                now = time.monotonic()
                reads[0] += 1
                done = [s for s in todo if (values.get(s[0]) or 0) >= s[1]]
                if done:
                    with lock:
                        for s in done:
                            pending.remove(s)
                            latencies.append(now - s[2])
                time.sleep(POLL_INTERVAL_S)

        poll_thread = threading.Thread(target=poller, name="poller", daemon=True)
        poll_thread.start()
        skip = int(WARMUP_SKIP_S * rate)
        stride = max(1, (n_timed - skip) // max(1, samples))
        sampled = 0
        t_start = time.monotonic()
        wall_start = time.time()
        for j in range(n_timed):
            due = t_start + j / rate
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            i = WARMUP_EVENTS + j
            e = fresh_event(i)
            is_sample = j >= skip and (j - skip) % stride == 0 and sampled < samples
            produced_at = time.monotonic()
            send(e)
            if is_sample:
                sampled += 1
                with lock:
                    pending.append((e.user_id, e.event_time_ms, produced_at))
        produce_s = time.monotonic() - t_start
        producer.flush(timeout=30)
        producing_done.set()
        poll_thread.join(VISIBLE_TIMEOUT_S + 30)
        with lock:
            lost = len(pending)

        # the ingestor stops by itself after `total` records; bounded wait, then ask it to stop
        done_payload = None
        try:
            kind, payload = results.get(timeout=60)
            if kind == "error":
                raise RuntimeError(f"ingestor process failed: {payload}")
            done_payload = payload
        except queue.Empty:
            stop_evt.set()
            kind, payload = results.get(timeout=30)
            done_payload = payload if kind == "done" else None
        observed = [v for t, v in (done_payload or {}).get("observed", []) if t >= wall_start + WARMUP_SKIP_S]
        return {"produced": n_timed, "produce_s": round(produce_s, 2),
                "achieved_rate": round(n_timed / produce_s), "samples": sampled, "lost": lost,
                "reads": reads[0],
                "p50_ms": quantile_ms(latencies, 0.5), "p99_ms": quantile_ms(latencies, 0.99),
                "max_ms": quantile_ms(latencies, 1.0),
                "ingestor_p50_ms": quantile_ms(observed, 0.5), "ingestor_p99_ms": quantile_ms(observed, 0.99),
                "ingestor_stats": (done_payload or {}).get("stats")}
    finally:
        stop_evt.set()
        producer.close(timeout=5)
        child.join(30)
        if child.is_alive():
            child.terminate()
            child.join(10)


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--events", type=int, default=None, help="cap on the MovieLens events (default all)")
    parser.add_argument("--rate", type=float, default=1000.0, help="(c) events/s")
    parser.add_argument("--seconds", type=float, default=20.0, help="(c) how long to produce")
    parser.add_argument("--samples", type=int, default=200, help="(c) events whose visibility is timed")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    def on_term(*_):
        raise SystemExit(143)  # unwinds through the finally below: the stack is always stopped
    signal.signal(signal.SIGTERM, on_term)

    load_start = round(os.getloadavg()[0], 2)  # other work on the machine skews every figure
    tmp = Path(tempfile.mkdtemp(prefix="onerec-bench-ingest-"))
    tag = uuid.uuid4().hex[:8]
    base = stack.isolated_overrides(tmp / "stack")
    cfg = load_config(args.preset, base)
    os.environ[feast_store.FEAST_DIR_VAR] = str(tmp / "feast")
    stack_started = False
    try:
        log(f"starting the embedded stack in {tmp}")
        t0 = time.monotonic()
        stack_started = True
        stack.up(cfg)
        env = read_env_file(Path(cfg.stack.state_dir) / "stack.env")
        for var in (KAFKA_BOOTSTRAP, REDIS_URL, MLFLOW_TRACKING_URI):
            os.environ[var] = env[var]  # ours, whatever the shell had
        bootstrap = env[KAFKA_BOOTSTRAP]
        log(f"stack up in {time.monotonic() - t0:.1f}s; applying the Feast repo")
        feast_store.apply_repo(cfg)

        bench_overrides = [*base, f"kafka.user_events.name=bench-events-{tag}",
                           f"kafka.dlq.name=bench-dlq-{tag}", f"ingest.group_id=bench-ingest-{tag}"]
        bcfg = load_config(args.preset, bench_overrides)
        stack.kafka_topics_ready(bootstrap, bcfg.kafka)
        dataset, events = movielens_events(bcfg, args.events)
        n = len(events)
        log(f"publishing {n} {dataset} events to {bcfg.kafka.user_events.name} "
            f"({bcfg.kafka.user_events.partitions} partitions)")
        from onerec.stream.replay import publish
        t_pub = time.monotonic()
        publish(events, bootstrap, bcfg.kafka.user_events.name, total=n, progress=False)
        publish_s = time.monotonic() - t_pub

        log("(a) raw kafka-python consumer")
        raw = raw_consume(bcfg, bootstrap, bcfg.kafka.user_events.name, n, timeout_s=JOIN_TIMEOUT_S + n / 500)
        log(f"(a) {raw['events_per_s']} events/s ({raw['batches']} batches)")

        log("(b) Ingestor -> Feast online + offline")
        ours = ingest_throughput(bcfg, n, timeout_s=JOIN_TIMEOUT_S + n / 100)
        log(f"(b) {ours['events_per_s']} events/s")
        ingestor_b = ours.pop("ingestor")
        consistency = online_vs_state(ingestor_b.store, ingestor_b.state.client)
        ours.pop("freshness_hist")

        fcfg_overrides = [*base, f"kafka.user_events.name=bench-live-{tag}",
                          f"kafka.dlq.name=bench-dlq-{tag}", f"ingest.group_id=bench-live-{tag}"]
        fcfg = load_config(args.preset, fcfg_overrides)
        stack.kafka_topics_ready(bootstrap, fcfg.kafka)
        log(f"(c) freshness at {args.rate:g} events/s")
        fresh = freshness(fcfg, fcfg_overrides, args.preset, bootstrap, events, args.rate, args.seconds,
                          args.samples)
        consistency_c = online_vs_state(ingestor_b.store, ingestor_b.state.client)  # (b) + (c) in the state
    finally:
        if stack_started:
            log("stopping the stack")
            stack.down(cfg)
        shutil.rmtree(tmp, ignore_errors=True)

    ratio = ours["events_per_s"] / raw["events_per_s"] if raw["events_per_s"] else None
    figures = {
        "benchmark": "ingest", "preset": args.preset, "dataset": dataset, "events": n,
        "partitions": bcfg.kafka.user_events.partitions, "max_poll_records": bcfg.ingest.max_poll_records,
        "publish_events_per_s": round(n / publish_s),
        "raw_events_per_s": raw["events_per_s"], "raw_seconds": raw["seconds"],
        "ingest_events_per_s": ours["events_per_s"], "ingest_seconds": ours["seconds"],
        "ingest_events_per_s_with_flush": ours["events_per_s_with_flush"],
        "raw_batches": raw["batches"], "ingest_batches": ours["batches"],
        "ratio": round(ratio, 3) if ratio is not None else None,
        "online_stale_users": consistency["stale_users"], "online_stale_items": consistency["stale_items"],
        "online_users_checked": consistency["users"], "online_items_checked": consistency["items"],
        "online_stale_users_after_live": consistency_c["stale_users"],
        "online_stale_items_after_live": consistency_c["stale_items"],
        "rate": args.rate, "seconds": args.seconds, "achieved_rate": fresh["achieved_rate"],
        "freshness_samples": fresh["samples"], "freshness_lost": fresh["lost"],
        "freshness_p50_ms": fresh["p50_ms"], "freshness_p99_ms": fresh["p99_ms"],
        "freshness_max_ms": fresh["max_ms"],
        "ingestor_freshness_p50_ms": fresh["ingestor_p50_ms"],
        "ingestor_freshness_p99_ms": fresh["ingestor_p99_ms"],
        "live_batches": (fresh["ingestor_stats"] or {}).get("batches"),
        "cpu_count": os.cpu_count(), "loadavg_1m_start": load_start, "loadavg_1m_end": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    def consistent(c: dict) -> str:
        text = (f"{c['users'] - c['stale_users']}/{c['users']}, {c['items'] - c['stale_items']}/{c['items']}")
        examples = c["users_examples"][:2] + c["items_examples"][:2]
        return text + (f"  stale e.g. (id, state, online) {examples}" if examples else "")

    rows = [
        ("events (MovieLens 100K, event-time order)", f"{n}"),
        ("(a) raw kafka-python consume",
         f"{raw['events_per_s']:,} ev/s  ({raw['seconds']} s, {raw['batches']} batches)" if raw["events_per_s"]
         else f"n/a: all {n} records came in one poll (use --events >= 2 x ingest.max_poll_records)"),
        ("(b) Ingestor -> Feast online", f"{ours['events_per_s']:,} ev/s  ({ours['seconds']} s, "
                                          f"{ours['batches']} batches)"),
        ("(b) incl. final offline flush", f"{ours['events_per_s_with_flush']:,} ev/s"),
        ("ratio (b)/(a)   [target >= 0.5]", f"{ratio:.3f}" if ratio is not None else "n/a"),
        ("(b) online == state: users, items", consistent(consistency)),
        (f"(c) produce rate (target {args.rate:g}/s)", f"{fresh['achieved_rate']:,} ev/s for {args.seconds:g} s"),
        ("(c) produce -> get_online_features p50", f"{fresh['p50_ms']} ms"),
        ("(c) produce -> get_online_features p99 [< 1000]", f"{fresh['p99_ms']} ms  (max {fresh['max_ms']} ms, "
                                                            f"{fresh['samples']} samples, {fresh['lost']} lost)"),
        ("(c) ingestor histogram p50 / p99", f"{fresh['ingestor_p50_ms']} / {fresh['ingestor_p99_ms']} ms  "
                                              f"({figures['live_batches']} batches)"),
        ("(c) online == state after it: users, items", consistent(consistency_c)),
        ("cpus, load average (1 min) start/end", f"{os.cpu_count()}, {load_start}/{figures['loadavg_1m_end']}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\nIngest benchmark (preset {args.preset})")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    emit_figures(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
