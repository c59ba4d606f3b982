"""The SQL A/B store: every exposure (one row per request id) and every user event, kept for the
scorecard and the dashboard. SQLAlchemy Core; a SQLite file by default, Postgres in production.

    store = ABStore.open("sqlite:///state/ab.db")         # or "postgresql+psycopg://user@host/ab"
    store.add_exposures(row.as_dict() for row in rows)    # the reward joiner, after each closed batch
    store.add_events(event_dicts)                         # every user event: CUPED covariates, novelty
    store.experiments()                                   # [{name, first_ms, last_ms, exposures, users, variants}]
    users = store.user_frame("v2-vs-v3")                  # per (variant, user) sums: the statistics' unit
    pre = store.pre_period(users.user_id, before_ms=first_ms, days=14)

Writes are idempotent: a redelivered request id or event id is ignored (INSERT .. ON CONFLICT DO
NOTHING), so the joiner may replay after a crash and the counts stay right. The schema is declared
once, in `metadata` below; the Alembic migrations in migrations/ create it (`upgrade()`; `open()` =
construct + upgrade), and tests/unit/test_abtest_store.py fails when the two disagree, so a schema
change is a change here plus a new revision (migrations/env.py says how). On SQLite the file runs
in WAL mode with a busy timeout, so the joiner writes while the dashboard reads.
"""
from __future__ import annotations

import json
import math
import numbers
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Insert,
    Integer,
    MetaData,
    Select,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url

MIGRATIONS = Path(__file__).with_name("migrations")
DAY_MS = 86_400_000
SQLITE_BUSY_TIMEOUT_S = 30.0   # wait this long for another connection's write lock instead of "database is locked"
IN_CHUNK = 10_000              # ids per IN (...): under SQLite's (32766) and Postgres' (65535) parameter limits

metadata = MetaData()

exposures = Table(
    "exposures", metadata,
    Column("request_id", String, primary_key=True),
    Column("experiment", String, nullable=True),          # NULL: no experiment was running
    Column("variant", String, nullable=False),
    Column("model_version", String, nullable=False),
    Column("user_id", BigInteger, nullable=False),
    Column("served_ms", BigInteger, nullable=False),
    Column("fallback", String, nullable=True),            # why the model was not used; NULL: it was
    Column("n_items", Integer, nullable=False),
    Column("reward", Float, nullable=False),              # sum over the items (no reaction = 0)
    Column("reacted", Integer, nullable=False),           # items with a reaction
    Column("latency_ms", Float, nullable=True),
    Column("items", Text, nullable=False),                # JSON list of item ids, in served order
    Column("watch_s", Float, nullable=False, server_default="0"),   # seconds played of its items (0002)
    # every reader filters by experiment, and the time cuts (until_ms) are ranges within one
    Index("ix_exposures_experiment_served_ms", "experiment", "served_ms"),
)

events = Table(
    "events", metadata,
    Column("event_id", String, primary_key=True),
    Column("user_id", BigInteger, nullable=False),
    Column("item_id", BigInteger, nullable=False),
    Column("event_type", String, nullable=False),
    Column("time_ms", BigInteger, nullable=False),
    Column("reward", Float, nullable=True),               # NULL: the event carries none (organic activity)
    Index("ix_events_user_id_time_ms", "user_id", "time_ms"),   # pre_period: listed users in a window
)

experiment_configs = Table(
    "experiment_configs", metadata,                       # what an A/B file configured (0002)
    Column("name", String, primary_key=True),
    Column("variants", Text, nullable=False),             # JSON [{name, alias, weight}], in the file's order
    Column("registered_ms", BigInteger, nullable=False),
)

# INSERT .. ON CONFLICT DO NOTHING is dialect-specific SQL: these are the dialects the store speaks.
_INSERTS = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}


def insert_new(table: Table, dialect_name: str) -> Insert:
    """INSERT .. ON CONFLICT (primary key) DO NOTHING RETURNING the key: only new rows come back."""
    key = list(table.primary_key)
    return _INSERTS[dialect_name](table).on_conflict_do_nothing(index_elements=key).returning(*key)


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)      # numpy ints pass, True does not


def _is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)   # a NaN poisons sums


