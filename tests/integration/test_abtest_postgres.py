"""The SQL A/B store on a real PostgreSQL server (production's backend; the unit tests use SQLite):
the migrations, idempotent writes, parity with SQLite (frames, dtypes, the scorecard), concurrency.

A throwaway server per module: initdb + pg_ctl on 127.0.0.1, a free port, a temporary directory
(as the `postgres` OS user when the tests run as root: initdb and postgres refuse root). Skipped,
with the reason, when the server binaries are not installed (apt-get install postgresql).
"""
from __future__ import annotations

import glob
import math
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

import pandas as pd
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from onerec.abtest.scorecard import scorecard
from onerec.abtest.store import DAY_MS, ABStore, metadata
from onerec.config import load_config
from onerec.stack import free_port
from tests.abtest_data import START_MS, read_until, seed_experiment

psycopg = pytest.importorskip("psycopg", reason="psycopg 3 (the store's Postgres driver) is not installed")

pytestmark = pytest.mark.integration

INSTALL = "apt-get install postgresql"
SERVER_TOOLS = ("initdb", "pg_ctl", "postgres")
CFG = load_config("debug").abtest
WEIGHTS = {"control": 50.0, "treatment": 50.0}
# how Postgres names the types the metadata declares (information_schema.columns.data_type)
PG_TYPES = {"VARCHAR": "character varying", "BIGINT": "bigint", "INTEGER": "integer", "FLOAT": "double precision",
            "TEXT": "text"}


# ---------------------------------------------------------------- the server


def _server_bin() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres: PATH's (links resolved), else the newest
    /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("pg_ctl")
    candidates = [Path(os.path.realpath(found)).parent] if found else []
    candidates += sorted((Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")),
                         key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1, reverse=True)
    return next((d for d in candidates if all((d / t).is_file() for t in SERVER_TOOLS)), None)


def _as_server_user() -> tuple[list[str], str | None]:
    """The command prefix that runs the server tools as a user they accept, and that user (None:
    the current one). Skips when running as root without a `postgres` user to switch to."""
    if os.geteuid() != 0:
        return [], None                     # any non-root user may own a throwaway cluster
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip(f"running as root, and initdb/postgres refuse root: needs a 'postgres' OS user to run them "
                    f"as ({INSTALL} creates one)")
    if runuser := shutil.which("runuser"):
        return [runuser, "-u", "postgres", "--"], "postgres"
    pytest.skip("running as root, and initdb/postgres refuse root: needs runuser (util-linux) to run them as "
                "the 'postgres' user")


def _run(prefix: list[str], cmd: list, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, *map(str, cmd)], cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout, check=False)


