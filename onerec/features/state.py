"""The feature logic: events -> per-user and per-item state -> feature rows.

One code path for streaming and backfill: both call `FeatureState.apply(events)` on batches in
event order, then `rows(...)` for the entities the batch touched. The state lives in Redis (not in
the process), updated by one Lua script per batch, so that:
  - an event id already applied is skipped in the same atomic step that applies it
    (redelivered events never double-count, whatever the crash point);
  - several ingestor instances can update the same item concurrently;
  - a restarted ingestor continues where the state is, not where its memory was.
Feast's online store is a projection of this state: rows are re-pushed for every touched entity,
so a batch that was applied but not pushed before a crash is pushed again on redelivery.

Keys (prefix `onerec:fs:`): seen:<event_id> (string, TTL), u:<user> (hash), useq:<user> (list,
newest first, trimmed to N), i:<item> (hash), iwin:<item> (sorted set of event ids by time).
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from onerec.config import FeaturesConfig
from onerec.data.events import UserEvent
from onerec.features.schema import CREATED_TS, EVENT_TS, ITEM_STATS, USER_AGGREGATES, USER_SEQUENCE

PREFIX = "onerec:fs:"

# ARGV: prefix, sequence_length, dedup_ttl_s, window_ms, events: one line per event of tab-separated
# event_id, user, item, type, time_ms, play_s, watch_ratio, rating ('' when absent). Returns how
# many were new. One string for the batch, not 8 arguments an event: redis-py packed 40k arguments
# a batch on the ingestor's thread (the GIL), the split costs Lua a fraction of that. A line that
# does not have exactly these fields (an id with a tab or newline) fails the batch before any write.
# Events are checked against `seen` one by one, but their effects are summed per entity in Lua
# tables and written once per entity: a 5,000-event batch costs ~2 Redis calls an event instead
# of ~15. Sums of floats are added in one step per batch (the order of additions differs from
# event-at-a-time by rounding only).
APPLY_LUA = """
local p, n, ttl, window = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local users, items, user_ids, item_ids = {}, {}, {}, {}
local function entity(map, ids, id)
  local e = map[id]
  if not e then
    e = {last = -1, counts = {}, sums = {}, seq = {}, win = {}}
    map[id] = e
    ids[#ids + 1] = id
  end
  return e
end
local function add(tbl, key, v) tbl[key] = (tbl[key] or 0) + v end
local f, k = {}, 0  -- 8 fields an event; every line is checked before anything is written (no rollback)
for line in string.gmatch(ARGV[5], '[^\\n]+') do
  f[k+1], f[k+2], f[k+3], f[k+4], f[k+5], f[k+6], f[k+7], f[k+8] = string.match(line,
    '^([^\\t]+)\\t(%d+)\\t(%d+)\\t(%a+)\\t(%-?%d+)\\t([^\\t]*)\\t([^\\t]*)\\t([^\\t]*)$')
  if not f[k+1] then return redis.error_reply('malformed event line: ' .. string.sub(line, 1, 200)) end
  k = k + 8
end
local applied = 0
for i = 1, k, 8 do
  local eid, user, item, etype, t, play, ratio, rating = f[i], f[i+1], f[i+2], f[i+3], f[i+4], f[i+5], f[i+6], f[i+7]
  if redis.call('SET', p .. 'seen:' .. eid, '1', 'NX', 'EX', ttl) then
    applied = applied + 1
    local u, it, tn = entity(users, user_ids, user), entity(items, item_ids, item), tonumber(t)
    add(u.counts, 'events', 1)
    if tn > u.last then u.last = tn end
    if tn > it.last then it.last = tn end
    if etype == 'impression' then
      add(it.counts, 'exposures', 1)
    else
      u.seq[#u.seq + 1] = item .. ',' .. t .. ',' .. rating .. ',' .. play .. ',' .. ratio
      add(it.counts, 'interactions', 1)
      it.win[#it.win + 1] = tn
      it.win[#it.win + 1] = eid
    end
    if etype == 'play' then
      add(u.counts, 'plays', 1)
      add(it.counts, 'plays', 1)
      add(u.sums, 'watch_s', tonumber(play))
    end
    if rating ~= '' then
      add(u.counts, 'ratings', 1)
      add(u.sums, 'rating_sum', tonumber(rating))
      add(it.counts, 'ratings', 1)
      add(it.sums, 'rating_sum', tonumber(rating))
    end
    if ratio ~= '' then
      add(it.counts, 'ratio_n', 1)
      add(it.sums, 'ratio_sum', tonumber(ratio))
    end
  end
end
-- write each entity once; returns its latest event time (stored or new)
local function write(key, e)
  for field, v in pairs(e.counts) do redis.call('HINCRBY', key, field, v) end
  for field, v in pairs(e.sums) do redis.call('HINCRBYFLOAT', key, field, string.format('%.17g', v)) end
  local last = tonumber(redis.call('HGET', key, 'last_ms') or '-1')
  if e.last > last then
    last = e.last
    redis.call('HSET', key, 'last_ms', string.format('%d', last))
  end
  return last
end
local function push_chunks(cmd, key, values, step)  -- Lua's unpack has a stack limit
  for j = 1, #values, step do
    redis.call(cmd, key, unpack(values, j, math.min(j + step - 1, #values)))
  end
end
for _, id in ipairs(user_ids) do
  local e = users[id]
  write(p .. 'u:' .. id, e)
  if #e.seq > 0 then
    push_chunks('LPUSH', p .. 'useq:' .. id, e.seq, 1000)  -- oldest pushed first: newest ends up at the head
    redis.call('LTRIM', p .. 'useq:' .. id, 0, n - 1)
  end
end
for _, id in ipairs(item_ids) do
  local e = items[id]
  local last = write(p .. 'i:' .. id, e)
  local win = p .. 'iwin:' .. id
  if #e.win > 0 then push_chunks('ZADD', win, e.win, 1000) end
  -- the window ends at the item's latest event of any type
  redis.call('ZREMRANGEBYSCORE', win, '-inf', '(' .. string.format('%d', last - window))
end
return applied
"""


def _num(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def watch_ratio(event: UserEvent) -> float | None:
    if event.play_duration_s is None or not event.item_duration_s:
        return None
    return event.play_duration_s / event.item_duration_s


@dataclass
class Touched:
    users: set[int]
    items: set[int]
    applied: int  # events that were new (not redeliveries)


class FeatureState:
    def __init__(self, client, cfg: FeaturesConfig):
        self.client = client  # a redis.Redis
        self.cfg = cfg
        self._apply = client.register_script(APPLY_LUA)

    def apply(self, events: Sequence[UserEvent]) -> Touched:
        """Apply a batch in order (callers keep each user's events in event-time order)."""
        lines = "\n".join(f"{e.event_id}\t{e.user_id}\t{e.item_id}\t{e.event_type}\t{e.event_time_ms}\t"
                          f"{_num(e.play_duration_s)}\t{_num(watch_ratio(e))}\t{_num(e.rating)}" for e in events)
        args = [PREFIX, self.cfg.sequence_length, self.cfg.dedup_ttl_s, self.cfg.popularity_window_s * 1000, lines]
        applied = int(self._apply(args=args)) if events else 0
        return Touched({e.user_id for e in events}, {e.item_id for e in events}, applied)

    def rows(self, users: set[int], items: set[int]) -> dict[str, pd.DataFrame]:
        """The current feature rows of these entities, one DataFrame per view (schema order)."""
        users_sorted, items_sorted = sorted(users), sorted(items)
        pipe = self.client.pipeline(transaction=False)
        for u in users_sorted:
            pipe.hgetall(f"{PREFIX}u:{u}")
            pipe.lrange(f"{PREFIX}useq:{u}", 0, -1)
        for i in items_sorted:
            pipe.hgetall(f"{PREFIX}i:{i}")
            pipe.zcard(f"{PREFIX}iwin:{i}")
        replies = pipe.execute()
        created = pd.Timestamp(int(time.time() * 1e6), unit="us", tz="UTC")  # parquet stores microseconds
        user_replies = replies[: 2 * len(users_sorted)]
        item_replies = replies[2 * len(users_sorted):]
        present = [(u, state, seq) for u, state, seq in zip(users_sorted, user_replies[0::2], user_replies[1::2])
                   if state]
        seq_rows = _sequence_rows(present)
        agg_rows, item_rows = [_aggregate_row(u, state) for u, state, _ in present], []
        for i, state, window in zip(items_sorted, item_replies[0::2], item_replies[1::2]):
            if state:
                item_rows.append(_item_row(i, state, window))
        return {view.name: _frame(rows, view.columns, created)
                for view, rows in ((USER_SEQUENCE, seq_rows), (USER_AGGREGATES, agg_rows),
                                   (ITEM_STATS, item_rows))}

    def state_user_ids(self) -> list[int]:
        return sorted(int(k.rsplit(b":", 1)[1]) for k in self.client.scan_iter(f"{PREFIX}u:*", count=1000))

    def state_item_ids(self) -> list[int]:
        return sorted(int(k.rsplit(b":", 1)[1]) for k in self.client.scan_iter(f"{PREFIX}i:*", count=1000))


def _f(state: dict, key: str) -> float:
    return float(state.get(key.encode(), 0))


def _mean(total: float, count: float) -> float:
    return total / count if count else 0.0


def _ms_to_ts(ms: float) -> pd.Timestamp:
    return pd.Timestamp(int(ms), unit="ms", tz="UTC")


SEQ_FIELDS = ("seq_item_ids", "seq_event_times_ms", "seq_ratings", "seq_play_s", "seq_watch_ratios")


def _sequence_rows(users: list[tuple[int, dict, list[bytes]]]) -> list[dict]:
    """(user, state hash, packed sequence newest first) -> rows with oldest-first lists.

    Every user's entries are parsed in one pass of pandas' C CSV reader: parsing them one by one in
    Python took half a second for a push of all MovieLens users (47k entries), the largest part of
    a catch-up push. round_trip parsing reads each float exactly as `float()` does."""
    lengths = np.array([len(seq) for _, _, seq in users], dtype=np.int64)
    columns: list[list] = [[[] for _ in users] for _ in SEQ_FIELDS]
    if lengths.sum():
        blob = b"\n".join(entry for _, _, seq in users for entry in reversed(seq))   # oldest first
        table = pd.read_csv(io.BytesIO(blob), header=None, names=list(SEQ_FIELDS), float_precision="round_trip",
                            dtype={"seq_item_ids": np.int64, "seq_event_times_ms": np.int64})
        cuts = np.cumsum(lengths)[:-1]
        for j, name in enumerate(SEQ_FIELDS):
            values = table[name].to_numpy()
            if values.dtype.kind == "f":
                values = np.nan_to_num(values, nan=0.0)  # absent ('') -> 0.0, see schema.py
            columns[j] = [part.tolist() for part in np.split(values, cuts)]
    return [{"user_id": u, **{name: columns[j][k] for j, name in enumerate(SEQ_FIELDS)},
             EVENT_TS: _ms_to_ts(_f(state, "last_ms"))}
            for k, (u, state, _) in enumerate(users)]


def _aggregate_row(user: int, state: dict) -> dict:
    plays, watch = _f(state, "plays"), _f(state, "watch_s")
    return {"user_id": user, "event_count": int(_f(state, "events")), "play_count": int(plays),
            "rating_count": int(_f(state, "ratings")),
            "mean_rating": _mean(_f(state, "rating_sum"), _f(state, "ratings")),
            "total_watch_s": watch, "mean_watch_s": _mean(watch, plays),
            "last_active_ms": int(_f(state, "last_ms")), EVENT_TS: _ms_to_ts(_f(state, "last_ms"))}


def _item_row(item: int, state: dict, window: int) -> dict:
    return {"item_id": item, "exposures": int(_f(state, "exposures")),
            "interactions": int(_f(state, "interactions")), "plays": int(_f(state, "plays")),
            "rating_count": int(_f(state, "ratings")),
            "mean_rating": _mean(_f(state, "rating_sum"), _f(state, "ratings")),
            "mean_watch_ratio": _mean(_f(state, "ratio_sum"), _f(state, "ratio_n")),
            "popularity_window": int(window), "last_event_ms": int(_f(state, "last_ms")),
            EVENT_TS: _ms_to_ts(_f(state, "last_ms"))}


def _frame(rows: list[dict], columns: list[str], created: pd.Timestamp) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=[c for c in columns if c != CREATED_TS])
    df[CREATED_TS] = created
    return df[columns].astype({c: np.int64 for c in columns[:1]})
