"""Baselines that OneRec must beat: most-popular items, and SASRec (Kang & McAuley, 2018).

    index = ItemIndex.from_items(ds.items)                       # raw item id <-> 1..N (0 = padding)
    seqs = user_sequences(leave_last_out(ds.interactions), index)
    pop = Popularity(len(index)).fit(seqs.for_test().histories)  # counts of what test may use
    model = SASRec(len(index), SASRecConfig(use_attributes=True), attributes=item_attributes(ds.items, index))
    model.fit(seqs.train, seqs.for_validation())                 # early stop on valid NDCG@10
    evaluate(model.score, *seqs.for_test(), n_items=len(index))  # test input = train + valid

SASRec here is the recipe that gave a strong in-run baseline on Amazon Beauty (DESIGN, "Quality
bars"), not the 2018 paper verbatim: pre-LN blocks with a GELU FFN, and a full-softmax
cross-entropy over all N items at every position instead of one sampled negative (the sampled
binary loss leaves SASRec far below what it can reach under full ranking). Position embeddings
count back from the newest item, so the last item always has the same position whatever the
batch length (see `SASRec.hidden`). With `use_attributes`, each item's embedding is its own
vector plus the mean of its attribute embeddings (Beauty: category and brand), which lets rare
items borrow from frequent ones that share a brand.

Measured on Amazon Beauty (test, full ranking, history kept in the ranking; defaults, seed 0,
2-core AVX2 CPU shared with other jobs, time_budget_s=690):

    model                   R@5    N@5    R@10   N@10   cov@10  epochs (best)  train s   seq/s
    Popularity (train+val)  .0073  .0040  .0114  .0054  .0008
    SASRec                  .0462  .0266  .0732  .0353  .94     16 (15)        695       180-1600
    SASRec + attributes     .0492  .0285  .0753  .0369  .85     21 (10)        423       1200-1480

SASRec ran out of time with valid NDCG@10 still creeping up (.0434); the attribute variant
stopped early (patience 10). With the history masked (`exclude_history=True`) R@10 is .0802 /
.0851: Beauty's test item is never in the user's history, yet the models still rank history
items in their top 10. DESIGN's in-run figures (R@10 .0786 / .0900) are higher still.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from onerec.config import DataConfig, SASRecConfig
from onerec.data.loaders import Dataset, load_dataset
from onerec.data.splits import LeaveLastOut, leave_last_out
from onerec.eval.metrics import evaluate
from onerec.tokenizer.embeddings import SIDE_FEATURE_COLUMNS

log = logging.getLogger(__name__)

PAD = 0  # item index 0 is padding; real items are 1..N


# --------------------------------------------------------------------------- item index and sequences

@dataclass(frozen=True, eq=False)
class ItemIndex:
    """Raw item ids <-> contiguous item indices 1..N; index 0 is padding, never an item."""
    item_ids: np.ndarray  # (N,) int64 sorted; item index i + 1 <-> item_ids[i]

    @classmethod
    def from_items(cls, items: pd.DataFrame) -> ItemIndex:
        """The whole catalogue, items nobody interacted with included (they are ranked too)."""
        return cls(np.unique(items["item_id"].to_numpy(dtype=np.int64)))

    def __len__(self) -> int:
        return len(self.item_ids)

    def index_of(self, item_ids) -> np.ndarray:
        """Raw ids -> indices 1..N; raises KeyError naming the first id not in the catalogue."""
        ids = np.asarray(item_ids, dtype=np.int64)
        pos = np.searchsorted(self.item_ids, ids)
        pos_ok = np.minimum(pos, len(self.item_ids) - 1)
        bad = np.flatnonzero(self.item_ids[pos_ok] != ids) if len(self.item_ids) else np.arange(ids.size)
        if bad.size:
            raise KeyError(f"item id {ids.flat[bad[0]]} is not in the items table ({bad.size} unknown); "
                           "build the ItemIndex from the same data set's items")
        return pos + 1

    def id_of(self, indices) -> np.ndarray:
        """Indices 1..N -> raw ids."""
        return self.item_ids[np.asarray(indices, dtype=np.int64) - 1]


class EvalSet(NamedTuple):
    """What `metrics.evaluate` takes after score_fn: `evaluate(fn, *eval_set, n_items=N)`."""
    users: np.ndarray               # (U,) raw user ids
    histories: list[np.ndarray]     # U item-index sequences, oldest first
    targets: np.ndarray             # (U,) the held-out item index

    def sample(self, n: int, seed: int) -> EvalSet:
        """A seeded sample of n users (all of them when n is 0 or >= U), in their original order."""
        if not n or n >= len(self.targets):
            return self
        keep = np.sort(np.random.default_rng(seed).choice(len(self.targets), n, replace=False))
        return EvalSet(self.users[keep], [self.histories[i] for i in keep], self.targets[keep])


@dataclass(frozen=True, eq=False)
class UserSequences:
    """Per-user item-index sequences from a leave-last-out split, one row per user in train."""
    users: np.ndarray             # (U,) raw user ids, sorted
    train: list[np.ndarray]       # U sequences of item indices (1..N), oldest first
    valid: np.ndarray             # (U,) valid item index; 0 = none (users with < 3 events)
    test: np.ndarray              # (U,) test item index; 0 = none

    def for_validation(self) -> EvalSet:
        """Input = the train sequence, target = the valid item (users that have one)."""
        keep = np.flatnonzero(self.valid > PAD)
        return EvalSet(self.users[keep], [self.train[i] for i in keep], self.valid[keep])

    def for_test(self) -> EvalSet:
        """Input = train + valid item, target = the test item: the model sees all it may see."""
        keep = np.flatnonzero(self.test > PAD)
        hist = [np.append(self.train[i], self.valid[i]) for i in keep]
        return EvalSet(self.users[keep], hist, self.test[keep])


def user_sequences(split: LeaveLastOut, index: ItemIndex) -> UserSequences:
    """Group each part of `split` (sorted by user, time) into item-index sequences."""
    train = split.train
    users, starts = np.unique(train["user_id"].to_numpy(), return_index=True)  # starts ascending
    items = index.index_of(train["item_id"].to_numpy())
    seqs = np.split(items, starts[1:])

    def one_per_user(part: pd.DataFrame, name: str) -> np.ndarray:
        out = np.zeros(len(users), dtype=np.int64)
        u = part["user_id"].to_numpy()
        pos = np.searchsorted(users, u)
        if len(u) and ((pos >= len(users)).any() or (users[np.minimum(pos, len(users) - 1)] != u).any()):
            raise ValueError(f"user_sequences: a {name} user has no train events; pass the parts of "
                             "one leave_last_out split")
        out[pos] = index.index_of(part["item_id"].to_numpy())
        return out

    return UserSequences(users, seqs, one_per_user(split.valid, "valid"), one_per_user(split.test, "test"))


@dataclass(frozen=True)
class OfflineData:
    """A data set ready for offline evaluation: its leave-last-out split as item-index sequences."""
    dataset: Dataset
    split: LeaveLastOut
    index: ItemIndex
    seqs: UserSequences


def offline_data(cfg: DataConfig) -> OfflineData:
    """Load cfg's data set and split it; every model of a comparison starts from this."""
    ds = load_dataset(cfg)
    split = leave_last_out(ds.interactions)
    index = ItemIndex.from_items(ds.items)
    return OfflineData(ds, split, index, user_sequences(split, index))


