"""Feast access: open the store from the environment, apply the repo, write rows, read them back.

Layout under ONEREC_FEAST_DIR (default `<stack.state_dir>/feast`): `registry.db` and
`offline/<view>/part-*.parquet`. Offline rows are appended as new parquet parts written to a
temporary name and renamed, so a crash never leaves a half-written file (Feast's own file-store
push rewrites the whole file on every call, which is quadratic and not crash-safe).
"""
from __future__ import annotations

import os
import string
import sys
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from onerec.config import PROJECT_ROOT, Config
from onerec.endpoints import REDIS_URL, resolve_endpoints
from onerec.features.schema import CREATED_TS, EVENT_TS, VIEWS, View

FEATURE_REPO = PROJECT_ROOT / "feature_repo"
FEAST_DIR_VAR = "ONEREC_FEAST_DIR"

ARROW_TYPES = {"int64": pa.int64(), "float32": pa.float32(), "float64": pa.float64(),
               "int64[]": pa.list_(pa.int64()), "float32[]": pa.list_(pa.float32())}


def feast_dir(cfg: Config) -> Path:
    return Path(os.environ.get(FEAST_DIR_VAR) or Path(cfg.stack.state_dir) / "feast").resolve()


def feast_redis(redis_url: str) -> str:
    """redis://host:port/db -> Feast's `host:port,db=N` connection string."""
    url = urlparse(redis_url)
    if url.scheme not in ("redis", "rediss") or not url.hostname:
        raise ValueError(f"{REDIS_URL}={redis_url!r} is not a redis:// URL")
    options = [f"db={url.path.lstrip('/') or 0}"]
    if url.password:
        options.append(f"password={url.password}")
    if url.scheme == "rediss":
        options.append("ssl=true")
    return ",".join([f"{url.hostname}:{url.port or 6379}", *options])


def open_store(cfg: Config):
    """A FeatureStore for feature_repo/, with endpoints from the environment / stack env file."""
    import yaml
    from feast import FeatureStore
    from feast.repo_config import RepoConfig

    root = feast_dir(cfg)
    values = {"FEAST_REDIS": feast_redis(resolve_endpoints(cfg.stack.state_dir).require(REDIS_URL)),
              FEAST_DIR_VAR: str(root)}
    text = string.Template((FEATURE_REPO / "feature_store.yaml").read_text()).substitute(values)
    repo_config = RepoConfig(**yaml.safe_load(text))
    repo_config.repo_path = root  # relative offline paths (offline/<view>) resolve under the feast dir
    return FeatureStore(config=repo_config)


def arrow_schema(view: View) -> pa.Schema:
    return pa.schema([pa.field(view.join_key, pa.int64()),
                      *[pa.field(n, ARROW_TYPES[t]) for n, t in view.fields],
                      pa.field(EVENT_TS, pa.timestamp("us", tz="UTC")),
                      pa.field(CREATED_TS, pa.timestamp("us", tz="UTC"))])


def write_offline(cfg: Config, view: View, rows: pd.DataFrame) -> Path | None:
    """Append rows to the view's offline source as one new parquet part (atomic rename)."""
    if rows.empty:
        return None
    folder = feast_dir(cfg) / "offline" / view.name
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(rows[view.columns], schema=arrow_schema(view), preserve_index=False)
    name = f"part-{pd.Timestamp.now(tz='UTC').strftime('%Y%m%dT%H%M%S%f')}-{uuid.uuid4().hex[:8]}.parquet"
    tmp = folder / f".{name}.tmp"
    pq.write_table(table, tmp)
    tmp.replace(folder / name)
    return folder / name


def apply_repo(cfg: Config) -> list[str]:
    """`feast apply` for feature_repo/: registers entities, views and services; creates the
    offline folders with an empty part so Feast can read their schema before any data."""
    from feast.repo_operations import _get_repo_contents, apply_total_with_repo_instance

    store = open_store(cfg)
    for view in VIEWS:
        folder = feast_dir(cfg) / "offline" / view.name
        folder.mkdir(parents=True, exist_ok=True)
        if not any(folder.glob("*.parquet")):
            pq.write_table(arrow_schema(view).empty_table(), folder / "part-00000000-empty.parquet")
    # Feast imports the repo's files as top-level modules named relative to the cwd.
    cwd, sys.path[:0] = os.getcwd(), [str(FEATURE_REPO)]
    try:
        os.chdir(FEATURE_REPO)
        repo = _get_repo_contents(FEATURE_REPO, store.config.project, store.config)
    finally:
        os.chdir(cwd)
        sys.path.remove(str(FEATURE_REPO))
    apply_total_with_repo_instance(store, store.config.project, store.registry, repo,
                                   skip_source_validation=True)
    return sorted([*(v.name for v in repo.feature_views), *(s.name for s in repo.feature_services)])


class OnlineWriter:
    """Writes feature rows to Feast's online store.

    Rows are stamped with their `created` time, not the entity's latest event time: Feast's Redis
    store drops a row whose timestamp is not newer than the stored one, and an event that arrives
    after a newer one for the same entity (items get events from every partition) leaves the
    latest event time unchanged, so its update would be lost. The offline rows keep event time
    for point-in-time joins. The feature views are looked up once: `FeatureStore.push` reads the
    registry on every call, which dominated a small batch's cost.

    The rows go to the provider's `online_write_batch` as Feast's own (entity key, {feature:
    ValueProto}, event time, created time) tuples, built column by column here: Feast's
    `ingest_df` (kept as `write_reference`, and tested to give the same tuples) goes through arrow
    and calls `pd.isna` on every value, ~0.5 s for a push of every MovieLens user and item.
    """

    def __init__(self, store):
        self.provider = store._get_provider()  # no public cached path in Feast 0.67
        self.views = {view.name: store.get_feature_view(view.name) for view in VIEWS}

    def write(self, view: View, rows: pd.DataFrame) -> None:
        if not rows.empty:
            self.provider.online_write_batch(self.provider.repo_config, self.views[view.name],
                                             online_rows(view, rows), progress=None)

    def write_reference(self, view: View, rows: pd.DataFrame) -> None:
        """The same through Feast's DataFrame path (slow; the reference for tests)."""
        if not rows.empty:
            online = rows[view.columns].assign(**{EVENT_TS: rows[CREATED_TS]})
            self.provider.ingest_df(self.views[view.name], online)


def online_rows(view: View, rows: pd.DataFrame) -> list[tuple]:
    """rows (view.columns) -> Feast's online-write tuples, stamped with the `created` time."""
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import FloatList, Int64List, Value

    scalar = {"int64": "int64_val", "float32": "float_val", "float64": "double_val"}
    listed = {"int64[]": ("int64_list_val", Int64List), "float32[]": ("float_list_val", FloatList)}
    columns = []
    for name, dtype in view.fields:
        values = rows[name].tolist()
        if dtype in listed:
            field, cls = listed[dtype]
            columns.append([Value(**{field: cls(val=v)}) for v in values])
        else:
            columns.append([Value(**{scalar[dtype]: v}) for v in values])
    names = [name for name, _ in view.fields]
    keys = [EntityKey(join_keys=[view.join_key], entity_values=[Value(int64_val=k)])
            for k in rows[view.join_key].tolist()]
    # naive UTC, as Feast's own conversion hands them over
    stamps = pd.DatetimeIndex(rows[CREATED_TS]).tz_convert("UTC").tz_localize(None).to_pydatetime()
    return [(key, dict(zip(names, values)), ts, ts) for key, values, ts in zip(keys, zip(*columns), stamps)]
