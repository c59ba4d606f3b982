"""What V1 and V2 share: the batch format, semantic-ID embeddings, the context embedding, the
training loss and the generation interface that beam search drives.

Batch (a dict of tensors; "target" only for training):
    context       (B, S, L) int64  semantic-ID codes of the last S events (S <= max_seq_len);
                                    padded slots may hold any value, e.g. -1
    context_items (B, S)    int64  their item indices 1..N, 0 = padding (read iff item_embedding)
    context_mask  (B, S)    bool   True = real event (default: context[..., 0] >= 0)
    side          (B, S, F) float  per-event side features (required iff n_side_features > 0)
    user          (B, U)    float  user features (required iff n_user_features > 0)
    target        (B, M, L) int64  the next session, M <= session_len items
    target_mask   (B, M)    bool   optional: items that count in the loss (sessions shorter than M)
    target_items  (B, M)    int64  their item indices 1..N (read iff the model has a dense head)

The target is decoded as one flat sequence of M*L tokens; position j holds level j % L.
Decoder input ids live in one shared vocabulary: level l token t -> offsets[l] + t, then BOS.

Generation interface (see beam.py):
    memory = model.encode(batch)                      # once per request
    h, aux = model.decode(ids (B, T), memory, cache)  # (B, T, D), final norm applied
    logits = model.logits(h, level)                   # (..., K_level)
    item_logits = model.item_logits(h[:, 0], memory)  # (B, N) the dense head, from the BOS state

The dense head (model.dense_loss_weight > 0; COBRA, Yang et al. 2025, and LIGER, Yang et al.
2024, pair semantic-ID generation with a dense item score the same way): the decoder's state
at BOS, which sees only the context, is projected and scored against every item's vector
(its level embeddings + its per-item vector: the context's own item representation), trained
with a full-softmax cross-entropy on the next item. Next-item ranking (topk_next_items) then
scores the beam's items and the head's top items by both: the decoder's log-prob of the code +
dense_score_weight x the head's log-prob. Why: semantic IDs share one prefix among many items,
so the beam's last level must tell apart items it has seen a few times; the item-level score
learns them one by one, the way SASRec does, and finds rare items the beam has pruned.

The repeat gate (model.repeat_gate, with the dense head; RepeatNet, Ren et al. 2019, models
re-consumption the same way): a logit offset, read from the BOS state, added to the head's
logits of the items already in the context. A dot product with the user's state cannot say
"not one of these 50", an offset can: on Amazon Beauty no train target repeats an item of its
context, and the gate learns a large negative offset; where users do re-consume it can grow.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from onerec.config import ModelConfig

from .layers import CrossAttention, KVCache, MoE, SelfAttention, dropout_layer


@dataclass
class Memory:
    """The encoded context: cross-attention keys/values and which context tokens are real.

    kv holds one (k, v) per decoder layer (V1) or a single pair shared by all layers (V2);
    k, v are (B, Hkv, S', hd) and key_mask (B, S'), S' = S + 1 (a leading user/start token);
    items (B, S) the context's item indices (0 = padding) when the batch has them (the repeat gate).
    `decode` may feed g rows per memory row (a user's beams, consecutive): they share it."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    key_mask: torch.Tensor
    items: torch.Tensor | None = None

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv[0] if len(self.kv) == 1 else self.kv[i]


class SemanticIdEmbedding(nn.Module):
    """One table for every level's tokens (level l at rows offsets[l]..offsets[l]+K_l-1) plus BOS."""

    def __init__(self, codebook_sizes: list[int], d_model: int):
        super().__init__()
        sizes = torch.tensor(codebook_sizes)
        self.register_buffer("offsets", torch.cumsum(sizes, 0) - sizes, persistent=False)  # (L,)
        self.bos_id = int(sizes.sum())
        self.table = nn.Embedding(self.bos_id + 1, d_model)

    def ids(self, tokens: torch.Tensor, levels: torch.Tensor | int) -> torch.Tensor:
        """Level-local tokens -> shared ids; `levels` broadcasts against tokens."""
        return self.offsets[levels] + tokens

    def items(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (..., L) -> (..., D): the sum of an item's level embeddings."""
        ids = (self.offsets + codes).reshape(-1, codes.shape[-1])             # (X, L)
        return F.embedding_bag(ids, self.table.weight, mode="sum").view(*codes.shape[:-1], self.table.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids)


class ContextEmbedding(nn.Module):
    """Context events -> (B, 1 + S, D) vectors and mask. Event vector = item embedding (sum of
    its level embeddings, + a vector of its own when n_items > 0, + the mean of its attribute
    vectors when n_attributes > 0) + side-feature projection +
    recency embedding (0 = the latest event, so left and right padding give the same result).
    Token 0 is a learned start vector plus the user-feature projection; it is always valid, so
    no user has an empty context.

    Why the per-item vector: items with a common code prefix share most of their sum of level
    embeddings, and colliding items (told apart only by a last, meaning-free level) nearly all
    of it, so by codes alone the model can hardly tell such histories apart. Outputs stay
    semantic IDs: the vocabulary the decoder generates does not grow with N."""

    def __init__(self, d_model: int, max_seq_len: int, n_side_features: int, n_user_features: int,
                 n_items: int = 0, n_attributes: int = 0, attribute_slots: int = 0):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.item = nn.Embedding(n_items + 1, d_model) if n_items else None  # row 0 = padding
        self.attr = None
        if n_attributes:  # rare items borrow from frequent ones of the same brand or category
            self.attr = nn.Embedding(n_attributes + 1, d_model, padding_idx=0)
            # (N + 1, A) attribute ids 1..n_attributes, 0 = none; -1 until set_item_tables
            self.register_buffer("attributes", torch.full((n_items + 1, attribute_slots), -1))
        self.recency = nn.Embedding(max_seq_len, d_model)
        self.start = nn.Parameter(torch.zeros(d_model))
        self.side = nn.Linear(n_side_features, d_model) if n_side_features else None
        self.user = nn.Linear(n_user_features, d_model) if n_user_features else None

    def forward(self, emb: SemanticIdEmbedding, batch: Mapping[str, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        codes = batch["context"]                                              # (B, S, L)
        b, s, _ = codes.shape
        if s > self.max_seq_len:
            raise ValueError(f"context has {s} events but the model takes at most max_seq_len="
                             f"{self.max_seq_len}; keep the last {self.max_seq_len} events")
        mask = batch.get("context_mask")
        mask = (codes[..., 0] >= 0) if mask is None else mask.bool()          # (B, S)
        x = emb.items(codes.clamp(min=0))                                     # (B, S, D)
        if self.item is not None:
            if batch.get("context_items") is None:
                raise ValueError("the model was built with item_embedding (n_items="
                                 f"{self.item.num_embeddings - 1}) but the batch has no 'context_items'")
            x = x + self.item_vectors(batch["context_items"])                 # (B, S, D)
        x = x + _optional(self.side, batch, "side", "n_side_features")
        recency = mask.flip(1).cumsum(1).flip(1) - 1                          # (B, S) 0 = latest
        x = x + self.recency(recency.clamp(min=0))
        x = x * mask[..., None]                                               # padding -> 0
        head = self.start.expand(b, 1, -1) + _optional(self.user, batch, "user", "n_user_features")
        ones = torch.ones(b, 1, dtype=torch.bool, device=codes.device)
        return torch.cat([head, x], dim=1), torch.cat([ones, mask], dim=1)    # (B, 1+S, D), (B, 1+S)

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """items (...) indices 0..N -> (..., D): the per-item vector, + the mean of its attribute
        vectors when the model has them."""
        x = self.item(items)
        if self.attr is not None:
            attrs = self.attributes[items].reshape(-1, self.attributes.shape[1])  # (X, A) 0 = none
            # embedding_bag's mean leaves padding_idx out (and gives 0 for no attributes)
            mean = F.embedding_bag(attrs, self.attr.weight, mode="mean", padding_idx=0)  # (X, D)
            x = x + mean.view(x.shape)
        return x


def _optional(proj: nn.Linear | None, batch: Mapping[str, torch.Tensor], key: str, knob: str):
    """A feature projection, or 0 when the model has none; a mismatch is an error, not a skip."""
    if proj is None:
        if batch.get(key) is not None:
            raise ValueError(f"batch has '{key}' but the model was built with {knob}=0")
        return 0.0
    if batch.get(key) is None:
        raise ValueError(f"the model was built with {knob}={proj.in_features} but the batch has no '{key}'")
    x = proj(batch[key].to(proj.weight.dtype))
    return x if x.dim() == 3 else x[:, None, :]                               # (B, S or 1, D)


# --------------------------------------------------------------------------- FLOP counting
# Matmul FLOPs of one forward pass (2 per multiply-add); embeddings, norms, softmax and
# elementwise work are left out. Attention scores count the full T x S grid (the causal half is
# not subtracted, as SDPA's math kernel computes it all). MoE counts the router plus top_k experts.


def linear_flops(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out


def attention_core_flops(t_q: int, t_k: int, d_model: int) -> int:
    return 2 * (2 * t_q * t_k * d_model)                                      # q k^T and att v


def ffn_flops(tokens: int, d_model: int, hidden: int, swiglu: bool, n_experts: int, top_k: int) -> int:
    one = (3 if swiglu else 2) * linear_flops(tokens, d_model, hidden)
    if n_experts == 0:
        return one
    return linear_flops(tokens, d_model, n_experts) + top_k * one


# --------------------------------------------------------------------------- the shared model base


class GenerativeRecommender(nn.Module):
    """Holds the config and extra knobs, the embeddings, output heads and the training loss.
    Subclasses define `encode`, `decode` and `flops_per_sample`."""

    arch = ""

    def __init__(self, cfg: ModelConfig, *, codebook_sizes: list[int] | None = None, n_items: int = 0,
                 n_attributes: int = 0, attribute_slots: int = 0,
                 n_kv_heads: int | None = None, n_side_features: int = 0, n_user_features: int = 0,
                 ffn_mult: int = 4, activation: str = "swiglu", moe_aux_coef: float = 0.01):
        super().__init__()
        if not codebook_sizes:
            raise ValueError("codebook_sizes is required: pass the tokenizer's codebook_sizes "
                             "(one vocabulary size per semantic-ID level)")
        if not cfg.item_embedding and (cfg.item_attributes or cfg.dense_loss_weight > 0):
            raise ValueError("model.item_attributes and model.dense_loss_weight need model.item_embedding")
        if cfg.item_embedding and n_items < 1:
            raise ValueError("model.item_embedding needs n_items: pass the catalogue size (the "
                             "tokenizer's item count; item index i + 1 <-> its item_ids[i])")
        n_items = n_items if cfg.item_embedding else 0
        if cfg.item_attributes and (n_attributes < 1 or attribute_slots < 1):
            raise ValueError("model.item_attributes needs n_attributes and attribute_slots (the shape "
                             "of onerec.eval.item_attributes' table); this data set may have none")
        n_attributes, attribute_slots = (n_attributes, attribute_slots) if cfg.item_attributes else (0, 0)
        n_kv_heads = cfg.n_heads if n_kv_heads is None else n_kv_heads
        if n_kv_heads < 1 or cfg.n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads={n_kv_heads} must divide n_heads={cfg.n_heads}")
        if activation not in ("swiglu", "gelu"):
            raise ValueError(f"activation '{activation}': choose swiglu or gelu")
        self.cfg = cfg
        self.codebook_sizes = [int(k) for k in codebook_sizes]
        self.n_levels = len(self.codebook_sizes)
        self.n_layers = cfg.n_layers
        self.n_kv_heads = n_kv_heads
        self.n_side_features, self.n_user_features = n_side_features, n_user_features
        self.ffn_hidden, self.activation, self.moe_aux_coef = ffn_mult * cfg.d_model, activation, moe_aux_coef
        self._extra = dict(codebook_sizes=self.codebook_sizes, n_items=n_items, n_attributes=n_attributes,
                           attribute_slots=attribute_slots, n_kv_heads=n_kv_heads,
                           n_side_features=n_side_features, n_user_features=n_user_features,
                           ffn_mult=ffn_mult, activation=activation, moe_aux_coef=moe_aux_coef)
        d = cfg.d_model
        self.emb = SemanticIdEmbedding(self.codebook_sizes, d)
        self.context = ContextEmbedding(d, cfg.max_seq_len, n_side_features, n_user_features, n_items,
                                        n_attributes, attribute_slots)
        self.max_target_len = cfg.session_len * self.n_levels
        self.position = nn.Embedding(self.max_target_len, d)                  # decoder positions
        self.drop = dropout_layer(cfg.dropout)
        self.heads = nn.ModuleList(nn.Linear(d, k, bias=False) for k in self.codebook_sizes)
        self.dense = None
        if cfg.dense_loss_weight > 0:
            self.dense = nn.Linear(d, d, bias=False)
            # (N + 1, L) each item's semantic ID (row 0 padding); -1 until set_item_tables
            self.register_buffer("item_codes", torch.full((n_items + 1, self.n_levels), -1))
        self.repeat = nn.Linear(d, 1) if cfg.repeat_gate else None            # see the module docstring

    @property
    def hparams(self) -> dict:
        """Everything needed to rebuild this model: build_model(ModelConfig(**cfg), **extra)."""
        return {"cfg": dataclasses.asdict(self.cfg), "extra": dict(self._extra)}

    def _init_weights(self) -> None:
        """nanoGPT init: N(0, 0.02) for linears and embeddings; zero biases."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def set_reference(self, flag: bool = True) -> GenerativeRecommender:
        """Run every attention and MoE layer on its plain reference path (tests, debugging)."""
        for m in self.modules():
            if isinstance(m, (SelfAttention, CrossAttention, MoE)):
                m.reference = flag
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_item_tables(self, item_codes: torch.Tensor | None = None,
                        attributes: torch.Tensor | None = None) -> GenerativeRecommender:
        """Fill the per-item buffers the config asks for (a loaded model gets them from its
        safetensors): item_codes (N + 1, L) = ItemCodes.table, for the dense head; attributes
        (N + 1, A) = onerec.eval.item_attributes(...), for model.item_attributes."""
        for name, table, owner in (("item_codes", item_codes, self),
                                   ("attributes", attributes, self.context)):
            if name not in owner._buffers:
                if table is not None:
                    raise ValueError(f"'{name}' given, but the config does not use it")
                continue
            want = owner._buffers[name].shape
            if table is None or tuple(table.shape) != tuple(want):
                raise ValueError(f"the model needs '{name}' of shape {tuple(want)}, got "
                                 f"{None if table is None else tuple(table.shape)}")
            rows = table[1:].to(torch.int64)                                  # row 0 is padding
            high = (torch.tensor(self.codebook_sizes) - 1 if name == "item_codes"
                    else torch.tensor(self.context.attr.num_embeddings - 1)).to(rows.device)
            if bool((rows < 0).any()) or bool((rows > high).any()):
                raise ValueError(f"'{name}' rows 1..N must hold values in 0..{high.tolist()}")
            owner._buffers[name][0] = 0
            owner._buffers[name][1:] = rows
        self._tables_checked = False
        return self

    def _check_item_tables(self) -> None:
        """Once per model (not per step: a device sync): the tables were set or loaded."""
        if getattr(self, "_tables_checked", False):
            return
        for owner, name in ((self, "item_codes"), (self.context, "attributes")):
            if name in owner._buffers and bool((owner._buffers[name][1:] < 0).any()):
                raise ValueError(f"the model's '{name}' table is not set: call set_item_tables "
                                 "(onerec.model.data.catalogue_model does) or load a saved model")
        self._tables_checked = True

    def head_flops(self, target_len: int) -> int:
        """Matmul FLOPs of the output heads for target_len decoder tokens, + the dense head's
        projection and its logits over all N items when the model has one."""
        d = self.cfg.d_model
        flops = sum(linear_flops(1, d, self.codebook_sizes[j % self.n_levels]) for j in range(target_len))
        if self.dense is not None:
            flops += linear_flops(1, d, d) + linear_flops(1, d, self.item_codes.shape[0] - 1)
        if self.repeat is not None:
            flops += linear_flops(1, d, 1)
        return flops

    def bos_state(self, memory: Memory) -> torch.Tensor:
        """(B, D) the decoder's state at BOS: what the first token, and the dense head, read."""
        bos = torch.full((memory.key_mask.shape[0], 1), self.emb.bos_id, device=memory.key_mask.device)
        return self.decode(bos, memory)[0][:, 0]

    def head_logits(self, memory: Memory) -> torch.Tensor:
        """(B, N) the dense head's next-item logits for encoded contexts: item_logits at BOS."""
        return self.item_logits(self.bos_state(memory), memory)

    def item_logits(self, h: torch.Tensor, memory: Memory) -> torch.Tensor:
        """The dense head: h (B, D) decoder states at BOS of `memory`'s contexts -> (B, N)
        next-item logits, column j = item index j + 1. Item vectors: level embeddings of its code
        + its per-item vector; the repeat gate's offset on the context's items when it has one."""
        if self.dense is None:
            raise ValueError("the model has no dense head (model.dense_loss_weight = 0)")
        self._check_item_tables()
        # fp32 even under bf16 autocast: with dense_score_weight ~10, bf16's logit steps (~0.06
        # near 16) would reorder the ranking
        with torch.autocast(h.device.type, enabled=False):
            logits = self.dense(h.float()) @ self.catalogue_vectors().T               # (B, N)
            if self.repeat is None:
                return logits
            if memory.items is None:
                raise ValueError("the model has a repeat gate but the batch has no 'context_items'")
            seen = torch.zeros(logits.shape[0], logits.shape[1] + 1, device=logits.device)
            seen = seen.scatter_(1, memory.items, 1.0)[:, 1:]                           # (B, N) 1 = in context
            return logits + self.repeat(h.float()) * seen

    def catalogue_vectors(self) -> torch.Tensor:
        """(N, D) fp32 item vectors: level embeddings of each item's code + its per-item vector.
        Without autograd (serving, evaluation) they are computed once per version of the weights
        they read (tensor versions change with every optimizer step or load) and then reused."""
        if torch.is_grad_enabled():
            return self._catalogue_vectors()
        sources = [*self.emb.parameters(), *self.context.parameters(), *self.context.buffers(), self.item_codes]
        key = tuple((id(t), t._version) for t in sources)
        if getattr(self, "_vectors_key", None) != key:
            self._vectors, self._vectors_key = self._catalogue_vectors(), key
        return self._vectors

    def _catalogue_vectors(self) -> torch.Tensor:
        items = torch.arange(1, self.item_codes.shape[0], device=self.item_codes.device)    # (N,)
        return (self.emb.items(self.item_codes[1:]) + self.context.item_vectors(items)).float()

    # -- interface for subclasses
    def encode(self, batch: Mapping[str, torch.Tensor]) -> Memory:
        raise NotImplementedError

    def decode(self, ids: torch.Tensor, memory: Memory, cache: KVCache | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def flops_per_sample(self, context_len: int, target_len: int) -> int:
        raise NotImplementedError

    # -- shared
    def embed_targets(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """ids (B, T) at positions start..start+T-1 -> (B, T, D) token + position embeddings."""
        t = ids.shape[1]
        if start + t > self.max_target_len:
            raise ValueError(f"decoding position {start + t - 1} but the model has "
                             f"{self.max_target_len} positions (session_len x levels)")
        pos = torch.arange(start, start + t, device=ids.device)
        return self.drop(self.emb(ids) + self.position(pos))

    def logits(self, h: torch.Tensor, level: int) -> torch.Tensor:
        """h (..., D) hidden states predicting a level-`level` token -> (..., K_level)."""
        return self.heads[level](h)

    def input_ids(self, target: torch.Tensor) -> torch.Tensor:
        """target (B, M, L) -> teacher-forcing decoder input (B, M*L): BOS, then all but the last token."""
        b, m, n_levels = target.shape
        levels = torch.arange(n_levels, device=target.device)
        ids = self.emb.ids(target, levels).reshape(b, m * n_levels)           # (B, M*L)
        bos = torch.full((b, 1), self.emb.bos_id, dtype=ids.dtype, device=ids.device)
        return torch.cat([bos, ids[:, :-1]], dim=1)

    def forward(self, batch: Mapping[str, torch.Tensor]):
        """-> (logits, loss, aux): logits[l] (B, M, K_l) predicts target[:, :, l] (flat position
        m*L + l); loss = mean next-token cross-entropy + moe_aux_coef * MoE load-balance loss
        (+ dense_loss_weight * the dense head's next-item cross-entropy, when it has one);
        aux = {"ce": ..., "moe_aux": ...[, "item_ce": ...]} (detaching is up to the caller)."""
        target = batch["target"]                                              # (B, M, L)
        if target.shape[-1] != self.n_levels:
            raise ValueError(f"target has {target.shape[-1]} levels, the model {self.n_levels}")
        self._check_item_tables()
        memory = self.encode(batch)
        h, moe_aux = self.decode(self.input_ids(target), memory)              # (B, M*L, D)
        tmask = batch.get("target_mask")
        ce, count, logits = h.new_zeros(()), 0, []
        for level in range(self.n_levels):
            lg = self.logits(h[:, level::self.n_levels], level)               # (B, M, K_l)
            logits.append(lg)
            nll = F.cross_entropy(lg.flatten(0, 1).float(), target[:, :, level].flatten(),
                                  reduction="none")                           # (B*M,)
            if tmask is not None:
                nll = nll * tmask.flatten().to(nll.dtype)
            ce = ce + nll.sum()
            count += nll.numel() if tmask is None else tmask.sum()
        ce = ce / torch.as_tensor(count, device=ce.device).clamp(min=1)
        loss = ce + self.moe_aux_coef * moe_aux
        parts = {"ce": ce, "moe_aux": moe_aux}
        if self.dense is not None:  # the next item (the session's first) from the BOS state
            if batch.get("target_items") is None:
                raise ValueError("the model has a dense head but the batch has no 'target_items'")
            item_ce = F.cross_entropy(self.item_logits(h[:, 0], memory), batch["target_items"][:, 0] - 1,
                                      ignore_index=-1)                        # 0 = padding
            loss = loss + self.cfg.dense_loss_weight * item_ce
            parts["item_ce"] = item_ce
        return logits, loss, parts
