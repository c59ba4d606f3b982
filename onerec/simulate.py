"""`onerec simulate`: users in the loop. Simulated users ask the running predictor for
recommendations over HTTP (KServe v1) and react to every item of every answer with a `rate`
event on Kafka `user-events` that carries the answer's request id, so the reward joiner can
tie each reaction to its exposure.

    sim = Simulator(cfg.simulate, response, holdout, recommend=http_recommender(url, "onerec"),
                    send=producer_send, seed=cfg.seed)
    report = sim.run(users)

Reactions are grounded in MovieLens: where the held-out slice (data.holdout_fraction: ratings
later than anything replayed or trained on) has the user's real rating of the item, that is the
reaction ("real"); otherwise a draw from the response model fitted on the seen ratings
("modelled", onerec/rl/response.py). The report gives the share of each, the mean rating per
variant and model version, and errors (a failed request is counted and skipped, never retried
into a burst). Requests are paced to `simulate.max_rate_per_s`; the same seed gives the same
users, order and modelled draws. Real clients replace this in production.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from onerec.config import SimulateConfig
from onerec.data.events import UserEvent, validate
from onerec.rl.response import ResponseModel

Recommend = Callable[[int, int, str], dict]      # (user, k, request id) -> one KServe v1 prediction
Send = Callable[[UserEvent], None]


def http_recommender(url: str, model_name: str, timeout_s: float = 10.0, log_exposure: bool = True) -> Recommend:
    """POST {url}/v1/models/{model_name}:predict for one user -> its prediction dict
    (log_exposure=False: a probe, not logged as an exposure)."""
    endpoint = f"{url.rstrip('/')}/v1/models/{model_name}:predict"

    def recommend(user: int, k: int, request_id: str) -> dict:
        row = {"user_id": user, "k": k, "request_id": request_id, **({} if log_exposure else {"log_exposure": False})}
        body = json.dumps({"instances": [row]}).encode()
        req = urllib.request.Request(endpoint, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            (prediction,) = json.loads(resp.read())["predictions"]
        return prediction

    return recommend


class Simulator:
    def __init__(self, cfg: SimulateConfig, response: ResponseModel, holdout: pd.DataFrame,
                 recommend: Recommend, send: Send, seed: int, run_id: str | None = None):
        self.cfg, self.response, self.recommend, self.send = cfg, response, recommend, send
        self.rng = np.random.default_rng(seed)
        self.run_id = run_id or uuid.uuid4().hex[:12]
        last = holdout.drop_duplicates(["user_id", "item_id"], keep="last")    # a re-rating: the latest
        self.real = {(int(u), int(i)): float(r)
                     for u, i, r in zip(last["user_id"], last["item_id"], last["rating"])}

    def pick_users(self, candidates: Sequence[int]) -> list[int]:
        """cfg.users distinct users drawn (seeded) from candidates, in a seeded order."""
        if not len(candidates):
            raise ValueError("no users to simulate: backfill or replay features first")
        n = min(self.cfg.users, len(candidates))
        return [int(u) for u in self.rng.choice(np.asarray(candidates), n, replace=False)]

    def run(self, users: Sequence[int], progress: bool = True) -> dict:
        schedule = [u for _ in range(self.cfg.sessions_per_user) for u in users]
        counts = defaultdict(int)
        by_arm: dict[tuple[str, str], list[float]] = defaultdict(list)
        start = time.monotonic()
        for j, user in enumerate(tqdm(schedule, desc="simulate", unit="req", disable=not progress)):
            if (wait := start + j / self.cfg.max_rate_per_s - time.monotonic()) > 0:
                time.sleep(wait)
            request_id = f"sim-{self.run_id}-{j}"
            try:
                answer = self.recommend(user, self.cfg.k, request_id)
                items = [int(i) for i in answer["items"]]
            except (OSError, urllib.error.URLError, ValueError, KeyError, TypeError) as exc:
                counts["request_errors"] += 1
                counts[f"error:{type(exc).__name__}"] += 1
                continue
            counts["requests"] += 1
            counts["fallback_requests"] += bool(answer.get("fallback"))
            ratings = self.react(user, items)
            now_ms = int(time.time() * 1000)
            for pos, (item, (rating, real)) in enumerate(zip(items, ratings)):
                self.send(validate(UserEvent(
                    event_id=f"{request_id}-{pos}", user_id=user, item_id=item, event_type="rate",
                    event_time_ms=now_ms, rating=rating, request_id=request_id,
                    context={"position": pos, "source": "real" if real else "modelled"})))
                counts["real_reactions" if real else "modelled_reactions"] += 1
                by_arm[(str(answer.get("variant")), str(answer.get("model_version")))].append(rating)
        return self._report(counts, by_arm, time.monotonic() - start)

    def react(self, user: int, items: Sequence[int]) -> list[tuple[float, bool]]:
        """-> (rating, real?) per item: the held-out real rating, else a modelled draw."""
        drawn = self.response.sample(np.full(len(items), user), np.asarray(items), self.rng)
        return [(self.real[(user, item)], True) if (user, item) in self.real else (float(d), False)
                for item, d in zip(items, drawn)]

    @staticmethod
    def _report(counts: dict, by_arm: dict, seconds: float) -> dict:
        reactions = counts["real_reactions"] + counts["modelled_reactions"]
        report = {"requests": counts["requests"], "request_errors": counts["request_errors"],
                  "fallback_requests": counts["fallback_requests"], "reactions": reactions,
                  "real_reactions": counts["real_reactions"], "modelled_reactions": counts["modelled_reactions"],
                  "real_share": round(counts["real_reactions"] / reactions, 4) if reactions else None,
                  "seconds": round(seconds, 1), "requests_per_s": round(counts["requests"] / max(seconds, 1e-9), 1),
                  "errors_by_type": {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("error:")}}
        report["by_variant"] = {f"{variant}/v{version}": {"reactions": len(r), "mean_rating": round(float(np.mean(r)), 4),
                                                          "liked_share": round(float(np.mean(np.array(r) >= 4)), 4)}
                                for (variant, version), r in sorted(by_arm.items())}
        return report


def fit_population(cfg, progress: bool = True) -> dict:
    """What every simulation of cfg's data set shares: the seen ratings' users, the holdout, and
    the response model fitted on the seen ratings with its calibration on the holdout."""
    from onerec.rl.offline import seen_and_holdout
    from onerec.rl.response import calibration

    seen, holdout, _ = seen_and_holdout(cfg)
    response = ResponseModel.fit(seen, cfg.simulate, cfg.seed, progress=progress)
    return {"users": sorted(seen["user_id"].unique()), "holdout": holdout, "response": response,
            "calibration": calibration(response, seen, holdout)}


def simulate(cfg, url: str, bootstrap: str, progress: bool = True, population: dict | None = None) -> dict:
    """The whole command: simulate cfg.simulate.users users against the predictor at `url` and
    publish their reactions (population: a `fit_population` result to reuse across rounds)."""
    from kafka import KafkaProducer

    if cfg.simulate.k > cfg.serving.max_k:
        raise ValueError(f"simulate.k={cfg.simulate.k} is above serving.max_k={cfg.serving.max_k}")
    population = population or fit_population(cfg, progress)
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, retries=5)
    futures = []
    try:
        sim = Simulator(cfg.simulate, population["response"], population["holdout"],
                        http_recommender(url, cfg.registry.model_name),
                        lambda e: futures.append(producer.send(cfg.kafka.user_events.name,
                                                               key=str(e.user_id).encode(), value=e.to_json())),
                        cfg.seed)
        report = sim.run(sim.pick_users(population["users"]), progress=progress)
        producer.flush()
        for future in futures:
            future.get(timeout=30)                 # a reaction Kafka did not take is an error, not a silent loss
    finally:
        producer.close()
    return {**report, "published": len(futures), **population["calibration"], "run_id": sim.run_id}
