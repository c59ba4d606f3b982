"""Pure pieces of the feature and replay paths (no broker, no Redis)."""
import pandas as pd
import pyarrow.parquet as pq
import pytest

from onerec.data.events import UserEvent
from onerec.features import store as feast_store
from onerec.features.schema import ITEM_STATS, USER_SEQUENCE, VIEWS
from onerec.features.state import watch_ratio
from onerec.stream import replay


@pytest.mark.parametrize("url, expected", [
    ("redis://127.0.0.1:6379/0", "127.0.0.1:6379,db=0"),
    ("redis://:secret@cache:7000/2", "cache:7000,db=2,password=secret"),
    ("rediss://cache", "cache:6379,db=0,ssl=true"),
])
def test_feast_redis_connection_string(url, expected):
    assert feast_store.feast_redis(url) == expected


def test_feast_redis_rejects_other_urls():
    with pytest.raises(ValueError, match="REDIS_URL='http://x' is not a redis:// URL"):
        feast_store.feast_redis("http://x")


def test_view_names_are_unique_and_schemas_cover_every_column():
    names = [n for v in VIEWS for n in v.feature_names if v.entity == "user"]
    assert len(names) == len(set(names))
    for view in VIEWS:
        assert feast_store.arrow_schema(view).names == view.columns


def test_write_offline_appends_atomic_parts(tmp_path, monkeypatch, debug_config):
    monkeypatch.setenv(feast_store.FEAST_DIR_VAR, str(tmp_path))
    row = {"item_id": 7, **{n: 1 for n in ITEM_STATS.feature_names}, "mean_rating": 4.5,
           "event_timestamp": pd.Timestamp("1998-01-01", tz="UTC"), "created": pd.Timestamp.now(tz="UTC")}
    for _ in range(2):
        feast_store.write_offline(debug_config, ITEM_STATS, pd.DataFrame([row]))
    folder = tmp_path / "offline" / "item_stats"
    assert len(list(folder.glob("part-*.parquet"))) == 2 and not list(folder.glob(".*tmp"))
    table = pq.read_table(folder)
    assert table.num_rows == 2 and table.column("mean_rating").to_pylist() == [4.5, 4.5]
    assert feast_store.write_offline(debug_config, USER_SEQUENCE, pd.DataFrame()) is None


def test_watch_ratio_needs_both_durations():
    base = UserEvent("e", 1, 2, "play", 900_000_000_000, play_duration_s=30.0, item_duration_s=120.0)
    assert watch_ratio(base) == 0.25
    assert watch_ratio(UserEvent("e", 1, 2, "click", 900_000_000_000)) is None


@pytest.mark.parametrize("text, speed", [("100x", 100.0), ("2.5", 2.5), ("1X", 1.0)])
def test_parse_speed(text, speed):
    assert replay.parse_speed(text) == speed


@pytest.mark.parametrize("text", ["fast", "0x", "-3x"])
def test_parse_speed_rejects(text):
    with pytest.raises(ValueError, match="--speed"):
        replay.parse_speed(text)


def test_paced_waits_event_time_over_speed(monkeypatch):
    clock = {"now": 0.0}
    slept = []
    monkeypatch.setattr(replay.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(replay.time, "sleep", lambda s: (slept.append(s), clock.__setitem__("now", clock["now"] + s)))
    events = [UserEvent(f"e{i}", 1, 2, "click", 900_000_000_000 + i * 10_000) for i in range(4)]  # 10 s apart
    assert list(replay.paced(events, speed=10.0)) == events
    assert slept == pytest.approx([1.0, 1.0, 1.0])
    slept.clear()
    list(replay.paced(events, speed=None))
    assert slept == []


def test_sequence_rows_parse_like_plain_python():
    """The vectorised parse of packed sequences equals the plain one: order, absent -> 0.0, exact floats."""
    from onerec.features.state import SEQ_FIELDS, _sequence_rows

    packed = {  # newest first, as LRANGE returns them: item,time_ms,rating,play_s,watch_ratio
        7: [b"3,1700000002000,,12.25,0.1234567890123456", b"5,1700000001000,4.0,,"],
        8: [],  # a user with events but none that enter the sequence (impressions only)
        9: [b"11,1700000003000,,0.1,1e-07"],
    }
    users = [(u, {b"last_ms": b"1700000003000"}, seq) for u, seq in packed.items()]
    rows = _sequence_rows(users)

    def plain(seq):
        entries = [p.decode().split(",") for p in reversed(seq)]
        num = lambda s: float(s) if s else 0.0  # noqa: E731
        return [[int(e[0]) for e in entries], [int(e[1]) for e in entries],
                *[[num(e[k]) for e in entries] for k in (2, 3, 4)]]

    assert [r["user_id"] for r in rows] == [7, 8, 9]
    for row, (_, seq) in zip(rows, packed.items()):
        assert [row[name] for name in SEQ_FIELDS] == plain(seq)
        assert all(type(v) is int for v in row["seq_item_ids"])
    assert rows[0]["seq_item_ids"] == [5, 3] and rows[0]["seq_ratings"] == [4.0, 0.0]
