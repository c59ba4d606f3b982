"""Constrained beam search over semantic IDs, session-wise.

    items, scores = generate(model, batch, trie.allowed, trie.item_of, beam_size=8, session_len=3, topk=4)
    items, scores = topk_next_items(model, batch, trie.allowed, trie.item_of, beam_size=20, k=10)
    # with a dense head: the beam's items and the head's top items, ranked by both scores

- Only valid codes: at level l the candidates are `allowed_fn(prefix of the current item)`.
- No repeats within a session: at the last level, a token that would complete an item the beam
  has already generated is masked.
- Scores are sums of the model's log-probabilities (log_softmax over the level's whole
  vocabulary, not renormalized over the allowed tokens), so they are comparable across beams.
- The decoder's self-attention keys/values are kept in a KVCache and reordered with the beams,
  so each step feeds one token per beam; the context is encoded once and its keys/values are
  shared by the user's beams (cross-attention groups them), never copied per beam.
- Beams that run out of valid continuations get score -inf and items -1 (only when fewer than
  beam_size valid sessions exist).

`reference_beam_search` is the plain version (Python loops over users, beams and trie children,
a nested-dict trie from `dict_trie`, the whole prefix re-decoded each step without a cache);
the tests check both give the same items and scores.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch

from .common import GenerativeRecommender
from .layers import KVCache

AllowedFn = Callable[[torch.Tensor], torch.Tensor]   # (X, l) prefixes -> (X, K_l) bool
ItemOfFn = Callable[[torch.Tensor], torch.Tensor]    # (X, L) codes -> (X,) item index, -1 invalid


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode inside, the caller's mode restored after. A model already in eval mode (serving)
    is left untouched: switching walks every submodule, ~1 ms a call on a small model."""
    was_training = model.training
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def context_only(batch: Mapping[str, torch.Tensor]) -> dict:
    return {k: v for k, v in batch.items() if k not in ("target", "target_mask", "target_items")}


