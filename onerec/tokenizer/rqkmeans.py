"""Semantic IDs by balanced residual K-means (RQ-KMeans), as in OneRec.

    tok = SemanticIdTokenizer.fit(item_ids, emb, levels=3, codebook_size=8192)
    tok.codes            # (N, levels + 1) int64: `levels` semantic tokens + 1 disambiguation token
    tok.encode([50, 1])  # item ids -> codes;  tok.decode(codes) -> item ids (-1 where invalid)
    tok.save(dir); SemanticIdTokenizer.load(dir)

Level l clusters the residual left by levels 0..l-1 (r_0 = emb, r_{l+1} = r_l - C_l[code_l]),
so the code of an item is coarse-to-fine and emb ~= sum_l C_l[code_l].

Codebook size per level (`scaled_codebook_size`), the same K at every semantic level:

    K = min(codebook_size, N, even_ceil(scale * N ** (1/L)))     even_ceil: up to a multiple of 2

With scale = 1, K**L ~= N, just enough codes for every item, but residual codes are far from
uniform, so most items collide. The default scale = 2 (K**L ~= 8N) trades a larger vocabulary per
level for fewer collisions; measured with the default embeddings, L = 3, seed 0:

    data (N)          scale  K   collision rate  max bucket  relative error
    ml-100k (1682)    1      12  0.65            27          0.47
                      2      24  0.34            10          0.36
                      3      36  0.20             6          0.30
    Beauty (12101)    1      24  0.59           117          0.43
                      2      46  0.32            83          0.36
                      3      70  0.22            60          0.31

(Beauty's big buckets are product lines, e.g. 83 shades of one nail polish: same brand and
category attributes, bought together, embedding cosine 0.95; the last token tells them apart.)
The paper's 8192 per level is for ~10^8 items; `codebook_size` caps K (debug preset: 16).

Balanced assignment: each cluster holds at most ceil(N/K) items, so no code is a dumping ground
and all K codes are used. `balanced_assign` computes the assignment where no (item, cluster) pair
would both rather be together than with what they got (a stable matching; items prefer near
clusters, clusters prefer near items). When both sides rank by the same distance, that matching
is unique and equals the plain greedy "take the globally closest free pair"
(`balanced_assign_reference`); the fast path finds it by deferred acceptance in vectorized rounds.
(Entropic-OT prices before the matching lowered the reconstruction loss by only ~2% on ml-100k
and Beauty at 10x the time, so they are not used.)

Collisions: items whose `levels` tokens are all equal get a final disambiguation token, their rank
within that bucket (closest to the reconstruction first, ties by item id). Every item has this
token (0 where its code is unique), so all codes have the same length; the last level's size is
the largest bucket.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from onerec.tokenizer.trie import CodeTrie

FORMAT_NAME = "onerec-semantic-id"
FORMAT_VERSION = 1
TENSORS_FILE = "tokenizer.safetensors"
META_FILE = "tokenizer.json"


class TokenizerError(ValueError):
    """A tokenizer file is missing, corrupted or inconsistent, or an item id is unknown."""


# --------------------------------------------------------------------------- codebook size rule

DEFAULT_SCALE = 2.0  # K**L ~= 8N; see the table above


def scaled_codebook_size(n_items: int, levels: int, codebook_size: int,
                         scale: float = DEFAULT_SCALE) -> int:
    """K = min(codebook_size, n_items, even_ceil(scale * n_items ** (1 / levels))), at least 1.

    even_ceil rounds up to a multiple of 2 (only `n_items` or an odd `codebook_size` can make K
    odd). Examples (levels=3, codebook_size=8192): ml-100k (1682 items): scale 1 -> 12,
    scale 2 -> 24; Amazon Beauty (12101): 24 / 46.
    """
    if n_items < 1 or levels < 1 or codebook_size < 1 or scale <= 0:
        raise ValueError(f"need n_items, levels, codebook_size >= 1 and scale > 0, got "
                         f"{n_items}, {levels}, {codebook_size}, {scale}")
    root = scale * n_items ** (1.0 / levels)
    k = math.ceil(root - 1e-9)  # 1000 ** (1/3) is 9.999999999999998: do not round that up to 11
    k += k % 2
    return max(1, min(codebook_size, n_items, k))


# --------------------------------------------------------------------------- balanced assignment

def balanced_assign(cost: np.ndarray, capacity: int) -> np.ndarray:
    """Assign each row to a column, at most `capacity` rows per column; (N, K) -> (N,) int64.

    Deferred acceptance (Gale-Shapley, rows proposing): every free row proposes to its cheapest
    column that would still take it; each column keeps its `capacity` cheapest proposers and
    rejects the rest, who propose again next round. Ties break by (cost, row, column). The result
    equals `balanced_assign_reference` (see the module docstring). Each round is vectorized over
    rows (plus one sort of the held rows); rounds repeat while some column rejects a row: ~10
    per call on Beauty, and never more than the N * K proposals Gale-Shapley can make in all.
    """
    n, k = cost.shape
    if capacity * k < n:
        raise ValueError(f"capacity {capacity} x {k} columns cannot hold {n} rows")
    assign = np.full(n, -1, dtype=np.int64)
    # A full column's worst kept pair (cost, row); a new row beats it if (cost, row) is smaller.
    worst_cost = np.full(k, np.inf)                        # (K,) inf: not full, takes anyone
    worst_row = np.full(k, n, dtype=np.int64)              # (K,)
    while True:
        free = np.flatnonzero(assign < 0)                  # (F,)
        if len(free) == 0:
            return assign
        c = cost[free]                                     # (F, K)
        takes = (c < worst_cost) | ((c == worst_cost) & (free[:, None] < worst_row))
        # A free row always has a column that takes it: fewer than n rows are held, and
        # capacity * K >= n, so some column is not full.
        assign[free] = np.where(takes, c, np.inf).argmin(axis=1)  # first minimum: lowest column

        # Each column keeps its `capacity` best (cost, row) among held rows and new proposals.
        held = np.flatnonzero(assign >= 0)                 # (H,)
        col = assign[held]
        held_cost = cost[held, col]
        order = np.lexsort((held_cost, col))  # by column, then cost; stable, so then by row
        col, row, held_cost = col[order], held[order], held_cost[order]
        rank = np.arange(len(row)) - np.searchsorted(col, col)  # position within its column
        assign[row[rank >= capacity]] = -1
        last = rank == capacity - 1                        # the worst kept pair of a full column
        worst_cost[col[last]] = held_cost[last]
        worst_row[col[last]] = row[last]


def balanced_assign_reference(cost: np.ndarray, capacity: int) -> np.ndarray:
    """Plain reference for `balanced_assign`: visit (cost, row, column) pairs from the cheapest
    and take a pair when its row is free and its column has room. O(NK log NK), Python loop."""
    n, k = cost.shape
    assign = [-1] * n
    load = [0] * k
    for c, i, j in sorted((float(cost[i, j]), i, j) for i in range(n) for j in range(k)):
        if assign[i] < 0 and load[j] < capacity:
            assign[i] = j
            load[j] += 1
    return np.asarray(assign, dtype=np.int64)


# --------------------------------------------------------------------------- balanced k-means

def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: each next centre is drawn with probability ~ squared distance to the
    nearest centre so far; (N, D) -> (k, D). Falls back to uniform draws once all points
    coincide with a centre (duplicates)."""
    n = len(x)
    centres = np.empty((k, x.shape[1]))
    centres[0] = x[rng.integers(n)]
    d2 = ((x - centres[0]) ** 2).sum(axis=1)               # (N,) to the nearest centre
    for j in range(1, k):
        total = d2.sum()
        i = rng.choice(n, p=d2 / total) if total > 0 else rng.integers(n)
        centres[j] = x[i]
        d2 = np.minimum(d2, ((x - centres[j]) ** 2).sum(axis=1))
    return centres