def item_attributes(items: pd.DataFrame, index: ItemIndex, column: str | None = None) -> torch.Tensor:
    """(N + 1, A) int64: row i lists item index i's attributes as 1..n_attr, right-padded with 0.

    column: the items table's multi-hot list column; by default the first of `genres` (ml-100k)
    and `attributes` (Amazon Beauty) present. Row 0 (padding) and items without any are all 0.
    Raw attribute ids are remapped to 1..n_attr in sorted order, so n_attr = table.max().
    """
    if column is None:
        column = next((c for c in SIDE_FEATURE_COLUMNS if c in items.columns), None)
        if column is None:
            raise ValueError(f"item_attributes: the items table has none of {SIDE_FEATURE_COLUMNS}; "
                             "this data set has no attributes (set use_attributes=False)")
    rows = index.index_of(items["item_id"].to_numpy())
    lists = [np.asarray(v, dtype=np.int64) for v in items[column]]
    width = max((len(v) for v in lists), default=0)
    vocab = np.unique(np.concatenate(lists)) if lists and width else np.zeros(0, dtype=np.int64)
    table = np.zeros((len(index) + 1, max(width, 1)), dtype=np.int64)
    for row, v in zip(rows, lists):
        table[row, :len(v)] = np.searchsorted(vocab, v) + 1
    return torch.from_numpy(table)