def _admin(url: str):
    """An autocommit psycopg connection (CREATE / DROP DATABASE cannot run in a transaction)."""
    u = make_url(url)
    return psycopg.connect(host=u.host, port=u.port, user=u.username, dbname=u.database, autocommit=True,
                           connect_timeout=10)


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server of this module's own -> the URL of its `abtest` database."""
    bindir = _server_bin()
    if bindir is None:
        pytest.skip(f"PostgreSQL server binaries ({', '.join(SERVER_TOOLS)}) not found on PATH or in "
                    f"/usr/lib/postgresql/*/bin: {INSTALL}")
    prefix, user = _as_server_user()
    # not under pytest's tmp_path: its base folder is private to the user running the tests
    root = Path(tempfile.mkdtemp(prefix="onerec-pg-"))
    data, sockets, log = root / "data", root / "sockets", root / "server.log"
    sockets.mkdir()
    if user is not None:
        for p in (root, sockets):
            shutil.chown(p, user, user)
    port = free_port()
    started = False
    try:
        init = _run(prefix, [bindir / "initdb", "-D", data, "-A", "trust", "-U", "onerec", "-E", "UTF8",
                             "--locale=C", "--no-sync"], root)
        if init.returncode != 0:
            pytest.fail(f"initdb failed ({init.returncode}):\n{init.stdout}\n{init.stderr}")
        options = (f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={sockets} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        start = _run(prefix, [bindir / "pg_ctl", "-D", data, "-l", log, "-o", options, "-w", "-t", "30", "start"],
                     root, timeout=45)
        started = True                      # or half-started: stop it either way
        if start.returncode != 0:
            server_log = log.read_text(errors="replace") if log.exists() else "(no server log)"
            pytest.fail(f"pg_ctl start failed ({start.returncode}) on port {port}:\n{start.stdout}\n{start.stderr}\n"
                        f"server log:\n{server_log}")
        url = f"postgresql+psycopg://onerec@127.0.0.1:{port}/abtest"
        with _admin(url.replace("/abtest", "/postgres")) as conn:
            conn.execute("CREATE DATABASE abtest")
        yield url
    finally:
        if started:
            stop = _run(prefix, [bindir / "pg_ctl", "-D", data, "-m", "fast", "-w", "-t", "30", "stop"], root)
            if stop.returncode != 0:
                _run(prefix, [bindir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"], root)
        shutil.rmtree(root, ignore_errors=True)


def _create_database(server_url: str, sql_options: str = "") -> str:
    name = f"ab_{uuid.uuid4().hex}"
    with _admin(server_url) as conn:
        conn.execute(f"CREATE DATABASE {name} {sql_options}")
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def _drop_database(server_url: str, url: str) -> None:
    with _admin(server_url) as conn:
        force = " WITH (FORCE)" if conn.info.server_version >= 130000 else ""    # a connection left open
        conn.execute(f"DROP DATABASE IF EXISTS {make_url(url).database}{force}")


@pytest.fixture
def pg_url(postgres_url):
    """A fresh, empty database for one test."""
    url = _create_database(postgres_url)
    yield url
    _drop_database(postgres_url, url)


@pytest.fixture
def pg_store(pg_url):
    store = ABStore.open(pg_url)
    yield store
    store.close()


# ---------------------------------------------------------------- rows


def exposure(request_id, user=1, variant="control", experiment="exp", t=START_MS, items=(10, 11), rewards=(1.0, None),
             **extra):
    return {"request_id": request_id, "experiment": experiment, "variant": variant, "model_version": "3",
            "user_id": user, "fallback": None, "served_ms": t, "items": list(items), "rewards": list(rewards),
            "reward": float(sum(r for r in rewards if r is not None)), "reacted": sum(r is not None for r in rewards),
            **extra}


def user_event(event_id, user=1, item=10, t=START_MS, reward=None):
    return {"event_id": event_id, "user_id": user, "item_id": item, "event_type": "click", "time_ms": t,
            "reward": reward}


def _count(store: ABStore, table: str) -> int:
    with store.engine.connect() as conn:
        return conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()


def _head(url: str) -> str:
    return ScriptDirectory.from_config(ABStore(url).alembic_config()).get_current_head()


# ---------------------------------------------------------------- schema


def test_open_migrates_to_the_head_once(pg_url):
    head = _head(pg_url)
    store = ABStore(pg_url)
    assert store.revision() is None and inspect(store.engine).get_table_names() == []   # __init__ does not migrate
    assert store.upgrade() == head == store.revision()
    assert set(inspect(store.engine).get_table_names()) == {"alembic_version", *metadata.tables}
    assert store.add_exposures([exposure("r1")]) == 1
    again = ABStore.open(pg_url)                                   # a second open: nothing to do, data kept
    assert again.revision() == head and _count(again, "alembic_version") == 1
    assert again.add_exposures([exposure("r1")]) == 0 and _count(again, "exposures") == 1
    again.close()
    store.close()


def test_the_migrated_postgres_schema_is_the_metadata(pg_store):
    with pg_store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        assert compare_metadata(context, metadata) == []
        # the types as Postgres itself names them: what a DBA sees, and what compare_metadata compared
        columns = conn.execute(text("SELECT table_name, column_name, data_type, is_nullable FROM "
                                    "information_schema.columns WHERE table_schema = current_schema() "
                                    "AND table_name <> 'alembic_version'")).all()
    assert {(t, c): (dt, n == "YES") for t, c, dt, n in columns} == {
        (t.name, c.name): (PG_TYPES[c.type.compile()], c.nullable) for t in metadata.tables.values() for c in t.c}
    inspector = inspect(pg_store.engine)
    for table in metadata.tables.values():
        assert {(i["name"], tuple(i["column_names"]), i["unique"]) for i in inspector.get_indexes(table.name)} == {
            (i.name, tuple(c.name for c in i.columns), bool(i.unique)) for i in table.indexes}
        assert inspector.get_pk_constraint(table.name)["constrained_columns"] == [c.name for c in table.primary_key]


def test_downgrade_to_base_and_upgrade_again(pg_url):
    store = ABStore(pg_url)
    revisions = [s.revision for s in reversed(list(ScriptDirectory.from_config(store.alembic_config())
                                                   .walk_revisions()))]      # base -> head
    cfg = store.alembic_config()
    command.upgrade(cfg, revisions[0])
    with store.engine.begin() as conn:      # a row as the first revision wrote it (no watch_s column)
        conn.execute(text("INSERT INTO exposures (request_id, experiment, variant, model_version, user_id, served_ms,"
                          " n_items, reward, reacted, items) VALUES ('old', 'exp', 'control', '1', 7, 5, 2, 1.0, 1,"
                          " '[1,2]')"))
    assert store.upgrade() == revisions[-1]
    old = store.exposure_frame("exp").iloc[0]
    assert old["request_id"] == "old" and old["watch_s"] == 0.0 and old["items"] == [1, 2]   # the server default
    store.register_experiment("exp", [{"name": "control", "alias": "champion", "weight": 1.0}])

    command.downgrade(cfg, revisions[0])                     # one step down: the later revision undone, rows kept
    assert store.revision() == revisions[0]
    assert "watch_s" not in {c["name"] for c in inspect(store.engine).get_columns("exposures")}
    assert _count(store, "exposures") == 1
    command.downgrade(cfg, "base")
    assert store.revision() is None and inspect(store.engine).get_table_names() == ["alembic_version"]

    assert store.upgrade() == revisions[-1] and _count(store, "exposures") == 0
    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    assert store.add_exposures([exposure("r1")]) == 1
    store.close()


# ---------------------------------------------------------------- writes


def test_redelivered_ids_are_counted_once(pg_store, tmp_path):
    """ON CONFLICT DO NOTHING, and only new rows returned: a redelivered id is ignored, also one
    twice in the same batch (Postgres refuses that only for DO UPDATE); the first delivery wins."""
    sqlite_store = ABStore.open(f"sqlite:///{tmp_path}/ab.db")
    for store in (pg_store, sqlite_store):
        assert store.add_exposures([exposure("r1"), exposure("r2")]) == 2
        assert store.add_exposures([exposure("r2"), exposure("r3")]) == 1              # r2 redelivered
        assert store.add_exposures([exposure("r4", user=4), exposure("r4", user=5), exposure("r1")]) == 1
        assert store.add_exposures([]) == 0
        assert store.exposure_frame("exp").set_index("request_id").loc["r4", "user_id"] == 4  # the first of the two

        assert store.add_events([user_event("e1"), user_event("e1", reward=1.0), user_event("e2")]) == 2
        assert store.add_events([user_event("e2"), user_event("e3")]) == 1
        # a batch larger than one multi-row INSERT (SQLAlchemy pages them by 1000), duplicates across pages
        batch = [user_event(f"b{i % 1500}", user=10_000 + i) for i in range(2500)]
        assert store.add_events(batch) == 1500 and store.add_events(batch) == 0
        assert _count(store, "events") == 3 + 1500
        assert store.pre_period([1], before_ms=START_MS + 1, days=1).to_dict("records") == [
            {"user_id": 1, "events": 3, "reward": 0.0}]                   # e1's first delivery: no reward
    sqlite_store.close()


def test_a_batch_postgres_would_refuse_writes_nothing(pg_store):
    """A NUL character: Postgres text cannot hold it, so the store refuses it on every backend,
    before writing anything of the batch; and a value out of BIGINT's range Postgres refuses itself
    (the batch is one transaction)."""
    with pytest.raises(ValueError, match="without NUL"):
        pg_store.add_events([user_event("fine"), user_event("nul\x00byte")])
    assert _count(pg_store, "events") == 0
    with pytest.raises(DBAPIError):
        pg_store.add_events([user_event("fine"), {**user_event("huge"), "user_id": 2**70}])
    assert _count(pg_store, "events") == 0
    assert pg_store.add_events([user_event("fine")]) == 1


def test_register_experiment_upserts(pg_store):
    assert pg_store.experiment_config("exp") is None
    first = [{"name": "control", "alias": "champion", "weight": 50.0}, {"name": "treatment", "alias": "challenger",
                                                                         "weight": 50.0}]
    pg_store.register_experiment("exp", first)
    got = pg_store.experiment_config("exp")
    assert got["name"] == "exp" and got["variants"] == first and isinstance(got["registered_ms"], int)
    second = [{**first[0], "weight": 90.0}, {**first[1], "weight": 10.0}]
    pg_store.register_experiment("exp", second)                     # ON CONFLICT (name) DO UPDATE
    again = pg_store.experiment_config("exp")
    assert again["variants"] == second and again["registered_ms"] >= got["registered_ms"]
    assert _count(pg_store, "experiment_configs") == 1


# ---------------------------------------------------------------- parity with SQLite


def assert_close(a, b, path="card") -> None:
    """Equal nested values; floats within 1e-9 relative (the backends sum in their own orders)."""
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, float) and isinstance(b, float), f"{path}: {a!r} != {b!r}"
        assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9), f"{path}: {a!r} != {b!r}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{path}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close(x, y, f"{path}[{i}]")
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} != {b!r}"


