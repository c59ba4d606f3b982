import pytest

from onerec.endpoints import (ENDPOINT_VARS, EndpointError, read_env_file, resolve_endpoints,
                              write_env_file)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ENDPOINT_VARS:
        monkeypatch.delenv(var, raising=False)


def test_env_file_round_trip_and_environment_wins(tmp_path, monkeypatch):
    write_env_file(tmp_path / "stack.env", {"KAFKA_BOOTSTRAP": "127.0.0.1:1", "REDIS_URL": "redis://x"})
    assert read_env_file(tmp_path / "stack.env") == {"KAFKA_BOOTSTRAP": "127.0.0.1:1", "REDIS_URL": "redis://x"}
    monkeypatch.setenv("REDIS_URL", "redis://from-env")
    ep = resolve_endpoints(tmp_path)
    assert ep.kafka_bootstrap == "127.0.0.1:1" and ep.redis_url == "redis://from-env"
    assert ep.require("KAFKA_BOOTSTRAP") == "127.0.0.1:1"


def test_missing_endpoint_says_what_to_do(tmp_path):
    with pytest.raises(EndpointError, match="MLFLOW_TRACKING_URI is not set.*onerec stack up"):
        resolve_endpoints(tmp_path).require("MLFLOW_TRACKING_URI")
