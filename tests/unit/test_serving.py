"""The predictor in process (no server, no network): requests over KServe v1 and v2, A/B
routing, cold users and a failing feature store, malformed requests."""
from __future__ import annotations

import asyncio
import gc
import json
import os
import time
import weakref
from collections import Counter
from concurrent.futures import Future

import numpy as np
import pytest
import torch

from onerec.config import load_config
from onerec.eval.baselines import offline_data
from onerec.model.data import catalogue_model, fit_tokenizer
from onerec.model.train import save_model
from onerec.serve import ABConfig, ABRouter, FeatureSource, RequestError, parse_request, settle_heap

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Features(FeatureSource):
    """Stands in for the Feast online store: a dict of histories, a popularity list, a switch."""

    def __init__(self, histories: dict[int, list[int]], popular: list[int]):
        self.by_user, self.ranked, self.down = histories, popular, False

    def histories(self, user_ids):
        if self.down:
            raise ConnectionError("redis is down")
        return [self.by_user.get(u, []) for u in user_ids]

    def popular(self, n):
        if self.down:
            raise ConnectionError("redis is down")
        return self.ranked[:n]


IN_THREAD = ["serving.model_process=false"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Two saved (untrained, differently seeded) debug models and the debug users' histories.
    The models run on the batcher's thread here (test_model_process.py covers the child process)."""
    cfg = load_config("debug", IN_THREAD)
    data = offline_data(cfg.data)
    tok = fit_tokenizer(data.split.train, data.dataset.items, cfg.tokenizer, cfg.seed)
    dirs = {}
    for alias, seed in (("champion", 0), ("challenger", 1)):
        torch.manual_seed(seed)
        dirs[alias] = (str(save_model(catalogue_model(cfg.model, tok, data.index, data.dataset.items),
                                      tmp_path_factory.mktemp(alias), tokenizer=tok)), str(seed + 1))
    train = data.split.train
    histories = {int(u): g["item_id"].tolist() for u, g in train.groupby("user_id")}
    popular = train["item_id"].value_counts().index.tolist()
    return cfg, dirs, histories, popular, set(tok.item_ids.tolist())


def predictor(served, ab_config: str = "", **kw):
    from serving.predictor import OneRecPredictor

    cfg, dirs, histories, popular, _ = served
    cfg = load_config("debug", [*IN_THREAD, f"serving.ab_config={ab_config}"]) if ab_config else cfg
    p = OneRecPredictor("onerec", cfg, model_dirs=dirs, features=kw.get("features") or Features(histories, popular))
    assert p.load() and p.ready
    return p


def ask(p, body):
    """predict() is a coroutine (KServe awaits it); in process we run it to completion."""
    return asyncio.run(p.predict(body))


def test_v1_request_returns_k_distinct_catalogue_items_with_their_semantic_ids(served):
    cfg, dirs, histories, _, catalogue = served
    p = predictor(served)
    user = next(iter(histories))
    out = ask(p, {"instances": [{"user_id": user, "k": 5, "request_id": "r-1"}]})
    (rec,) = out["predictions"]
    assert rec["request_id"] == "r-1" and rec["user_id"] == user and rec["fallback"] is None
    assert len(rec["items"]) == len(set(rec["items"])) == 5 and set(rec["items"]) <= catalogue
    assert rec["scores"] == sorted(rec["scores"], reverse=True)
    assert (rec["variant"], rec["model_version"]) == ("control", dirs["champion"][1])
    from onerec.model.train import load_model

    _, tok = load_model(dirs["champion"][0])
    assert rec["semantic_ids"] == tok.encode(np.array(rec["items"])).tolist()


def test_a_request_for_more_items_than_the_head_candidates_widens_them(served):
    """serving.head_candidates below max_k: a request asking k more still gets k distinct items,
    the same ones k head candidates give (the beams stay as narrow as configured)."""
    cfg, dirs, histories, popular, catalogue = served
    from serving.predictor import OneRecPredictor

    user = next(iter(histories))
    answers = {}
    for head in (4, 8):
        narrow = load_config("debug", [*IN_THREAD, "serving.beam_size=2", f"serving.head_candidates={head}",
                                       "serving.default_k=4"])
        p = OneRecPredictor("onerec", narrow, model_dirs=dirs, features=Features(histories, popular))
        assert p.load()
        (answers[head],) = ask(p, {"instances": [{"user_id": user, "k": 8}]})["predictions"]
        p.stop()
    assert len(set(answers[4]["items"])) == 8 and set(answers[4]["items"]) <= catalogue
    assert answers[4]["items"] == answers[8]["items"]


def test_v2_infer_request_gives_padded_tensors(served):
    from kserve import InferInput, InferRequest

    _, _, histories, _, _ = served
    users = np.array(list(histories)[:3] + [10**9], dtype=np.int64)          # the last is unknown
    req = InferRequest("onerec", [InferInput("user_id", [4], "INT64", users),
                                  InferInput("k", [4], "INT64", np.array([3, 4, 5, 2], dtype=np.int64))])
    res = ask(predictor(served), req)
    outputs = {o.name: o for o in res.outputs}
    items = outputs["item_ids"].as_numpy()
    assert items.shape == (4, 5)
    assert [(row >= 0).sum() for row in items] == [3, 4, 5, 2]
    assert list(outputs["fallback"].data) == ["", "", "", "cold_user"]


def test_cold_user_gets_the_popular_items_flagged(served):
    _, _, _, popular, _ = served
    (rec,) = ask(predictor(served), {"instances": [{"user_id": 10**9, "k": 4}]})["predictions"]
    assert rec["items"] == popular[:4] and rec["fallback"] == "cold_user"


def test_feature_store_down_is_a_flagged_fallback_not_an_error(served):
    _, _, histories, popular, catalogue = served
    features = Features(histories, popular)
    p = predictor(served, features=features)
    features.down = True
    (rec,) = ask(p, {"instances": [{"user_id": next(iter(histories)), "k": 3}]})["predictions"]
    assert rec["fallback"] == "features_unavailable" and len(rec["items"]) == 3 and set(rec["items"]) <= catalogue
    assert p.recommender.feature_errors >= 1


@pytest.mark.parametrize("body, message", [
    ({}, "instances"),
    ({"instances": []}, "instances"),
    ({"instances": [{"user": 1}]}, "unknown field(s) user"),
    ({"instances": [{"user_id": 1, "log_exposure": "no"}]}, "log_exposure must be true or false"),
    ({"instances": [{"user_id": "7"}]}, "user_id must be a non-negative integer"),
    ({"instances": [{"user_id": 1, "k": 0}]}, "k must be an integer in 1..10"),
    ({"instances": [{"user_id": 1, "k": 11}]}, "k must be an integer in 1..10"),
    ({"instances": [7]}, "a request must be an object"),
])
def test_malformed_requests_are_400_with_what_is_wrong(served, body, message):
    from kserve.errors import InvalidInput

    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(")", r"\)")):
        ask(predictor(served), body)


