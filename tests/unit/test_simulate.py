"""The simulator with a fake predictor and a fake Kafka: reactions carry request ids, real
held-out ratings win over modelled ones, failures are counted, runs are seeded."""
from __future__ import annotations

import dataclasses
import urllib.error

import numpy as np
import pandas as pd
import pytest

from onerec.config import load_config
from onerec.data.events import parse_event
from onerec.rl.response import ResponseModel
from onerec.simulate import Simulator


@pytest.fixture(scope="module")
def response():
    rng = np.random.default_rng(0)
    ratings = pd.DataFrame({"user_id": rng.integers(1, 30, 600), "item_id": rng.integers(1, 50, 600),
                            "rating": rng.integers(1, 6, 600).astype(float)})
    return ResponseModel.fit(ratings, load_config("debug").simulate, seed=0)


def fake_predictor(fail_every: int = 0):
    calls = []

    def recommend(user, k, request_id):
        calls.append(request_id)
        if fail_every and len(calls) % fail_every == 0:
            raise urllib.error.URLError("connection refused")
        return {"request_id": request_id, "items": [10 + j for j in range(k)], "variant": "control",
                "model_version": "3", "fallback": None}

    return recommend, calls


def simulator(response, holdout, recommend, sent, seed=0, **cfg):
    sim_cfg = dataclasses.replace(load_config("debug").simulate, k=4, max_rate_per_s=10_000, **cfg)
    return Simulator(sim_cfg, response, holdout, recommend, sent.append, seed=seed, run_id="t")


def test_every_item_of_every_answer_gets_a_valid_reaction_with_the_request_id(response):
    recommend, calls = fake_predictor()
    sent = []
    holdout = pd.DataFrame({"user_id": [5, 5], "item_id": [11, 11], "rating": [2.0, 5.0]})  # re-rated: latest
    report = simulator(response, holdout, recommend, sent, users=3, sessions_per_user=2).run([5, 6, 7], progress=False)
    assert report["requests"] == len(calls) == 6 and report["reactions"] == len(sent) == 24
    for event in sent:
        assert parse_event(event.to_json()) == event                      # valid on the wire
        assert event.event_type == "rate" and event.request_id in calls and 1 <= event.rating <= 5
    real = [e for e in sent if e.context["source"] == "real"]
    assert [(e.user_id, e.item_id, e.rating) for e in real] == [(5, 11, 5.0)] * 2   # both of user 5's sessions
    assert report["real_reactions"] == 2 and report["real_share"] == round(2 / 24, 4)
    assert [e.context["position"] for e in sent[:4]] == [0, 1, 2, 3]
    assert report["by_variant"]["control/v3"]["reactions"] == 24


def test_failed_requests_are_counted_and_skipped(response):
    recommend, calls = fake_predictor(fail_every=2)
    sent = []
    report = simulator(response, pd.DataFrame(columns=["user_id", "item_id", "rating"]), recommend, sent,
                       sessions_per_user=1).run([1, 2, 3, 4], progress=False)
    assert (report["requests"], report["request_errors"]) == (2, 2) and len(sent) == 8
    assert report["errors_by_type"] == {"URLError": 2}


def test_the_same_seed_gives_the_same_users_and_reactions(response):
    def once(seed):
        recommend, _ = fake_predictor()
        sent = []
        sim = simulator(response, pd.DataFrame(columns=["user_id", "item_id", "rating"]), recommend, sent,
                        seed=seed, users=5, sessions_per_user=1)
        users = sim.pick_users(list(range(1, 40)))
        sim.run(users, progress=False)
        return users, [(e.user_id, e.item_id, e.rating) for e in sent]

    assert once(1) == once(1) and once(1) != once(2)


def test_no_users_is_a_clear_error(response):
    recommend, _ = fake_predictor()
    with pytest.raises(ValueError, match="no users"):
        simulator(response, pd.DataFrame(columns=["user_id", "item_id", "rating"]), recommend, []).pick_users([])
