"""Shared test helpers: free loopback ports and debug-preset configs that use them."""
from __future__ import annotations

from pathlib import Path

import pytest

from onerec.config import Config, load_config
from onerec.stack import free_port, isolated_config  # noqa: F401 - free_port: for the tests


def stack_config(state_dir, *overrides: str) -> Config:
    """The debug preset on free ports with its own state directory."""
    return isolated_config("debug", state_dir, *overrides)


@pytest.fixture
def debug_config() -> Config:
    return load_config("debug")


def data_root() -> Path:
    """The shared data; missing data is a failure (the tests would prove nothing), not a skip."""
    root = load_config("debug").data.root_path()
    for f in ("ml-100k/u.data", "amazon-s3rec/Beauty.txt"):
        if not (root / f).is_file():
            pytest.fail(f"shared data not found: {root / f}; set ONEREC_DATA_ROOT (or data.root in "
                        "configs/debug.yaml) to the folder holding ml-100k/ and amazon-s3rec/")
    return root


@pytest.fixture(autouse=True)
def no_endpoint_leaks(monkeypatch):
    """Endpoints come from each test's own stack env file: clear what an earlier test (or
    mlflow.set_tracking_uri, which exports MLFLOW_TRACKING_URI) left in the environment."""
    from onerec.endpoints import AB_STORE_URL, ENDPOINT_VARS

    for var in (*ENDPOINT_VARS, AB_STORE_URL):
        monkeypatch.delenv(var, raising=False)
