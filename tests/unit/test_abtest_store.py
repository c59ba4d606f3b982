"""The SQL A/B store: migrations match the schema, idempotent writes, SQL aggregates equal pandas'."""
from __future__ import annotations

import threading

import pandas as pd
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.dialects import postgresql

from onerec.abtest.store import DAY_MS, ABStore, exposures, insert_new, metadata
from tests.abtest_data import read_until

T0 = 1_700_000_000_000


def exposure(request_id, user=1, variant="control", experiment="exp", t=T0, items=(10, 11), rewards=(1.0, None),
             fallback=None, model_version="3", **extra):
    """A JoinedRow.as_dict() row (plus the serving fields the joiner adds)."""
    return {"request_id": request_id, "experiment": experiment, "variant": variant, "model_version": model_version,
            "user_id": user, "fallback": fallback, "served_ms": t, "items": list(items), "rewards": list(rewards),
            "reward": float(sum(r for r in rewards if r is not None)), "reacted": sum(r is not None for r in rewards),
            **extra}


def user_event(event_id, user=1, item=10, t=T0, reward=None, event_type="click"):
    return {"event_id": event_id, "user_id": user, "item_id": item, "event_type": event_type, "time_ms": t,
            "reward": reward}


@pytest.fixture
def store(tmp_path):
    s = ABStore.open(f"sqlite:///{tmp_path}/state/ab.db")     # state/ does not exist yet: created
    yield s
    s.close()


def test_upgrade_creates_the_tables_once(tmp_path):
    s = ABStore(f"sqlite:///{tmp_path}/ab.db")
    assert s.revision() is None and inspect(s.engine).get_table_names() == []      # __init__ does not migrate
    assert s.upgrade() == "0002" == s.revision()
    assert set(inspect(s.engine).get_table_names()) == {"alembic_version", "exposures", "events", "experiment_configs"}
    s.add_exposures([exposure("r1")])
    assert s.upgrade() == "0002" and s.add_exposures([exposure("r1")]) == 0      # twice: no-op, data kept
    command.downgrade(s.alembic_config(), "base")
    assert s.revision() is None and inspect(s.engine).get_table_names() == ["alembic_version"]
    s.close()


def test_the_migrations_create_exactly_the_metadata(store):
    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []


def test_the_postgres_migration_sql(store, capsys):
    cfg = store.alembic_config()
    cfg.set_main_option("sqlalchemy.url", "postgresql://")       # offline: the dialect only, no server or driver
    command.upgrade(cfg, "head", sql=True)
    sql = capsys.readouterr().out
    assert "CREATE TABLE exposures" in sql and "user_id BIGINT NOT NULL" in sql
    assert "CREATE INDEX ix_exposures_experiment_served_ms ON exposures (experiment, served_ms)" in sql
    assert "INSERT INTO alembic_version (version_num) VALUES ('0001')" in sql


def test_postgres_insert_is_on_conflict_do_nothing():
    sql = str(insert_new(exposures, "postgresql").compile(dialect=postgresql.dialect()))
    assert "ON CONFLICT (request_id) DO NOTHING RETURNING exposures.request_id" in sql


def test_sqlite_runs_in_wal_mode(store):
    with store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"


def test_exposures_are_counted_once_per_request_id(store):
    assert store.add_exposures([exposure("r1"), exposure("r2")]) == 2
    assert store.add_exposures([exposure("r2"), exposure("r3")]) == 1              # r2 redelivered
    assert store.add_exposures([]) == 0
    assert list(store.exposure_frame("exp").request_id) == ["r1", "r2", "r3"]


@pytest.mark.parametrize("change, message", [
    ({"reward": None}, "reward must be a finite number"),
    ({"reward": float("nan")}, "reward must be a finite number"),
    ({"user_id": "7"}, "user_id must be an integer"),
    ({"user_id": True}, "user_id must be an integer"),
    ({"items": [1, "2"]}, "items must be a list of integers"),
    ({"experiment": 3}, "experiment must be a string without NUL, or None"),
    ({"request_id": "a\x00b"}, "request_id must be a string without NUL"),       # Postgres refuses NUL
    ({"rewards": [1.0]}, "2 items but 1 rewards"),
])
def test_bad_exposures_are_rejected_before_anything_is_written(store, change, message):
    with pytest.raises(ValueError, match=message):
        store.add_exposures([exposure("ok"), {**exposure("bad"), **change}])
    assert store.exposure_frame("exp").empty