def _reads(store: ABStore, name: str) -> dict:
    """Everything the store answers about one experiment (and its models, its users' history)."""
    first_ms = next(e["first_ms"] for e in store.experiments() if e["name"] == name)
    users = store.user_frame(name)
    return {
        "exposure_frame": store.exposure_frame(name),
        "user_frame": users,
        "user_frame_until": store.user_frame(name, until_ms=START_MS + DAY_MS),
        "user_frame_before_all": store.user_frame(name, until_ms=START_MS - 1),        # empty: the dtypes still
        "pre_period": store.pre_period(users["user_id"], before_ms=first_ms, days=CFG.pre_period_days),
        "pre_period_unknown": store.pre_period([10**12, 0], before_ms=first_ms, days=1),
        "popularity_before": store.item_popularity(before_ms=first_ms),
        "popularity": store.item_popularity(),
        "model_exposures_3": store.model_exposures("3", START_MS, START_MS + DAY_MS),
        "model_exposures_4": store.model_exposures("4", START_MS + DAY_MS, START_MS + 3 * DAY_MS),
        "model_exposures_none": store.model_exposures("nope", START_MS, START_MS + DAY_MS),
    }


def _assert_same_reads(left: dict, right: dict) -> None:
    for key, x in left.items():
        y = right[key]
        if isinstance(x, pd.Series):
            pd.testing.assert_series_equal(x, y, check_dtype=True, obj=key)
        else:
            pd.testing.assert_frame_equal(x, y, check_dtype=True, obj=key)


