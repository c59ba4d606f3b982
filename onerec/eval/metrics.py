"""Full-ranking metrics for leave-last-out evaluation: every user has one held-out target item.

    scores = model.score(histories)                  # (B, N) one score per catalogue item
    ranks = rank_of_target(scores, targets)          # (B,) 0 = the target scored highest
    recall_at_k(ranks, 10), ndcg_at_k(ranks, 10)     # means over the B users
    evaluate(model.score, None, histories, targets, n_items=N)   # all of it, batched -> dict

Protocol (the published Amazon Beauty figures, see DESIGN "Quality bars"): the target is ranked
against ALL items of the catalogue, not a sampled subset, and with one target per user
Recall@K equals HitRate@K. By default items already in the user's history stay in the ranking;
removing them (`exclude_history=True`) raises every score, so say which one a number used.

Index convention (shared with `onerec.eval.baselines`): items are indexed 1..N and 0 is padding;
column j of a score matrix scores item index j + 1. `evaluate` takes histories and targets as
item indices 1..N and does the shift itself; the low-level functions below work on columns.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

# A per-row set of columns to mask: a list of index sequences, or CSR (indptr (B+1,), indices).
Exclude = Sequence[Sequence[int]] | tuple[np.ndarray, np.ndarray]


def _exclusion_coords(exclude: Exclude, n_rows: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of every masked entry, from either form of `exclude`."""
    if isinstance(exclude, tuple) and len(exclude) == 2 and isinstance(exclude[0], np.ndarray):
        indptr, cols = np.asarray(exclude[0], dtype=np.int64), np.asarray(exclude[1], dtype=np.int64)
    else:
        if len(exclude) != n_rows:
            raise ValueError(f"exclude has {len(exclude)} rows, scores have {n_rows}")
        lengths = np.fromiter((len(e) for e in exclude), dtype=np.int64, count=n_rows)
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        cols = np.concatenate([np.asarray(e, dtype=np.int64) for e in exclude]) if indptr[-1] else \
            np.zeros(0, dtype=np.int64)
    if len(indptr) != n_rows + 1:
        raise ValueError(f"exclude indptr has {len(indptr)} entries, expected {n_rows + 1}")
    rows = np.repeat(np.arange(n_rows), np.diff(indptr))
    return torch.as_tensor(rows, device=device), torch.as_tensor(cols, device=device)


def mask_scores(scores: torch.Tensor, exclude: Exclude, keep: torch.Tensor | None = None) -> torch.Tensor:
    """A copy of `scores` (B, N) with the `exclude`d columns of each row set to -inf.

    keep (B,): one column per row that is never masked, the target: a user who buys an item again
    would otherwise get rank N-1 for the right answer (we mask what the user has seen, not the truth).
    """
    rows, cols = _exclusion_coords(exclude, scores.shape[0], scores.device)
    masked = scores.clone()
    masked[rows, cols] = -math.inf
    if keep is not None:
        idx = torch.arange(scores.shape[0], device=scores.device)
        masked[idx, keep] = scores[idx, keep]
    return masked


def rank_of_target(scores: torch.Tensor, targets: torch.Tensor, exclude: Exclude | None = None) -> torch.Tensor:
    """0-based rank of each row's target column among all N columns -> (B,) int64.

    scores (B, N) float, targets (B,) int64 column indices, exclude: optional columns per row set
    to -inf first (the target itself is kept, see `mask_scores`).
    Ties are broken pessimistically: rank = #{items with score >= the target's score} - 1, so a
    model that scores everything equal gets rank N-1, not 0 (an optimistic rule would reward
    constant scores; random tie-breaking would make the metric noisy).
    """
    if scores.dim() != 2 or targets.shape != scores.shape[:1]:
        raise ValueError(f"scores must be (B, N) and targets (B,); got {tuple(scores.shape)} and "
                         f"{tuple(targets.shape)}")
    targets = targets.to(scores.device, torch.long)
    if exclude is not None:
        scores = mask_scores(scores, exclude, keep=targets)
    target_scores = scores.gather(1, targets[:, None])  # (B, 1)
    if torch.isnan(target_scores).any():
        # NaN compares false with everything: the target would silently rank first (-1 + 1 = 0)
        raise ValueError("a target's score is NaN; the model diverged or the score function is broken")
    return (scores >= target_scores).sum(dim=1) - 1  # (B,); the target counts itself once


