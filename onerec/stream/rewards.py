"""The reward join: exposures (what the predictor served, Kafka `exposures`) joined with the
users' reactions (Kafka `user-events` carrying a request id) into one row per exposure with a
reward per served item: what alignment trains on and what the A/B statistics count.

`RewardJoin` is the state machine (no I/O, so every edge case is a unit test):
    join = RewardJoin(window_ms=60_000, reward_of=event_reward)
    join.add_exposure(exposure_dict, now_ms)     # from the exposures topic
    join.add_reaction(user_event, now_ms)        # from user-events
    rows = join.close(now_ms)                    # exposures whose window has passed -> JoinedRow
An exposure stays open for `window_ms` after it was served; a reaction to one of its items in
that time sets that item's reward (the latest reaction per item wins; the same event id twice is
a duplicate). Reactions are matched by (request id, item). Edge cases, each counted in `stats`:
  - a reaction before its exposure (the topics are read independently): held for the window,
    matched when the exposure arrives, else `unmatched`;
  - a reaction after its exposure closed: `late` (not applied: the row is already out);
  - a reaction to an item that exposure did not serve: `unmatched`;
  - an exposure seen twice (a redelivery after a restart): `duplicate_exposures`, ignored while
    its request id is remembered (for 10 windows after it closed);
  - events without a request id (organic activity, the replay): `organic`, ignored.
`RewardJoiner` is the service (`onerec rewards join`, a consumer-group member like the ingestor):
it reads both topics, writes each closed row to the offline store (parquet parts under the Feast
offline folder, `exposure_rewards/`, read back by `load_rewards`, deduplicated by request id)
and adds it, with every user event read, to the A/B store (SQL, onerec/abtest/store.py; one row
per request id and per event id), and only then commits offsets, below the oldest record still
held in memory. A crash redelivers what was not written; what was written twice is
deduplicated downstream. Malformed exposures and events are counted and skipped (the ingestor
already sends bad user events to the DLQ).

Rewards: `event_reward` maps a reaction to [-1, 1]: `rate` -> (rating - 3) / 2, `like` and
`share` +1, `skip` -1, `click` +0.25, `play` -> the duration-aware shaping when the joiner was
given a fitted shaper (onerec/rl/rewards.py), else counted `unshaped_plays` and given 0.
"""
from __future__ import annotations

import json
import math
import signal
import threading
import time
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from onerec.abtest.store import ABStore
from onerec.config import Config
from onerec.data.events import EventValidationError, UserEvent, parse_event
from onerec.rl.rewards import DurationShaper, rating_reward

COUNTERS = ("exposures", "duplicate_exposures", "reactions", "matched", "duplicate_reactions", "late",
            "unmatched", "organic", "unshaped_plays", "no_reward", "rows", "bad_exposures", "bad_events", "ab_counted", "ab_events")
REMEMBER_WINDOWS = 10     # closed request ids are remembered this many windows (duplicates, late)
EVENT_REWARDS = {"like": 1.0, "share": 1.0, "skip": -1.0, "click": 0.25}


def event_reward(event: UserEvent, shaper: DurationShaper | None = None) -> float | None:
    """A reaction -> reward in [-1, 1]; None when it carries none (an impression, an unshaped play)."""
    if event.event_type == "rate":
        return rating_reward(event.rating)
    if event.event_type == "play":
        return None if shaper is None else shaper.reward(event.item_duration_s, event.play_duration_s)
    return EVENT_REWARDS.get(event.event_type)


@dataclass
class JoinedRow:
    request_id: str
    user_id: int
    variant: str
    model_version: str
    fallback: str | None
    served_ms: int
    items: list[int]
    rewards: list[float | None]       # per position; None = no reaction within the window
    experiment: str | None = None     # the A/B experiment it was served under
    latency_ms: float | None = None   # the request's time in the predictor
    watch_s: float = 0.0              # seconds played of its items (the latest play per item)

    @property
    def reward(self) -> float:
        """The exposure's reward: the sum over its items (no reaction = 0)."""
        return float(sum(r for r in self.rewards if r is not None))

    def as_dict(self) -> dict:
        return {**self.__dict__, "reward": self.reward, "reacted": sum(r is not None for r in self.rewards)}


