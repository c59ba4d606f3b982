"""Metrics against hand-computed values; baselines on toy data (SASRec must learn a cycle)."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from onerec.data.splits import leave_last_out
from onerec.eval import (
    ItemIndex,
    Popularity,
    SASRec,
    SASRecConfig,
    coverage,
    evaluate,
    item_attributes,
    mask_scores,
    ndcg_at_k,
    rank_of_target,
    recall_at_k,
    user_sequences,
)
from onerec.eval.baselines import attention_reference, length_buckets

# --------------------------------------------------------------------------- metrics

def test_rank_recall_ndcg_hand_computed():
    # 20 items, scores 19..0: column c has rank 19 - c; targets at ranks 0, 3, 12.
    scores = torch.arange(19, -1, -1, dtype=torch.float32).repeat(3, 1)  # (3, 20), col c -> 19 - c
    ranks = rank_of_target(scores, torch.tensor([0, 3, 12]))
    assert ranks.tolist() == [0, 3, 12]
    assert recall_at_k(ranks, 5) == pytest.approx(2 / 3)
    assert recall_at_k(ranks, 10) == pytest.approx(2 / 3)
    assert recall_at_k(ranks, 13) == pytest.approx(1.0)
    # rank 0 -> 1/log2(2) = 1; rank 3 -> 1/log2(5) = 0.43068; rank 12 counts only from k = 13
    assert ndcg_at_k(ranks, 5) == pytest.approx((1 + 1 / math.log2(5)) / 3)
    assert ndcg_at_k(ranks, 10) == pytest.approx((1 + 1 / math.log2(5)) / 3)
    assert ndcg_at_k(ranks, 13) == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(14)) / 3)
    assert ndcg_at_k(ranks, 3) == pytest.approx(1 / 3)  # rank 3 is outside the top 3


def test_ties_are_pessimistic():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0],     # all equal: the target ranks last
                           [5.0, 2.0, 2.0, 0.0],     # one better, one tied -> rank 2
                           [0.0, 3.0, 1.0, 1.0]])    # strictly best -> rank 0
    ranks = rank_of_target(scores, torch.tensor([0, 1, 1]))
    assert ranks.tolist() == [3, 2, 0]


def test_nan_target_score_is_an_error():
    with pytest.raises(ValueError, match="NaN"):
        rank_of_target(torch.tensor([[float("nan"), 1.0]]), torch.tensor([0]))


def test_exclusion_masks_all_but_the_target():
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0, 5.0],
                           [9.0, 8.0, 7.0, 6.0, 5.0]])
    targets = torch.tensor([3, 0])
    assert rank_of_target(scores, targets).tolist() == [3, 0]
    # row 0 hides items 0 and 2 (rank 3 -> 1); row 1 hides item 0, its own target: kept, rank 0
    exclude = [[0, 2], [0]]
    assert rank_of_target(scores, targets, exclude=exclude).tolist() == [1, 0]
    csr = (np.array([0, 2, 3]), np.array([0, 2, 0]))  # the same sets as CSR
    assert rank_of_target(scores, targets, exclude=csr).tolist() == [1, 0]
    masked = mask_scores(scores, exclude, keep=targets)
    assert masked[0].tolist() == [-math.inf, 8.0, -math.inf, 6.0, 5.0]
    assert masked[1].tolist() == scores[1].tolist()
    assert scores[0, 0] == 9.0  # the input is not modified


def test_coverage():
    assert coverage(torch.tensor([[0, 1], [1, 2], [2, 0]]), 10) == pytest.approx(0.3)
    assert coverage(np.array([[4, 4]]), 4) == pytest.approx(0.25)


def test_evaluate_batched_equals_unbatched_and_exclusion():
    gen = torch.Generator().manual_seed(0)
    n_users, n_items = 37, 15
    table = torch.randn(n_users, n_items, generator=gen)
    users = np.arange(n_users)
    histories = [np.arange(1, 1 + u % 5) for u in users]  # item indices 1..N
    targets = (users % n_items) + 1

    def score(hist, users=None):
        return table[torch.as_tensor(users)]

    one = evaluate(score, users, histories, targets, n_items, batch_size=n_users)
    many = evaluate(score, users, histories, targets, n_items, batch_size=4)
    assert one == many
    assert one["n_users"] == n_users and set(one) >= {"recall@5", "recall@10", "ndcg@5", "ndcg@10",
                                                        "coverage@10"}
    # by hand: column = index - 1
    ranks = rank_of_target(table, torch.as_tensor(targets - 1))
    assert one["recall@10"] == pytest.approx(recall_at_k(ranks, 10))
    assert one["ndcg@5"] == pytest.approx(ndcg_at_k(ranks, 5))
    assert one["coverage@10"] == pytest.approx(coverage(table.topk(10).indices, n_items))
    # masking the history can only move targets up
    excl = evaluate(score, users, histories, targets, n_items, batch_size=7, exclude_history=True)
    assert excl["recall@5"] >= one["recall@5"] and excl["ndcg@10"] >= one["ndcg@10"]
    with pytest.raises(ValueError, match="item indices"):
        evaluate(score, users, histories, targets - 1, n_items)  # 0 is padding, not an item


# --------------------------------------------------------------------------- data helpers, popularity

def _toy_interactions():
    # user 1: a b c d; user 2: b c e; user 3: a (too short: train only)
    rows = [(1, 10, 0), (1, 20, 1), (1, 30, 2), (1, 40, 3), (2, 20, 0), (2, 30, 1), (2, 50, 2), (3, 10, 0)]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])


def test_item_index_and_user_sequences():
    items = pd.DataFrame({"item_id": [50, 10, 40, 30, 20, 60], "attributes": [[7], [3, 7], [], [3], [9], [3]]})
    index = ItemIndex.from_items(items)
    assert len(index) == 6 and index.index_of([10, 60]).tolist() == [1, 6]
    assert index.id_of([1, 6]).tolist() == [10, 60]
    with pytest.raises(KeyError, match="item id 99"):
        index.index_of([10, 99])
    seqs = user_sequences(leave_last_out(_toy_interactions()), index)
    assert seqs.users.tolist() == [1, 2, 3]
    assert [s.tolist() for s in seqs.train] == [[1, 2], [2], [1]]
    assert seqs.valid.tolist() == [3, 3, 0] and seqs.test.tolist() == [4, 5, 0]
    val, test = seqs.for_validation(), seqs.for_test()
    assert val.users.tolist() == [1, 2] and [h.tolist() for h in val.histories] == [[1, 2], [2]]
    assert [h.tolist() for h in test.histories] == [[1, 2, 3], [2, 3]] and test.targets.tolist() == [4, 5]
    attrs = item_attributes(items, index)  # vocab 3, 7, 9 -> 1, 2, 3
    assert attrs.shape == (7, 2)
    assert attrs[1].tolist() == [1, 2] and attrs[4].tolist() == [0, 0] and attrs[0].tolist() == [0, 0]


def test_popularity_ranks_by_count():
    pop = Popularity(5).fit([[1, 2, 2, 3], [2, 3], [4]])  # counts: 1:1, 2:3, 3:2, 4:1, 5:0
    scores = pop.score([[1], [5]])
    assert scores.shape == (2, 5) and scores[0].tolist() == [1, 3, 2, 1, 0]
    m = evaluate(pop.score, None, [[1], [1], [1]], [2, 3, 1], n_items=5)
    # ranks 0, 1 and 3 (item 1 ties with item 4: pessimistic)
    assert m["recall@5"] == 1.0 and m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(5)) / 3)
    assert m["coverage@5"] == 1.0 and m["coverage@10"] == 1.0


# --------------------------------------------------------------------------- SASRec

TINY = SASRecConfig(hidden=32, n_blocks=1, n_heads=2, max_len=10, dropout=0.0, lr=1e-2,
                    batch_size=16, max_epochs=30, patience=30, eval_batch_size=64)


def _cyclic(n_users=50, n_items=20, length=12):
    """User u walks the cycle 1 -> 2 -> ... -> 20 -> 1 from item u % 20 + 1: the next item is
    a function of the last one, so a model that learns reaches Recall@1 = 1."""
    return [np.array([(u + t) % n_items + 1 for t in range(length)]) for u in range(n_users)]


def test_sasrec_learns_a_cycle():
    seqs = _cyclic()
    train = [s[:-2] for s in seqs]
    valid = (None, train, np.array([s[-2] for s in seqs]))
    model = SASRec(20, TINY, device="cpu")
    history = model.fit(train, valid, progress=False)
    assert history[0]["loss"] > history[-1]["loss"]
    test = evaluate(model.score, None, [s[:-1] for s in seqs], [s[-1] for s in seqs], n_items=20, ks=(1, 5))
    assert test["recall@1"] >= 0.98, test
    assert model.training is False


def test_sasrec_learns_with_attributes():
    seqs = _cyclic()
    attrs = torch.zeros(21, 1, dtype=torch.long)
    attrs[1:, 0] = torch.arange(20) % 4 + 1  # 4 attribute values
    model = SASRec(20, replace(TINY, use_attributes=True, max_epochs=20), attributes=attrs, device="cpu")
    model.fit([s[:-1] for s in seqs], progress=False)
    m = evaluate(model.score, None, [s[:-1] for s in seqs], [s[-1] for s in seqs], n_items=20, ks=(1,))
    assert m["recall@1"] >= 0.98, m
    with pytest.raises(ValueError, match="use_attributes"):
        SASRec(20, replace(TINY, use_attributes=True), device="cpu")
    with pytest.raises(ValueError, match="use_attributes is False"):
        SASRec(20, TINY, attributes=attrs, device="cpu")


def test_sasrec_is_deterministic():
    seqs = [s[:-1] for s in _cyclic(n_users=20, length=8)]
    cfg = replace(TINY, max_epochs=3, dropout=0.3)
    a, b = SASRec(20, cfg, device="cpu"), SASRec(20, cfg, device="cpu")
    ha, hb = a.fit(seqs, progress=False), b.fit(seqs, progress=False)
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    c = SASRec(20, cfg, device="cpu", seed=1)
    c.fit(seqs, progress=False)
    assert not torch.equal(a.item_emb.weight, c.item_emb.weight)


def test_sasrec_keeps_best_validation_state_and_stops_early():
    seqs = _cyclic(n_users=20, length=8)
    # validation targets the model cannot predict (constant item 1): NDCG stays flat -> patience ends it
    valid = (None, [s[:-1] for s in seqs], np.ones(20, dtype=np.int64))
    model = SASRec(20, replace(TINY, max_epochs=50, patience=2), device="cpu")
    history = model.fit([s[:-1] for s in seqs], valid, progress=False)
    assert len(history) < 50
    best = max(h["valid_ndcg@10"] for h in history)
    assert evaluate(model.score, *valid, n_items=20)["ndcg@10"] == pytest.approx(best)


def test_padding_and_position_do_not_change_scores():
    model = SASRec(20, replace(TINY, dropout=0.0), device="cpu")
    # the same history scored alone and in a batch with a longer one (so it gets left-padded)
    alone = model.score([[3, 4, 5]])
    batched = model.score([[3, 4, 5], [1, 2, 3, 4, 5, 6, 7]])
    torch.testing.assert_close(alone[0], batched[0])
    # histories longer than max_len are cut to the newest max_len items
    long = list(range(1, 21)) * 2
    torch.testing.assert_close(model.score([long])[0], model.score([long[-TINY.max_len:]])[0])


def test_fused_attention_matches_reference():
    model = SASRec(20, replace(TINY, n_blocks=2), device="cpu").eval()
    hist = [[3, 4, 5], [1, 2, 3, 4, 5, 6, 7], [9]]
    fast = model.score(hist)
    for block in model.blocks:
        block.attn.fast = False
    torch.testing.assert_close(model.score(hist), fast)
    q = k = v = torch.randn(2, 1, 3, 4)
    mask = torch.ones(3, 3, dtype=torch.bool).tril()[None, None].expand(2, 1, 3, 3)
    torch.testing.assert_close(attention_reference(q, k, v, mask),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_length_buckets_cover_every_example_once():
    lengths = np.array([5, 1, 3, 5, 2, 1, 4, 3, 2, 5])
    batches = length_buckets(lengths, 3, torch.Generator().manual_seed(0))
    assert sorted(np.concatenate(batches).tolist()) == list(range(10))
    assert all(len(b) <= 3 for b in batches)
    # sorted by length before chunking: a batch spans adjacent lengths only
    assert all(lengths[b].max() - lengths[b].min() <= 1 for b in batches)


def test_eval_set_sample_is_seeded_and_keeps_rows_together():
    from onerec.eval.baselines import EvalSet

    full = EvalSet(np.arange(100) * 10, [np.array([i, i + 1]) for i in range(100)], np.arange(100) + 5)
    a, b = full.sample(30, seed=1), full.sample(30, seed=1)
    assert np.array_equal(a.users, b.users) and len(a.users) == 30
    assert not np.array_equal(a.users, full.sample(30, seed=2).users)
    assert list(a.users) == sorted(a.users)  # original order
    for user, hist, target in zip(*a):
        i = user // 10
        assert np.array_equal(hist, [i, i + 1]) and target == i + 5
    assert full.sample(0, seed=1) is full and full.sample(500, seed=1) is full
