"""Stack pieces that need no running process."""
import sys

import pytest

from onerec import stack
from onerec.config import load_config


def test_missing_package_or_binary_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(stack.StackError, match="package 'no_such_pkg' is not installed"):
        stack._package_binary("no_such_pkg", "bin/x")
    (tmp_path / "fakepkg").mkdir()
    (tmp_path / "fakepkg" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(stack.StackError, match=r"binary .*fakepkg/bin/tansu is missing"):
        stack._package_binary("fakepkg", "bin/tansu")
    sys.modules.pop("fakepkg", None)


def test_parts_follow_the_config():
    cfg = load_config("debug", ["stack.kafka_port=31001", "stack.redis_port=31002", "stack.mlflow_port=31003"])
    parts = {p.name: p for p in stack.parts(cfg)}
    assert list(parts) == list(stack.PARTS)
    assert parts["kafka"].endpoint == "127.0.0.1:31001"
    assert parts["redis"].endpoint == "redis://127.0.0.1:31002/0"
    assert parts["mlflow"].endpoint == "http://127.0.0.1:31003"
    kafka_cmd = parts["kafka"].command()
    assert kafka_cmd[kafka_cmd.index("--listener-url") + 1] == "tcp://127.0.0.1:31001"
    assert "--appendonly" in parts["redis"].command()


def test_status_of_a_stack_never_started(tmp_path):
    cfg = load_config("debug", [f"stack.state_dir={tmp_path}"])
    assert [s.state for s in stack.status(cfg)] == ["stopped"] * 3
    assert stack.down(cfg) == []
    table = stack.format_status(stack.status(cfg))
    assert table.splitlines()[0].split()[:4] == ["part", "state", "pid", "endpoint"]


def test_a_stale_pid_file_is_ignored(tmp_path):
    cfg = load_config("debug", [f"stack.state_dir={tmp_path}"])
    (tmp_path / "run").mkdir()
    # pid 1 exists but started long before this record claims: not ours, must not be touched
    (tmp_path / "run" / "redis.json").write_text('{"pid": 1, "create_time": 1.0, "port": 1, "command": []}')
    assert stack.down(cfg) == []
    assert not (tmp_path / "run" / "redis.json").exists()