def test_missing_keys_are_named(store):
    row = exposure("r1")
    del row["variant"], row["served_ms"]
    with pytest.raises(ValueError, match="exposure #0: missing variant, served_ms"):
        store.add_exposures([row])
    with pytest.raises(ValueError, match="missing time_ms"):
        store.add_events([{k: v for k, v in user_event("e1").items() if k != "time_ms"}])
    with pytest.raises(ValueError, match="expected a mapping"):
        store.add_events(["e1"])


def test_experiments_exclude_rows_without_one(store):
    store.add_exposures([exposure("r1", user=1, t=T0 + 5), exposure("r2", user=2, variant="treatment", t=T0),
                         exposure("r3", user=1, t=T0 + 9), exposure("r4", experiment=None, t=T0 - 1),
                         exposure("r5", experiment="other", variant="a", latency_ms=12.5)])
    assert store.experiments() == [
        {"name": "exp", "first_ms": T0, "last_ms": T0 + 9, "exposures": 3, "users": 2,
         "variants": ["control", "treatment"]},
        {"name": "other", "first_ms": T0, "last_ms": T0, "exposures": 1, "users": 1, "variants": ["a"]}]


def test_exposure_frame_columns_and_order(store):
    store.add_exposures([exposure("late", t=T0 + 2, items=(5, 6, 7), rewards=(None, 0.5, -1.0), latency_ms=8.0),
                         exposure("early", t=T0, fallback="popular"),
                         exposure("elsewhere", experiment="other")])
    frame = store.exposure_frame("exp")
    assert list(frame.columns) == ["request_id", "variant", "model_version", "user_id", "served_ms", "fallback",
                                   "n_items", "reward", "reacted", "latency_ms", "watch_s", "items"]
    assert list(frame.request_id) == ["early", "late"]
    early, late = frame.to_dict("records")
    assert late["items"] == [5, 6, 7] and late["n_items"] == 3 and late["reward"] == -0.5 and late["reacted"] == 2
    assert late["latency_ms"] == 8.0 and pd.isna(early["latency_ms"]) and early["fallback"] == "popular"
    assert store.exposure_frame("nothing").columns.equals(frame.columns)


def test_user_frame_is_the_pandas_groupby(store):
    rows = [exposure(f"r{i}", user=i % 4, variant="control" if i % 3 else "treatment", t=T0 + 1000 * i,
                     items=range(1 + i % 3), rewards=[(i % 5) - 2.0 if j else None for j in range(1 + i % 3)],
                     fallback="popular" if i % 7 == 0 else None, watch_s=float(i % 6))
            for i in range(40)]
    store.add_exposures(rows)
    for until_ms in (None, T0 + 17_000, T0):
        kept = pd.DataFrame([r for r in rows if until_ms is None or r["served_ms"] < until_ms], columns=list(rows[0]))
        kept["n_items"] = kept["items"].map(len)
        expected = (kept.groupby(["variant", "user_id"])
                    .agg(exposures=("request_id", "size"), items_served=("n_items", "sum"), reward=("reward", "sum"),
                         reacted=("reacted", "sum"), watch_s=("watch_s", "sum"), fallbacks=("fallback", "count"),
                         first_ms=("served_ms", "min"), last_ms=("served_ms", "max"))
                    .reset_index())
        pd.testing.assert_frame_equal(store.user_frame("exp", until_ms), expected, check_dtype=False)
    assert store.user_frame("exp", T0 + 17_000).exposures.sum() == 17       # served_ms < until_ms


def test_pre_period_window_edges_and_zero_fill(store):
    before, days = T0, 2.5
    start = before - int(2.5 * DAY_MS)
    assert store.add_events([
        user_event("at-start", user=1, t=start, reward=1.0),          # included
        user_event("inside", user=1, t=before - 1, reward=None),      # counted, no reward
        user_event("at-end", user=1, t=before, reward=5.0),           # excluded: the window is half-open
        user_event("too-early", user=2, t=start - 1, reward=5.0),
        user_event("b", user=3, t=before - DAY_MS, reward=-0.5),
    ]) == 5
    frame = store.pre_period([3, 1, 2, 99, 1], before, days)
    assert frame.to_dict("list") == {"user_id": [3, 1, 2, 99], "events": [1, 2, 0, 0], "reward": [-0.5, 1.0, 0.0, 0.0]}
    assert list(store.pre_period([], before, days).columns) == ["user_id", "events", "reward"]