def test_postgres_answers_what_sqlite_answers(pg_store, tmp_path):
    sqlite_store = ABStore.open(f"sqlite:///{tmp_path}/ab.db")
    for store in (sqlite_store, pg_store):
        seed_experiment(store, name="exp-pg", lift=0.1, outside_events=True)
        seed_experiment(store, name="exp-other", users=50, seed=1, first_user=1000, start_ms=START_MS + DAY_MS)
        store.add_exposures([exposure("no-experiment", experiment=None, variant="default")])   # not listed

    assert_close(sqlite_store.experiments(), pg_store.experiments())          # the types too: ints stay ints
    assert [e["name"] for e in pg_store.experiments()] == ["exp-other", "exp-pg"]
    for name in ("exp-pg", "exp-other"):
        _assert_same_reads(_reads(sqlite_store, name), _reads(pg_store, name))
        assert_close(sqlite_store.variant_models(name), pg_store.variant_models(name))
        assert_close(sqlite_store.experiment_config(name)["variants"], pg_store.experiment_config(name)["variants"])

    cards = [scorecard(store, "exp-pg", CFG, weights=WEIGHTS, now_ms=0) for store in (sqlite_store, pg_store)]
    assert cards[0]["comparisons"], "the seeded experiment should have a comparison to check"
    assert_close(*cards)
    sqlite_store.close()


