"""`onerec features backfill`: the history part (before T0) through the same feature logic as the
stream, into the offline store, then materialized so the online store starts warm.

Run it before `onerec ingest` on a fresh state: it feeds the same idempotent state that the
ingestor continues from (event ids make a repeated backfill a no-op for the state).
"""
from __future__ import annotations

from datetime import timedelta

import pandas as pd
from tqdm import tqdm

from onerec.config import Config
from onerec.data import load_dataset, online_split
from onerec.features import store as feast_store
from onerec.features.schema import VIEWS
from onerec.features.state import FeatureState
from onerec.stream.replay import interaction_events

BATCH = 5000  # events per state update; each batch leaves one snapshot row per touched entity


def backfill(cfg: Config, redis_client, progress: bool = True) -> dict:
    dataset = load_dataset(cfg.data)
    history = online_split(dataset.interactions, cfg.data).history
    history = history.sort_values("timestamp", kind="stable")  # event-time order, per-user order kept
    state, events = FeatureState(redis_client, cfg.features), list(interaction_events(history, dataset.name))
    applied, rows_written = 0, 0
    for start in tqdm(range(0, len(events), BATCH), desc="backfill", unit="batch", disable=not progress):
        touched = state.apply(events[start:start + BATCH])
        applied += touched.applied
        rows = state.rows(touched.users, touched.items)
        for view in VIEWS:
            feast_store.write_offline(cfg, view, rows[view.name])
            rows_written += len(rows[view.name])
    store = feast_store.open_store(cfg)
    first = pd.Timestamp(int(history["timestamp"].min()), unit="s", tz="UTC")
    last = pd.Timestamp(int(history["timestamp"].max()), unit="s", tz="UTC")
    # materialize's window is end-exclusive at second resolution: pad both ends
    store.materialize(first.to_pydatetime() - timedelta(seconds=1), last.to_pydatetime() + timedelta(seconds=1),
                      feature_views=[v.name for v in VIEWS])
    return {"history_events": len(events), "applied": applied, "offline_rows": rows_written,
            "users": len({e.user_id for e in events}), "items": len({e.item_id for e in events})}