_KINDS = {
    # NUL: SQLite stores it, Postgres refuses the whole batch (and a joiner would retry it forever)
    "str": (lambda v: isinstance(v, str) and "\x00" not in v, "a string without NUL"),
    "str?": (lambda v: v is None or (isinstance(v, str) and "\x00" not in v), "a string without NUL, or None"),
    "int": (_is_int, "an integer"),
    "float": (_is_real, "a finite number"),
    "float?": (lambda v: v is None or _is_real(v), "a finite number or None"),
    "ints": (lambda v: isinstance(v, (list, tuple)) and all(map(_is_int, v)), "a list of integers"),
    "floats?": (lambda v: isinstance(v, (list, tuple)) and all(x is None or _is_real(x) for x in v),
                "a list of finite numbers or None"),
}
EXPOSURE_FIELDS = {"request_id": "str", "experiment": "str?", "variant": "str", "model_version": "str",
                   "user_id": "int", "fallback": "str?", "served_ms": "int", "items": "ints", "rewards": "floats?",
                   "reward": "float", "reacted": "int", "latency_ms": "float?", "watch_s": "float"}
EVENT_FIELDS = {"event_id": "str", "user_id": "int", "item_id": "int", "event_type": "str", "time_ms": "int",
                "reward": "float?"}


def _checked(rows: Iterable[Mapping], fields: dict[str, str], what: str, optional: frozenset[str] = frozenset()):
    """Yield (position, row) after checking its keys and types; ValueError names the row and field."""
    for n, row in enumerate(rows):
        if not isinstance(row, Mapping):
            # TRY004 would have a TypeError: one error type for every bad row, so a caller catches one
            raise ValueError(f"{what} #{n}: expected a mapping, got {type(row).__name__}")  # noqa: TRY004
        missing = [f for f in fields if f not in row and f not in optional]
        if missing:
            raise ValueError(f"{what} #{n}: missing {', '.join(missing)}")
        for name, kind in fields.items():
            if name not in row:                            # an optional field left out: its default
                continue
            ok, wanted = _KINDS[kind]
            if not ok(row.get(name)):
                raise ValueError(f"{what} #{n}: {name} must be {wanted}, got {row.get(name)!r}")
        yield n, row