def test_text_order_follows_the_collation_but_the_answers_do_not(postgres_url, tmp_path):
    """ORDER BY on a text column follows the database's collation: SQLite's is bytewise, a
    production Postgres's often linguistic (en_US): 'Treat' sorts before 'control' on one and after
    it on the other. The rows, and the scorecard (which orders variants itself), are the same."""
    try:
        url = _create_database(postgres_url, "TEMPLATE template0 ENCODING 'UTF8' LOCALE_PROVIDER icu "
                                             "ICU_LOCALE 'en-US' LOCALE 'C'")
    except psycopg.Error as e:
        pytest.skip(f"this PostgreSQL cannot create an ICU-collated database (needs 15+, built with ICU): {e}")
    pg_store, sqlite_store = ABStore.open(url), ABStore.open(f"sqlite:///{tmp_path}/ab.db")
    try:
        for store in (sqlite_store, pg_store):
            for name in ("exp_b", "Exp-A", "exp-c"):
                seed_experiment(store, name=name, users=60, lift=0.2, variants=("control", "Treat"))
        assert_close(*(sorted(store.experiments(), key=lambda e: e["name"]) for store in (sqlite_store, pg_store)))
        for name in ("exp_b", "Exp-A", "exp-c"):
            left, right = _reads(sqlite_store, name), _reads(pg_store, name)
            for key, f in left.items():       # each frame in bytewise (Python's) order, served_ms ties too
                if isinstance(f, pd.DataFrame):
                    by = (["served_ms", "request_id"] if "request_id" in f else
                          ["variant", "user_id"] if "variant" in f else ["user_id"])   # pre_period: user_frame's
                    left[key], right[key] = (g.sort_values(by).reset_index(drop=True) for g in (f, right[key]))
            _assert_same_reads(left, right)
            assert_close(*(dict(sorted(store.variant_models(name).items())) for store in (sqlite_store, pg_store)))
            assert_close(*(scorecard(store, name, CFG, weights={"control": 50.0, "Treat": 50.0}, control="control",
                                     now_ms=0) for store in (sqlite_store, pg_store)))
    finally:
        pg_store.close()
        sqlite_store.close()
        _drop_database(postgres_url, url)


# ---------------------------------------------------------------- concurrency


def test_concurrent_writers_and_a_reader(pg_store):
    """Two writers (two joiners after a rebalance) deliver the same batches at the same moment, in
    opposite orders, while the dashboard reads: no error (no deadlock), each id counted once."""
    url = pg_store.engine.url.render_as_string(hide_password=False)
    rounds, size = 30, 200
    errors: list[BaseException] = []
    written: list[int] = []
    together = threading.Barrier(2, timeout=30)
    done = threading.Event()

    def write(reverse: bool) -> None:
        writer = ABStore(url)
        try:
            for i in range(rounds):
                rows = [exposure(f"r{i}-{j}", user=j % 7, t=START_MS + i) for j in range(size)]
                together.wait()
                written.append(writer.add_exposures(rows[::-1] if reverse else rows))
                written.append(writer.add_events([user_event(r["request_id"], user=r["user_id"]) for r in rows]))
        except BaseException as e:  # noqa: BLE001 - reported to the test thread
            errors.append(e)
            together.abort()
        finally:
            writer.close()

    writers = [threading.Thread(target=write, args=(reverse,)) for reverse in (False, True)]
    reader = threading.Thread(target=read_until, args=(url, done, errors, size))   # whole batches only
    for t in (reader, *writers):
        t.start()
    for t in writers:
        t.join(60)
    done.set()
    reader.join(10)
    assert errors == []
    assert sum(written) == 2 * rounds * size
    assert pg_store.experiments()[0]["exposures"] == rounds * size == _count(pg_store, "events")
