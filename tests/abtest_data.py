"""A seeded A/B store for the scorecard, dashboard and guardrail tests: two variants, users who
were active before the experiment (CUPED's covariate), exposures over three days."""
from __future__ import annotations

from typing import Self

import numpy as np

from onerec.abtest.store import ABStore

DAY_MS = 86_400_000
START_MS = 1_764_547_200_000          # 2025-12-01 00:00 UTC


def _per_variant(value, is_treatment: bool):
    """A number for both variants, or a (control, treatment) pair."""
    return value[int(is_treatment)] if isinstance(value, (tuple, list)) else value


def seed_experiment(store: ABStore, name: str = "exp-1", users: int = 400, lift: float = 0.0,
                    weights: tuple[float, float] = (50.0, 50.0), seed: int = 0,
                    latency_ms: float | tuple[float, float] = 20.0,
                    fallback_share: float | tuple[float, float] = 0.02, days: float = 3,
                    model_versions: tuple[str, str] = ("3", "4"), *, split: tuple[float, float] | None = None,
                    register: bool = True, variants: tuple[str, str] = ("control", "treatment"),
                    start_ms: int = START_MS, first_user: int = 0, outside_events: bool = False) -> dict:
    """users split by weights (or by `split`, when the assignment is to differ from the weights
    registered) into control / treatment; each user's reward per item is their own taste (also seen
    before the experiment) + noise (+ lift for the treatment). latency_ms and fallback_share: for
    both variants or (control, treatment). register: record the variants' weights in the store (as
    register_ab_file does). outside_events: also events that must NOT count as the pre-period
    covariate (older than 14 days, or during the experiment), from a separate random stream.
    -> what was written: rows (exposures), events, and per user its variant and taste."""
    rng = np.random.default_rng(seed)
    split = split or weights
    share = split[1] / sum(split)
    taste = rng.normal(0.1, 0.3, users)                                    # per user: drives pre and post
    treated = rng.random(users) < share
    events, rows = [], []
    for k in range(users):
        u, t = first_user + k, bool(treated[k])
        variant = variants[int(t)]
        for j in range(int(rng.integers(1, 6))):                           # pre-experiment activity
            events.append({"event_id": f"{name}-pre-{u}-{j}", "user_id": u, "item_id": int(rng.integers(1, 200)),
                           "event_type": "rate", "time_ms": start_ms - int(rng.integers(1, 10)) * DAY_MS,
                           "reward": float(np.clip(taste[k] + rng.normal(0, 0.3), -1, 1))})
        for j in range(int(rng.integers(1, 8))):
            items = rng.choice(np.arange(1, 200), size=5, replace=False).tolist()
            mean = taste[k] + (lift if t else 0.0)
            rewards = [float(np.clip(mean + rng.normal(0, 0.5), -1, 1)) if rng.random() < 0.6 else None for _ in items]
            rows.append({"request_id": f"{name}-{u}-{j}", "experiment": name, "variant": variant,
                         "model_version": model_versions[int(t)], "user_id": u,
                         "fallback": "cold_user" if rng.random() < _per_variant(fallback_share, t) else None,
                         "served_ms": start_ms + int(rng.integers(0, int(days * DAY_MS))), "items": items,
                         "rewards": rewards, "reward": float(sum(r for r in rewards if r is not None)),
                         "reacted": sum(r is not None for r in rewards),
                         "latency_ms": float(rng.gamma(4.0, _per_variant(latency_ms, t) / 4.0)),
                         "watch_s": float(rng.exponential(60))})
    if outside_events:
        other = np.random.default_rng(seed + 1_000_003)
        for k in range(users):
            u = first_user + k
            events.append({"event_id": f"{name}-old-{u}", "user_id": u, "item_id": int(other.integers(1, 200)),
                           "event_type": "rate", "time_ms": start_ms - int(other.integers(15, 40)) * DAY_MS,
                           "reward": float(other.uniform(-1, 1))})
            events.append({"event_id": f"{name}-during-{u}", "user_id": u, "item_id": int(other.integers(1, 200)),
                           "event_type": "rate", "time_ms": start_ms + int(other.integers(0, int(days * DAY_MS))),
                           "reward": float(other.uniform(-1, 1))})
    store.add_events(events)
    store.add_exposures(rows)
    if register:
        store.register_experiment(name, [{"name": variants[0], "alias": "champion", "weight": weights[0]},
                                         {"name": variants[1], "alias": "challenger", "weight": weights[1]}])
    return {"rows": rows, "events": events,
            "variant": {first_user + k: variants[int(treated[k])] for k in range(users)},
            "taste": {first_user + k: float(taste[k]) for k in range(users)}}


# ---------------------------------------------------------------- a predictor's /metrics, for real


def exposition(requests: float = 200, overloaded: float = 3, failures: float = 1, bad_requests: float = 50) -> str:
    """The predictor's Prometheus counters as its /metrics writes them (text format 0.0.4)."""
    return "\n".join([
        "# HELP onerec_serving_request_seconds predict() per HTTP request",
        "# TYPE onerec_serving_request_seconds histogram",
        f'onerec_serving_request_seconds_bucket{{le="0.01"}} {requests / 2}',
        f'onerec_serving_request_seconds_bucket{{le="+Inf"}} {requests}',
        f"onerec_serving_request_seconds_count {requests}",
        f"onerec_serving_request_seconds_sum {requests * 0.004}",
        "# HELP onerec_serving_bad_requests_total requests refused with 400",
        "# TYPE onerec_serving_bad_requests_total counter",
        f"onerec_serving_bad_requests_total {bad_requests}",
        "# HELP onerec_serving_overloaded_total requests refused with 503: too many waiting",
        "# TYPE onerec_serving_overloaded_total counter",
        f"onerec_serving_overloaded_total {overloaded}",
        "onerec_serving_overloaded_created 1.7645472e+09",
        "# HELP onerec_serving_failures_total requests that failed in the model or the feature lookup (500)",
        "# TYPE onerec_serving_failures_total counter",
        f"onerec_serving_failures_total {failures}",
        "",
    ])


class MetricsServer:
    """http.server on 127.0.0.1, a free port, in a thread, answering every GET with `text` (settable
    while it runs): `with MetricsServer(exposition()) as server: server.url`."""

    def __init__(self, text: str, content_type: str = "text/plain; version=0.0.4; charset=utf-8"):
        self.text, self.content_type, self.hits = text, content_type, 0

    def __enter__(self) -> Self:
        import http.server
        import threading

        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                owner.hits += 1
                body = owner.text.encode()
                self.send_response(200)
                self.send_header("Content-Type", owner.content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):      # quiet
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/metrics"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def unreachable_url() -> str:
    """A loopback URL nothing listens on (a port just bound and released): connection refused."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/metrics"


def read_until(url: str, done, errors: list, size: int | None = None) -> None:
    """A reader thread's loop (the concurrency tests): per-user sums and the experiments list until
    `done` is set; with `size`, every batch must be whole (one transaction each). Errors go to `errors`."""
    reader = ABStore(url)
    try:
        while not done.is_set():
            frame = reader.user_frame("exp")
            assert size is None or int(frame["exposures"].sum()) % size == 0
            reader.experiments()
    except BaseException as e:  # noqa: BLE001 - reported to the test thread
        errors.append(e)
    finally:
        reader.close()
