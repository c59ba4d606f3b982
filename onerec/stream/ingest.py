"""`onerec ingest`: Kafka `user-events` -> validated -> feature state -> Feast online + offline.

A consumer-group member: run several and they share the partitions. Per poll batch:
  1. parse + validate each record; invalid ones go to `user-events-dlq` with the reason in
     record headers (and the original partition/offset), and the loop keeps going;
  2. apply the valid events to the feature state (Redis, idempotent by event id); every
     `ingest.online_push_interval_s` (`catchup_push_interval_s` while draining a backlog) push
     the rows of the entities changed since the last push to Feast online (coalescing: a user
     touched by ten batches in a catch-up is pushed once);
  3. every `ingest.offline_flush_s`: write the buffered rows to the offline store, flush the DLQ
     producer, and only then commit the offsets. A crash anywhere redelivers the uncommitted
     events, which change nothing (seen ids) but get their entities' rows pushed again.
While Redis or Feast fails, the batch is retried with exponential back-off and the partitions are
paused (the consumer keeps polling, so it stays in the group); nothing is committed meanwhile.
SIGTERM/SIGINT: finish the batch, flush, commit, leave the group.
"""
from __future__ import annotations

import signal
import threading
import time
import warnings
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
# Imported here, before anything imports Feast: Feast sets PROMETHEUS_MULTIPROC_DIR when it is
# imported, and prometheus_client picks its value store when it is first imported; in
# multiprocess mode every Metrics() in a process would share the same counters.
import prometheus_client
from prometheus_client.core import HistogramMetricFamily

from onerec.config import Config
from onerec.data.events import EventValidationError, UserEvent, dlq_headers, parse_event
from onerec.features import store as feast_store
from onerec.features.schema import VIEWS
from onerec.features.state import FeatureState

GROUP_TIMEOUTS = dict(session_timeout_ms=6000, heartbeat_interval_ms=1000, max_poll_interval_ms=60000)


@dataclass
class IngestStats:
    consumed: int = 0      # records read from Kafka (redeliveries included)
    written: int = 0       # valid events in the feature state (in Feast by the next push)
    dlq: int = 0           # invalid records sent to the DLQ
    duplicates: int = 0    # valid events already applied before (redeliveries, producer retries)
    batches: int = 0
    retries: int = 0
    dlq_reasons: dict = field(default_factory=lambda: defaultdict(int))

    def as_dict(self) -> dict:
        return {"consumed": self.consumed, "written": self.written, "dlq": self.dlq,
                "duplicates": self.duplicates, "batches": self.batches, "retries": self.retries,
                "dlq_reasons": dict(self.dlq_reasons)}


class BulkHistogram:
    """A Prometheus histogram observed a batch at a time: one numpy pass per push instead of a
    locked Python call per event (3 µs an event, a tenth of the whole per-event budget)."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...], registry):
        self.name, self.documentation = name, documentation
        self.bounds = np.asarray(buckets, dtype=float)                # upper bounds, +Inf implied
        self.counts = np.zeros(len(buckets) + 1, dtype=np.int64)      # per bucket, not cumulative
        self.sum = 0.0
        self._lock = threading.Lock()                                 # /metrics scrapes from a thread
        registry.register(self)

    def observe_many(self, values) -> None:
        values = np.asarray(values, dtype=float)
        # bucket i holds bounds[i-1] < v <= bounds[i] (Prometheus' `le`)
        counts = np.bincount(np.searchsorted(self.bounds, values, side="left"), minlength=len(self.counts))
        with self._lock:
            self.counts += counts
            self.sum += float(values.sum())

    def describe(self):
        yield HistogramMetricFamily(self.name, self.documentation)

    def collect(self):
        with self._lock:
            cumulative, total = np.cumsum(self.counts), self.sum
        buckets = [(repr(float(b)), int(c)) for b, c in zip(self.bounds, cumulative[:-1])]
        yield HistogramMetricFamily(self.name, self.documentation, sum_value=total,
                                    buckets=[*buckets, ("+Inf", int(cumulative[-1]))])


class Metrics:
    """Prometheus metrics on a registry of their own (several ingestors can share a process)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge

        if prometheus_client.values.ValueClass is not prometheus_client.values.MutexValue:
            warnings.warn("prometheus_client is in multiprocess mode (Feast was imported first and set "
                          "PROMETHEUS_MULTIPROC_DIR): ingestors in this process share their metrics")
        self.registry = CollectorRegistry()
        self.consumed = Counter("onerec_ingest_consumed", "records read from Kafka", registry=self.registry)
        self.written = Counter("onerec_ingest_written", "valid events written to the feature stores",
                               registry=self.registry)
        self.dlq = Counter("onerec_ingest_dlq", "invalid records sent to the DLQ", ["reason"],
                           registry=self.registry)
        self.duplicates = Counter("onerec_ingest_duplicates", "redelivered events skipped", registry=self.registry)
        self.lag = Gauge("onerec_ingest_consumer_lag", "records behind the partition end", ["partition"],
                         registry=self.registry)
        self.freshness = BulkHistogram("onerec_ingest_freshness_seconds", "Kafka record time -> online in Feast",
                                       buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30),
                                       registry=self.registry)

    def serve(self, port: int) -> None:
        prometheus_client.start_http_server(port, registry=self.registry)