def recall_at_k(ranks: torch.Tensor, k: int) -> float:
    """Share of users whose target is in the top k (one target per user: = HitRate@k)."""
    return (ranks < k).double().mean().item()


def ndcg_at_k(ranks: torch.Tensor, k: int) -> float:
    """Mean of 1 / log2(rank + 2) over users, 0 where rank >= k (one relevant item: IDCG = 1)."""
    gains = 1.0 / torch.log2(ranks.double() + 2.0)
    return torch.where(ranks < k, gains, torch.zeros_like(gains)).mean().item()


def coverage(topk_items: torch.Tensor | np.ndarray, n_items: int) -> float:
    """Distinct items among all recommended lists (U, k) / catalogue size: 1.0 = every item shown."""
    return len(np.unique(np.asarray(topk_items))) / n_items


def binary_auc(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float:
    """ROC AUC: the chance a random positive scores above a random negative (ties count half),
    by the Mann-Whitney rank sum. Needs both classes."""
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if len(scores) != len(labels) or not n_pos or not n_neg:
        raise ValueError(f"binary_auc needs scores and labels of one length with both classes "
                         f"({n_pos} positives, {n_neg} negatives)")
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks (1-based) over tied scores
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def evaluate(score_fn: Callable[..., torch.Tensor], users: Sequence | None,
             histories: Sequence[Sequence[int]], targets: Sequence[int], n_items: int, *,
             ks: Sequence[int] = (5, 10), batch_size: int = 1024, exclude_history: bool = False) -> dict:
    """Rank each user's target among all n_items items; means over users.

    score_fn(histories, users=...) -> (B, n_items) scores, column j = item index j + 1; it gets
      one batch of `histories` (item indices 1..N, oldest first) and, by keyword, the matching
      `users` (None if `users` is None: models that ignore users need no list).
      `baselines.Popularity.score` and `baselines.SASRec.score` fit as is.
    targets: the held-out item index (1..N) per user.
    exclude_history: False (default) keeps items already in the history in the ranking, as the
      published Beauty figures do; True masks them (except the target), which raises all scores.
    Returns {"recall@k", "ndcg@k", "coverage@k" for each k, "n_users"}; coverage@k counts the
    distinct items in all users' top-k lists (after masking, if any).
    """
    if len(histories) != len(targets) or (users is not None and len(users) != len(targets)):
        raise ValueError(f"histories ({len(histories)}), targets ({len(targets)}) and users "
                         f"({'-' if users is None else len(users)}) must have one entry per user")
    targets = np.asarray(targets, dtype=np.int64)
    if len(targets) and not (1 <= targets.min() and targets.max() <= n_items):
        raise ValueError(f"targets must be item indices in 1..{n_items} (0 is padding); "
                         f"got {targets.min()}..{targets.max()}")
    kmax = max(ks)
    # Users go in order of history length, so a batch of a sequence model pads little (scoring
    # Beauty in user order took 4x longer). The results are means and a union: order-free.
    order = np.argsort([len(h) for h in histories], kind="stable")
    all_ranks, all_topk = [], []
    for start in range(0, len(targets), batch_size):
        rows = order[start:start + batch_size]
        hist = [histories[i] for i in rows]
        batch_users = None if users is None else \
            users[rows] if isinstance(users, np.ndarray) else [users[i] for i in rows]
        scores = score_fn(hist, users=batch_users)
        if scores.shape != (len(hist), n_items):
            raise ValueError(f"score_fn returned {tuple(scores.shape)}, expected ({len(hist)}, {n_items})")
        cols = torch.as_tensor(targets[rows] - 1, device=scores.device)
        if exclude_history:
            scores = mask_scores(scores, [np.asarray(h, dtype=np.int64) - 1 for h in hist], keep=cols)
        all_ranks.append(rank_of_target(scores, cols).cpu())
        all_topk.append(scores.topk(min(kmax, n_items), dim=1).indices.cpu())
    ranks = torch.cat(all_ranks) if all_ranks else torch.zeros(0, dtype=torch.long)
    topk = torch.cat(all_topk) if all_topk else torch.zeros(0, kmax, dtype=torch.long)
    out: dict = {}
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(ranks, k)
        out[f"ndcg@{k}"] = ndcg_at_k(ranks, k)
    for k in ks:
        out[f"coverage@{k}"] = coverage(topk[:, :k], n_items)
    out["n_users"] = len(ranks)
    return out