def test_concurrent_requests_share_one_beam_search_and_get_what_they_would_get_alone(served):
    """Batching must not change answers: padding shorter histories, mixing k's, or a cold user
    in the batch leaves every user's items and scores as a lone request would have them."""
    _, _, histories, _, _ = served
    p = predictor(served)
    users = [*list(histories)[:7], 10**9]
    bodies = [{"instances": [{"user_id": u, "k": 3 + i % 5, "request_id": f"r{i}"}]} for i, u in enumerate(users)]
    alone = [ask(p, b)["predictions"][0] for b in bodies]
    calls = []
    recommend = p.batcher.fn
    p.batcher.fn = lambda plan: calls.append(len(plan.requests)) or recommend(plan)   # pipelined: fn(plan)
    p.batcher.max_wait_s = 0.05                       # generous: the 8 submits take microseconds

    async def together():
        return await asyncio.gather(*(p.predict(b) for b in bodies))

    batched = [r["predictions"][0] for r in asyncio.run(together())]
    assert len(calls) < len(bodies) and sum(calls) == len(bodies)
    for a, b in zip(alone, batched):
        assert (a["request_id"], a["items"], a["fallback"]) == (b["request_id"], b["items"], b["fallback"])
        np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-4, atol=1e-5)
    p.stop()