# --------------------------------------------------------------------------- popularity

class Popularity:
    """Every user gets the same ranking: items by how often they occur in the fitted sequences.

    Fit it on what the ranking may use: for the test, train + valid items (`for_test().histories`;
    Beauty R@10 .0114, the DESIGN figure); train counts alone give .0106.
    """

    def __init__(self, n_items: int):
        self.n_items = n_items
        self.counts = torch.zeros(n_items)  # (N,) column j = item index j + 1

    def fit(self, sequences: Sequence[Sequence[int]]) -> Popularity:
        flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]) if len(sequences) else []
        counts = np.bincount(flat, minlength=self.n_items + 1)[1:]  # drop the padding column
        self.counts = torch.as_tensor(counts, dtype=torch.float32)
        return self

    def score(self, histories: Sequence[Sequence[int]], users=None) -> torch.Tensor:
        return self.counts.expand(len(histories), -1)  # (B, N), a view: no copy per user


# --------------------------------------------------------------------------- SASRec

SELECT_METRIC = "ndcg@10"  # early stopping and the kept state are chosen on this validation metric


def attention_reference(q, k, v, mask, dropout_p: float = 0.0):
    """The plain path of F.scaled_dot_product_attention: q, k, v (B, H, T, hd), mask (B, 1, T, T)
    bool, True = may attend. Kept to test the fused path against (tests/unit/test_eval.py)."""
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, T)
    att = att.masked_fill(~mask, -math.inf).softmax(dim=-1)
    att = F.dropout(att, dropout_p, training=dropout_p > 0)
    return att @ v                                            # (B, H, T, hd)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.fast = True  # F.scaled_dot_product_attention; False = attention_reference

    def forward(self, x, mask):
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)   # (B, H, T, hd)
                   for t in self.qkv(x).split(D, dim=2))
        p = self.dropout if self.training else 0.0
        if self.fast:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:
            y = attention_reference(q, k, v, mask, p)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))                       # (B, T, D)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + ffn(ln(x))."""

    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.hidden), nn.LayerNorm(cfg.hidden)
        self.attn = CausalSelfAttention(cfg)
        self.ffn = nn.Sequential(nn.Linear(cfg.hidden, cfg.ffn_mult * cfg.hidden), nn.GELU(),
                                 nn.Linear(cfg.ffn_mult * cfg.hidden, cfg.hidden))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mask):
        x = x + self.drop(self.attn(self.ln1(x), mask))
        return x + self.drop(self.ffn(self.ln2(x)))