@dataclass
class _Open:
    row: JoinedRow
    position: dict[int, int]          # item -> position in the session
    closes_ms: int
    reacted_ms: dict[int, int] = field(default_factory=dict)   # item -> time of the reaction applied
    played_s: dict[int, tuple[int, float]] = field(default_factory=dict)   # item -> (time, seconds) latest play
    tokens: list = field(default_factory=list)                 # the records it holds (Kafka positions)


class RewardJoin:
    def __init__(self, window_ms: int, reward_of: Callable[[UserEvent], float | None] = event_reward):
        if window_ms <= 0:
            raise ValueError(f"window_ms must be > 0, got {window_ms}")
        self.window_ms, self.reward_of = window_ms, reward_of
        self.open: dict[str, _Open] = {}
        self.waiting: dict[str, list[tuple[UserEvent, int, object]]] = defaultdict(list)  # before their exposure
        self.closed: OrderedDict[str, int] = OrderedDict()                          # request id -> closed at
        self.seen_events: OrderedDict[str, int] = OrderedDict()                     # event id -> seen at
        self.stats: dict[str, int] = defaultdict(int)

    def add_exposure(self, exposure: dict, now_ms: int, token: object = None) -> None:
        """token: what to report in `pending_tokens` until this exposure's row is out (its record)."""
        request_id = exposure["request_id"]
        if request_id in self.open or request_id in self.closed:
            self.stats["duplicate_exposures"] += 1
            return
        self.stats["exposures"] += 1
        items = [int(i["item_id"]) for i in sorted(exposure["items"], key=lambda i: i["position"])]
        row = JoinedRow(request_id, int(exposure["user_id"]), str(exposure["variant"]), str(exposure["model_version"]),
                        exposure.get("fallback"), int(exposure["time_ms"]), items, [None] * len(items),
                        exposure.get("experiment") or None, exposure.get("latency_ms"))
        entry = _Open(row, {item: p for p, item in enumerate(items)}, max(now_ms, row.served_ms) + self.window_ms,
                      tokens=[token])
        self.open[request_id] = entry
        for event, _, held in self.waiting.pop(request_id, []):
            self._apply(entry, event, held)

    def add_reaction(self, event: UserEvent, now_ms: int, token: object = None) -> None:
        if event.request_id is None:
            self.stats["organic"] += 1
            return
        if event.event_id in self.seen_events:
            self.stats["duplicate_reactions"] += 1
            return
        self.seen_events[event.event_id] = now_ms
        self.stats["reactions"] += 1
        if event.request_id in self.open:
            self._apply(self.open[event.request_id], event, token)
        elif event.request_id in self.closed:
            self.stats["late"] += 1
        else:
            self.waiting[event.request_id].append((event, now_ms, token))

    def _apply(self, entry: _Open, event: UserEvent, token: object) -> None:
        entry.tokens.append(token)
        pos = entry.position.get(event.item_id)
        if pos is None or event.user_id != entry.row.user_id:
            self.stats["unmatched"] += 1
            return
        if event.event_type == "play" and event.play_duration_s is not None \
                and event.event_time_ms >= entry.played_s.get(event.item_id, (-math.inf, 0.0))[0]:
            entry.played_s[event.item_id] = (event.event_time_ms, event.play_duration_s)
        reward = self.reward_of(event)
        if reward is None:
            self.stats["unshaped_plays" if event.event_type == "play" else "no_reward"] += 1
            return
        if event.event_time_ms >= entry.reacted_ms.get(event.item_id, -math.inf):   # the latest reaction wins
            entry.row.rewards[pos], entry.reacted_ms[event.item_id] = reward, event.event_time_ms
        self.stats["matched"] += 1

    def close(self, now_ms: int) -> list[JoinedRow]:
        """Rows of the exposures whose window has passed; expires waiting reactions and memory."""
        done = [rid for rid, entry in self.open.items() if entry.closes_ms <= now_ms]
        rows = []
        for rid in done:
            entry = self.open.pop(rid)
            entry.row.watch_s = float(sum(seconds for _, seconds in entry.played_s.values()))
            rows.append(entry.row)
        for rid in done:
            self.closed[rid] = now_ms
        for rid in [r for r, held in self.waiting.items() if held[0][1] + self.window_ms <= now_ms]:
            self.stats["unmatched"] += len(self.waiting.pop(rid))
        forget_before = now_ms - REMEMBER_WINDOWS * self.window_ms
        for memory in (self.closed, self.seen_events):
            while memory and next(iter(memory.values())) < forget_before:
                memory.popitem(last=False)
        self.stats["rows"] += len(rows)
        return rows

    def counts(self) -> dict[str, int]:
        """Every counter (zeros included), for reports and dashboards."""
        return {name: self.stats[name] for name in COUNTERS}

    def pending_tokens(self):
        """The tokens of every record whose effect is still only in memory (open exposures, the
        reactions applied to them, reactions waiting): a consumer commits below the oldest."""
        for entry in self.open.values():
            yield from entry.tokens
        for held in self.waiting.values():
            yield from (token for _, _, token in held)

    def drain(self) -> list[JoinedRow]:
        """Every open exposure as a row now (shutdown: nothing half-joined is lost)."""
        return self.close(math.inf)


