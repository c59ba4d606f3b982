"""Two ways to cut the canonical interactions table.

- `leave_last_out`: offline evaluation as in the published benchmarks (TIGER, SASRec, S3-Rec):
  each user's last event is the test item, the one before it validation, the rest training.
- `time_split`: the streaming loop. Events before T0 are history (what the first model trains
  on and what the feature store is seeded with); events from T0 on are replayed as the live stream.

Both are pure and deterministic: the same table gives the same parts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from onerec.data.loaders import DataError


@dataclass(frozen=True, eq=False)  # eq=False: comparing DataFrames with == is ambiguous
class LeaveLastOut:
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame


@dataclass(frozen=True, eq=False)
class TimeSplit:
    history: pd.DataFrame  # timestamp < t0, sorted by (user_id, timestamp)
    live: pd.DataFrame     # timestamp >= t0, in replay order: (timestamp, user_id, original row)
    t0: int


def _check_columns(interactions: pd.DataFrame, where: str) -> None:
    missing = [c for c in ("user_id", "timestamp") if c not in interactions.columns]
    if missing:
        raise DataError(f"{where}: interactions lack column(s) {', '.join(missing)}; "
                        "pass the table from onerec.data.load_dataset")


def leave_last_out(interactions: pd.DataFrame) -> LeaveLastOut:
    """Per user: last event -> test, second-to-last -> valid, the rest -> train.

    "Last" is by timestamp; ties keep row order (MovieLens has many same-second ratings, so the
    canonical table's file order decides among them). Users with fewer than 3 events go
    entirely to train: they cannot give both a validation and a test item without leaving
    nothing to learn from. Each part is sorted by (user_id, timestamp) with a fresh index.
    """
    _check_columns(interactions, "leave_last_out")
    order = np.lexsort((interactions["timestamp"].to_numpy(), interactions["user_id"].to_numpy()))
    df = interactions.iloc[order].reset_index(drop=True)  # lexsort is stable: ties keep row order
    users = df["user_id"]
    count = users.map(users.value_counts()).to_numpy()
    from_end = count - 1 - df.groupby("user_id", sort=False).cumcount().to_numpy()  # 0 = last event
    eligible = count >= 3
    test = eligible & (from_end == 0)
    valid = eligible & (from_end == 1)
    train = ~(test | valid)
    return LeaveLastOut(*(df[m].reset_index(drop=True) for m in (train, valid, test)))


def time_split(interactions: pd.DataFrame, live_fraction: float) -> TimeSplit:
    """Cut at T0, the timestamp at quantile (1 - live_fraction) of all events.

    T0 is the timestamp of the k-th event in time order, k = floor((1 - live_fraction) * n), so
    about `live_fraction` of the events are live; events sharing T0's second all go live, which
    keeps the boundary clean (every history event < t0 <= every live event). The live part is
    sorted by (timestamp, user_id, original row) because the replayer sends it in that order.
    """
    _check_columns(interactions, "time_split")
    if not 0.0 < live_fraction < 1.0:
        raise DataError(f"time_split: live_fraction={live_fraction} must be between 0 and 1 "
                        "(exclusive); set data.live_fraction")
    n = len(interactions)
    if n < 2:
        raise DataError(f"time_split: {n} interaction(s); need at least 2 to have history and live events")
    ts = interactions["timestamp"].to_numpy()
    k = min(int(np.floor((1.0 - live_fraction) * n)), n - 1)  # n - 1: the live part is never empty
    t0 = int(np.sort(ts, kind="stable")[k])
    live_mask = ts >= t0
    if live_mask.all():
        raise DataError(f"time_split: live_fraction={live_fraction} leaves no history: the first "
                        f"{k + 1} events all have timestamp {t0}; use a smaller live_fraction")

    history = interactions[~live_mask]
    order = np.lexsort((history["timestamp"].to_numpy(), history["user_id"].to_numpy()))
    history = history.iloc[order].reset_index(drop=True)
    live = interactions[live_mask]
    # lexsort is stable, so events with the same (timestamp, user) keep their original order.
    order = np.lexsort((live["user_id"].to_numpy(), live["timestamp"].to_numpy()))
    live = live.iloc[order].reset_index(drop=True)
    return TimeSplit(history, live, t0)
