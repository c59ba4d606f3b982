"""The simulated users' response model: it learns real structure, handles the unseen, and is
calibrated against held-out ratings beside the popularity baseline."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from onerec.config import load_config
from onerec.rl.response import ResponseModel, calibration


def synthetic_ratings(n_users=120, n_items=80, per_user=30, seed=0) -> pd.DataFrame:
    """Ratings from a known rank-2 taste model plus noise, clipped to 1..5."""
    rng = np.random.default_rng(seed)
    pu, qi = rng.normal(size=(n_users, 2)), rng.normal(size=(n_items, 2))
    rows = []
    for u in range(n_users):
        for i in rng.choice(n_items, per_user, replace=False):
            rows.append((u + 1, i + 1, float(np.clip(np.rint(3 + pu[u] @ qi[i] + rng.normal(0, 0.3)), 1, 5))))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "rating"])


@pytest.fixture(scope="module")
def fitted():
    ratings = synthetic_ratings()
    heldout = ratings.sample(frac=0.15, random_state=1)
    seen = ratings.drop(heldout.index)
    cfg = dataclasses.replace(load_config("debug").simulate, response_dim=4, response_epochs=400, response_l2=0.01)
    return ResponseModel.fit(seen, cfg, seed=0), seen, heldout


def test_it_learns_the_tastes_better_than_popularity(fitted):
    model, seen, heldout = fitted
    report = calibration(model, seen, heldout)
    assert report["response_rmse"] < 0.8 * report["popularity_rmse"]
    assert report["response_auc"] > report["popularity_auc"] + 0.1 and report["response_auc"] > 0.8
    assert report["heldout_ratings"] == len(heldout) and 0 < report["heldout_liked_share"] < 1


def test_unseen_users_and_items_get_the_terms_they_have(fitted):
    model, _, _ = fitted
    item = int(model.item_ids[0])
    new_user = model.predict([10**9], [item])[0]
    assert new_user == pytest.approx(np.clip(model.mean + model.item_bias[0], 1, 5))
    assert model.predict([10**9], [10**9])[0] == pytest.approx(np.clip(model.mean, 1, 5))


def test_samples_are_seeded_integer_ratings_spread_around_the_prediction(fitted):
    model, seen, _ = fitted
    users, items = seen["user_id"].to_numpy()[:500], seen["item_id"].to_numpy()[:500]
    a = model.sample(users, items, np.random.default_rng(3))
    b = model.sample(users, items, np.random.default_rng(3))
    assert np.array_equal(a, b) and a.dtype == np.int64 and set(np.unique(a)) <= {1, 2, 3, 4, 5}
    assert abs(a.mean() - model.predict(users, items).mean()) < 0.2 and len(np.unique(a)) >= 3


@pytest.mark.parametrize("bad", [
    pd.DataFrame({"user_id": [1], "item_id": [1]}),
    pd.DataFrame({"user_id": [1], "item_id": [1], "rating": [7.0]}),
    pd.DataFrame({"user_id": [], "item_id": [], "rating": []}),
])
def test_bad_ratings_are_refused(bad):
    with pytest.raises(ValueError, match="rating"):
        ResponseModel.fit(bad, load_config("debug").simulate, seed=0)
