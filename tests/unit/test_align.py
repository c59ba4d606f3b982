"""Alignment moves the policy towards rewarded items, and the KL term holds it near the reference."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from onerec.config import ConfigError, load_config
from onerec.rl.align import align, sample_items, sample_logp, sample_served
from tests.unit.test_model import brute_force_fns, make_batch, make_model, model_batch, random_codes, spread_weights


def align_cfg(**kw):
    """debug's align config; the token sampler unless asked (these small models have no dense head)."""
    return dataclasses.replace(load_config("debug").align, **{"sampler": "tokens", **kw})


class Trie:
    def __init__(self, codes):
        self.allowed, self.item_of = brute_force_fns(codes)


@pytest.fixture(scope="module")
def setup():
    codes = random_codes(24, seed=2)
    model = spread_weights(make_model("v2", n_layers=1, d_model=16, extra={"n_items": 24}), std=0.1)
    batches = [model_batch(make_batch(codes, 8, 5, 1, seed=s)) for s in range(3)]
    users = [torch.arange(8) for _ in batches]
    return model, codes, batches, users


def liked(rows_set):
    return lambda users, rows: torch.isin(rows, torch.tensor(sorted(rows_set))).float()


def mean_sampled_reward(model, codes, batches, reward_fn, seed=7):
    g = torch.Generator().manual_seed(seed)
    values = [reward_fn(None, sample_items(model, b, Trie(codes), 16, generator=g)[0]).mean() for b in batches]
    return float(torch.stack(values).mean())


def test_samples_are_valid_items_and_their_logp_is_the_sum_of_token_logps(setup):
    model, codes, batches, _ = setup
    rows, sampled = sample_items(model, batches[0], Trie(codes), 5, generator=torch.Generator().manual_seed(0))
    assert rows.shape == (8, 5) and ((rows >= 0) & (rows < 24)).all()
    assert torch.equal(codes[rows], sampled)                                   # the row's code is what was drawn
    logp = sample_logp(model, batches[0], sampled)
    assert logp.shape == (8, 5) and (logp < 0).all()


@pytest.mark.parametrize("method", ["ecpo", "gbpo", "dpo"])
def test_alignment_raises_the_reward_of_what_the_policy_samples(setup, method):
    model, codes, batches, users = setup
    reward_fn = liked({0, 3, 5, 8, 13, 21})
    before = mean_sampled_reward(model, codes, batches, reward_fn)
    cfg = align_cfg(method=method, group_size=8, steps=30, lr=3e-3, kl_coef=0.0, dpo_beta=1.0)
    aligned, log = align(model, batches, users, Trie(codes), reward_fn, cfg, seed=0)
    after = mean_sampled_reward(aligned, codes, batches, reward_fn)
    assert after > before + 0.15, (before, after)
    assert len(log) == 30 and all(row["kl"] >= 0 for row in log)
    assert mean_sampled_reward(model, codes, batches, reward_fn) == before        # the input model is untouched


def test_the_kl_term_keeps_the_policy_closer_to_the_reference(setup):
    model, codes, batches, users = setup
    reward_fn = liked({0, 3, 5})
    free = align_cfg(steps=20, lr=3e-3, kl_coef=0.0)
    held = align_cfg(steps=20, lr=3e-3, kl_coef=5.0)
    kl_free = align(model, batches, users, Trie(codes), reward_fn, free, seed=0)[1][-1]["kl"]
    kl_held = align(model, batches, users, Trie(codes), reward_fn, held, seed=0)[1][-1]["kl"]
    assert kl_held < kl_free


def test_bad_align_configs_are_refused():
    with pytest.raises(ConfigError, match="align.method"):
        load_config("debug", ["align.method=ppo"])
    with pytest.raises(ConfigError, match="align.group_size"):
        load_config("debug", ["align.group_size=1"])


def test_for_the_hybrid_the_aligned_score_is_the_serving_score():
    from onerec.model import topk_next_items
    from tests.unit.test_model import dense_model

    model, codes = dense_model(n_items=12, score_weight=0.7)
    model.eval()
    batch = model_batch(make_batch(codes, 3, 5, 1, seed=4))
    allowed, item_of = brute_force_fns(codes)
    items, scores = topk_next_items(model, batch, allowed, item_of, beam_size=12, k=4)   # exact: beam >= N
    with torch.no_grad():
        ours = sample_logp(model, batch, codes[items], rows=items)
    torch.testing.assert_close(ours, scores, atol=1e-4, rtol=1e-4)


def test_the_served_sampler_draws_from_the_serving_score_among_the_heads_top_items():
    from tests.unit.test_model import dense_model

    model, codes = dense_model(n_items=12, score_weight=0.7)
    model.eval()
    batch = model_batch(make_batch(codes, 3, 5, 1, seed=4))
    all_rows = torch.arange(12).expand(3, 12)
    with torch.no_grad():
        score = sample_logp(model, batch, codes[all_rows], rows=all_rows)             # (3, 12) every item
        head = model.head_logits(model.encode(batch)).log_softmax(-1)
    top = head.topk(6, dim=1).indices                                                # the 6 candidates
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_served(model, batch, codes, 1, 6, generator=g)[0] for _ in range(3000)], 1)  # (3, 3000)
    for u in range(3):
        assert set(draws[u].tolist()) <= set(top[u].tolist())                        # never outside the candidates
        want = score[u, top[u]].softmax(-1)                                          # the serving score's softmax
        got = torch.tensor([(draws[u] == r).float().mean() for r in top[u]])
        torch.testing.assert_close(got, want, atol=0.03, rtol=0)
    rows, sampled = sample_served(model, batch, codes, 4, 6, generator=g)
    assert torch.equal(codes[rows], sampled) and all(len(set(r.tolist())) == 4 for r in rows)   # distinct per user
    with pytest.raises(ValueError, match="candidates"):
        sample_served(model, batch, codes, 7, 6)


def test_the_served_sampler_needs_a_dense_head_and_codes(setup):
    model, codes, batches, users = setup
    with pytest.raises(ValueError, match="dense head"):
        sample_served(model, batches[0], codes, 2, 5)
    with pytest.raises(ValueError, match="item_codes"):
        align(model, batches, users, Trie(codes), liked({0}), align_cfg(sampler="served"), seed=0)


def test_served_alignment_raises_the_reward_of_what_is_served():
    from onerec.model import topk_next_items
    from tests.unit.test_model import dense_model

    model, codes = dense_model(n_items=12, score_weight=0.7)
    batches = [model_batch(make_batch(codes, 6, 5, 1, seed=s)) for s in range(2)]
    users = [torch.arange(6) for _ in batches]
    reward_fn = liked({1, 4, 7})
    allowed, item_of = brute_force_fns(codes)

    def served_reward(m):
        with torch.no_grad():
            return float(torch.stack([reward_fn(None, topk_next_items(m.eval(), b, allowed, item_of, 12, 3)[0]).mean()
                                      for b in batches]).mean())

    cfg = align_cfg(sampler="served", candidates=12, group_size=6, steps=30, lr=3e-3, kl_coef=0.0)
    aligned, _ = align(model, batches, users, Trie(codes), reward_fn, cfg, seed=0, item_codes=codes)
    assert served_reward(aligned) > served_reward(model) + 0.15
