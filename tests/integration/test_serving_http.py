"""`python -m serving` as a real KServe server on loopback: the champion from the embedded
MLflow registry, user histories from Feast online (Redis), over KServe v1 and v2 HTTP."""
from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from onerec import stack
from onerec.cli import main
from onerec.endpoints import ENV_FILE_NAME, read_env_file
from serving.process import ServerProcess
from tests.conftest import stack_config

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


def _register_two_versions(cfg, uri: str, tmp_path) -> tuple[str, str, set[int]]:
    """Versions 1 and 2 (other initial weights); 1 was champion, 2 is now (so a rollback has
    somewhere to go)."""
    from mlflow.tracking import MlflowClient

    from onerec.eval.baselines import offline_data
    from onerec.model.data import catalogue_model, fit_tokenizer
    from onerec.model.train import save_model
    from onerec.registry import Registry

    data = offline_data(cfg.data)
    tok = fit_tokenizer(data.split.train, data.dataset.items, cfg.tokenizer, cfg.seed)
    client = MlflowClient(uri)
    experiment = client.create_experiment("serving-test")
    reg = Registry.connect(uri, cfg.registry.model_name)
    versions = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        folder = save_model(catalogue_model(cfg.model, tok, data.index, data.dataset.items), tmp_path / f"m{seed}",
                            tokenizer=tok)
        run = client.create_run(experiment).info.run_id
        client.log_artifacts(run, str(folder), "model")
        versions.append(reg.register(run, "model"))
    reg.move({"champion": versions[0]}, action="register-alias", who="test")
    reg.promote(versions[1], reason="test")
    return versions[0], versions[1], set(tok.item_ids.tolist())


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
        previous, version, catalogue = _register_two_versions(cfg, uri, tmp_path)

        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "REDIS_URL": redis_url,
               "KAFKA_BOOTSTRAP": env_file["KAFKA_BOOTSTRAP"]}
        server = ServerProcess(["--preset", "debug", "--set", f"stack.state_dir={cfg.stack.state_dir}",
                                "--set", "serving.reload_poll_s=1"], env, tmp_path / "server.log")
        server.start()
        base = server.url

        history_user = 1                                  # ml-100k user 1: in the debug slice's history
        status, body = _post(f"{base}/v1/models/onerec:predict",
                             {"instances": [{"user_id": history_user, "k": 5, "request_id": "http-1"}]})
        assert status == 200, body
        (rec,) = body["predictions"]
        assert rec["fallback"] is None and rec["model_version"] == version
        assert len(set(rec["items"])) == 5 and set(rec["items"]) <= catalogue

        # concurrent requests are batched in the server: each still gets its own, unchanged answer
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda i: _post(f"{base}/v1/models/onerec:predict", {"instances": [
                {"user_id": history_user, "k": 5, "request_id": f"c-{i}"}]}), range(32)))
        assert [status for status, _ in answers] == [200] * 32
        assert all(b["predictions"][0]["items"] == rec["items"] for _, b in answers)
        assert sorted(b["predictions"][0]["request_id"] for _, b in answers) == sorted(f"c-{i}" for i in range(32))

        status, body = _post(f"{base}/v1/models/onerec:predict", {"instances": [{"user_id": 1, "k": 999}]})
        assert status == 400 and "k must be an integer" in json.dumps(body)

        status, body = _post(f"{base}/v2/models/onerec/infer", {"inputs": [
            {"name": "user_id", "shape": [2], "datatype": "INT64", "data": [history_user, 10**9]}]})
        assert status == 200, body
        outputs = {o["name"]: o for o in body["outputs"]}
        assert outputs["item_ids"]["shape"] == [2, cfg.serving.default_k]
        assert outputs["fallback"]["data"] == ["", "cold_user"]

        # every response went to Kafka `exposures`: the v1 requests (1 + 32), then the two v2 users
        exposures = _consume(env_file["KAFKA_BOOTSTRAP"], cfg.kafka.exposures.name, want=35)
        first = next(e for e in exposures if e["request_id"] == "http-1")
        assert [i["item_id"] for i in first["items"]] == rec["items"] and first["model_version"] == version
        assert sorted(e["user_id"] for e in exposures) == sorted([history_user] * 34 + [10**9])

        # `onerec model rollback` while requests stream: none fails, the previous champion serves
        # new requests within 10 s
        results, stop = [], threading.Event()

        def stream():
            while not stop.is_set():
                t = time.monotonic()
                try:
                    status, body = _post(f"{base}/v1/models/onerec:predict", {"instances": [{"user_id": history_user}]})
                except OSError as exc:                            # a timeout or a refused connection fails too
                    status, body = repr(exc), {}
                results.append((t, status, body.get("predictions", [{}])[0].get("model_version"),
                                time.monotonic() - t))

        sender = threading.Thread(target=stream)
        sender.start()
        try:
            time.sleep(1.0)
            cli = ["--config", "debug", "--set", f"stack.state_dir={cfg.stack.state_dir}",
                   "--set", f"stack.mlflow_port={cfg.stack.mlflow_port}"]
            rolled_at = time.monotonic()
            assert main(["model", "rollback", *cli, "--reason", "test"]) == 0
            deadline = rolled_at + 10
            while time.monotonic() < deadline and not (results and results[-1][2] == previous):
                time.sleep(0.2)
            time.sleep(1.0)
        finally:
            stop.set()
            sender.join(30)
        assert results and all(status == 200 for _, status, _, _ in results), [r for r in results if r[1] != 200][:3]
        switched = [t for t, _, v, _ in results if v == previous]
        assert switched and switched[0] - rolled_at < 10, f"the previous champion did not serve within 10 s: {results[-3:]}"
        assert {v for t, _, v, _ in results if t < rolled_at} == {version}
        assert all(v == previous for t, _, v, _ in results if t > switched[0])    # no flapping back
    finally:
        if server is not None:
            server.stop()
            print(server.tail())                          # the server's log, shown when the test fails
        stack.down(cfg)