class Ingestor:
    def __init__(self, cfg: Config, bootstrap: str, redis_client, feature_store, metrics: Metrics | None = None):
        self.cfg, self.bootstrap = cfg, bootstrap
        self.state = FeatureState(redis_client, cfg.features)
        self.store = feature_store
        self.online = feast_store.OnlineWriter(feature_store)
        self.metrics = metrics or Metrics()
        self.stats = IngestStats()
        self.stop = threading.Event()
        self._rows: dict[str, list[pd.DataFrame]] = defaultdict(list)  # offline rows not yet written
        self._dirty_users: set[int] = set()                             # changed, not yet pushed online
        self._dirty_items: set[int] = set()
        self._unpushed_times: list[float] = []                          # their Kafka record times
        self._last_push = time.monotonic()
        self._offsets: dict = {}                                        # next offsets not yet committed
        self._last_flush = time.monotonic()
        self._pool: ThreadPoolExecutor | None = None                    # applies batches in the background
        self._pending: tuple[Future, list[UserEvent], list[float]] | None = None

    # ------------------------------------------------------------------ the loop
    def run(self, idle_exit_s: float | None = None, max_records: int | None = None) -> IngestStats:
        """Consume until stopped (SIGTERM, `stop`), idle for `idle_exit_s`, or `max_records` read."""
        from kafka import KafkaConsumer, KafkaProducer
        from kafka.consumer.subscription_state import ConsumerRebalanceListener

        ingestor = self

        class FlushOnRevoke(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked):
                ingestor._flush(consumer, dlq)  # commit what we did before another member takes over

            def on_partitions_assigned(self, assigned):
                pass

        c = self.cfg.ingest
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=c.group_id,
                                 enable_auto_commit=False, auto_offset_reset="earliest",
                                 max_poll_records=c.max_poll_records, client_id="onerec-ingest",
                                 **GROUP_TIMEOUTS)
        consumer.subscribe([self.cfg.kafka.user_events.name], listener=FlushOnRevoke())
        dlq = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5, retries=5)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="onerec-ingest-state")
        last_active = time.monotonic()  # idle = polls that bring nothing while nothing is retried
        try:
            while not self.stop.is_set():
                retries_before = self.stats.retries
                batch = consumer.poll(timeout_ms=c.poll_timeout_ms)
                if batch:
                    self._process(batch, consumer, dlq)
                    self._update_lag(consumer)
                # A poll at least half full means a backlog: each push costs the same whatever its
                # size, so draining one with fewer, larger pushes is what catches up fastest.
                backlog = sum(len(r) for r in batch.values()) >= c.max_poll_records // 2
                interval = c.catchup_push_interval_s if backlog else c.online_push_interval_s
                if time.monotonic() - self._last_push >= interval:
                    self._push_online(consumer)
                if time.monotonic() - self._last_flush >= c.offline_flush_s:
                    self._flush(consumer, dlq)
                if batch or self.stats.retries != retries_before or not consumer.assignment():
                    last_active = time.monotonic()  # time spent joining or riding out an outage is not idle
                if idle_exit_s is not None and time.monotonic() - last_active > idle_exit_s:
                    break
                if max_records is not None and self.stats.consumed >= max_records:
                    break
            self._flush(consumer, dlq)
        finally:
            self._pool.shutdown(wait=True)
            self._pending = None  # not applied for sure: uncommitted, so redelivered
            dlq.close()
            _close_after_join(consumer)
        return self.stats

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())

    # ------------------------------------------------------------------ one batch
    def _process(self, batch: dict, consumer, dlq) -> None:
        events, record_times = [], []
        now_ms = time.time_ns() // 1_000_000  # "too far in the future" is judged once a batch
        for tp, records in batch.items():  # each partition's records in offset order
            for record in records:
                try:
                    events.append(parse_event(record.value, now_ms))
                    record_times.append(record.timestamp / 1000.0)
                except EventValidationError as err:
                    self._to_dlq(dlq, record, err)
            self._offsets[tp] = records[-1].offset + 1
        consumed = sum(len(r) for r in batch.values())
        self.stats.consumed += consumed
        self.metrics.consumed.inc(consumed)
        # The previous batch was applied in the background while this one was fetched and parsed:
        # the Lua script runs in redis-server, on another core, for a third of an event's cost.
        self._settle(consumer)
        if events:
            self._pending = (self._pool.submit(self.state.apply, events), events, record_times)
        self.stats.batches += 1

    def _settle(self, consumer) -> None:
        """Wait for the batch being applied in the background. If that failed, apply it again here,
        with retries: the consumer (paused meanwhile) belongs to this thread."""
        if self._pending is None:
            return
        future, events, record_times = self._pending
        self._pending = None
        try:
            applied = future.result()
        except Exception as exc:  # noqa: BLE001 (Redis down: same handling as a failed write here)
            applied = self._with_retry(lambda: self.state.apply(events), consumer, failed=exc)
        self._dirty_users |= applied.users
        self._dirty_items |= applied.items
        self._unpushed_times += record_times
        self.stats.written += len(events)
        self.stats.duplicates += len(events) - applied.applied
        self.metrics.written.inc(len(events))
        self.metrics.duplicates.inc(len(events) - applied.applied)

    def _push_online(self, consumer) -> None:
        """Rows of every entity changed since the last push -> Feast online (and the offline buffer)."""
        self._settle(consumer)
        if self._dirty_users or self._dirty_items:
            rows = self._with_retry(lambda: self.state.rows(self._dirty_users, self._dirty_items), consumer)
            for view in VIEWS:
                self._with_retry(lambda: self.online.write(view, rows[view.name]), consumer)
                self._rows[view.name].append(rows[view.name])
            self.metrics.freshness.observe_many(np.maximum(0.0, time.time() - np.asarray(self._unpushed_times)))
            self._dirty_users, self._dirty_items, self._unpushed_times = set(), set(), []
        self._last_push = time.monotonic()

    def _to_dlq(self, dlq, record, err: EventValidationError) -> None:
        headers = dlq_headers(err) + [("source.partition", str(record.partition).encode()),
                                      ("source.offset", str(record.offset).encode())]
        dlq.send(self.cfg.kafka.dlq.name, key=record.key, value=record.value, headers=headers)
        self.stats.dlq += 1
        self.stats.dlq_reasons[err.reason] += 1
        self.metrics.dlq.labels(err.reason).inc()

    def _with_retry(self, action, consumer, failed: Exception | None = None):
        """Retry until it works or we are stopped; pause partitions meanwhile to stay in the group.
        `failed`: the error of a first attempt made elsewhere (back off before the next)."""
        backoff = 0.1
        while True:
            if failed is None:
                try:
                    result = action()
                    if consumer.paused():
                        consumer.resume(*consumer.paused())
                    return result
                except Exception as exc:  # noqa: BLE001 (Redis/Feast down: not committed, so retry it)
                    failed = exc
            if self.stop.is_set():
                raise RuntimeError("stopped while the feature stores were unavailable; "
                                   "the batch was not committed and will be redelivered") from failed
            self.stats.retries += 1
            print(f"ingest: write failed ({type(failed).__name__}: {failed}); retrying in {backoff:.1f}s",
                  flush=True)
            consumer.pause(*consumer.assignment())
            consumer.poll(timeout_ms=0)  # keeps the group membership alive; paused -> no records
            self.stop.wait(backoff)
            backoff = min(backoff * 2, self.cfg.ingest.max_backoff_s)
            failed = None

    # ------------------------------------------------------------------ durability
    def _flush(self, consumer, dlq) -> None:
        """Online rows, offline rows, then DLQ, then offsets: a commit follows the writes it covers."""
        from kafka.structs import OffsetAndMetadata

        self._push_online(consumer)
        for view in VIEWS:
            if self._rows[view.name]:
                frame = pd.concat(self._rows[view.name], ignore_index=True)
                self._with_retry(lambda: feast_store.write_offline(self.cfg, view, frame), consumer)
                self._rows[view.name] = []
        dlq.flush()
        if self._offsets:
            consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in self._offsets.items()})
            self._offsets = {}
        self._last_flush = time.monotonic()

    def _update_lag(self, consumer) -> None:
        # Tansu reports highwater as the last batch's base offset, so the lag can read a little low.
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is not None:
                self.metrics.lag.labels(str(tp.partition)).set(max(0, high - consumer.position(tp)))


def _close_after_join(consumer, wait_s: float = 15.0) -> None:
    """Tansu leaves a group stuck for good when a member sends LeaveGroup in the middle of its
    join, so a member stopped that early first finishes joining. Records polled here are not
    processed and not committed: the group gets them again."""
    deadline = time.monotonic() + wait_s
    while not consumer.assignment() and time.monotonic() < deadline:
        consumer.poll(timeout_ms=100)
    consumer.close()


def open_ingestor(cfg: Config) -> Ingestor:
    """An ingestor wired to the endpoints in the environment / the stack's env file."""
    import redis

    from onerec.endpoints import KAFKA_BOOTSTRAP, REDIS_URL, resolve_endpoints

    endpoints = resolve_endpoints(cfg.stack.state_dir)
    client = redis.Redis.from_url(endpoints.require(REDIS_URL), socket_timeout=5, socket_connect_timeout=2)
    return Ingestor(cfg, endpoints.require(KAFKA_BOOTSTRAP), client, feast_store.open_store(cfg))
