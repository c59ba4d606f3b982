"""The exposure log's CPU cost per exposure: librdkafka (ours, onerec.exposures.ExposureLog) against
kafka-python's producer (the baseline: what the exposure log used before), into a real broker.

    .venv/bin/python benchmarks/exposure_log.py [--exposures 10000] [--rate 1250] [--rounds 2] [--json PATH]

Starts the embedded stack (free loopback ports, a temporary directory; stopped at the end). Each
round publishes --exposures exposures of a 10-item recommendation at --rate per second, in
bursts of 25 (as the predictor's batches answer them), then waits until the broker has
acknowledged every one. The CPU is this process's (every thread: the producer's own threads
included), per exposure, over publishing and acknowledgement; that is what the predictor's
server process pays, on the cores the beam search needs. The baseline serializes with json and
calls kafka-python's KafkaProducer.send with a delivery callback per record (acks=1, linger 5 ms);
rounds alternate baseline and ours. Figures last, as one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))    # the repo root, when run as a script

from onerec import stack  # noqa: E402
from onerec.cli import emit_figures  # noqa: E402
from onerec.config import load_config  # noqa: E402
from onerec.endpoints import ENV_FILE_NAME, read_env_file  # noqa: E402
from onerec.exposures import ExposureLog, exposure_record  # noqa: E402
from onerec.serve import Recommendation  # noqa: E402

BURST = 25


class KafkaPythonLog:
    """The baseline: one json.dumps and one kafka-python send per exposure."""

    def __init__(self, bootstrap: str, topic: str):
        from kafka import KafkaProducer

        self.topic, self.sent, self.dropped = topic, 0, 0
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=5, retries=2,
                                      max_block_ms=1000, request_timeout_ms=5000)

    def _ok(self, _metadata) -> None:
        self.sent += 1

    def _failed(self, _error) -> None:
        self.dropped += 1

    def publish(self, recs, latency_ms: float) -> None:
        now = int(time.time() * 1000)
        for rec in recs:
            record = exposure_record(rec, now, latency_ms)
            self.producer.send(self.topic, key=str(rec.user_id).encode(), value=json.dumps(record).encode()) \
                .add_callback(self._ok).add_errback(self._failed)

    def close(self) -> None:
        self.producer.flush(10)
        self.producer.close(10)


def measure(log, n: int, rate: float) -> dict:
    """Publish n exposures at `rate` per second in bursts, wait for the acks -> CPU us per exposure."""
    recs = [Recommendation(f"bench-{i}", 1000 + i, list(range(10)), [0.5 - 0.01 * j for j in range(10)],
                           [[1, 2, 3, 4]] * 10, "control", "1", None, "") for i in range(BURST)]
    cpu0, wall0 = time.process_time(), time.monotonic()
    for burst in range(n // BURST):
        log.publish(recs, latency_ms=12.5)
        time.sleep(max(0.0, wall0 + (burst + 1) * BURST / rate - time.monotonic()))
    deadline = time.monotonic() + 60
    while log.sent + log.dropped < n // BURST * BURST and time.monotonic() < deadline:
        time.sleep(0.005)
    cpu = time.process_time() - cpu0
    return {"cpu_us_per_exposure": round(1e6 * cpu / n, 1), "sent": log.sent, "dropped": log.dropped,
            "seconds": round(time.monotonic() - wall0, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exposures", type=int, default=10_000, help="per round and producer")
    parser.add_argument("--rate", type=float, default=1250.0, help="exposures per second")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.exposures < BURST or args.rate <= 0 or args.rounds < 1:
        parser.error(f"--exposures >= {BURST}, --rate > 0, --rounds >= 1")
    tmp = Path(tempfile.mkdtemp(prefix="onerec-bench-exposures-"))
    cfg = load_config("debug", stack.isolated_overrides(tmp / "stack"))
    runs: dict[str, list[dict]] = {"kafka_python": [], "librdkafka": []}
    try:
        stack.up(cfg)
        bootstrap = read_env_file(Path(cfg.stack.state_dir) / ENV_FILE_NAME)["KAFKA_BOOTSTRAP"]
        topic = cfg.kafka.exposures.name
        for log_class in (KafkaPythonLog, ExposureLog):            # warm-up: connections, metadata
            warm = log_class(bootstrap, topic)
            measure(warm, 500, args.rate)
            warm.close()
        for r in range(args.rounds):
            for name, log_class in (("kafka_python", KafkaPythonLog), ("librdkafka", ExposureLog)):
                log = log_class(bootstrap, topic)
                runs[name].append(measure(log, args.exposures, args.rate))
                log.close()
                print(f"round {r + 1} {name:<12} {runs[name][-1]}", file=sys.stderr, flush=True)
    finally:
        stack.down(cfg)
    median = {name: statistics.median(run["cpu_us_per_exposure"] for run in rows) for name, rows in runs.items()}
    figures = {"benchmark": "exposure_log", "exposures_per_round": args.exposures, "rate_per_s": args.rate,
               "rounds": args.rounds, **{f"{name}_cpu_us_per_exposure": [run["cpu_us_per_exposure"] for run in rows]
                                         for name, rows in runs.items()},
               **{f"{name}_undelivered": sum(args.exposures - run["sent"] for run in rows) for name, rows in runs.items()},
               "kafka_python_cpu_us_median": median["kafka_python"], "librdkafka_cpu_us_median": median["librdkafka"],
               "cpu_ratio_baseline_over_ours": round(median["kafka_python"] / median["librdkafka"], 2),
               "date": time.strftime("%Y-%m-%d")}
    print(f"\nExposure log CPU per exposure at {args.rate:.0f}/s ({args.rounds} alternating rounds of {args.exposures}):")
    print(f"  kafka-python (baseline) {median['kafka_python']:.1f} us, librdkafka (ours) {median['librdkafka']:.1f} us: "
          f"{figures['cpu_ratio_baseline_over_ours']}x less CPU")
    emit_figures(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
