"""Training and evaluation batches for OneRec, from per-user item sequences and a tokenizer.

    tok = fit_tokenizer(split.train, ds.items, cfg.tokenizer, seed=cfg.seed)   # train events only
    codes = ItemCodes.from_tokenizer(tok, index)          # item index 1..N -> semantic ID
    model = catalogue_model(cfg.model, tok, index, ds.items)   # build_model + per-item tables
    data = build_examples(seqs.train, codes, cfg.model.max_seq_len, cfg.model.session_len)
    for idx in data.epoch_batches(batch_size, epoch, seed):
        batch = data.batch(idx)                           # the model's batch format (common.py)
    ctx = context_batch(histories, codes, max_seq_len)    # for topk_next_items / generate

One training example per user and position t >= 1 of the user's train sequence s:
    context = codes of s[max(0, t - max_seq_len) : t]     the previous <= max_seq_len items
    target  = codes of s[t : t + session_len]             the next session; target_mask is False
                                                          where the sequence ends first
Examples are not materialized: all train sequences are concatenated into one flat tensor and
an example is the flat position of its first target (plus its user's start and end), so memory
is O(events) whatever max_seq_len is; a batch is gathered from them with a few tensor ops.

Item indices are those of `onerec.eval.ItemIndex`: 1..N, 0 = padding. Contexts are left-padded
(the newest event last) with code -1 and context_mask False; padded target items carry code 0
(a valid token, so teacher forcing and the loss never see -1) and target_mask False.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from onerec.config import ModelConfig, TokenizerConfig
from onerec.eval.baselines import ItemIndex
from onerec.tokenizer import CodeTrie, SemanticIdTokenizer, item_embeddings

from .common import GenerativeRecommender


def fit_tokenizer(interactions: pd.DataFrame, items: pd.DataFrame, cfg: TokenizerConfig,
                  seed: int) -> SemanticIdTokenizer:
    """Item embeddings (collaborative, from `interactions`, + side features) -> RQ-KMeans
    semantic IDs, every knob from `cfg`. Pass the train interactions only: validation and test
    events must not shape the codes."""
    item_ids, emb = item_embeddings(interactions, items, dim=cfg.embedding_dim, seed=seed,
                                    window=cfg.cooc_window, side_dim=cfg.side_dim,
                                    side_weight=cfg.side_weight, smoothing=cfg.ppmi_smoothing)
    return SemanticIdTokenizer.fit(item_ids, emb, cfg.levels, cfg.codebook_size,
                                   scale=cfg.codebook_scale, n_iter=cfg.kmeans_iters, seed=seed)


def catalogue_model(model_cfg: ModelConfig, tok: SemanticIdTokenizer, index: ItemIndex,
                    items: pd.DataFrame) -> GenerativeRecommender:
    """build_model for this catalogue, with the per-item tables the config asks for filled in.

    With model.item_embedding the model's item rows are the catalogue's (item index i + 1 is the
    tokenizer's item_ids[i], checked here), so the saved model and its tokenizer map raw ids to
    them; model.item_attributes adds `items`' attribute table, the dense head the item codes."""
    from onerec.eval.baselines import item_attributes
    from onerec.model import build_model

    tables, extra = {}, {}
    if model_cfg.item_embedding:
        if not np.array_equal(tok.item_ids, index.item_ids):
            raise ValueError(f"the tokenizer's {len(tok.item_ids)} items are not the catalogue's "
                             f"{len(index)}: fit the tokenizer on the same items table")
        extra["n_items"] = len(index)
    if model_cfg.item_attributes:
        try:
            tables["attributes"] = item_attributes(items, index)                     # (N + 1, A)
        except ValueError as exc:
            raise ValueError(f"model.item_attributes: {exc}; set model.item_attributes=false") from None
        extra.update(n_attributes=int(tables["attributes"].max()),
                     attribute_slots=tables["attributes"].shape[1])
    if model_cfg.dense_loss_weight > 0:
        tables["item_codes"] = ItemCodes.from_tokenizer(tok, index).table           # (N + 1, L)
    model = build_model(model_cfg, codebook_sizes=tok.codebook_sizes, **extra)
    return model.set_item_tables(**tables)


@dataclass(frozen=True, eq=False)
class ItemCodes:
    """Semantic IDs by item index: table[i] is item index i's code, row 0 (padding) is all -1."""

    table: torch.Tensor       # (N + 1, L) int64
    sizes: list[int]          # (L,) vocabulary per code position (the tokenizer's codebook_sizes)

    @classmethod
    def from_tokenizer(cls, tok: SemanticIdTokenizer, index: ItemIndex) -> ItemCodes:
        """Codes of every catalogue item; raises if the tokenizer lacks one (fit it on the same items)."""
        codes = torch.from_numpy(tok.encode(index.item_ids).astype(np.int64))        # (N, L)
        pad = torch.full((1, codes.shape[1]), -1, dtype=torch.int64)
        return cls(torch.cat([pad, codes]), list(tok.codebook_sizes))

    @property
    def n_items(self) -> int:
        return self.table.shape[0] - 1

    @property
    def levels(self) -> int:
        return self.table.shape[1]

    def trie(self) -> CodeTrie:
        """Prefix trie over the catalogue's codes; its item_of gives row r = item index r + 1."""
        return CodeTrie.from_codes(self.table[1:], sizes=self.sizes)


@dataclass(frozen=True, eq=False)
class TrainExamples:
    """Every (context -> next session) example of a set of sequences; see the module docstring."""

    items: torch.Tensor       # (T,) int64 item indices, all users' train sequences concatenated
    pos: torch.Tensor         # (E,) int64 flat position of each example's first target item
    start: torch.Tensor       # (E,) int64 flat position of the example's user's first item
    end: torch.Tensor         # (E,) int64 flat position just after that user's last item
    codes: ItemCodes
    max_seq_len: int          # S: context events at most
    session_len: int          # M: target items at most

    def __len__(self) -> int:
        return len(self.pos)

    def steps_per_epoch(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)

    def epoch_batches(self, batch_size: int, epoch: int, seed: int) -> list[torch.Tensor]:
        """Example indices of each batch of `epoch`, shuffled; the same (seed, epoch) gives the same
        batches, so a run resumed mid-epoch replays the rest of that epoch exactly. The last batch
        may be smaller."""
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(self), generator=gen)                              # (E,)
        return list(order.split(batch_size))

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Examples `idx` (B,) -> {context (B, S_b, L), context_items (B, S_b), context_mask (B, S_b),
        target (B, M_b, L), target_mask (B, M_b), target_items (B, M_b)} with S_b <= max_seq_len and M_b <= session_len
        trimmed to the longest context / session in the batch (short histories cost no padding)."""
        pos, start, end = self.pos[idx], self.start[idx], self.end[idx]              # (B,) each
        s_b = int((pos - start).clamp(max=self.max_seq_len).max())                    # >= 1 (t >= 1)
        ctx_pos = pos[:, None] - s_b + torch.arange(s_b)                              # (B, S_b) oldest first
        ctx_mask = ctx_pos >= start[:, None]                                          # (B, S_b)
        ctx_items = torch.where(ctx_mask, self.items[ctx_pos.clamp(min=0)], 0)        # (B, S_b) 0 = pad
        m_b = int((end - pos).clamp(max=self.session_len).max())                      # >= 1
        tgt_pos = pos[:, None] + torch.arange(m_b)                                    # (B, M_b)
        tgt_mask = tgt_pos < end[:, None]                                             # (B, M_b)
        tgt_items = torch.where(tgt_mask, self.items[tgt_pos.clamp(max=len(self.items) - 1)], 0)
        return {
            "context": self.codes.table[ctx_items],                                   # (B, S_b, L) -1 = pad
            "context_items": ctx_items,                                               # (B, S_b) 0 = pad
            "context_mask": ctx_mask,
            "target": self.codes.table[tgt_items].clamp(min=0),                       # (B, M_b, L)
            "target_mask": tgt_mask,
            "target_items": tgt_items,                                                # (B, M_b) 0 = pad
        }

    def fingerprint(self) -> str:
        """A short hash of the examples (sequences and codes): a checkpoint must match its data."""
        h = hashlib.sha256()
        for t in (self.items, self.pos, self.codes.table):
            h.update(t.numpy().tobytes())
        h.update(f"{self.max_seq_len},{self.session_len}".encode())
        return h.hexdigest()[:16]


def build_examples(sequences: Sequence[Sequence[int]], codes: ItemCodes, max_seq_len: int,
                   session_len: int) -> TrainExamples:
    """All examples of `sequences` (item indices 1..N, oldest first): one per position t >= 1."""
    if max_seq_len < 1 or session_len < 1:
        raise ValueError(f"max_seq_len ({max_seq_len}) and session_len ({session_len}) must be >= 1")
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))  # (U,)
    flat = (np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]) if lengths.sum()
            else np.zeros(0, dtype=np.int64))                                         # (T,)
    if len(flat) and not (1 <= flat.min() and flat.max() <= codes.n_items):
        raise ValueError(f"sequences must hold item indices 1..{codes.n_items} (0 is padding); "
                         f"got {flat.min()}..{flat.max()}")
    user_start = np.cumsum(lengths) - lengths                                         # (U,)
    user_of = np.repeat(np.arange(len(lengths)), lengths)                             # (T,)
    start, end = user_start[user_of], (user_start + lengths)[user_of]                 # (T,) each
    pos = np.flatnonzero(np.arange(len(flat)) > start)                                # t >= 1
    if len(pos) == 0:
        raise ValueError("no sequence has 2 or more items: nothing to learn from")
    as_t = torch.from_numpy
    return TrainExamples(as_t(flat), as_t(pos), as_t(start[pos]), as_t(end[pos]), codes,
                         max_seq_len, session_len)


def context_batch(histories: Sequence[Sequence[int]], codes: ItemCodes, max_seq_len: int,
                  device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Histories (item indices 1..N, oldest first) -> {context (B, S, L), context_items (B, S),
    context_mask (B, S)}:
    the newest <= max_seq_len items of each, left-padded; S = the longest kept history (>= 1).
    An empty history is all padding (the model's start token still gives it a context)."""
    kept = [np.asarray(h, dtype=np.int64)[len(h) - min(len(h), max_seq_len):] for h in histories]
    lengths = np.fromiter((len(h) for h in kept), dtype=np.int64, count=len(kept))    # (B,)
    s = max(1, int(lengths.max()) if len(kept) else 1)
    items = np.zeros((len(kept), s), dtype=np.int64)                                  # (B, S) 0 = pad
    mask = np.arange(s)[None, :] >= (s - lengths)[:, None]                            # (B, S)
    if lengths.sum():
        items[mask] = np.concatenate(kept)          # row-major fill: each row's slots in order
    items_t = torch.from_numpy(items)
    return {"context": codes.table[items_t].to(device), "context_items": items_t.to(device),
            "context_mask": torch.from_numpy(mask).to(device)}