@torch.no_grad()
def generate(model: GenerativeRecommender, context_batch: Mapping[str, torch.Tensor],
             allowed_fn: AllowedFn, item_of_fn: ItemOfFn, beam_size: int, session_len: int,
             topk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> items (B, topk, session_len) item indices, scores (B, topk) log-probs, best first."""
    topk = beam_size if topk is None else topk
    if not 1 <= topk <= beam_size:
        raise ValueError(f"topk={topk} must be in 1..beam_size={beam_size}")
    with eval_mode(model):
        memory = model.encode(context_only(context_batch))
        cache, h_bos = _decode_bos(model, memory)
        items, scores, _ = _search(model, memory, cache, h_bos, allowed_fn, item_of_fn, beam_size, session_len, topk)
    return items, scores


def _decode_bos(model: GenerativeRecommender, memory) -> tuple[KVCache, torch.Tensor]:
    """Every beam starts at BOS: decode it once per user -> the cache and h_bos (B, D)."""
    b = memory.key_mask.shape[0]
    cache = KVCache(model.n_layers)
    bos = torch.full((b, 1), model.emb.bos_id, dtype=torch.long, device=memory.key_mask.device)
    return cache, model.decode(bos, memory, cache)[0][:, -1]


def _search(model: GenerativeRecommender, memory, cache: KVCache, h_bos: torch.Tensor, allowed_fn: AllowedFn,
            item_of_fn: ItemOfFn, beam_size: int, session_len: int, topk: int,
            forced: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The beam search from BOS (cache and h_bos from _decode_bos) -> items (B, topk, M), scores
    (B, topk) and the log-probs (B, C) of `forced`: codes (B, C, L) of one item each (session_len
    1), teacher-forced in the same decoder calls as the beams. That scores C given items per user
    for the price of C more rows in each step, not a decode of its own (1.07-1.12x per request
    at batches of 1-32, RESULTS.md)."""
    n_levels, w = model.n_levels, beam_size
    b, device = h_bos.shape[0], h_bos.device
    if forced is None:
        forced = torch.zeros(b, 0, n_levels, dtype=torch.long, device=device)
    elif session_len != 1:
        raise ValueError("forced items are scored for a session of one item")
    c = forced.shape[1]
    g = w + c                                  # rows per user: its W beams, then its C forced items
    first = (torch.arange(b, device=device) * g)[:, None]                     # (B, 1) a user's first row
    forced_rows = first + w + torch.arange(c, device=device)                  # (B, C)
    fan = torch.arange(b, device=device).repeat_interleave(g)                 # (B*g,) each row's user
    cache.reorder(fan)          # the memory stays (B, ...): a user's rows share its row (CrossAttention)
    h = h_bos.index_select(0, fan)                                            # (B*g, D) step 0's state
    scores = torch.full((b, w), float("-inf"), device=device)                 # (B, W)
    scores[:, 0] = 0.0                                                        # one live beam to start
    forced_logp = torch.zeros(b, c, device=device)                            # (B, C)
    tokens = torch.zeros(b * w, 0, dtype=torch.long, device=device)           # (B*W, t) so far
    items = torch.zeros(b * w, 0, dtype=torch.long, device=device)            # (B*W, m) completed
    beam_base = (torch.arange(b, device=device) * w)[:, None]                 # (B, 1)
    ids = None                                  # each later step's input tokens (B*g, 1); step 0 has h

    for step in range(session_len * n_levels):
        level = step % n_levels
        k_l = model.codebook_sizes[level]
        if step:
            h = model.decode(ids, memory, cache)[0][:, -1]                    # (B*g, D)
        logp_all = model.logits(h, level).float().log_softmax(dim=-1).view(b, g, k_l)
        forced_token = forced[:, :, level]                                    # (B, C)
        forced_logp += logp_all[:, w:].gather(2, forced_token[..., None])[..., 0]
        logp = logp_all[:, :w].reshape(b * w, k_l)                            # (B*W, K_l) the beams'
        prefix = tokens[:, tokens.shape[1] - level:]                          # (B*W, l) current item
        ok = allowed_fn(prefix).to(device)                                    # (B*W, K_l)
        if level == n_levels - 1 and items.shape[1] > 0:
            ok = ok & ~_completes_seen_item(prefix, ok, items, item_of_fn)
        cand = scores.reshape(-1, 1) + logp.masked_fill(~ok, float("-inf"))   # (B*W, K_l)
        scores, flat = cand.view(b, w * k_l).topk(w, dim=1)                   # (B, W) best first
        parent = (beam_base + flat // k_l).reshape(-1)                        # (B*W,) beam of parent
        token = (flat % k_l).reshape(-1)                                      # (B*W,)
        tokens = torch.cat([tokens[parent], token[:, None]], dim=1)
        items = items[parent]
        cache.reorder(torch.cat([first + flat // k_l, forced_rows], 1).reshape(-1))  # (B*g,) rows kept
        if level == n_levels - 1:
            items = torch.cat([items, item_of_fn(tokens[:, -n_levels:]).to(device)[:, None]], dim=1)
        step_tokens = torch.cat([token.view(b, w), forced_token], 1)          # (B, g)
        ids = model.emb.ids(step_tokens, level).reshape(-1, 1)                # (B*g, 1)

    items = items.view(b, w, session_len)
    items = torch.where(torch.isfinite(scores)[..., None], items, torch.full_like(items, -1))
    return items[:, :topk], scores[:, :topk], forced_logp


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


def is_hybrid(model: GenerativeRecommender) -> bool:
    """Ranks by the decoder and the dense head together (topk_next_items)."""
    return model.dense is not None and model.cfg.dense_score_weight > 0


@torch.no_grad()
def topk_next_items(model: GenerativeRecommender, context: Mapping[str, torch.Tensor],
                    allowed_fn: AllowedFn, item_of_fn: ItemOfFn, beam_size: int, k: int,
                    head_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search over one item (L tokens): the k best distinct items, (B, k) and scores (B, k).
    Needs beam_size >= k; distinct codes are distinct items, so the k beams are k items.

    With a dense head and model.dense_score_weight > 0 (the hybrid, see common.py) the candidates
    are the beam's beam_size items and the head's top head_k (default beam_size); each is scored
    by its exact log-prob under the decoder + dense_score_weight x the head's log-softmax over
    the catalogue, and the best k of those sums are returned (so k <= head_k also suffices: the
    head's items are distinct). Every candidate is a catalogue item either way."""
    head_k = beam_size if head_k is None else head_k
    weight = model.cfg.dense_score_weight if is_hybrid(model) else 0.0
    if not 1 <= k <= (max(beam_size, head_k) if weight else beam_size):
        raise ValueError(f"k={k} must be in 1..beam_size={beam_size}" + (f" or head_k={head_k}" if weight else ""))
    with eval_mode(model):
        memory = model.encode(context_only(context))                         # once, for both scores
        cache, h_bos = _decode_bos(model, memory)
        if not weight:
            items, scores, _ = _search(model, memory, cache, h_bos, allowed_fn, item_of_fn, beam_size, 1, k)
            return items[:, :, 0], scores
        dense = model.item_logits(h_bos, memory).log_softmax(-1)              # (B, N) fp32
        by_dense = dense.topk(min(head_k, dense.shape[1]), dim=1).indices     # (B, W') rows
        # a beam item's score is already its exact log-prob; the head's picks ride along the beams
        items, scores, head_logp = _search(model, memory, cache, h_bos, allowed_fn, item_of_fn, beam_size, 1,
                                           beam_size, forced=model.item_codes[by_dense + 1])
        gen = torch.cat([scores, head_logp], 1)                               # (B, C)
    cand = torch.cat([items[:, :, 0], by_dense], 1)                           # (B, C) rows, -1 = none
    c = cand.shape[1]
    earlier = torch.ones(c, c, dtype=torch.bool, device=cand.device).tril(-1)  # (C, C) j < i
    repeat = ((cand[:, :, None] == cand[:, None, :]) & earlier).any(-1)       # (B, C) listed before
    fused = gen + weight * dense.gather(1, cand.clamp(min=0))
    fused = fused.masked_fill(repeat | (cand < 0), float("-inf"))
    fused, order = fused.topk(k, dim=1)                                       # (B, k) best first
    return torch.where(torch.isfinite(fused), cand.gather(1, order), -1), fused


def item_logp(model: GenerativeRecommender, memory, codes: torch.Tensor) -> torch.Tensor:
    """codes (B, C, L) -> (B, C): each item's log-prob under the decoder (teacher forcing)."""
    b, c, n_levels = codes.shape
    target = codes.reshape(b * c, 1, n_levels)
    h, _ = model.decode(model.input_ids(target), memory)                      # (B*C, L, D), memory (B, ...)
    logp = sum(model.logits(h[:, level], level).float().log_softmax(-1)
               .gather(1, target[:, 0, level:level + 1])[:, 0] for level in range(n_levels))
    return logp.view(b, c)


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
    context = context_only(context_batch)
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


@torch.no_grad()
def reference_topk_next_items(model: GenerativeRecommender, context_batch: Mapping[str, torch.Tensor],
                              trie: dict, beam_size: int, k: int, head_k: int | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `topk_next_items`, one user and one candidate at a time: the beam from
    `reference_beam_search`, each item's dense logit as an explicit dot product with its vector
    (+ the repeat gate's offset for an item of the context), and each candidate's log-prob from
    decoding [BOS, its first L - 1 tokens] without a cache."""
    weight = model.cfg.dense_score_weight if model.dense is not None else 0.0
    items, scores = reference_beam_search(model, context_batch, trie, beam_size, 1,
                                          topk=beam_size if weight else k)
    if not weight:
        return items[:, :, 0], scores
    was_training = model.training
    model.eval()
    context = context_only(context_batch)
    n_levels, offsets, n = model.n_levels, model.emb.offsets.tolist(), model.item_codes.shape[0] - 1
    out_items, out_scores = torch.full((len(items), k), -1), torch.full((len(items), k), float("-inf"))
    for u in range(len(items)):
        memory = model.encode({key: v[u:u + 1] for key, v in context.items()})
        device = memory.key_mask.device

        def decode(tokens):
            ids = [model.emb.bos_id] + [offsets[j] + t for j, t in enumerate(tokens)]
            return model.decode(torch.tensor([ids], device=device), memory)[0][0]   # (T, D)

        h_bos = decode([])[0].float()                                         # (D,)
        query = model.dense(h_bos)                                            # (D,)
        seen, offset = set(), 0.0                                             # the repeat gate
        if model.repeat is not None:
            seen, offset = set(context["context_items"][u].tolist()), float(model.repeat(h_bos))
        logits = []
        for j in range(n):                                                    # column j = item j + 1
            codes = model.item_codes[j + 1].tolist()
            vector = sum(model.emb.table.weight[offsets[lv] + codes[lv]] for lv in range(n_levels))
            vector = vector + model.context.item_vectors(torch.tensor(j + 1, device=device))
            logits.append(float(query @ vector.float()) + (offset if j + 1 in seen else 0.0))
        top = max(logits)
        log_z = top + math.log(sum(math.exp(x - top) for x in logits))
        by_dense = sorted(range(n), key=lambda j: -logits[j])[:beam_size if head_k is None else head_k]
        candidates = []
        for row in [int(r) for r in items[u, :, 0]] + by_dense:
            if row < 0 or row in candidates:
                continue
            candidates.append(row)
        ranked = []
        for row in candidates:
            codes = model.item_codes[row + 1].tolist()
            h = decode(codes[:-1])
            logp = sum(float(model.logits(h[lv], lv).float().log_softmax(-1)[codes[lv]]) for lv in range(n_levels))
            ranked.append((logp + weight * (logits[row] - log_z), row))
        ranked.sort(key=lambda pair: -pair[0])
        for i, (score, row) in enumerate(ranked[:k]):
            out_items[u, i], out_scores[u, i] = row, score
    model.train(was_training)
    return out_items, out_scores
