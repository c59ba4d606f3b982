"""Where the running parts are: Kafka, Redis, MLflow.

Endpoints are never in code or presets. They come from the process environment, or else from
the env file that `onerec stack up` writes into the stack's state directory. So on a cluster you
export KAFKA_BOOTSTRAP / REDIS_URL / MLFLOW_TRACKING_URI and nothing else changes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENV_FILE_NAME = "stack.env"
KAFKA_BOOTSTRAP = "KAFKA_BOOTSTRAP"
REDIS_URL = "REDIS_URL"
MLFLOW_TRACKING_URI = "MLFLOW_TRACKING_URI"
ENDPOINT_VARS = (KAFKA_BOOTSTRAP, REDIS_URL, MLFLOW_TRACKING_URI)
AB_STORE_URL = "AB_STORE_URL"          # the A/B store (SQLAlchemy URL); default: SQLite in the state dir
AB_STORE_FILE = "ab.db"


class EndpointError(RuntimeError):
    pass


@dataclass(frozen=True)
class Endpoints:
    kafka_bootstrap: str | None
    redis_url: str | None
    mlflow_tracking_uri: str | None
    source: str  # where they came from, for error messages

    def require(self, var: str) -> str:
        value = {KAFKA_BOOTSTRAP: self.kafka_bootstrap, REDIS_URL: self.redis_url,
                 MLFLOW_TRACKING_URI: self.mlflow_tracking_uri}[var]
        if not value:
            raise EndpointError(f"{var} is not set ({self.source}): run `onerec stack up` for the "
                                f"embedded stack, or export {var} to point at a real cluster")
        return value


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; blank lines and # comments ignored."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    return values


def write_env_file(path: Path, values: dict[str, str]) -> None:
    tmp = path.with_suffix(".tmp")  # write-then-rename: readers never see half a file
    tmp.write_text("# written by `onerec stack up`; removed by `onerec stack down`\n"
                   + "".join(f"{k}={v}\n" for k, v in values.items()))
    tmp.replace(path)


def resolve_endpoints(state_dir: str | Path) -> Endpoints:
    """The environment wins over the stack's env file, per variable."""
    env_file = Path(state_dir) / ENV_FILE_NAME
    from_file = read_env_file(env_file) if env_file.is_file() else {}
    values = {var: os.environ.get(var) or from_file.get(var) for var in ENDPOINT_VARS}
    source = f"environment, then {env_file}" + ("" if from_file else " (absent)")
    return Endpoints(values[KAFKA_BOOTSTRAP], values[REDIS_URL], values[MLFLOW_TRACKING_URI], source)


def ab_store_url(state_dir: str | Path) -> str:
    """AB_STORE_URL (Postgres on a cluster), else the SQLite file in the stack's state directory."""
    return os.environ.get(AB_STORE_URL) or f"sqlite:///{(Path(state_dir) / AB_STORE_FILE).resolve()}"
