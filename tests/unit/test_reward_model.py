"""The reward model learns who likes what, beats a constant and a popularity predictor on a
later time slice, and reads the joined rows the way the joiner writes them."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from onerec.config import load_config
from onerec.rl.reward_model import (evaluate_reward_model, item_attribute_table,
                                    reward_examples, time_slices, train_reward_model)


def rm_cfg(**kw):
    return dataclasses.replace(load_config("debug").reward_model, **kw)


def synthetic_examples(n=8000, seed=0) -> pd.DataFrame:
    """Two kinds of users; each likes one half of the items: a pattern popularity cannot see."""
    rng = np.random.default_rng(seed)
    users, items = rng.integers(1, 50, n), rng.integers(1, 60, n)
    likes = (users % 2) == (items % 2)
    reward = np.where(likes, 1.0, -0.5) * (rng.random(n) > 0.1)          # 10 % noise to 0
    return pd.DataFrame({"user_id": users, "item_id": items, "position": 0, "reward": reward,
                         "served_ms": np.arange(n)})


def test_the_reward_model_beats_constant_and_popularity_on_the_later_slice():
    train, test = time_slices(synthetic_examples(), test_share=0.2)
    assert train["served_ms"].max() < test["served_ms"].min()
    model, fit = train_reward_model(train, None, rm_cfg(dim=16, epochs=15), seed=0)
    report = evaluate_reward_model(model, train, test)
    assert 1 <= fit["epochs"] <= 15 and fit["valid_auc"] > 0.8
    assert report["reward_model_auc"] > 0.85 and report["popularity_auc"] < 0.65
    assert report["reward_model_rmse"] < report["constant_rmse"] and report["reward_model_rmse"] < report["popularity_rmse"]
    scores = model.score([2, 2], [4, 5])                                  # an even user: even items
    assert scores[0] > scores[1] and ((-1 <= scores) & (scores <= 1)).all()


def test_joined_rows_become_one_example_per_reacted_item():
    rows = pd.DataFrame({"request_id": ["a", "b"], "user_id": [1, 2], "items": [[10, 11, 12], [13]],
                         "rewards": [[1.0, None, -0.5], [float("nan")]], "served_ms": [5, 6]})
    ex = reward_examples(rows)
    assert ex[["user_id", "item_id", "position", "reward"]].values.tolist() == [[1, 10, 0, 1.0], [1, 12, 2, -0.5]]


def test_item_attributes_enter_the_item_tower():
    items = pd.DataFrame({"item_id": [3, 1, 2], "genres": [["a"], ["b", "c"], []]})
    table, ids = item_attribute_table(items)
    assert ids.tolist() == [1, 2, 3] and table.tolist() == [[2, 3], [0, 0], [1, 0]]
    model, _ = train_reward_model(synthetic_examples(200), (table, ids), rm_cfg(dim=4, epochs=1), seed=0)
    with torch.no_grad():
        with_attrs = model._attribute_vectors(torch.tensor([1, 2, 99]))
    assert with_attrs[0].abs().sum() > 0 and with_attrs[1].abs().sum() == 0 and with_attrs[2].abs().sum() == 0


def test_no_examples_or_too_few_to_slice_are_clear_errors():
    with pytest.raises(ValueError, match="no reward examples"):
        train_reward_model(synthetic_examples(0), None, rm_cfg(), seed=0)
    with pytest.raises(ValueError, match="cannot be cut"):
        time_slices(synthetic_examples(1))
