"""The exposure log: every recommendation served, to Kafka `exposures`, without slowing or
failing a request.

    log = ExposureLog(bootstrap, "exposures", max_buffer=10_000)
    log.publish(recommendations)        # never blocks: a full buffer drops and counts
    log.close()                         # flush what is buffered (bounded wait)

`publish` only appends to a bounded in-memory queue; one background thread drains it into a
KafkaProducer (keyed by user, so a user's exposures stay in order). While Kafka is down the
producer's sends fail or time out: those records are dropped and counted (`dropped`), the
thread backs off and reconnects, and requests go on being served. An exposure (JSON):
    {"schema_version": 1, "request_id", "user_id", "experiment", "variant", "model_version", "fallback",
     "time_ms", "latency_ms", "items": [{"item_id", "position", "score"}, ...]}
`experiment` ('' = none running) and `latency_ms` (the request's time in the predictor, null when not
measured) were added later within version 1; readers take them as optional.
The reward joiner (issue 8) joins users' later events to these by request id / user and item.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from prometheus_client import Counter

log = logging.getLogger(__name__)
EXPOSURE_SCHEMA_VERSION = 1
EXPOSURES = Counter("onerec_serving_exposures", "exposures by outcome", ["outcome"])  # sent | dropped


def exposure_record(rec, time_ms: int, latency_ms: float | None = None) -> dict:
    return {"schema_version": EXPOSURE_SCHEMA_VERSION, "request_id": rec.request_id, "user_id": rec.user_id,
            "experiment": rec.experiment, "variant": rec.variant, "model_version": rec.model_version,
            "fallback": rec.fallback, "time_ms": time_ms, "latency_ms": latency_ms,
            "items": [{"item_id": int(i), "position": p, "score": float(s)}
                      for p, (i, s) in enumerate(zip(rec.items, rec.scores))]}


def kafka_producer(bootstrap: str):
    from kafka import KafkaProducer

    # max_block_ms bounds how long a send waits for metadata when the broker is gone
    return KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=5, retries=2, max_block_ms=1000,
                         request_timeout_ms=5000)


class ExposureLog:
    def __init__(self, bootstrap: str, topic: str, max_buffer: int = 10_000,
                 producer_factory: Callable[[str], object] = kafka_producer, max_backoff_s: float = 10.0):
        self.bootstrap, self.topic, self.factory, self.max_backoff_s = bootstrap, topic, producer_factory, max_backoff_s
        self.buffer: queue.Queue = queue.Queue(maxsize=max_buffer)
        self.sent = self.dropped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="exposure-log", daemon=True)
        self._thread.start()

    def publish(self, recommendations: Sequence, time_ms: int | None = None, latency_ms: float | None = None) -> int:
        """Queue one exposure per recommendation -> how many were dropped (buffer full)."""
        now = int(time.time() * 1000) if time_ms is None else time_ms
        dropped = 0
        for rec in recommendations:
            try:
                self.buffer.put_nowait(exposure_record(rec, now, latency_ms))
            except queue.Full:
                dropped += 1
        self._count_dropped(dropped)
        return dropped

    def _count_dropped(self, n: int) -> None:
        if n:
            self.dropped += n
            EXPOSURES.labels("dropped").inc(n)

    def _count_sent(self, _metadata) -> None:
        self.sent += 1
        EXPOSURES.labels("sent").inc()

    def _drain(self) -> None:
        producer, backoff = None, 0.5
        while not (self._stop.is_set() and self.buffer.empty()):
            try:
                record = self.buffer.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                producer = producer or self.factory(self.bootstrap)
                future = producer.send(self.topic, key=str(record["user_id"]).encode(),
                                       value=json.dumps(record).encode())
                future.add_callback(self._count_sent).add_errback(lambda _: self._count_dropped(1))
                backoff = 0.5
            except Exception as exc:  # noqa: BLE001 - Kafka down: drop, back off, reconnect
                self._count_dropped(1)
                log.warning("exposure log: %s; retrying in %.1f s", exc, backoff)
                if producer is not None:
                    try:
                        producer.close(timeout=0)
                    except Exception:  # noqa: BLE001
                        pass
                producer = None
                if self._stop.is_set():                      # closing with Kafka down: give up the rest
                    self._count_dropped(self.buffer.qsize())
                    return
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
        if producer is not None:
            producer.flush(timeout=5)
            producer.close(timeout=5)

    def close(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)