class ABStore:
    def __init__(self, url: str):
        """The engine only: the schema is `upgrade()`'s job (`open` does both)."""
        url_ = make_url(url)
        if url_.get_backend_name() not in _INSERTS:
            raise ValueError(f"the A/B store speaks {' and '.join(_INSERTS)}, not {url_.get_backend_name()} ({url})")
        if url_.get_backend_name() == "sqlite":
            if url_.database and url_.database != ":memory:":
                Path(url_.database).parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(url_, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
            event.listen(self.engine, "connect", _sqlite_wal)
        else:
            # services hold connections for days: ping first, so one dropped by the server is replaced
            self.engine = create_engine(url_, pool_pre_ping=True)

    @classmethod
    def open(cls, url: str) -> ABStore:
        store = cls(url)
        store.upgrade()
        return store

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ schema

    def alembic_config(self) -> AlembicConfig:
        """Alembic's configuration without an alembic.ini: the package's migrations, this store's url."""
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        # the value goes through configparser interpolation: a '%' in a password must be doubled
        cfg.set_main_option("sqlalchemy.url", self.engine.url.render_as_string(hide_password=False).replace("%", "%%"))
        return cfg

    def upgrade(self) -> str:
        """Migrate the database to the head revision (a no-op when it is there) -> that revision."""
        cfg = self.alembic_config()
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn     # migrate through this engine: its pragmas, an in-memory db
            command.upgrade(cfg, "head")
        return ScriptDirectory.from_config(cfg).get_current_head()

    def revision(self) -> str | None:
        """The database's schema revision; None before the first upgrade."""
        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    # ------------------------------------------------------------------ writes

    def add_exposures(self, rows: Iterable[Mapping]) -> int:
        """JoinedRow.as_dict() rows (experiment None included) -> how many request ids were new.
        The whole batch is checked before anything is written; ValueError on a bad row."""
        values = []
        for n, row in _checked(rows, EXPOSURE_FIELDS, "exposure", optional=frozenset({"latency_ms", "watch_s"})):
            if len(row["items"]) != len(row["rewards"]):
                raise ValueError(f"exposure #{n} ({row['request_id']}): {len(row['items'])} items "
                                 f"but {len(row['rewards'])} rewards")
            values.append({
                "request_id": row["request_id"], "experiment": row["experiment"], "variant": row["variant"],
                "model_version": row["model_version"], "user_id": int(row["user_id"]),
                "served_ms": int(row["served_ms"]), "fallback": row["fallback"], "n_items": len(row["items"]),
                "reward": float(row["reward"]), "reacted": int(row["reacted"]),
                "latency_ms": None if row.get("latency_ms") is None else float(row["latency_ms"]),
                "items": json.dumps([int(i) for i in row["items"]], separators=(",", ":")),
                "watch_s": float(row.get("watch_s", 0.0)),
            })
        return self._insert_new(exposures, values)

    def add_events(self, rows: Iterable[Mapping]) -> int:
        """User events (event_id, user_id, item_id, event_type, time_ms, reward) -> how many event ids were new."""
        values = [{"event_id": e["event_id"], "user_id": int(e["user_id"]), "item_id": int(e["item_id"]),
                   "event_type": e["event_type"], "time_ms": int(e["time_ms"]),
                   "reward": None if e["reward"] is None else float(e["reward"])}
                  for _, e in _checked(rows, EVENT_FIELDS, "event")]
        return self._insert_new(events, values)

    def _insert_new(self, table: Table, values: list[dict]) -> int:
        if not values:
            return 0
        # in key order: two writers whose batches overlap then lock the keys in the same order, so on
        # Postgres one waits for the other's commit (and skips its rows) instead of a deadlock
        key = [c.name for c in table.primary_key]
        values = sorted(values, key=lambda v: [v[k] for k in key])
        # one transaction per batch: it is all in or all out, and a reader never sees half of one
        with self.engine.begin() as conn:
            return len(conn.execute(insert_new(table, conn.dialect.name), values).all())

    # ------------------------------------------------------------------ reads

    def experiments(self) -> list[dict]:
        """One dict per experiment (rows without one excluded), by name."""
        e = exposures.c
        named = e.experiment.is_not(None)
        with self.engine.connect() as conn:
            totals = conn.execute(
                select(e.experiment, func.min(e.served_ms), func.max(e.served_ms), func.count(),
                       func.count(e.user_id.distinct()))
                .where(named).group_by(e.experiment).order_by(e.experiment)).all()
            pairs = conn.execute(select(e.experiment, e.variant).where(named).distinct()).all()
        variants: dict[str, set[str]] = {}
        for name, variant in pairs:
            variants.setdefault(name, set()).add(variant)
        return [{"name": name, "first_ms": first, "last_ms": last, "exposures": n, "users": users,
                 "variants": sorted(variants.get(name, ()))}
                for name, first, last, n, users in totals]

    def exposure_frame(self, experiment: str) -> pd.DataFrame:
        """Every exposure of the experiment, by served_ms; `items` as lists of item ids."""
        return self._exposures(exposures.c.experiment == experiment)

    def model_exposures(self, model_version: str, since_ms: int, until_ms: int) -> pd.DataFrame:
        """Every exposure model_version served in [since_ms, until_ms), in any experiment or none
        (the guardrail watcher's window), by served_ms; the columns of exposure_frame."""
        e = exposures.c
        return self._exposures(e.model_version == model_version, e.served_ms >= since_ms, e.served_ms < until_ms)

    def _exposures(self, *where) -> pd.DataFrame:
        e = exposures.c
        frame = self._frame(
            select(e.request_id, e.variant, e.model_version, e.user_id, e.served_ms, e.fallback, e.n_items,
                   e.reward, e.reacted, e.latency_ms, e.watch_s, e["items"])   # ["items"]: .items is a method
            .where(*where).order_by(e.served_ms, e.request_id),
            {"user_id": "int64", "served_ms": "int64", "n_items": "int64", "reward": "float64", "reacted": "int64",
             "latency_ms": "float64", "watch_s": "float64"})
        frame["items"] = [json.loads(items) for items in frame["items"]]
        return frame

    def register_experiment(self, name: str, variants: list[Mapping]) -> None:
        """Record (or replace) an experiment's configured variants [{name, alias, weight}]."""
        if not name or not variants or any(set(v) != {"name", "alias", "weight"} for v in variants):
            raise ValueError(f"experiment {name!r}: needs a name and variants of {{name, alias, weight}}")
        row = {"name": name, "variants": json.dumps([dict(v) for v in variants]), "registered_ms": _now_ms()}
        with self.engine.begin() as conn:
            insert = _INSERTS[conn.dialect.name](experiment_configs).values(row)
            conn.execute(insert.on_conflict_do_update(index_elements=["name"], set_={
                "variants": insert.excluded.variants, "registered_ms": insert.excluded.registered_ms}))

    def experiment_config(self, name: str) -> dict | None:
        """{name, variants, registered_ms} as registered; None when the experiment never was."""
        c = experiment_configs.c
        with self.engine.connect() as conn:
            row = conn.execute(select(c.name, c.variants, c.registered_ms).where(c.name == name)).first()
        return None if row is None else {"name": row.name, "variants": json.loads(row.variants),
                                         "registered_ms": row.registered_ms}

    def user_frame(self, experiment: str, until_ms: int | None = None) -> pd.DataFrame:
        """One row per (variant, user), summed in SQL over the exposures served before until_ms (all
        when None): variant, user_id, exposures, items_served, reward, reacted, watch_s, fallbacks, first_ms, last_ms."""
        e = exposures.c
        query = (select(e.variant, e.user_id, func.count().label("exposures"),
                        func.sum(e.n_items).label("items_served"), func.sum(e.reward).label("reward"),
                        func.sum(e.reacted).label("reacted"), func.sum(e.watch_s).label("watch_s"),
                        func.count(e.fallback).label("fallbacks"),
                        func.min(e.served_ms).label("first_ms"), func.max(e.served_ms).label("last_ms"))
                 .where(e.experiment == experiment).group_by(e.variant, e.user_id).order_by(e.variant, e.user_id))
        if until_ms is not None:
            query = query.where(e.served_ms < until_ms)
        return self._frame(query, {"user_id": "int64", "exposures": "int64", "items_served": "int64",
                                   "reward": "float64", "reacted": "int64", "watch_s": "float64", "fallbacks": "int64",
                                   "first_ms": "int64", "last_ms": "int64"})

    def pre_period(self, user_ids: Iterable[int], before_ms: int, days: float) -> pd.DataFrame:
        """Each listed user's events in [before_ms - days, before_ms): user_id, events, reward (sum of the
        non-null rewards). One row per listed user, in the listed order; no events -> zeros."""
        if days <= 0:
            raise ValueError(f"days must be > 0, got {days}")
        ids = list(dict.fromkeys(int(u) for u in user_ids))
        start = before_ms - round(days * DAY_MS)
        ev = events.c
        rows = []
        with self.engine.connect() as conn:
            for i in range(0, len(ids), IN_CHUNK):
                rows += conn.execute(
                    select(ev.user_id, func.count(), func.coalesce(func.sum(ev.reward), 0.0))
                    .where(ev.user_id.in_(ids[i:i + IN_CHUNK]), ev.time_ms >= start, ev.time_ms < before_ms)
                    .group_by(ev.user_id)).all()
        found = pd.DataFrame(rows, columns=["user_id", "events", "reward"]).set_index("user_id")
        return (found.reindex(pd.Index(ids, name="user_id"), fill_value=0).reset_index()
                .astype({"user_id": "int64", "events": "int64", "reward": "float64"}))

    def item_popularity(self, before_ms: int | None = None) -> pd.Series:
        """item_id -> how many events it had (before before_ms when given), by item id."""
        ev = events.c
        query = select(ev.item_id, func.count().label("events")).group_by(ev.item_id).order_by(ev.item_id)
        if before_ms is not None:
            query = query.where(ev.time_ms < before_ms)
        return self._frame(query, {"item_id": "int64", "events": "int64"}).set_index("item_id")["events"]

    def variant_models(self, experiment: str) -> dict[str, list[str]]:
        """variant -> the model versions it served, in the order they were first served (a swap mid-run shows)."""
        e = exposures.c
        with self.engine.connect() as conn:
            pairs = conn.execute(
                select(e.variant, e.model_version).where(e.experiment == experiment)
                .group_by(e.variant, e.model_version).order_by(e.variant, func.min(e.served_ms), e.model_version)).all()
        models: dict[str, list[str]] = {}
        for variant, version in pairs:
            models.setdefault(variant, []).append(version)
        return models

    def _frame(self, query: Select, dtypes: dict[str, str]) -> pd.DataFrame:
        # explicit dtypes: an empty result must still have the columns' types (the statistics read them)
        with self.engine.connect() as conn:
            result = conn.execute(query)
            return pd.DataFrame(result.all(), columns=list(result.keys())).astype(dtypes)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _sqlite_wal(dbapi_connection, _record) -> None:
    # WAL: readers see the last commit while a writer writes (instead of blocking each other)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()
