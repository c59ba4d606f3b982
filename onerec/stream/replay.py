"""Turn a data set's interactions into validated user events and publish them to Kafka.

Event ids are stable (`<dataset>:<user>:<item>:<timestamp>[:n]`), so a replay that is run
again produces the same ids and a consumer's de-duplication sees redeliveries, not new events.
Records are keyed by user id: Kafka keeps one user's events in order within a partition.
"""
from __future__ import annotations

import math
import time
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


def parse_speed(text: str) -> float:
    """`100x` or `100` -> 100.0 (event time runs 100 times faster than wall time)."""
    try:
        speed = float(text.lower().removesuffix("x"))
    except ValueError:
        raise ValueError(f"--speed {text!r}: expected a factor such as 100x") from None
    if not speed > 0:
        raise ValueError(f"--speed {text!r}: must be > 0")
    return speed


def paced(events: Iterable[UserEvent], speed: float | None) -> Iterator[UserEvent]:
    """Yield events no faster than event time / speed (None: as fast as possible)."""
    start_wall, start_event = time.monotonic(), None
    for event in events:
        if speed is not None:
            start_event = event.event_time_ms if start_event is None else start_event
            due = start_wall + (event.event_time_ms - start_event) / 1000.0 / speed
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
        yield event


def replay(cfg, bootstrap: str, speed: float | None, limit: int | None = None, progress: bool = True) -> dict:
    """Publish the data set's live part (events from T0 on) in event-time order."""
    from onerec.data import load_dataset, online_split

    dataset = load_dataset(cfg.data)
    live = online_split(dataset.interactions, cfg.data).live
    live = live if limit is None else live.iloc[:limit]
    started = time.monotonic()
    sent = publish(paced(interaction_events(live, dataset.name), speed), bootstrap,
                   cfg.kafka.user_events.name, total=len(live), progress=progress)
    seconds = time.monotonic() - started
    return {"published": sent, "topic": cfg.kafka.user_events.name, "seconds": round(seconds, 2),
            "events_per_s": round(sent / seconds) if seconds else None,
            "speed": "max" if speed is None else f"{speed:g}x"}
