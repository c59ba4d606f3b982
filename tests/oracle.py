"""The features, computed directly from events with pandas: an independent check on the
streaming path (onerec/features/state.py), written without looking at its Redis state."""
from __future__ import annotations

import numpy as np
import pandas as pd

from onerec.data.events import UserEvent


def events_frame(events: list[UserEvent]) -> pd.DataFrame:
    df = pd.DataFrame([e.to_dict() for e in events])
    for col in ("play_duration_s", "item_duration_s", "rating"):
        if col not in df:
            df[col] = np.nan
    df["order"] = np.arange(len(df))  # arrival order breaks ties between equal event times
    return df


def expected_features(events: list[UserEvent], sequence_length: int, window_s: int) -> dict[str, pd.DataFrame]:
    df = events_frame(events)
    df["ratio"] = df["play_duration_s"] / df["item_duration_s"]
    df["is_play"] = df["event_type"] == "play"
    df["watch"] = np.where(df["is_play"], df["play_duration_s"], 0.0)
    interactions = df[df["event_type"] != "impression"].sort_values(["event_time_ms", "order"], kind="stable")

    users = df.groupby("user_id").agg(
        event_count=("event_id", "size"), play_count=("is_play", "sum"),
        rating_count=("rating", "count"), rating_sum=("rating", "sum"),
        total_watch_s=("watch", "sum"), last_active_ms=("event_time_ms", "max"))
    users["mean_rating"] = np.where(users.rating_count > 0, users.rating_sum / users.rating_count.clip(lower=1), 0.0)
    users["mean_watch_s"] = np.where(users.play_count > 0, users.total_watch_s / users.play_count.clip(lower=1), 0.0)

    def last_n(group: pd.DataFrame) -> pd.Series:
        tail = group.sort_values("order", kind="stable").tail(sequence_length)
        return pd.Series({"seq_item_ids": tail.item_id.tolist(),
                          "seq_event_times_ms": tail.event_time_ms.tolist(),
                          "seq_ratings": tail.rating.fillna(0.0).tolist(),
                          "seq_play_s": tail.play_duration_s.fillna(0.0).tolist(),
                          "seq_watch_ratios": tail.ratio.fillna(0.0).tolist()})
    sequence = interactions.groupby("user_id")[list(interactions.columns)].apply(last_n)

    items = df.groupby("item_id").agg(
        exposures=("event_type", lambda t: int((t == "impression").sum())),
        plays=("is_play", "sum"), rating_count=("rating", "count"), rating_sum=("rating", "sum"),
        ratio_n=("ratio", "count"), ratio_sum=("ratio", "sum"), last_event_ms=("event_time_ms", "max"))
    items["interactions"] = interactions.groupby("item_id").size().reindex(items.index, fill_value=0)
    items["mean_rating"] = np.where(items.rating_count > 0, items.rating_sum / items.rating_count.clip(lower=1), 0.0)
    items["mean_watch_ratio"] = np.where(items.ratio_n > 0, items.ratio_sum / items.ratio_n.clip(lower=1), 0.0)
    cutoff = interactions.item_id.map(items.last_event_ms) - window_s * 1000
    items["popularity_window"] = (interactions[interactions.event_time_ms >= cutoff].groupby("item_id").size()
                                  .reindex(items.index, fill_value=0))
    return {"user_sequence": sequence, "user_aggregates": users, "item_stats": items}


def assert_rows_match(actual: pd.DataFrame, expected: pd.DataFrame, columns: list[str], key: str) -> None:
    """Every expected entity present with equal values (floats to float32 precision)."""
    actual = actual.set_index(key).sort_index()
    expected = expected.sort_index()
    assert list(actual.index) == list(expected.index), f"{key}s differ"
    for col in columns:
        for entity, got, want in zip(expected.index, actual[col], expected[col]):
            if isinstance(want, list):
                assert len(got) == len(want) and np.allclose(got, want, rtol=1e-6, atol=1e-6), \
                    f"{key}={entity} {col}: {got} != {want}"
            else:
                assert np.isclose(float(got), float(want), rtol=1e-6, atol=1e-6), \
                    f"{key}={entity} {col}: {got} != {want}"