class SASRec(nn.Module):
    """Next-item prediction with causal self-attention; scores are dot products with item embeddings.

    n_items: catalogue size N (item indices 1..N, 0 = padding).
    attributes: (N + 1, A) from `item_attributes`, required when cfg.use_attributes.
    device: "cpu", "cuda", ...; None = CUDA when available, else CPU.
    """

    def __init__(self, n_items: int, cfg: SASRecConfig = SASRecConfig(),
                 attributes: torch.Tensor | None = None, device: str | torch.device | None = None,
                 seed: int = 0):
        super().__init__()
        self.n_items, self.cfg, self.seed = n_items, cfg, seed
        torch.manual_seed(seed)  # the same seed gives the same initial weights
        self.item_emb = nn.Embedding(n_items + 1, cfg.hidden, padding_idx=PAD)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        if attributes is not None and not cfg.use_attributes:
            raise ValueError("attributes given but cfg.use_attributes is False; set it, or pass none")
        if cfg.use_attributes:
            if attributes is None or attributes.shape[0] != n_items + 1:
                raise ValueError(f"use_attributes needs attributes of shape (n_items + 1, A) = "
                                 f"({n_items + 1}, A) from item_attributes(...), got "
                                 f"{None if attributes is None else tuple(attributes.shape)}")
            self.register_buffer("attrs", attributes.long())          # (N + 1, A), 0 = none
            self.register_buffer("attr_count", (attributes > 0).sum(1, keepdim=True).clamp(min=1).float())
            self.attr_emb = nn.Embedding(int(attributes.max()) + 1, cfg.hidden, padding_idx=PAD)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_blocks))
        self.ln_f = nn.LayerNorm(cfg.hidden)
        self.apply(self._init_weights)
        self.history: list[dict] = []
        self.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            nn.init.zeros_(m.weight[m.padding_idx])

    @property
    def device(self) -> torch.device:
        return self.item_emb.weight.device

    def item_table(self) -> torch.Tensor:
        """(N + 1, D) the embedding of every item index; row 0 (padding) stays 0."""
        table = self.item_emb.weight
        if self.cfg.use_attributes:
            table = table + self.attr_emb(self.attrs).sum(1) / self.attr_count  # mean over real attrs
        return table

    def hidden(self, seq: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """seq (B, T) item indices, left-padded with 0 -> (B, T, D), position t predicts item t + 1."""
        T = seq.shape[1]
        if T > self.cfg.max_len:
            raise ValueError(f"sequence length {T} > max_len {self.cfg.max_len}; keep the newest items")
        # Positions count back from the newest item (always max_len - 1): the last position of a
        # short training batch and of a scoring batch mean the same thing.
        pos = torch.arange(self.cfg.max_len - T, self.cfg.max_len, device=seq.device)  # (T,)
        # Items enter scaled by sqrt(D), as in SASRec and the Transformer: the table is also the
        # output layer, so it stays small (init std 0.02), and unscaled the item signal drowned in
        # the block outputs. On Beauty this reached in 6 epochs the valid NDCG@10 (.038) that took 15.
        x = F.embedding(seq, table) * math.sqrt(self.cfg.hidden) + self.pos_emb(pos)   # (B, T, D)
        x = self.drop(x)
        # Causal, and padding is never a key; a padding query attends to itself so that no row of
        # the mask is empty (an all -inf softmax row is NaN). Padding outputs are never used.
        causal = torch.ones(T, T, dtype=torch.bool, device=seq.device).tril()          # (T, T)
        mask = causal & ((seq != PAD)[:, None, None, :] | torch.eye(T, dtype=torch.bool, device=seq.device))
        for block in self.blocks:
            x = block(x, mask)                                                          # mask (B, 1, T, T)
        return self.ln_f(x)

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean full-softmax cross-entropy over all N items at every non-padding position.

        inputs, targets (B, T): targets[:, t] is the item after inputs[:, t]; 0 = padding.
        """
        table = self.item_table()
        h = self.hidden(inputs, table)                    # (B, T, D)
        keep = targets != PAD
        # Only real positions go through the (P, N) output layer: it dominates the cost.
        logits = h[keep] @ table[1:].T                    # (P, N); column j = item j + 1
        return F.cross_entropy(logits, targets[keep] - 1)

    @torch.no_grad()
    def score(self, histories: Sequence[Sequence[int]], users=None) -> torch.Tensor:
        """(B, N) scores of every item as the next one after each history (column j = item j + 1)."""
        self.eval()
        seq = _left_pad([np.asarray(h, dtype=np.int64)[-self.cfg.max_len:] for h in histories],
                        self.device)
        table = self.item_table()
        return self.hidden(seq, table)[:, -1] @ table[1:].T   # (B, D) @ (D, N)

    def fit(self, train: Sequence[Sequence[int]], valid: EvalSet | tuple | None = None,
            progress: bool = True) -> list[dict]:
        """Train on each sequence (inputs s[:-1] -> targets s[1:], the newest max_len + 1 items).

        valid: (users, histories, targets) to select on, e.g. `UserSequences.for_validation()`;
        after every epoch the model is scored on it, the state with the best valid NDCG@10 is
        kept in memory and restored at the end, and training stops after `patience` epochs
        without improvement. Without valid, it trains max_epochs (or until the time budget).
        Returns (and keeps in self.history) one dict per epoch: loss (per target), seconds,
        samples_per_s (sequences), targets_per_s (positions), elapsed_s, valid_* metrics.
        """
        cfg = self.cfg
        torch.manual_seed(self.seed)                      # dropout draws
        gen = torch.Generator().manual_seed(self.seed)    # batch order
        examples = [np.asarray(s, dtype=np.int64)[-(cfg.max_len + 1):] for s in train if len(s) >= 2]
        if not examples:
            raise ValueError("SASRec.fit: no sequence has 2 or more items; nothing to learn from")
        lengths = np.array([len(s) - 1 for s in examples])  # positions with a target
        opt = torch.optim.Adam(self.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        best, best_state, bad_epochs = -math.inf, None, 0
        start = time.perf_counter()
        self.history = []
        for epoch in range(cfg.max_epochs):
            self.train()
            t0, total_loss, out_of_time, seen, positions = time.perf_counter(), 0.0, False, 0, 0
            bar = tqdm(total=len(examples), unit="seq", desc=f"epoch {epoch}", disable=not progress,
                       leave=False)
            for idx in length_buckets(lengths, cfg.batch_size, gen):
                batch = [examples[i] for i in idx]
                inputs = _left_pad([s[:-1] for s in batch], self.device)   # (B, T)
                targets = _left_pad([s[1:] for s in batch], self.device)   # (B, T)
                loss = self.loss(inputs, targets)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                n_targets = int(lengths[idx].sum())
                total_loss += loss.item() * n_targets
                seen, positions = seen + len(idx), positions + n_targets
                bar.update(len(idx))
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                if cfg.time_budget_s and time.perf_counter() - start > cfg.time_budget_s:
                    out_of_time = True
                    break
            bar.close()
            seconds = time.perf_counter() - t0
            row = {"epoch": epoch, "loss": total_loss / max(positions, 1), "seconds": seconds,
                   "samples_per_s": seen / seconds, "targets_per_s": positions / seconds,
                   "elapsed_s": time.perf_counter() - start}
            if valid is not None:
                metrics = evaluate(self.score, *valid, n_items=self.n_items, batch_size=cfg.eval_batch_size)
                row.update({f"valid_{k}": v for k, v in metrics.items()})
                if metrics[SELECT_METRIC] > best:
                    best, bad_epochs = metrics[SELECT_METRIC], 0
                    best_state = copy.deepcopy(self.state_dict())
                else:
                    bad_epochs += 1
            self.history.append(row)
            log.info("epoch %d loss %.4f %.0f seq/s valid %s %.4f", epoch, row["loss"],
                     row["samples_per_s"], SELECT_METRIC, row.get(f"valid_{SELECT_METRIC}", float("nan")))
            if progress:
                tqdm.write(f"epoch {epoch:3d}  loss {row['loss']:.4f}  {row['samples_per_s']:.0f} seq/s  "
                           f"valid {SELECT_METRIC} {row.get(f'valid_{SELECT_METRIC}', float('nan')):.4f}  "
                           f"({row['elapsed_s']:.0f} s)")
            if bad_epochs >= cfg.patience or out_of_time:
                break
        if best_state is not None:
            self.load_state_dict(best_state)
        self.eval()
        return self.history


def length_buckets(lengths: np.ndarray, batch_size: int, gen: torch.Generator) -> list[np.ndarray]:
    """Batches of example indices with similar lengths (little padding), in random order.

    A random permutation first, then a stable sort by length: equal lengths are shuffled, so the
    batches differ between epochs; then the batch order is shuffled too.
    """
    perm = torch.randperm(len(lengths), generator=gen).numpy()
    order = perm[np.argsort(lengths[perm], kind="stable")]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def _left_pad(seqs: Sequence[np.ndarray], device) -> torch.Tensor:
    """(B, T) int64, each sequence right-aligned and 0 before it; T = the longest (at least 1)."""
    T = max(1, max((len(s) for s in seqs), default=1))
    out = np.zeros((len(seqs), T), dtype=np.int64)
    for row, s in enumerate(seqs):
        if len(s):
            out[row, T - len(s):] = s
    return torch.from_numpy(out).to(device)
