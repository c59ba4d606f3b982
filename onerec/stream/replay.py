"""Turn a data set's interactions into validated user events and publish them to Kafka.

Event ids are stable (`<dataset>:<user>:<item>:<timestamp>[:n]`), so a replay that is run
again produces the same ids and a consumer's de-duplication sees redeliveries, not new events.
Records are keyed by user id: Kafka keeps one user's events in order within a partition.
"""
from __future__ import annotations

import math
from typing import Iterable, Iterator

import pandas as pd
from tqdm import tqdm

from onerec.data.events import UserEvent, validate


def interaction_events(interactions: pd.DataFrame, dataset: str) -> Iterator[UserEvent]:
    """(N, canonical columns) -> N events in row order. Rated rows become `rate` events, rows with
    a play duration `play` events, the rest `click` events. Raises EventValidationError on a row
    that cannot be a valid event (the loader validated the data, so that would be a bug)."""
    df = interactions
    repeat = df.groupby(["user_id", "item_id", "timestamp"]).cumcount().to_numpy()
    columns = [df[c].to_numpy() for c in ("user_id", "item_id", "timestamp", "rating",
                                          "play_duration", "item_duration")]
    for (user, item, ts, rating, play, duration), n in zip(zip(*columns), repeat):
        suffix = f":{n}" if n else ""  # the same (user, item, second) twice is two events
        yield validate(UserEvent(
            event_id=f"{dataset}:{user}:{item}:{ts}{suffix}",
            user_id=int(user), item_id=int(item),
            event_type="rate" if not math.isnan(rating) else "play" if not math.isnan(play) else "click",
            event_time_ms=int(ts) * 1000,
            rating=None if math.isnan(rating) else float(rating),
            play_duration_s=None if math.isnan(play) else float(play),
            item_duration_s=None if math.isnan(duration) else float(duration),
        ))


def publish(events: Iterable[UserEvent], bootstrap: str, topic: str, total: int | None = None,
            progress: bool = True, headers: list[tuple[str, bytes]] | None = None) -> int:
    """Send events keyed by user id, each with `headers` (e.g. which replay sent it); returns how
    many the broker acknowledged (all of them, or it raises)."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20,
                             batch_size=256 * 1024, retries=5)
    futures = []
    try:
        for event in tqdm(events, total=total, desc=f"publish {topic}", unit="ev",
                          disable=not progress, mininterval=0.5):
            futures.append(producer.send(topic, key=str(event.user_id).encode(), value=event.to_json(),
                                         headers=headers))
        producer.flush()
        for future in futures:
            future.get(timeout=30)  # surfaces any send error instead of losing it silently
    finally:
        producer.close()
    return len(futures)
