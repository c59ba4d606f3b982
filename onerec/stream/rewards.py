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
Rewards: `event_reward` maps a reaction to [-1, 1]: `rate` -> (rating - 3) / 2, `like` and
`share` +1, `skip` -1, `click` +0.25, `play` -> the duration-aware shaping when the joiner was
given a fitted shaper (onerec/rl/rewards.py), else counted `unshaped_plays` and given 0.
"""
from __future__ import annotations

import math
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from onerec.data.events import UserEvent
from onerec.rl.rewards import DurationShaper, rating_reward

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


class RewardJoin:
    def __init__(self, window_ms: int, reward_of: Callable[[UserEvent], float | None] = event_reward):
        if window_ms <= 0:
            raise ValueError(f"window_ms must be > 0, got {window_ms}")
        self.window_ms, self.reward_of = window_ms, reward_of
        self.open: dict[str, _Open] = {}
        self.waiting: dict[str, list[tuple[UserEvent, int]]] = defaultdict(list)   # reactions before exposures
        self.closed: OrderedDict[str, int] = OrderedDict()                          # request id -> closed at
        self.seen_events: OrderedDict[str, int] = OrderedDict()                     # event id -> seen at
        self.stats: dict[str, int] = defaultdict(int)

    def add_exposure(self, exposure: dict, now_ms: int) -> None:
        request_id = exposure["request_id"]
        if request_id in self.open or request_id in self.closed:
            self.stats["duplicate_exposures"] += 1
            return
        self.stats["exposures"] += 1
        items = [int(i["item_id"]) for i in sorted(exposure["items"], key=lambda i: i["position"])]
        row = JoinedRow(request_id, int(exposure["user_id"]), str(exposure["variant"]), str(exposure["model_version"]),
                        exposure.get("fallback"), int(exposure["time_ms"]), items, [None] * len(items))
        self.open[request_id] = _Open(row, {item: p for p, item in enumerate(items)},
                                      max(now_ms, row.served_ms) + self.window_ms)
        for event, _ in self.waiting.pop(request_id, []):
            self._apply(self.open[request_id], event)

    def add_reaction(self, event: UserEvent, now_ms: int) -> None:
        if event.request_id is None:
            self.stats["organic"] += 1
            return
        if event.event_id in self.seen_events:
            self.stats["duplicate_reactions"] += 1
            return
        self.seen_events[event.event_id] = now_ms
        self.stats["reactions"] += 1
        if event.request_id in self.open:
            self._apply(self.open[event.request_id], event)
        elif event.request_id in self.closed:
            self.stats["late"] += 1
        else:
            self.waiting[event.request_id].append((event, now_ms))

    def _apply(self, entry: _Open, event: UserEvent) -> None:
        pos = entry.position.get(event.item_id)
        if pos is None or event.user_id != entry.row.user_id:
            self.stats["unmatched"] += 1
            return
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
        rows = [self.open.pop(rid).row for rid in done]
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

    def drain(self) -> list[JoinedRow]:
        """Every open exposure as a row now (shutdown: nothing half-joined is lost)."""
        return self.close(math.inf)
