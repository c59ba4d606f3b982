"""`python -m serving` as a real KServe server on loopback: the champion from the embedded
MLflow registry, user histories from Feast online (Redis), over KServe v1 and v2 HTTP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

from onerec import stack
from onerec.config import PROJECT_ROOT
from onerec.endpoints import ENV_FILE_NAME, read_env_file
from tests.conftest import free_port, stack_config

pytestmark = pytest.mark.integration


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _consume(bootstrap: str, topic: str, want: int, timeout_s: float = 30.0) -> list[dict]:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id="serving-test", auto_offset_reset="earliest",
                             enable_auto_commit=False, session_timeout_ms=6000, heartbeat_interval_ms=1000)
    records, deadline = [], time.monotonic() + timeout_s
    try:
        while len(records) < want and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(json.loads(r.value) for r in batch)
    finally:
        consumer.close()
    return records


def _register_champion(cfg, uri: str, tmp_path) -> tuple[str, set[int]]:
    from mlflow.tracking import MlflowClient

    from onerec.eval.baselines import offline_data
    from onerec.model.data import catalogue_model, fit_tokenizer
    from onerec.model.train import save_model
    from onerec.registry import Registry

    data = offline_data(cfg.data)
    tok = fit_tokenizer(data.split.train, data.dataset.items, cfg.tokenizer, cfg.seed)
    torch.manual_seed(0)
    folder = save_model(catalogue_model(cfg.model, tok, data.index, data.dataset.items), tmp_path / "m", tokenizer=tok)
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("serving-test")).info.run_id
    client.log_artifacts(run, str(folder), "model")
    reg = Registry.connect(uri, cfg.registry.model_name)
    version = reg.register(run, "model")
    reg.move({"champion": version}, action="register-alias", who="test")
    return version, set(tok.item_ids.tolist())


def test_http_predictions_come_from_the_registry_champion_and_feast_features(tmp_path):
    import redis

    from onerec.features.backfill import backfill
    from onerec.features.store import apply_repo

    cfg = stack_config(tmp_path / "state")
    server = None
    try:
        stack.up(cfg)
        env_file = read_env_file(tmp_path / "state" / ENV_FILE_NAME)
        uri, redis_url = env_file["MLFLOW_TRACKING_URI"], env_file["REDIS_URL"]
        apply_repo(cfg)
        backfill(cfg, redis.Redis.from_url(redis_url), progress=False)
        version, catalogue = _register_champion(cfg, uri, tmp_path)

        port = free_port()
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "REDIS_URL": redis_url, "PYTHONPATH": str(PROJECT_ROOT),
               "KAFKA_BOOTSTRAP": env_file["KAFKA_BOOTSTRAP"]}
        server = subprocess.Popen(
            [sys.executable, "-m", "serving", "--model_name", "onerec", "--preset", "debug",
             "--set", f"stack.state_dir={cfg.stack.state_dir}", "--http_port", str(port),
             "--grpc_port", str(free_port()), "--enable_grpc", "false"],
            cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/v1/models/onerec", timeout=2) as resp:
                    if json.loads(resp.read()).get("ready"):
                        break
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() < deadline, "the predictor did not become ready in 120 s"
            time.sleep(1)

        history_user = 1                                  # ml-100k user 1: in the debug slice's history
        status, body = _post(f"{base}/v1/models/onerec:predict",
                             {"instances": [{"user_id": history_user, "k": 5, "request_id": "http-1"}]})
        assert status == 200, body
        (rec,) = body["predictions"]
        assert rec["fallback"] is None and rec["model_version"] == version
        assert len(set(rec["items"])) == 5 and set(rec["items"]) <= catalogue

        status, body = _post(f"{base}/v1/models/onerec:predict", {"instances": [{"user_id": 1, "k": 999}]})
        assert status == 400 and "k must be an integer" in json.dumps(body)

        status, body = _post(f"{base}/v2/models/onerec/infer", {"inputs": [
            {"name": "user_id", "shape": [2], "datatype": "INT64", "data": [history_user, 10**9]}]})
        assert status == 200, body
        outputs = {o["name"]: o for o in body["outputs"]}
        assert outputs["item_ids"]["shape"] == [2, cfg.serving.default_k]
        assert outputs["fallback"]["data"] == ["", "cold_user"]

        # every response went to Kafka `exposures`: the v1 request, then the two v2 users
        exposures = _consume(env_file["KAFKA_BOOTSTRAP"], cfg.kafka.exposures.name, want=3)
        first = next(e for e in exposures if e["request_id"] == "http-1")
        assert [i["item_id"] for i in first["items"]] == rec["items"] and first["model_version"] == version
        assert sorted(e["user_id"] for e in exposures) == sorted([history_user, history_user, 10**9])
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
        stack.down(cfg)
