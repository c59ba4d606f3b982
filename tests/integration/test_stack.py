"""The embedded stack as real processes on loopback: up, use each part, down, nothing left."""
from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path

import psutil
import pytest

from onerec import stack
from onerec.endpoints import read_env_file
from tests.conftest import stack_config

pytestmark = pytest.mark.integration

CONSUMER_TIMEOUTS = dict(session_timeout_ms=6000, heartbeat_interval_ms=1000, max_poll_interval_ms=10000)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _consume(bootstrap: str, topic: str, group: str, want: int, timeout_s: float = 30.0) -> list:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group,
                             auto_offset_reset="earliest", enable_auto_commit=False, **CONSUMER_TIMEOUTS)
    records, deadline = [], time.monotonic() + timeout_s
    try:
        while len(records) < want and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        consumer.commit()
    finally:
        consumer.close()
    return records


@pytest.fixture
def running_stack(tmp_path):
    cfg = stack_config(tmp_path / "state")
    try:
        yield cfg, stack.up(cfg)
    finally:
        stack.down(cfg)


def test_stack_serves_kafka_redis_mlflow_and_down_leaves_nothing(running_stack):
    from kafka import KafkaProducer

    cfg, statuses = running_stack
    assert [s.state for s in statuses] == ["healthy"] * 3
    pids = {s.name: s.pid for s in statuses}
    env = read_env_file(Path(cfg.stack.state_dir) / "stack.env")
    bootstrap, redis_url, mlflow_uri = env["KAFKA_BOOTSTRAP"], env["REDIS_URL"], env["MLFLOW_TRACKING_URI"]
    assert bootstrap == f"127.0.0.1:{cfg.stack.kafka_port}"

    # idempotent: a second `up` starts nothing new
    assert {s.name: s.pid for s in stack.up(cfg)} == pids

    # Kafka: topics from config, produce with keys and headers, consume as a group, resume
    kafka_detail = statuses[0].detail
    for topic in cfg.kafka.topics():
        assert f"{topic.name}[{topic.partitions}]" in kafka_detail
    topic = cfg.kafka.user_events.name
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    for i in range(100):
        producer.send(topic, key=f"user-{i % 7}".encode(), value=f"event-{i}".encode(),
                      headers=[("source", b"test")])
    producer.flush()
    first = _consume(bootstrap, topic, "group-a", want=100)
    assert sorted(r.value for r in first) == sorted(f"event-{i}".encode() for i in range(100))
    assert all(r.headers == [("source", b"test")] for r in first)
    for i in range(100, 120):
        producer.send(topic, key=b"user-x", value=f"event-{i}".encode())
    producer.flush()
    producer.close()
    resumed = _consume(bootstrap, topic, "group-a", want=20, timeout_s=15)
    assert sorted(r.value for r in resumed) == sorted(f"event-{i}".encode() for i in range(100, 120))

    # Redis: set/get, persisted with AOF in the state directory
    import redis
    client = redis.Redis.from_url(redis_url)
    client.set("onerec:test", "value")
    assert client.get("onerec:test") == b"value"
    client.close()
    assert (Path(cfg.stack.state_dir) / "redis" / "appendonly.aof").exists()

    # MLflow: log a run with an artifact and read it back through the server
    import mlflow
    from mlflow import MlflowClient
    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_experiment(f"stack-test-{uuid.uuid4().hex[:6]}")
    with mlflow.start_run() as run:
        mlflow.log_param("alpha", 0.5)
        mlflow.log_metric("recall_at_10", 0.0786)
        mlflow.log_text("hello", "notes/hello.txt")
    stored = MlflowClient(mlflow_uri).get_run(run.info.run_id)
    assert stored.data.params["alpha"] == "0.5" and stored.data.metrics["recall_at_10"] == 0.0786
    assert mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/notes/hello.txt") == "hello"

    # down: every process group gone, every port closed, env file removed
    group_members = [p for p in psutil.process_iter() if _pgid(p) in pids.values()]
    assert group_members, "expected the stack's processes to be visible before down"
    assert stack.down(cfg) == ["kafka", "redis", "mlflow"]
    assert not [p for p in psutil.process_iter() if _pgid(p) in pids.values() and _alive(p)]
    for port in (cfg.stack.kafka_port, cfg.stack.redis_port, cfg.stack.mlflow_port):
        assert not _port_open(port)
    assert not (Path(cfg.stack.state_dir) / "stack.env").exists()
    assert [s.state for s in stack.status(cfg)] == ["stopped"] * 3
    assert stack.down(cfg) == []


def _pgid(proc: psutil.Process) -> int | None:
    try:
        import os
        return os.getpgid(proc.pid)
    except OSError:
        return None


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_port_in_use_fails_clearly_and_leaves_nothing_running(tmp_path):
    cfg = stack_config(tmp_path / "state")
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", cfg.stack.redis_port))
        blocker.listen(1)
        with pytest.raises(stack.StackError) as err:
            stack.up(cfg)
    message = str(err.value)
    assert f"port {cfg.stack.redis_port} (redis) is in use" in message and "stack.redis_port" in message
    # kafka was started before redis failed; `up` must have stopped it again
    assert [s.state for s in stack.status(cfg)] == ["stopped"] * 3
    assert not _port_open(cfg.stack.kafka_port)


def test_cli_status_and_logs(tmp_path, capsys):
    from onerec.cli import main

    state = tmp_path / "state"
    args = ["--config", "debug", "--set", f"stack.state_dir={state}"]
    assert main(["stack", "status", *args]) == 3  # nothing running yet
    assert "stopped" in capsys.readouterr().out
    assert main(["stack", "logs", "nosuchpart", *args]) == 1
    assert "unknown part 'nosuchpart'" in capsys.readouterr().err