def squared_distances(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(N, D), (K, D) -> (N, K) squared Euclidean distances, via |x|^2 - 2 x.c + |c|^2."""
    d2 = (x ** 2).sum(axis=1)[:, None] - 2.0 * x @ centres.T + (centres ** 2).sum(axis=1)[None, :]
    return np.maximum(d2, 0.0)  # rounding can dip below zero


def balanced_kmeans(x: np.ndarray, k: int, n_iter: int, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd iterations with balanced assignment; returns (centres (k, D), assign (N,)).

    Runs `n_iter` iterations, stopping early only when the assignment repeats (the remaining
    iterations would reproduce it exactly). An empty cluster (possible when K does not divide N)
    keeps its previous centre.
    """
    n = len(x)
    capacity = -(-n // k)                                  # ceil(N / K)
    centres = kmeans_plus_plus(x, k, rng)                  # (k, D)
    assign = None
    for _ in range(max(1, n_iter)):
        new = balanced_assign(squared_distances(x, centres), capacity)  # (N,)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        onehot = sp.csr_matrix((np.ones(n), (assign, np.arange(n))), shape=(k, n))  # (k, N)
        sums = onehot @ x                                  # (k, D) per-cluster sums
        counts = np.bincount(assign, minlength=k)
        nonempty = counts > 0
        centres[nonempty] = sums[nonempty] / counts[nonempty, None]
    return centres, assign


def residual_kmeans(emb: np.ndarray, sizes: list[int], n_iter: int, seed: int
                    ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Balanced RQ-KMeans: (N, D) -> codes (N, L) int64 and L centroid tables (K_l, D) float32."""
    rng = np.random.default_rng(seed)
    residual = emb.astype(np.float64)                      # (N, D)
    codes, centroids = [], []
    for k in sizes:
        centres, assign = balanced_kmeans(residual, k, n_iter, rng)
        centres = centres.astype(np.float32)               # what is saved is what is subtracted
        residual = residual - centres[assign]
        codes.append(assign)
        centroids.append(centres)
    return np.stack(codes, axis=1), centroids


def disambiguate(codes: np.ndarray, error: np.ndarray) -> np.ndarray:
    """Rank of each item within the items sharing its code, smallest `error` first, ties by
    position; (N, L), (N,) -> (N,) int64 (0 for an item whose code is unique)."""
    _, bucket = np.unique(codes, axis=0, return_inverse=True)  # (N,) bucket id per item
    bucket = bucket.ravel()
    order = np.lexsort((np.arange(len(codes)), error, bucket))
    sorted_bucket = bucket[order]
    rank = np.empty(len(codes), dtype=np.int64)
    rank[order] = np.arange(len(codes)) - np.searchsorted(sorted_bucket, sorted_bucket)
    return rank


# --------------------------------------------------------------------------- the tokenizer

class SemanticIdTokenizer:
    """Item id <-> semantic ID (a row of `codes`); build with `fit` or `load`.

    item_ids:        (N,) int64, sorted ascending
    codes:           (N, levels + 1) int64, unique rows; the last column disambiguates collisions
    codebook_sizes:  levels + 1 ints, the vocabulary of each position (last = largest bucket)
    centroids:       `levels` float32 tables (K_l, D)
    """

    def __init__(self, item_ids: np.ndarray, codes: np.ndarray, codebook_sizes: list[int],
                 centroids: list[np.ndarray], report: dict):
        self.item_ids = item_ids
        self.codes = codes
        self.codebook_sizes = list(codebook_sizes)
        self.centroids = centroids
        self.levels = len(centroids)  # semantic levels, without the disambiguation level
        self._report = report
        # Exact mixed-radix key of a whole code, for decode: sum_l code_l * prod_{m>l} K_m.
        self._radix = _radix(self.codebook_sizes)
        keys = codes @ self._radix                         # (N,)
        self._key_order = np.argsort(keys, kind="stable")
        self._sorted_keys = keys[self._key_order]

    # ---------------------------------------------------------------- fitting

    @classmethod
    def fit(cls, item_ids, emb, levels: int = 3, codebook_size: int = 8192, *,
            scale: float = DEFAULT_SCALE, n_iter: int = 20, seed: int = 0) -> SemanticIdTokenizer:
        """Fit on item embeddings: item_ids (N,) unique ints, emb (N, D) finite floats.

        levels / codebook_size: TokenizerConfig; scale: the codebook size rule's multiplier
        (see `scaled_codebook_size`); n_iter: Lloyd iterations per level; seed: k-means++ draws.
        """
        item_ids = np.asarray(item_ids, dtype=np.int64)
        emb = np.asarray(emb, dtype=np.float64)
        if item_ids.ndim != 1 or emb.ndim != 2 or len(item_ids) != len(emb) or len(emb) == 0:
            raise ValueError(f"need item_ids (N,) and emb (N, D) with N >= 1, got shapes "
                             f"{item_ids.shape} and {emb.shape}")
        if len(np.unique(item_ids)) != len(item_ids):
            raise ValueError("item_ids has duplicates; one embedding per item expected")
        if not np.isfinite(emb).all():
            raise ValueError("emb has NaN or infinite values")
        order = np.argsort(item_ids, kind="stable")
        item_ids, emb = item_ids[order], emb[order]
        n = len(item_ids)

        k = scaled_codebook_size(n, levels, codebook_size, scale)
        codes, centroids = residual_kmeans(emb, [k] * levels, n_iter, seed)  # (N, L), L x (K, D)
        recon = sum(c[codes[:, l]].astype(np.float64) for l, c in enumerate(centroids))  # (N, D)
        error = ((emb - recon) ** 2).sum(axis=1)           # (N,)
        extra = disambiguate(codes, error)                 # (N,)
        full = np.concatenate([codes, extra[:, None]], axis=1)  # (N, L + 1)
        sizes = [k] * levels + [int(extra.max()) + 1]
        report = _fit_report(emb, full, sizes, centroids)
        report.update(scale=scale, n_iter=n_iter, seed=seed, codebook_size=codebook_size)
        return cls(item_ids, full, sizes, centroids, report)

    # ---------------------------------------------------------------- mapping

    def encode(self, item_ids) -> np.ndarray:
        """Item ids (B,) -> codes (B, levels + 1); an unknown id raises TokenizerError."""
        ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        pos = np.minimum(np.searchsorted(self.item_ids, ids), len(self.item_ids) - 1)
        unknown = self.item_ids[pos] != ids
        if unknown.any():
            raise TokenizerError(f"encode: {int(unknown.sum())} unknown item id(s), e.g. "
                                 f"{int(ids[unknown][0])}; the tokenizer covers {len(self.item_ids)} items")
        return self.codes[pos]

    def decode(self, codes) -> np.ndarray:
        """Codes (B, levels + 1) -> item ids (B,); -1 where the code is out of range or no item's."""
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or codes.shape[1] != len(self.codebook_sizes):
            raise TokenizerError(f"decode: expected codes of shape (B, {len(self.codebook_sizes)}), "
                                 f"got {codes.shape}")
        in_range = ((codes >= 0) & (codes < np.asarray(self.codebook_sizes))).all(axis=1)  # (B,)
        keys = np.where(in_range, codes @ self._radix, -1)  # out-of-range codes could alias a key
        pos = np.minimum(np.searchsorted(self._sorted_keys, keys), len(self._sorted_keys) - 1)
        found = in_range & (self._sorted_keys[pos] == keys)
        return np.where(found, self.item_ids[self._key_order[pos]], -1)

    def trie(self) -> CodeTrie:
        """The prefix trie of all codes, for constrained decoding (on the CPU; `.to(device)`)."""
        return CodeTrie.from_codes(torch.from_numpy(self.codes), sizes=self.codebook_sizes)

    def report(self) -> dict:
        """Fit quality (computed at fit time, kept through save/load):

        recon_mse            mean over items and dims of (emb - sum of centroids)^2
        recon_mse_per_level  the same after levels 1..L; baseline_mse: with no level (mean emb^2)
        relative_error       recon_mse / baseline_mse
        utilization          per position incl. the disambiguation one: used codes / size
        cluster_size_min/max per semantic level; capacity: ceil(N / K)
        collision_rate       1 - unique L-token codes / N, before disambiguation
        colliding_items      items whose L-token code some other item shares
        max_bucket_size      most items sharing one L-token code (= last codebook size)
        """
        return json.loads(json.dumps(self._report))  # a deep copy the caller may edit

    # ---------------------------------------------------------------- files

    def save(self, directory) -> Path:
        """Write tokenizer.safetensors (codes, item_ids, centroids.<l>) and tokenizer.json."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"codes": self.codes, "item_ids": self.item_ids}
        tensors.update({f"centroids.{l}": c for l, c in enumerate(self.centroids)})
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(directory / TENSORS_FILE))
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "levels": self.levels,
                "codebook_sizes": self.codebook_sizes, "n_items": len(self.item_ids),
                "dim": int(self.centroids[0].shape[1]), "report": self._report}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory) -> SemanticIdTokenizer:
        """Read a directory written by `save`; only JSON and safetensors are parsed (no pickle).
        Raises TokenizerError naming the file and the problem if anything is missing or wrong."""
        directory = Path(directory)
        meta_path, tensors_path = directory / META_FILE, directory / TENSORS_FILE
        for path in (meta_path, tensors_path):
            if not path.is_file():
                raise TokenizerError(f"{path}: file not found; save a fitted tokenizer to {directory}")

        def meta_error(problem: str) -> TokenizerError:
            return TokenizerError(f"{meta_path}: {problem}; re-save the tokenizer")

        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise meta_error(f"not valid JSON ({exc})") from None
        if not isinstance(meta, dict):
            raise meta_error("expected a JSON object")
        if meta.get("format") != FORMAT_NAME:
            raise meta_error(f"'format' is {meta.get('format')!r}, expected {FORMAT_NAME!r}")
        if meta.get("version") != FORMAT_VERSION:
            raise meta_error(f"format version {meta.get('version')!r}, this code reads {FORMAT_VERSION}")
        levels, sizes, n, dim = (meta.get(k) for k in ("levels", "codebook_sizes", "n_items", "dim"))
        if not (_is_int(levels) and levels >= 1):
            raise meta_error(f"'levels' must be an integer >= 1, got {levels!r}")
        if not (isinstance(sizes, list) and len(sizes) == levels + 1
                and all(_is_int(s) and s >= 1 for s in sizes)):
            raise meta_error(f"'codebook_sizes' must be {levels + 1} positive integers "
                             f"(levels + 1), got {sizes!r}")
        if math.prod(sizes) >= 2 ** 62:
            raise meta_error(f"'codebook_sizes' {sizes}: the code space exceeds 2^62 keys")
        for name, value in (("n_items", n), ("dim", dim)):
            if not (_is_int(value) and value >= 1):
                raise meta_error(f"'{name}' must be an integer >= 1, got {value!r}")
        if not isinstance(meta.get("report", {}), dict):
            raise meta_error("'report' must be an object")

        try:
            tensors = load_file(str(tensors_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise TokenizerError(f"{tensors_path}: not a readable safetensors file ({exc}); "
                                 "re-save the tokenizer") from None

        def mismatch(problem: str) -> TokenizerError:
            return TokenizerError(f"{tensors_path}: {problem} (against {meta_path}); the two files "
                                  "do not belong together: re-save the tokenizer")

        expected = {  # name: (dtype, shape, where the shape comes from)
            "codes": (np.int64, (n, levels + 1), "n_items, levels + 1"),
            "item_ids": (np.int64, (n,), "n_items"),
        }
        expected.update({f"centroids.{l}": (np.float32, (sizes[l], dim), f"codebook_sizes[{l}], dim")
                         for l in range(levels)})
        for name, (dtype, shape, source) in expected.items():
            if name not in tensors:
                raise mismatch(f"tensor '{name}' is missing")
            t = tensors[name]
            if t.dtype != dtype or t.shape != shape:
                raise mismatch(f"tensor '{name}' is {t.dtype} {tuple(t.shape)}, expected "
                               f"{np.dtype(dtype)} {shape} ({source})")
        codes, item_ids = tensors["codes"], tensors["item_ids"]
        if (np.diff(item_ids) <= 0).any():
            raise mismatch("item_ids must be strictly increasing (sorted, no duplicates)")
        bad = (codes < 0) | (codes >= np.asarray(sizes))
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise mismatch(f"codes[{row}, {col}] = {codes[row, col]} is outside the codebook of "
                           f"size {sizes[col]}")
        if len(np.unique(codes, axis=0)) != n:
            raise mismatch("codes has duplicate rows; every item needs a unique code")
        centroids = [tensors[f"centroids.{l}"] for l in range(levels)]
        if not all(np.isfinite(c).all() for c in centroids):
            raise mismatch("centroids have NaN or infinite values")
        return cls(item_ids, codes, sizes, centroids, meta.get("report", {}))


# --------------------------------------------------------------------------- helpers

def _radix(sizes: list[int]) -> np.ndarray:
    """Strides of the mixed-radix number whose digits are a code; checks it fits int64."""
    if math.prod(sizes) >= 2 ** 62:
        raise TokenizerError(f"codebook sizes {sizes}: the code space exceeds 2^62 keys")
    return np.array([math.prod(sizes[l + 1:]) for l in range(len(sizes))], dtype=np.int64)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fit_report(emb: np.ndarray, codes: np.ndarray, sizes: list[int],
                centroids: list[np.ndarray]) -> dict:
    n, levels = len(emb), len(centroids)
    residual = emb.copy()
    per_level = []
    for l, c in enumerate(centroids):
        residual -= c[codes[:, l]]
        per_level.append(float((residual ** 2).mean()))
    semantic = codes[:, :levels]
    _, bucket_sizes = np.unique(semantic, axis=0, return_counts=True)
    counts = [np.bincount(codes[:, l], minlength=sizes[l]) for l in range(levels + 1)]
    baseline = float((emb ** 2).mean())
    return {
        "n_items": n,
        "dim": int(emb.shape[1]),
        "levels": levels,
        "codebook_sizes": list(sizes),
        "recon_mse": per_level[-1],
        "recon_mse_per_level": per_level,
        "baseline_mse": baseline,
        "relative_error": per_level[-1] / baseline if baseline > 0 else 0.0,
        "utilization": [float((c > 0).sum() / len(c)) for c in counts],
        "cluster_size_min": [int(c.min()) for c in counts[:levels]],
        "cluster_size_max": [int(c.max()) for c in counts[:levels]],
        "capacity": -(-n // sizes[0]),
        "collision_rate": 1.0 - len(bucket_sizes) / n,
        "colliding_items": int(bucket_sizes[bucket_sizes > 1].sum()),
        "max_bucket_size": int(bucket_sizes.max()),
    }
