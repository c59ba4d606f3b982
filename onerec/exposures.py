"""The exposure log: every recommendation served, to Kafka `exposures`, without slowing or
failing a request.

    log = ExposureLog(bootstrap, "exposures", max_buffer=10_000)
    log.publish(recommendations)        # never blocks: a full buffer drops and counts
    log.close()                         # flush what is buffered (bounded wait)

The producer is librdkafka's (confluent-kafka): `publish` encodes each exposure (orjson) and hands
it to the producer's own bounded queue, keyed by user (murmur2, as Kafka's Java client and
kafka-python partition, so a user's exposures stay in order), and returns; librdkafka's threads
batch and send without the GIL. kafka-python's pure-Python producer cost the server 88 us of
CPU per exposure, librdkafka 27 (benchmarks/exposure_log.py, 1,250 a second). While Kafka is down,
librdkafka keeps reconnecting; an exposure that cannot be delivered within `delivery_timeout_s`,
or finds the buffer full, is dropped and counted (`dropped`), and requests go on being served.
A thread serves the delivery reports (`sent`, `dropped`) and librdkafka's log lines. An exposure
(JSON):
    {"schema_version": 1, "request_id", "user_id", "experiment", "variant", "model_version", "fallback",
     "time_ms", "latency_ms", "items": [{"item_id", "position", "score"}, ...]}
`experiment` ('' = none running) and `latency_ms` (the request's time in the predictor, null when not
measured) were added later within version 1; readers take them as optional.
The reward joiner (issue 8) joins users' later events to these by request id / user and item.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import orjson
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


def kafka_producer(bootstrap: str, max_buffer: int, delivery_timeout_s: float):
    """A confluent_kafka.Producer: produce(topic, value, key, on_delivery) never blocks (BufferError
    when `max_buffer` exposures wait), poll(timeout) serves the delivery reports."""
    from confluent_kafka import Producer

    return Producer({"bootstrap.servers": bootstrap, "acks": 1, "linger.ms": 5,
                     "partitioner": "murmur2_random",           # kafka-python's and Java's key -> partition
                     "queue.buffering.max.messages": max_buffer,
                     "message.timeout.ms": int(delivery_timeout_s * 1000),
                     "logger": log})                            # not librdkafka's own stderr lines


class ExposureLog:
    def __init__(self, bootstrap: str, topic: str, max_buffer: int = 10_000, delivery_timeout_s: float = 10.0,
                 producer_factory: Callable[[str, int, float], object] = kafka_producer):
        self.topic = topic
        self.sent = self.dropped = 0
        self._sent_total, self._dropped_total = EXPOSURES.labels("sent"), EXPOSURES.labels("dropped")
        self._producer = producer_factory(bootstrap, max_buffer, delivery_timeout_s)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve_reports, name="exposure-log", daemon=True)
        self._thread.start()

    def publish(self, recommendations: Sequence, time_ms: int | None = None, latency_ms: float | None = None) -> int:
        """Hand one exposure per recommendation to the producer -> how many were dropped (buffer
        full, or closed)."""
        now = int(time.time() * 1000) if time_ms is None else time_ms
        dropped = 0
        for rec in recommendations:
            if self._closed.is_set():
                dropped += 1
                continue
            try:
                self._producer.produce(self.topic, orjson.dumps(exposure_record(rec, now, latency_ms)),
                                       str(rec.user_id).encode(), on_delivery=self._delivered)
            except BufferError:
                dropped += 1
        self._count_dropped(dropped)
        return dropped

    def _count_dropped(self, n: int) -> None:
        if n:
            self.dropped += n
            self._dropped_total.inc(n)

    def _delivered(self, error, _message) -> None:
        """librdkafka's delivery report, one per exposure (on the report thread)."""
        if error is None:
            self.sent += 1
            self._sent_total.inc()
        else:
            self._count_dropped(1)
            log.debug("exposure not delivered: %s", error)

    def _serve_reports(self) -> None:
        while not self._closed.is_set():
            self._producer.poll(0.1)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop taking exposures and wait up to timeout_s for the buffered ones to be delivered;
        those still undelivered then are dropped and counted."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._thread.join(timeout_s)
        left = self._producer.flush(timeout_s)            # serves the last reports on this thread
        self._count_dropped(left)