def test_events_deduplicated_and_item_popularity(store):
    assert store.add_events([user_event("e1", item=10, t=T0), user_event("e2", item=11, t=T0 + 1),
                             user_event("e3", item=10, t=T0 + 2)]) == 3
    assert store.add_events([user_event("e3", item=10, t=T0 + 2), user_event("e4", item=12, t=T0 + 3)]) == 1
    assert store.item_popularity().to_dict() == {10: 2, 11: 1, 12: 1}
    assert store.item_popularity(before_ms=T0 + 2).to_dict() == {10: 1, 11: 1}


def test_variant_models_in_serving_order(store):
    store.add_exposures([exposure("a", model_version="10", t=T0 + 5), exposure("b", model_version="9", t=T0),
                         exposure("c", model_version="9", t=T0 + 9),
                         exposure("d", variant="treatment", model_version="11"),
                         exposure("e", experiment="other", model_version="1")])
    assert store.variant_models("exp") == {"control": ["9", "10"], "treatment": ["11"]}
    assert store.variant_models("nothing") == {}


def test_a_reader_and_two_writers_share_the_file(store):
    url = str(store.engine.url)
    errors: list[BaseException] = []
    written: list[int] = []
    done = threading.Event()

    def write(offset: int) -> None:
        writer = ABStore(url)
        try:      # overlapping request ids: both writers redeliver each other's rows
            written.extend(writer.add_exposures([exposure(f"r{i}-{j}", user=j % 7, t=T0 + i) for j in range(20)])
                           for i in range(offset, offset + 60))
        except BaseException as e:  # noqa: BLE001 - reported to the test thread
            errors.append(e)
        finally:
            writer.close()

    writers = [threading.Thread(target=write, args=(offset,)) for offset in (0, 30)]
    reader = threading.Thread(target=read_until, args=(url, done, errors))
    for t in (reader, *writers):
        t.start()
    for t in writers:
        t.join()
    done.set()
    reader.join()
    assert errors == []
    assert sum(written) == 90 * 20 == store.experiments()[0]["exposures"]


def test_upgrade_from_0001_keeps_the_rows_and_adds_watch_time(tmp_path):
    s = ABStore(f"sqlite:///{tmp_path}/ab.db")
    command.upgrade(s.alembic_config(), "0001")
    with s.engine.begin() as conn:          # a row as revision 0001 wrote it (no watch_s column)
        conn.execute(text("INSERT INTO exposures (request_id, experiment, variant, model_version, user_id, served_ms,"
                          " n_items, reward, reacted, items) VALUES ('old', 'exp', 'control', '1', 7, 5, 2, 1.0, 1,"
                          " '[1,2]')"))
    assert s.upgrade() == "0002"
    old = s.exposure_frame("exp").iloc[0]
    assert old["request_id"] == "old" and old["watch_s"] == 0.0 and old["items"] == [1, 2]
    s.add_exposures([exposure("new", watch_s=42.5)])
    assert s.exposure_frame("exp").set_index("request_id").loc["new", "watch_s"] == 42.5
    assert s.user_frame("exp").set_index("user_id").loc[1, "watch_s"] == 42.5
    s.close()


def test_experiment_configs_register_and_replace(store):
    assert store.experiment_config("exp") is None
    store.register_experiment("exp", [{"name": "a", "alias": "champion", "weight": 50.0},
                                      {"name": "b", "alias": "challenger", "weight": 50.0}])
    store.register_experiment("exp", [{"name": "a", "alias": "champion", "weight": 90.0},
                                      {"name": "b", "alias": "challenger", "weight": 10.0}])
    config = store.experiment_config("exp")
    assert [v["weight"] for v in config["variants"]] == [90.0, 10.0] and config["registered_ms"] > 0
    with pytest.raises(ValueError, match="variants"):
        store.register_experiment("exp", [{"name": "a"}])


def test_model_exposures_window_across_experiments(store):
    store.add_exposures([exposure("a", t=T0 - 1), exposure("b", t=T0), exposure("c", t=T0 + 5, experiment=None),
                         exposure("d", t=T0 + 10), exposure("e", t=T0 + 2, model_version="4")])
    frame = store.model_exposures("3", T0, T0 + 10)
    assert frame["request_id"].tolist() == ["b", "c"] and list(frame.columns) == list(store.exposure_frame("exp").columns)
