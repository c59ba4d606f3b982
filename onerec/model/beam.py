"""Constrained beam search over semantic IDs, session-wise.

    items, scores = generate(model, batch, trie.allowed, trie.item_of, beam_size=8, session_len=3, topk=4)
    items, scores = topk_next_items(model, batch, trie.allowed, trie.item_of, beam_size=20, k=10)

- Only valid codes: at level l the candidates are `allowed_fn(prefix of the current item)`.
- No repeats within a session: at the last level, a token that would complete an item the beam
  has already generated is masked.
- Scores are sums of the model's log-probabilities (log_softmax over the level's whole
  vocabulary, not renormalized over the allowed tokens), so they are comparable across beams.
- The decoder's self-attention keys/values are kept in a KVCache and reordered with the beams,
  so each step feeds one token per beam; the context is encoded once and repeated per beam.
- Beams that run out of valid continuations get score -inf and items -1 (only when fewer than
  beam_size valid sessions exist).

`reference_beam_search` is the plain version (Python loops over users, beams and trie children,
a nested-dict trie from `dict_trie`, the whole prefix re-decoded each step without a cache);
the tests check both give the same items and scores.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .common import GenerativeRecommender
from .layers import KVCache

AllowedFn = Callable[[torch.Tensor], torch.Tensor]   # (X, l) prefixes -> (X, K_l) bool
ItemOfFn = Callable[[torch.Tensor], torch.Tensor]    # (X, L) codes -> (X,) item index, -1 invalid


def _context_only(batch: Mapping[str, torch.Tensor]) -> dict:
    return {k: v for k, v in batch.items() if k not in ("target", "target_mask")}


@torch.no_grad()
def generate(model: GenerativeRecommender, context_batch: Mapping[str, torch.Tensor],
             allowed_fn: AllowedFn, item_of_fn: ItemOfFn, beam_size: int, session_len: int,
             topk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> items (B, topk, session_len) item indices, scores (B, topk) log-probs, best first."""
    topk = beam_size if topk is None else topk
    if not 1 <= topk <= beam_size:
        raise ValueError(f"topk={topk} must be in 1..beam_size={beam_size}")
    was_training = model.training
    model.eval()
    n_levels, w = model.n_levels, beam_size
    memory = model.encode(_context_only(context_batch))
    b = memory.key_mask.shape[0]
    device = memory.key_mask.device
    memory = memory.select(torch.arange(b, device=device).repeat_interleave(w))  # (B*W, ...)
    cache = KVCache(model.n_layers)
    scores = torch.full((b, w), float("-inf"), device=device)                 # (B, W)
    scores[:, 0] = 0.0                                                        # one live beam to start
    tokens = torch.zeros(b * w, 0, dtype=torch.long, device=device)           # (B*W, t) so far
    items = torch.zeros(b * w, 0, dtype=torch.long, device=device)            # (B*W, m) completed
    ids = torch.full((b * w, 1), model.emb.bos_id, dtype=torch.long, device=device)
    beam_base = (torch.arange(b, device=device) * w)[:, None]                 # (B, 1)

    for step in range(session_len * n_levels):
        level = step % n_levels
        k_l = model.codebook_sizes[level]
        h, _ = model.decode(ids, memory, cache)                               # (B*W, 1, D)
        logp = model.logits(h[:, -1], level).float().log_softmax(dim=-1)      # (B*W, K_l)
        prefix = tokens[:, tokens.shape[1] - level:]                          # (B*W, l) current item
        ok = allowed_fn(prefix).to(device)                                    # (B*W, K_l)
        if level == n_levels - 1 and items.shape[1] > 0:
            ok = ok & ~_completes_seen_item(prefix, ok, items, item_of_fn)
        cand = scores.reshape(-1, 1) + logp.masked_fill(~ok, float("-inf"))   # (B*W, K_l)
        scores, flat = cand.view(b, w * k_l).topk(w, dim=1)                   # (B, W) best first
        parent = (beam_base + flat // k_l).reshape(-1)                        # (B*W,) row of parent
        token = (flat % k_l).reshape(-1)                                      # (B*W,)
        tokens = torch.cat([tokens[parent], token[:, None]], dim=1)
        items = items[parent]
        cache.reorder(parent)
        if level == n_levels - 1:
            items = torch.cat([items, item_of_fn(tokens[:, -n_levels:]).to(device)[:, None]], dim=1)
        ids = model.emb.ids(token, level)[:, None]                            # (B*W, 1)

    model.train(was_training)
    items = items.view(b, w, session_len)
    items = torch.where(torch.isfinite(scores)[..., None], items, torch.full_like(items, -1))
    return items[:, :topk], scores[:, :topk]


def _completes_seen_item(prefix: torch.Tensor, ok: torch.Tensor, items: torch.Tensor,
                         item_of_fn: ItemOfFn) -> torch.Tensor:
    """(X, K_last) bool: allowed last tokens whose completed code is an item already in the beam."""
    rows, toks = ok.nonzero(as_tuple=True)                                    # allowed candidates only
    codes = torch.cat([prefix[rows], toks[:, None]], dim=1)                   # (C, L)
    cand = item_of_fn(codes).to(items.device)                                 # (C,)
    seen = (cand[:, None] == items[rows]).any(dim=1)                          # (C,)
    out = torch.zeros_like(ok)
    out[rows[seen], toks[seen]] = True
    return out


@torch.no_grad()
def topk_next_items(model: GenerativeRecommender, context: Mapping[str, torch.Tensor],
                    allowed_fn: AllowedFn, item_of_fn: ItemOfFn, beam_size: int, k: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search over one item (L tokens): the k best distinct items, (B, k) and scores (B, k).
    Needs beam_size >= k; distinct codes are distinct items, so the k beams are k items."""
    items, scores = generate(model, context, allowed_fn, item_of_fn, beam_size, session_len=1, topk=k)
    return items[:, :, 0], scores


# --------------------------------------------------------------------------- plain reference


def dict_trie(codes) -> dict:
    """codes: (N, L) list or tensor of unique codes -> nested dict {t0: {t1: {.. t_{L-1}: row}}}."""
    from onerec.tokenizer.trie import DictTrie

    return DictTrie.from_codes(torch.as_tensor(codes)).root


@torch.no_grad()
def reference_beam_search(model: GenerativeRecommender, context_batch: Mapping[str, torch.Tensor],
                          trie: dict, beam_size: int, session_len: int, topk: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `generate`, one user and one beam at a time, no KV cache."""
    topk = beam_size if topk is None else topk
    was_training = model.training
    model.eval()
    n_levels, offsets = model.n_levels, model.emb.offsets.tolist()
    context = _context_only(context_batch)
    b = context["context"].shape[0]
    all_items = torch.full((b, topk, session_len), -1, dtype=torch.long)
    all_scores = torch.full((b, topk), float("-inf"))
    for u in range(b):
        memory = model.encode({k: v[u:u + 1] for k, v in context.items()})
        beams = [([], [], 0.0)]                                               # (tokens, items, score)
        for step in range(session_len * n_levels):
            level = step % n_levels
            candidates = []
            for tokens, items, score in beams:
                ids = [model.emb.bos_id] + [offsets[j % n_levels] + t for j, t in enumerate(tokens)]
                h, _ = model.decode(torch.tensor([ids], device=memory.key_mask.device), memory)
                logp = model.logits(h[0, -1], level).float().log_softmax(dim=-1)
                node = trie
                for t in tokens[len(tokens) - level:]:
                    node = node[t]
                for t, child in node.items():
                    if level == n_levels - 1 and child in items:
                        continue                                              # no repeats in a session
                    new_items = items + [child] if level == n_levels - 1 else items
                    candidates.append((tokens + [t], new_items, score + float(logp[t])))
            candidates.sort(key=lambda c: -c[2])
            beams = candidates[:beam_size]
        for i, (_, items, score) in enumerate(beams[:topk]):
            all_items[u, i] = torch.tensor(items)
            all_scores[u, i] = score
    model.train(was_training)
    return all_items, all_scores
