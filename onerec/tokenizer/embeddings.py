"""Item embeddings for the semantic-ID tokenizer: collaborative signal + side features.

The tokenizer clusters these vectors, so items that users consume together, or that share
genres/attributes, should land close together and share semantic-ID prefixes.

    item_ids, emb = item_embeddings(ds.interactions, ds.items, dim=64)   # (N,), (N, 64)

Two parts, each L2-normalized per item, then weighted and concatenated:

1. Collaborative, `dim - side_dim` columns (word2vec-as-matrix-factorization, Levy & Goldberg):
   - co-occurrence counts of item pairs within `window` positions of each other in a user's
     time-ordered sequence, weighted 1/distance (neighbours count more than far pairs), symmetric;
     an item next to itself (a repeat) is not a pair;
   - PPMI with context-distribution smoothing (context counts ** 0.75): plain PMI overrates
     pairs with rare items; keeping only positive values keeps the matrix sparse;
   - truncated SVD (randomized, seeded), rows U * sqrt(S): the symmetric split of S that works
     best for similarity tasks in Levy et al. 2015.
2. Side features, `side_dim` columns: the items table's multi-hot `genres` (ml-100k) or
   `attributes` (Amazon Beauty) -> TF-IDF (a genre every movie has says little) -> truncated SVD.
   Data sets without such a column get no side part (all columns collaborative).

Weights: the collaborative part is scaled by sqrt(1 - side_weight) and the side part by
sqrt(side_weight), so an item with both parts has unit norm and `side_weight` is the side part's
share of the squared norm, i.e. of every squared distance K-means sees. An item with no
interactions (or no co-occurring neighbour) has a zero collaborative part: its vector is the side
part alone (norm sqrt(side_weight)); an item with neither part is the zero vector.

Everything is deterministic for a given `seed` (randomized SVD with a fixed state, signs fixed
so each singular vector's largest entry is positive). Amazon Beauty (12k items, 200k events)
takes about 1 s on a 2-core CPU.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.utils.extmath import randomized_svd

SIDE_FEATURE_COLUMNS = ("genres", "attributes")  # multi-hot list columns the loaders produce


def item_embeddings(interactions: pd.DataFrame, items: pd.DataFrame, dim: int = 64, seed: int = 0,
                    *, window: int = 5, side_dim: int = 16, side_weight: float = 0.3,
                    smoothing: float = 0.75) -> tuple[np.ndarray, np.ndarray]:
    """Return (item_ids (N,) int64 sorted, emb (N, dim) float32) for every item in `items`.

    interactions: the canonical table (user_id, item_id, timestamp, ...), any order.
    items: the catalogue; `item_id` plus optionally a `genres` / `attributes` list column.
    window: co-occurrence window in sequence positions (pairs up to `window` apart).
    side_dim: columns given to side features (capped by how many features exist).
    side_weight: the side part's share of the squared norm, in [0, 1].
    smoothing: context-distribution smoothing exponent of PPMI (1.0 = plain PMI).
    """
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if not 0.0 <= side_weight <= 1.0:
        raise ValueError(f"side_weight must be in [0, 1], got {side_weight}")
    item_ids = np.unique(items["item_id"].to_numpy(dtype=np.int64))  # (N,) sorted
    if len(item_ids) != len(items):
        raise ValueError("items table: item_id has duplicates; one row per item expected")
    n = len(item_ids)

    side_col = next((c for c in SIDE_FEATURE_COLUMNS if c in items.columns), None)
    side = None
    if side_col is not None and side_weight > 0 and side_dim > 0:
        order = np.argsort(items["item_id"].to_numpy(dtype=np.int64), kind="stable")
        side = _side_features(items[side_col].to_numpy(dtype=object)[order], min(side_dim, dim - 1),
                              seed)  # (N, S) rows unit or zero
    s = 0 if side is None else side.shape[1]

    collab = _collaborative(interactions, item_ids, dim - s, window, smoothing, seed)  # (N, dim - s)
    if side is None:
        emb = collab
    else:
        emb = np.concatenate([np.sqrt(1.0 - side_weight) * collab, np.sqrt(side_weight) * side], axis=1)
    assert emb.shape == (n, dim)
    return item_ids, emb.astype(np.float32)


# --------------------------------------------------------------------------- parts

def _collaborative(interactions: pd.DataFrame, item_ids: np.ndarray, dim: int, window: int,
                   smoothing: float, seed: int) -> np.ndarray:
    """Rows of U * sqrt(S) of the PPMI co-occurrence matrix, L2-normalized; (N, dim) float64."""
    n = len(item_ids)
    inter = interactions[["user_id", "timestamp", "item_id"]]
    order = np.lexsort((inter["timestamp"].to_numpy(), inter["user_id"].to_numpy()))  # stable
    user = inter["user_id"].to_numpy()[order]                      # (M,)
    item = np.searchsorted(item_ids, inter["item_id"].to_numpy()[order])  # (M,) row index
    unknown = (item >= n) | (item_ids[np.minimum(item, n - 1)] != inter["item_id"].to_numpy()[order])
    if unknown.any():
        bad = inter["item_id"].to_numpy()[order][unknown]
        raise ValueError(f"interactions: {unknown.sum()} events name items missing from the items "
                         f"table (e.g. item_id {int(bad[0])}); pass the whole catalogue")

    # Pairs (a, b) d = 1..window positions apart in the same user's sequence; one vectorized
    # shift per distance instead of a loop over users.
    rows, cols, vals = [], [], []
    for d in range(1, window + 1):
        same = (user[:-d] == user[d:]) & (item[:-d] != item[d:])
        a, b = item[:-d][same], item[d:][same]
        rows += [a, b]
        cols += [b, a]
        vals += [np.full(2 * len(a), 1.0 / d)]
    counts = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                           shape=(n, n))                            # (N, N) duplicates summed
    counts.sum_duplicates()

    total = counts.sum()
    out = np.zeros((n, dim))
    if total == 0 or dim == 0:
        return out
    row_sum = np.asarray(counts.sum(axis=1)).ravel()                # (N,)
    ctx = np.asarray(counts.sum(axis=0)).ravel() ** smoothing       # (N,) smoothed context counts
    ctx = ctx / ctx.sum()
    coo = counts.tocoo()
    # PMI(a, b) = log P(a, b) / (P(a) P_ctx(b)); P(a, b) = c / total, P(a) = row_sum / total.
    pmi = np.log(coo.data / row_sum[coo.row] / ctx[coo.col])
    keep = pmi > 0
    ppmi = sp.csr_matrix((pmi[keep], (coo.row[keep], coo.col[keep])), shape=(n, n))

    k = min(dim, n - 1)
    if k < 1:
        return out
    u, s, _ = randomized_svd(ppmi, n_components=k, n_iter=5, random_state=seed)  # (N, k), (k,)
    vec = _fix_signs(u) * np.sqrt(s)
    out[:, :k] = _l2_normalize(vec)
    return out


def _side_features(lists: np.ndarray, dim: int, seed: int) -> np.ndarray | None:
    """Multi-hot lists of feature ids -> TF-IDF -> SVD -> L2-normalized rows; (N, <=dim)."""
    n = len(lists)
    lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=n)
    if lengths.sum() == 0 or dim < 1:
        return None
    row = np.repeat(np.arange(n), lengths)
    feat = np.concatenate([np.asarray(x, dtype=np.int64) for x in lists if len(x)])
    _, col = np.unique(feat, return_inverse=True)                   # feature id -> column
    multi_hot = sp.csr_matrix((np.ones(len(row)), (row, col)), shape=(n, col.max() + 1))
    multi_hot.sum_duplicates()
    multi_hot.data[:] = 1.0                                         # a feature listed twice counts once
    df = np.asarray((multi_hot > 0).sum(axis=0)).ravel()            # items per feature
    idf = np.log((1 + n) / (1 + df)) + 1.0                          # sklearn's smoothed idf
    tfidf = _l2_normalize_sparse(multi_hot @ sp.diags(idf))        # (N, F)

    k = min(dim, tfidf.shape[1] - 1)  # SVD to the full rank would just rotate the features
    if k < 1:
        return _l2_normalize(tfidf.toarray())
    u, s, _ = randomized_svd(tfidf, n_components=k, n_iter=5, random_state=seed)
    return _l2_normalize(_fix_signs(u) * s)  # U * S: the projection of the TF-IDF rows


# --------------------------------------------------------------------------- helpers

def _fix_signs(u: np.ndarray) -> np.ndarray:
    """Flip each column so its largest-magnitude entry is positive (SVD signs are arbitrary)."""
    idx = np.abs(u).argmax(axis=0)
    return u * np.sign(u[idx, np.arange(u.shape[1])])


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x, dtype=np.float64), where=norm > 0)


def _l2_normalize_sparse(x: sp.csr_matrix) -> sp.csr_matrix:
    norm = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    return sp.diags(np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 0)) @ x