# --------------------------------------------------------------------------- the service

REWARDS_FOLDER = "exposure_rewards"


def parse_exposure(raw: bytes) -> dict:
    """An exposure record (onerec/exposures.py) -> dict; ValueError when it is not one."""
    d = json.loads(raw)
    if not isinstance(d, dict) or d.get("schema_version") != 1 or not isinstance(d.get("request_id"), str) \
            or not isinstance(d.get("items"), list) or not isinstance(d.get("time_ms"), int):
        raise ValueError("not an exposure record (schema_version 1, request_id, items, time_ms)")
    for item in d["items"]:
        if not isinstance(item, dict) or not isinstance(item.get("item_id"), int) or not isinstance(item.get("position"), int):
            raise ValueError("exposure items must be {item_id, position, score}")
    if not isinstance(d.get("experiment", ""), (str, type(None))) or isinstance(d.get("latency_ms"), bool) \
            or not isinstance(d.get("latency_ms"), (int, float, type(None))):
        raise ValueError("exposure experiment must be a string and latency_ms a number (or null)")
    return d


def rows_frame(rows: list[JoinedRow]) -> pd.DataFrame:
    frame = pd.DataFrame([r.as_dict() for r in rows])
    frame["event_timestamp"] = pd.to_datetime(frame["served_ms"], unit="ms", utc=True)
    return frame


def write_rewards(cfg: Config, rows: list[JoinedRow]) -> None:
    """Append rows to the offline store as one parquet part (atomic rename)."""
    from onerec.features.store import feast_dir

    if not rows:
        return
    folder = feast_dir(cfg) / "offline" / REWARDS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    name = f"part-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"
    tmp = folder / f".{name}.tmp"
    rows_frame(rows).to_parquet(tmp, index=False)
    tmp.replace(folder / name)


def load_rewards(cfg: Config) -> pd.DataFrame:
    """Every joined row in the offline store, one per request id (redeliveries dropped)."""
    from onerec.features.store import feast_dir

    folder = feast_dir(cfg) / "offline" / REWARDS_FOLDER
    parts = sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []
    if not parts:
        return pd.DataFrame(columns=["request_id", "user_id", "variant", "model_version", "fallback", "served_ms",
                                     "items", "rewards", "reward", "reacted", "event_timestamp"])
    return (pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
            .drop_duplicates("request_id", keep="first").reset_index(drop=True))


def event_row(event: UserEvent, reward: float | None) -> dict:
    """A user event as the A/B store keeps it (pre-experiment activity, item popularity)."""
    return {"event_id": event.event_id, "user_id": event.user_id, "item_id": event.item_id,
            "event_type": event.event_type, "time_ms": event.event_time_ms, "reward": reward}


