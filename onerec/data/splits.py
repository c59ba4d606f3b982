"""Two ways to cut the canonical interactions table.

- `leave_last_out`: offline evaluation as in the published benchmarks (TIGER, SASRec, S3-Rec):
  each user's last event is the test item, the one before it validation, the rest training.
- `time_split`: the streaming loop. Events before T0 are history (what the first model trains
  on and what the feature store is seeded with); events from T0 on are replayed as the live stream,
  up to T1 when a holdout is asked for: events from T1 on are never replayed, backfilled or
  trained on, so they stay real reactions no model has seen (the simulator's, the aligned
  model's offline check).

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
    live: pd.DataFrame     # t0 <= timestamp < t1, in replay order: (timestamp, user_id, original row)
    t0: int
    holdout: pd.DataFrame  # timestamp >= t1 (empty without a holdout), sorted by (user_id, timestamp)
    t1: int | None         # None: no holdout


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


def time_split(interactions: pd.DataFrame, live_fraction: float, holdout_fraction: float = 0.0) -> TimeSplit:
    """Cut at T0, the timestamp at quantile (1 - live_fraction - holdout_fraction) of all events,
    and at T1, the one at quantile (1 - holdout_fraction) when holdout_fraction > 0.

    A cut at quantile q is the timestamp of the k-th event in time order, k = floor(q * n);
    events sharing the cut's second all go to the later part, which keeps the boundaries clean
    (every history event < t0 <= every live event < t1 <= every holdout event). The live part is
    sorted by (timestamp, user_id, original row) because the replayer sends it in that order.
    """
    _check_columns(interactions, "time_split")
    if not 0.0 < live_fraction < 1.0:
        raise DataError(f"time_split: live_fraction={live_fraction} must be between 0 and 1 "
                        "(exclusive); set data.live_fraction")
    if not 0.0 <= holdout_fraction < 1.0 - live_fraction:
        raise DataError(f"time_split: holdout_fraction={holdout_fraction} must be >= 0 and leave history "
                        f"beside live_fraction={live_fraction}; set data.holdout_fraction")
    n = len(interactions)
    if n < 2:
        raise DataError(f"time_split: {n} interaction(s); need at least 2 to have history and live events")
    ts = interactions["timestamp"].to_numpy()
    ordered = np.sort(ts, kind="stable")

    def cut(q: float) -> int:
        return int(ordered[min(int(np.floor(q * n)), n - 1)])    # n - 1: the later part is never empty

    t0 = cut(1.0 - live_fraction - holdout_fraction)
    t1 = cut(1.0 - holdout_fraction) if holdout_fraction > 0 else None
    if (ts >= t0).all():
        raise DataError(f"time_split: live_fraction={live_fraction} leaves no history: the first "
                        f"events all have timestamp {t0}; use a smaller live_fraction")
    if t1 is not None and t1 <= t0:
        raise DataError(f"time_split: holdout_fraction={holdout_fraction} leaves no live events (T0 = T1 = "
                        f"{t0}); use a smaller holdout_fraction")
    late = ts >= t1 if t1 is not None else np.zeros(n, dtype=bool)
    history, live, holdout = interactions[ts < t0], interactions[(ts >= t0) & ~late], interactions[late]
    # lexsort is stable, so events with the same (timestamp, user) keep their original order.
    by_user = [frame.iloc[np.lexsort((frame["timestamp"].to_numpy(), frame["user_id"].to_numpy()))]
               .reset_index(drop=True) for frame in (history, holdout)]
    live = live.iloc[np.lexsort((live["user_id"].to_numpy(), live["timestamp"].to_numpy()))].reset_index(drop=True)
    return TimeSplit(by_user[0], live, t0, by_user[1], t1)


def online_split(interactions: pd.DataFrame, cfg) -> TimeSplit:
    """`time_split` with the data config's fractions (cfg: DataConfig): what every stage of the
    online loop (backfill, replay, the simulator) cuts the same way."""
    return time_split(interactions, cfg.live_fraction, cfg.holdout_fraction)