def test_a_full_queue_is_503_not_a_pile_up(served):
    from kserve.errors import ServerNotReady

    from onerec.batching import Overloaded

    p = predictor(served)

    class Full:
        def submit(self, items):
            raise Overloaded("1024 requests are already waiting; retry later")

    p.batcher = Full()
    with pytest.raises(ServerNotReady, match="already waiting"):
        ask(p, {"instances": [{"user_id": 1}]})


def test_a_request_shed_for_waiting_too_long_is_503_not_500(served):
    from kserve.errors import ServerNotReady

    from onerec.batching import Overloaded

    p = predictor(served)

    class Shedding:
        def submit(self, items):
            future = Future()
            future.set_exception(Overloaded("waited 40 ms for a batch, more than the 25 ms allowed; retry later"))
            return future

    p.batcher = Shedding()
    with pytest.raises(ServerNotReady, match="more than the 25 ms allowed"):
        ask(p, {"instances": [{"user_id": 1}]})


def test_a_shed_request_is_answered_503_without_kservers_error_traceback(caplog):
    """`python -m serving` installs shed_handler beside KServe's handlers: it wins for Shed (the
    most specific class), answers 503 with Retry-After, and logs nothing per refusal."""
    import logging

    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from kserve.errors import ServerNotReady, server_not_ready_handler

    from serving.predictor import RETRY_AFTER_S, Shed, shed_handler

    app = FastAPI()
    app.add_exception_handler(ServerNotReady, server_not_ready_handler)      # KServe's, as in the server
    app.add_exception_handler(Shed, shed_handler)

    @app.get("/shed")
    def refuse():
        raise Shed("waited 40 ms for a batch, more than the 25 ms allowed; retry later")

    @app.get("/not-ready")
    def not_ready():
        raise ServerNotReady("still loading")

    client = TestClient(app)
    with caplog.at_level(logging.INFO):
        resp = client.get("/shed")
    assert resp.status_code == 503 and resp.headers["retry-after"] == str(RETRY_AFTER_S)
    assert "more than the 25 ms allowed" in resp.json()["error"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    with caplog.at_level(logging.INFO):
        assert client.get("/not-ready").status_code == 503                    # other 503s: KServe's, logged
    assert any(r.levelno == logging.ERROR for r in caplog.records)


def test_the_alias_watcher_keeps_one_registry_client_and_reconnects_after_a_failure(served, monkeypatch):
    """Each poll used to connect anew (an extra /health request, MLflow CPU a co-located server
    takes from the beam search); now one client serves every poll until one fails."""
    from onerec import registry

    cfg, dirs, _, _, _ = served
    connects, answer = [], {"champion": dirs["champion"][1]}

    class Registry:
        def aliases(self):
            if isinstance(answer, Exception):
                raise answer
            return answer

    monkeypatch.setattr(registry.Registry, "connect", classmethod(lambda cls, uri, name: connects.append(uri) or Registry()))
    p = predictor(served)
    for _ in range(3):
        p.poll()
    assert len(connects) == 1 and p.recommender.models["champion"].version == dirs["champion"][1]
    answer = ConnectionError("MLflow went away")
    p.poll()                                                                  # fails, keeps serving
    answer = {"champion": dirs["champion"][1]}
    p.poll()
    assert len(connects) == 2
    p.stop()


def test_parse_request_defaults():
    cfg = load_config("debug").serving
    req = parse_request({"user_id": 3}, cfg)
    assert req.k == cfg.default_k and len(req.request_id) == 32
    with pytest.raises(RequestError):
        parse_request({"user_id": True}, cfg)


def test_ab_assignment_is_deterministic_and_follows_the_weights():
    ab = ABConfig.parse({"experiment": "exp-1", "variants": [
        {"name": "control", "alias": "champion", "weight": 80},
        {"name": "treatment", "alias": "challenger", "weight": 20}]}, "test")
    shares = Counter(ab.assign(u).name for u in range(20_000))
    assert abs(shares["treatment"] / 20_000 - 0.2) < 0.015
    assert [ab.assign(u).name for u in range(100)] == [ab.assign(u).name for u in range(100)]
    other = ABConfig.parse({"experiment": "exp-2", "variants": [
        {"name": "control", "alias": "champion", "weight": 80},
        {"name": "treatment", "alias": "challenger", "weight": 20}]}, "test")
    assert [ab.assign(u).name for u in range(200)] != [other.assign(u).name for u in range(200)]  # new salt


@pytest.mark.parametrize("bad, message", [
    ({"variants": []}, "experiment"),
    ({"experiment": "e", "variants": []}, "non-empty list"),
    ({"experiment": "e", "variants": [{"name": "a", "alias": "champion"}]}, "exactly name, alias, weight"),
    ({"experiment": "e", "variants": [{"name": "a", "alias": "champion", "weight": -1}]}, "weight"),
    ({"experiment": "e", "variants": [{"name": "a", "alias": "x", "weight": 1},
                                      {"name": "a", "alias": "y", "weight": 1}]}, "unique"),
])
def test_bad_ab_configs_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        ABConfig.parse(bad, "ab.json")


def test_ab_file_change_takes_effect_without_restart_and_a_bad_edit_keeps_the_last(served, tmp_path):
    path = tmp_path / "ab.json"
    path.write_text(json.dumps({"experiment": "e", "variants": [
        {"name": "control", "alias": "champion", "weight": 1}, {"name": "treatment", "alias": "challenger", "weight": 0}]}))
    p = predictor(served, ab_config=str(path))
    _, dirs, histories, _, _ = served
    users = list(histories)[:20]
    first = ask(p, {"instances": [{"user_id": u} for u in users]})["predictions"]
    assert {r["variant"] for r in first} == {"control"}
    path.write_text(json.dumps({"experiment": "e", "variants": [
        {"name": "control", "alias": "champion", "weight": 0}, {"name": "treatment", "alias": "challenger", "weight": 1}]}))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert p.router.refresh()
    after = ask(p, {"instances": [{"user_id": u} for u in users]})["predictions"]
    assert {(r["variant"], r["model_version"]) for r in after} == {("treatment", dirs["challenger"][1])}
    path.write_text("{not json")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert not p.router.refresh() and p.router.error
    assert p.router.config.variants[1].weight == 1                      # the last good config stays


def test_a_router_without_a_file_sends_everyone_to_the_champion():
    router = ABRouter()
    assert {router.assign(u).alias for u in range(50)} == {"champion"} and router.aliases() == {"champion"}


# --------------------------------------------------------------------------- exposures


class FakeProducer:
    """confluent_kafka.Producer's surface: produce() queues, poll() serves the delivery reports."""

    def __init__(self):
        self.records, self._reports = [], []

    def produce(self, topic, value, key, on_delivery):
        self.records.append((topic, key, json.loads(value)))
        self._reports.append(on_delivery)

    def poll(self, timeout):
        while self._reports:
            self._reports.pop(0)(None, None)
        time.sleep(timeout / 10)

    def flush(self, timeout):
        self.poll(0)
        return 0


def _wait(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def logged_predictor(served):
    """A predictor whose exposures go to a FakeProducer -> (predictor, producer, exposure log)."""
    from onerec.exposures import ExposureLog

    producer = FakeProducer()
    log = ExposureLog("kafka:9092", "exposures", producer_factory=lambda *_: producer)
    p = predictor(served)
    p.exposures = log
    return p, producer, log


def test_every_response_is_logged_as_an_exposure_with_positions(served):
    _, _, histories, _, _ = served
    p, producer, log = logged_predictor(served)
    users = list(histories)[:3]
    recs = ask(p, {"instances": [{"user_id": u, "k": 4, "request_id": f"r{u}"} for u in users]})["predictions"]
    _wait(lambda: len(producer.records) == 3)
    log.close()
    assert log.sent == 3 and log.dropped == 0
    for (topic, key, value), rec in zip(producer.records, recs):
        assert topic == "exposures" and key == str(rec["user_id"]).encode()
        assert value["request_id"] == rec["request_id"] and value["variant"] == rec["variant"]
        assert value["model_version"] == rec["model_version"] and value["schema_version"] == 1
        assert [(i["item_id"], i["position"]) for i in value["items"]] == list(zip(rec["items"], range(4)))


def test_a_probe_is_answered_but_not_logged_as_an_exposure(served):
    _, _, histories, _, _ = served
    p, producer, log = logged_predictor(served)
    user = next(iter(histories))
    recs = ask(p, {"instances": [{"user_id": user, "request_id": "probe", "log_exposure": False},
                                 {"user_id": user, "request_id": "real"}]})["predictions"]
    _wait(lambda: len(producer.records) == 1)
    log.close()
    assert len(recs) == 2 and [value["request_id"] for _, _, value in producer.records] == ["real"]


def test_kafka_down_never_fails_a_request_and_counts_the_drops(served):
    """The real librdkafka producer, pointed at a port where no broker listens."""
    from onerec.exposures import ExposureLog

    _, _, histories, _, _ = served
    log = ExposureLog("127.0.0.1:1", "exposures", delivery_timeout_s=0.5)
    p = predictor(served)
    p.exposures = log
    for u in list(histories)[:5]:
        assert len(ask(p, {"instances": [{"user_id": u}]})["predictions"][0]["items"]) == 10
    _wait(lambda: log.dropped == 5)
    t = time.monotonic()
    log.close()
    assert time.monotonic() - t < 2 and log.sent == 0 and log.dropped == 5


def test_a_full_buffer_drops_instead_of_blocking():
    from onerec.exposures import ExposureLog
    from onerec.serve import Recommendation

    log = ExposureLog("127.0.0.1:1", "exposures", max_buffer=2, delivery_timeout_s=30)
    rec = Recommendation("r", 1, [5], [0.5], [[0, 0, 0]], "control", "1", None)
    t = time.monotonic()
    dropped = sum(log.publish([rec]) for _ in range(10))
    assert time.monotonic() - t < 0.5 and dropped == 8 and log.dropped == 8
    log.close(timeout_s=0.2)                      # the 2 buffered ones never get out: dropped too
    assert log.dropped == 10 and log.sent == 0
    assert log.publish([rec]) == 1                # closed: dropped, never an error


def test_the_demo_imports_the_predictor_whatever_its_command_line():
    """KServe parses sys.argv when first imported; `onerec demo --config small` must survive it."""
    import subprocess
    import sys

    from onerec.config import PROJECT_ROOT

    code = ("import sys; sys.argv = ['onerec', 'demo', '--config', 'small']; "
            "from onerec.demo import predictor_class; print(predictor_class().__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert out.returncode == 0 and out.stdout.strip().endswith("OneRecPredictor"), out.stderr[-2000:]


class _Node:
    pass


def _cycle() -> weakref.ref:
    node = _Node()
    node.me = node                          # only the cyclic GC can free it
    return weakref.ref(node)


@pytest.mark.parametrize("collect", [True, False])
def test_settling_the_heap_freezes_what_lives_and_collects_first_only_when_asked(collect):
    garbage, frozen_before, thresholds = _cycle(), gc.get_freeze_count(), gc.get_threshold()
    try:
        settle_heap(collect=collect)
        assert gc.get_freeze_count() > frozen_before               # out of every full collection's walk
        assert gc.get_threshold()[2] == 100                        # and full collections 10x rarer
        gc.collect()
        assert (garbage() is None) == collect                      # frozen garbage stays until unfrozen
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def test_the_served_app_has_no_timing_middleware():
    import fastapi
    from kserve.protocol.rest.server import RESTServer
    from timing_asgi import TimingMiddleware

    from serving.__main__ import UntimedRESTServer

    def middlewares(cls, **kwargs) -> list:
        app = fastapi.FastAPI()
        cls("kserve.model_server:app", None, None, 0, **kwargs)._add_middlewares(app)
        return [m.cls for m in app.user_middleware]

    assert TimingMiddleware in middlewares(RESTServer)                # what KServe does: every request timed
    assert middlewares(UntimedRESTServer) == []


@pytest.mark.parametrize("event_loop,installed", [("auto", True), ("uvloop", True), ("asyncio", False)])
def test_the_event_loop_option_picks_uvloop_unless_asyncio_is_asked_for(event_loop, installed):
    import uvloop

    from serving.__main__ import use_uvloop

    try:
        assert use_uvloop(event_loop) is installed
        loop = asyncio.new_event_loop()
        assert isinstance(loop, uvloop.Loop) is installed
        loop.close()
    finally:
        asyncio.set_event_loop_policy(None)
        asyncio.set_event_loop(None)