class RewardJoiner:
    def __init__(self, cfg: Config, bootstrap: str, store: ABStore, shaper: DurationShaper | None = None):
        self.cfg, self.bootstrap, self.store = cfg, bootstrap, store
        self.reward_of = lambda e: event_reward(e, shaper)
        self.join = RewardJoin(int(cfg.rewards.window_s * 1000), self.reward_of)
        self.events: list[dict] = []          # read since the last flush, for the A/B store
        self._stop = threading.Event()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())

    def run(self, idle_exit_s: float | None = None, max_rows: int | None = None) -> dict:
        """Until stopped, idle for idle_exit_s (then every open exposure is closed and written),
        or max_rows rows written. -> the join's counters."""
        from kafka import KafkaConsumer, OffsetAndMetadata

        from onerec.stream.ingest import GROUP_TIMEOUTS

        topics = (self.cfg.kafka.exposures.name, self.cfg.kafka.user_events.name)
        consumer = KafkaConsumer(*topics, bootstrap_servers=self.bootstrap, group_id=self.cfg.rewards.group_id,
                                 enable_auto_commit=False, auto_offset_reset="earliest", **GROUP_TIMEOUTS)
        consumed: dict = {}                            # TopicPartition -> next offset to read
        last_record, last_flush, written = time.monotonic(), time.monotonic(), 0
        try:
            while not self._stop.is_set():
                batch = consumer.poll(timeout_ms=200)
                now_ms = int(time.time() * 1000)
                for tp, records in batch.items():
                    for rec in records:
                        self._add(tp, rec, now_ms)
                    consumed[tp] = records[-1].offset + 1
                    last_record = time.monotonic()
                idle = idle_exit_s is not None and time.monotonic() - last_record > idle_exit_s
                if idle or time.monotonic() - last_flush >= self.cfg.rewards.flush_s:
                    rows = self.join.drain() if idle else self.join.close(now_ms)
                    self._write(rows)
                    written += len(rows)
                    self._commit(consumer, consumed, OffsetAndMetadata)
                    last_flush = time.monotonic()
                if idle or (max_rows is not None and written >= max_rows):
                    break
        finally:
            consumer.close()
        return {**self.join.counts(), "rows_written": written}

    def _add(self, tp, rec, now_ms: int) -> None:
        token = (tp, rec.offset)
        try:
            if tp.topic == self.cfg.kafka.exposures.name:
                self.join.add_exposure(parse_exposure(rec.value), now_ms, token)
            else:
                event = parse_event(rec.value)
                self.join.add_reaction(event, now_ms, token)
                self.events.append(event_row(event, self.reward_of(event)))
        except (ValueError, EventValidationError, KeyError, TypeError):
            self.join.stats["bad_exposures" if tp.topic == self.cfg.kafka.exposures.name else "bad_events"] += 1

    def _write(self, rows: list[JoinedRow]) -> None:
        """Offline store, then the A/B store; raises (and nothing is committed) if either fails.
        Both are idempotent by id, so what a crash makes us write twice is counted once."""
        write_rewards(self.cfg, rows)
        self.join.stats["ab_counted"] += self.store.add_exposures([r.as_dict() for r in rows])
        self.join.stats["ab_events"] += self.store.add_events(self.events)
        self.events = []

    def _commit(self, consumer, consumed: dict, offset_and_metadata) -> None:
        """Per partition: below the oldest record still held in memory, else all consumed."""
        oldest: dict = {}
        for tp, offset in self.join.pending_tokens():
            oldest[tp] = min(offset, oldest.get(tp, offset))
        offsets = {tp: offset_and_metadata(oldest.get(tp, nxt), None, -1) for tp, nxt in consumed.items()}
        if offsets:
            consumer.commit(offsets)


def open_joiner(cfg: Config) -> RewardJoiner:
    from onerec.endpoints import KAFKA_BOOTSTRAP, ab_store_url, resolve_endpoints

    endpoints = resolve_endpoints(cfg.stack.state_dir)
    return RewardJoiner(cfg, endpoints.require(KAFKA_BOOTSTRAP), ABStore.open(ab_store_url(cfg.stack.state_dir)))
