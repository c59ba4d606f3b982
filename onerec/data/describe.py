"""Summary statistics of a Dataset, as a dict (for `--json`) and as a two-column text table."""
from __future__ import annotations

from datetime import datetime, timezone

import numpy as np

from onerec.data.loaders import Dataset


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def describe(ds: Dataset) -> dict:
    """Users, items, interactions, time span, sparsity, events per user, ratings (if any)."""
    inter = ds.interactions
    per_user = inter.groupby("user_id").size().to_numpy()
    users, items, n = len(per_user), len(ds.items), len(inter)
    ts = inter["timestamp"].to_numpy()
    stats: dict = {
        "dataset": ds.name,
        "users": users,
        "items": items,  # the catalogue, including items nobody interacted with
        "items_interacted": int(inter["item_id"].nunique()),
        "interactions": n,
        "sparsity": 1.0 - n / (users * items) if users and items else float("nan"),
        "per_user_mean": float(per_user.mean()) if users else float("nan"),
        "per_user_median": float(np.median(per_user)) if users else float("nan"),
        "per_user_min": int(per_user.min()) if users else 0,
        "per_user_max": int(per_user.max()) if users else 0,
    }
    if not ds.real_time:
        stats["timestamps"] = "sequence positions"
    elif n:
        stats["timestamps"] = "unix seconds"
        stats.update(first_timestamp=int(ts.min()), last_timestamp=int(ts.max()),
                     first_date=_iso(int(ts.min())), last_date=_iso(int(ts.max())))
    ratings = inter["rating"].dropna()
    if len(ratings):
        counts = ratings.value_counts().sort_index()
        # Whole-number ratings print as 1..5, not 1.0..5.0.
        stats["ratings"] = {(int(r) if float(r).is_integer() else float(r)): int(c)
                            for r, c in counts.items()}
    return stats


def format_table(stats: dict) -> str:
    """Two aligned columns; nested dicts (the rating counts) become indented rows."""
    rows: list[tuple[str, str]] = []
    for key, value in stats.items():
        if isinstance(value, dict):
            rows.append((key, ""))
            rows.extend((f"  {k}", _fmt(v)) for k, v in value.items())
        else:
            # Timestamps are identifiers of an instant, not quantities: no thousands separators.
            rows.append((key, str(value) if key.endswith("timestamp") else _fmt(value)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}".rstrip() for k, v in rows)


def _fmt(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return f"{value:,}"
    return f"{value:.4f}" if abs(value) < 1 else f"{value:,.2f}"
