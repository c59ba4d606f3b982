"""A seeded A/B store for the scorecard, dashboard and guardrail tests: two variants, users who
were active before the experiment (CUPED's covariate), exposures over three days."""
from __future__ import annotations

import numpy as np

from onerec.abtest.store import ABStore

DAY_MS = 86_400_000
START_MS = 1_764_547_200_000          # 2025-12-01 00:00 UTC


def seed_experiment(store: ABStore, name: str = "exp-1", users: int = 400, lift: float = 0.0,
                    weights: tuple[float, float] = (50.0, 50.0), seed: int = 0, latency_ms: float = 20.0,
                    fallback_share: float = 0.02, days: int = 3, model_versions: tuple[str, str] = ("3", "4")) -> dict:
    """users split by weights into control / treatment; each user's reward per item is their own
    taste (also seen before the experiment) + noise (+ lift for the treatment). -> what was written."""
    rng = np.random.default_rng(seed)
    share = weights[1] / sum(weights)
    taste = rng.normal(0.1, 0.3, users)                                    # per user: drives pre and post
    variant = np.where(rng.random(users) < share, "treatment", "control")
    events, rows = [], []
    for u in range(users):
        for j in range(int(rng.integers(1, 6))):                           # pre-experiment activity
            events.append({"event_id": f"{name}-pre-{u}-{j}", "user_id": u, "item_id": int(rng.integers(1, 200)),
                           "event_type": "rate", "time_ms": START_MS - int(rng.integers(1, 10)) * DAY_MS,
                           "reward": float(np.clip(taste[u] + rng.normal(0, 0.3), -1, 1))})
        for j in range(int(rng.integers(1, 8))):
            items = rng.choice(np.arange(1, 200), size=5, replace=False).tolist()
            mean = taste[u] + (lift if variant[u] == "treatment" else 0.0)
            rewards = [float(np.clip(mean + rng.normal(0, 0.5), -1, 1)) if rng.random() < 0.6 else None for _ in items]
            rows.append({"request_id": f"{name}-{u}-{j}", "experiment": name, "variant": str(variant[u]),
                         "model_version": model_versions[variant[u] == "treatment"], "user_id": u,
                         "fallback": "cold_user" if rng.random() < fallback_share else None,
                         "served_ms": START_MS + int(rng.integers(0, days * DAY_MS)), "items": items,
                         "rewards": rewards, "reward": float(sum(r for r in rewards if r is not None)),
                         "reacted": sum(r is not None for r in rewards),
                         "latency_ms": float(rng.gamma(4.0, latency_ms / 4.0)), "watch_s": float(rng.exponential(60))})
    store.add_events(events)
    store.add_exposures(rows)
    store.register_experiment(name, [{"name": "control", "alias": "champion", "weight": weights[0]},
                                     {"name": "treatment", "alias": "challenger", "weight": weights[1]}])
    return {"rows": rows, "events": events}
