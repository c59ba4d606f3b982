"""OneRec V2: lazy decoder-only. Compute goes to the generated tokens, not the context.

    context events -> ContextEmbedding -> RMSNorm -> ONE K/V projection (GQA: n_kv_heads)
                   = the keys/values every layer's cross-attention reads (no encoder)
    [BOS, t_0, .., t_{ML-2}] -> n_layers x Block -> RMSNorm -> per-level heads

Block = cross-attention to the shared K/V -> causal self-attention -> FFN (MoE when
n_experts > 0); pre-norm residual blocks with RMSNorm.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from onerec.config import ModelConfig

from .common import (
    GenerativeRecommender,
    Memory,
    attention_core_flops,
    ffn_flops,
    linear_flops,
)
from .layers import CrossAttention, KVCache, KVProjection, RMSNorm, SelfAttention, build_ffn


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, hidden: int, n_experts: int,
                 top_k: int, activation: str, dropout: float):
        super().__init__()
        self.norm_cross = RMSNorm(d_model)
        self.cross_attn = CrossAttention(d_model, n_heads, dropout)
        self.norm_self = RMSNorm(d_model)
        self.self_attn = SelfAttention(d_model, n_heads, n_kv_heads, dropout, causal=True)
        self.norm_ffn = RMSNorm(d_model)
        self.ffn = build_ffn(d_model, hidden, n_experts, top_k, activation, dropout)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor,
                cache: KVCache | None, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.cross_attn(self.norm_cross(x), k, v, key_mask)          # (B, T, D)
        x = x + self.self_attn(self.norm_self(x), cache=cache, layer=layer)
        y, aux = self.ffn(self.norm_ffn(x))
        return x + y, aux


class OneRecV2(GenerativeRecommender):
    """Extra knobs: see GenerativeRecommender (n_kv_heads sets the GQA group of both the shared
    context K/V and the decoder self-attention)."""

    arch = "v2"

    def __init__(self, cfg: ModelConfig, **extra):
        super().__init__(cfg, **extra)
        d = cfg.d_model
        self.norm_ctx = RMSNorm(d)
        self.context_kv = KVProjection(d, self.n_kv_heads, d // cfg.n_heads)  # shared by all layers
        self.blocks = nn.ModuleList(
            Block(d, cfg.n_heads, self.n_kv_heads, self.ffn_hidden, cfg.n_experts,
                  cfg.top_k_experts, self.activation, cfg.dropout)
            for _ in range(cfg.n_layers))
        self.norm_f = RMSNorm(d)
        self._init_weights()

    def encode(self, batch: Mapping[str, torch.Tensor]) -> Memory:
        x, mask = self.context(self.emb, batch)                               # (B, S', D), (B, S')
        k, v = self.context_kv(self.norm_ctx(self.drop(x)))                   # (B, Hkv, S', hd) each
        return Memory([(k, v)], mask, batch.get("context_items"))

    def decode(self, ids: torch.Tensor, memory: Memory, cache: KVCache | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, T) shared-vocabulary ids, continuing `cache` if given -> (h (B, T, D), aux)."""
        x = self.embed_targets(ids, 0 if cache is None else cache.length())   # (B, T, D)
        k, v = memory.layer(0)
        aux = x.new_zeros(())
        for i, block in enumerate(self.blocks):
            x, a = block(x, k, v, memory.key_mask, cache, i)
            aux = aux + a
        return self.norm_f(x), aux / len(self.blocks)

    def flops_per_sample(self, context_len: int, target_len: int) -> int:
        """Matmul FLOPs of one forward pass: context_len events (+1 start token), target_len
        decoder tokens (= items x levels). The context costs one K/V projection, once."""
        cfg, d = self.cfg, self.cfg.d_model
        s, t = context_len + 1, target_len
        kv_dim = 2 * self.n_kv_heads * (d // cfg.n_heads)
        swiglu = self.activation == "swiglu"
        flops = linear_flops(context_len, self.n_side_features, d) + linear_flops(1, self.n_user_features, d)
        flops += linear_flops(s, d, kv_dim)                                   # the shared K/V
        block = (linear_flops(t, d, d) + attention_core_flops(t, s, d) + linear_flops(t, d, d)  # cross
                 + linear_flops(t, d, d) + linear_flops(t, d, kv_dim) + attention_core_flops(t, t, d)
                 + linear_flops(t, d, d)                                      # self-attention
                 + ffn_flops(t, d, self.ffn_hidden, swiglu, cfg.n_experts, cfg.top_k_experts))
        heads = self.head_flops(t)
        return flops + cfg.n_layers * block + heads
