"""The one definition of every feature: the Feast repo, the feature computation, the offline
parquet schema and the tests all read these tables, so a name or type lives in one place.

Dtypes: int64, float32, float64, and list variants (`int64[]`, `float32[]`). An absent value is
0.0 (a rating event has no play duration; ratings are 1..5, so 0 means "not rated"), and means
are 0.0 when their count is 0: Feast's online store turns NaN into 0.0, and offline rows must
equal online ones.
"""
from __future__ import annotations

from dataclasses import dataclass

EVENT_TS = "event_timestamp"   # the entity's latest event time: point-in-time joins use it
CREATED_TS = "created"         # when the row was computed: breaks ties between equal event times


@dataclass(frozen=True)
class View:
    name: str
    entity: str                                  # user | item
    join_key: str
    fields: tuple[tuple[str, str], ...]          # (feature name, dtype)
    ttl_days: int                                # Feast serves nothing older than this

    @property
    def push_source(self) -> str:
        return f"{self.name}_push"

    @property
    def feature_names(self) -> list[str]:
        return [name for name, _ in self.fields]

    @property
    def columns(self) -> list[str]:
        return [self.join_key, *self.feature_names, EVENT_TS, CREATED_TS]


USER_SEQUENCE = View("user_sequence", "user", "user_id", (
    ("seq_item_ids", "int64[]"),          # the last N interacted items, oldest first
    ("seq_event_times_ms", "int64[]"),
    ("seq_ratings", "float32[]"),
    ("seq_play_s", "float32[]"),
    ("seq_watch_ratios", "float32[]"),    # play duration / item duration
), ttl_days=365)

USER_AGGREGATES = View("user_aggregates", "user", "user_id", (
    ("event_count", "int64"),             # every event, impressions included
    ("play_count", "int64"),
    ("rating_count", "int64"),
    ("mean_rating", "float32"),
    ("total_watch_s", "float64"),
    ("mean_watch_s", "float32"),          # per play event
    ("last_active_ms", "int64"),
), ttl_days=365)

ITEM_STATS = View("item_stats", "item", "item_id", (
    ("exposures", "int64"),               # impression events
    ("interactions", "int64"),            # every other event
    ("plays", "int64"),
    ("rating_count", "int64"),
    ("mean_rating", "float32"),
    ("mean_watch_ratio", "float32"),      # over events that carry a watch ratio
    ("popularity_window", "int64"),       # interactions at most popularity_window_s before its latest event
    ("last_event_ms", "int64"),
), ttl_days=365)

VIEWS = (USER_SEQUENCE, USER_AGGREGATES, ITEM_STATS)
# FeatureServices (feature_repo/services.py): one per consumer.
ONLINE_SERVICE = "recommender_online"
TRAINING_SERVICE = "training"

