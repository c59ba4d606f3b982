"""OneRec V1: encoder-decoder with an MoE decoder FFN, generating a session of items.

    context events -> ContextEmbedding -> n_encoder_layers x EncoderBlock -> RMSNorm -> memory
    memory -> each decoder layer's own K/V projection (computed once per request)
    [BOS, t_0, .., t_{ML-2}] -> n_layers x DecoderBlock -> RMSNorm -> per-level heads

EncoderBlock = self-attention (bidirectional, key padding mask) -> dense FFN.
DecoderBlock = causal self-attention -> cross-attention to the encoder output -> FFN (MoE when
n_experts > 0). Pre-norm residual blocks with RMSNorm throughout.
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


class EncoderBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, hidden: int, activation: str,
                 dropout: float):
        super().__init__()
        self.norm_attn = RMSNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, n_kv_heads, dropout, causal=False)
        self.norm_ffn = RMSNorm(d_model)
        self.ffn = build_ffn(d_model, hidden, 0, 0, activation, dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_attn(x), key_mask=key_mask)               # (B, S, D)
        return x + self.ffn(self.norm_ffn(x))[0]


class DecoderBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, hidden: int, n_experts: int,
                 top_k: int, activation: str, dropout: float):
        super().__init__()
        self.norm_self = RMSNorm(d_model)
        self.self_attn = SelfAttention(d_model, n_heads, n_kv_heads, dropout, causal=True)
        self.cross_kv = KVProjection(d_model, n_kv_heads, d_model // n_heads)  # applied to memory
        self.norm_cross = RMSNorm(d_model)
        self.cross_attn = CrossAttention(d_model, n_heads, dropout)
        self.norm_ffn = RMSNorm(d_model)
        self.ffn = build_ffn(d_model, hidden, n_experts, top_k, activation, dropout)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor,
                cache: KVCache | None, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.self_attn(self.norm_self(x), cache=cache, layer=layer)   # (B, T, D)
        x = x + self.cross_attn(self.norm_cross(x), k, v, key_mask)
        y, aux = self.ffn(self.norm_ffn(x))
        return x + y, aux


class OneRecV1(GenerativeRecommender):
    """Extra knob: n_encoder_layers (default cfg.n_layers); the rest: see GenerativeRecommender."""

    arch = "v1"

    def __init__(self, cfg: ModelConfig, *, n_encoder_layers: int | None = None, **extra):
        super().__init__(cfg, **extra)
        self.n_encoder_layers = cfg.n_layers if n_encoder_layers is None else n_encoder_layers
        self._extra["n_encoder_layers"] = self.n_encoder_layers
        d, h, hkv = cfg.d_model, cfg.n_heads, self.n_kv_heads
        self.encoder = nn.ModuleList(
            EncoderBlock(d, h, hkv, self.ffn_hidden, self.activation, cfg.dropout)
            for _ in range(self.n_encoder_layers))
        self.norm_enc = RMSNorm(d)
        self.decoder = nn.ModuleList(
            DecoderBlock(d, h, hkv, self.ffn_hidden, cfg.n_experts, cfg.top_k_experts,
                         self.activation, cfg.dropout)
            for _ in range(cfg.n_layers))
        self.norm_f = RMSNorm(d)
        self._init_weights()

    def encode(self, batch: Mapping[str, torch.Tensor]) -> Memory:
        x, mask = self.context(self.emb, batch)                               # (B, S', D), (B, S')
        x = self.drop(x)
        for block in self.encoder:
            x = block(x, mask)
        x = self.norm_enc(x)                                                  # (B, S', D)
        kv = [block.cross_kv(x) for block in self.decoder]                   # per layer (B, Hkv, S', hd)
        return Memory(kv, mask, batch.get("context_items"))

    def decode(self, ids: torch.Tensor, memory: Memory, cache: KVCache | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, T) shared-vocabulary ids, continuing `cache` if given -> (h (B, T, D), aux)."""
        x = self.embed_targets(ids, 0 if cache is None else cache.length())   # (B, T, D)
        aux = x.new_zeros(())
        for i, block in enumerate(self.decoder):
            k, v = memory.layer(i)
            x, a = block(x, k, v, memory.key_mask, cache, i)
            aux = aux + a
        return self.norm_f(x), aux / len(self.decoder)

    def flops_per_sample(self, context_len: int, target_len: int) -> int:
        """Matmul FLOPs of one forward pass: context_len events (+1 start token), target_len
        decoder tokens (= items x levels). See common.py for what is counted."""
        cfg, d = self.cfg, self.cfg.d_model
        s, t = context_len + 1, target_len
        kv_dim = 2 * self.n_kv_heads * (d // cfg.n_heads)
        swiglu = self.activation == "swiglu"
        flops = linear_flops(context_len, self.n_side_features, d) + linear_flops(1, self.n_user_features, d)
        enc = (linear_flops(s, d, d) + linear_flops(s, d, kv_dim) + attention_core_flops(s, s, d)
               + linear_flops(s, d, d) + ffn_flops(s, d, self.ffn_hidden, swiglu, 0, 0))
        dec = (linear_flops(t, d, d) + linear_flops(t, d, kv_dim) + attention_core_flops(t, t, d)
               + linear_flops(t, d, d)                                        # self-attention
               + linear_flops(t, d, d) + linear_flops(s, d, kv_dim)           # cross q, own k/v
               + attention_core_flops(t, s, d) + linear_flops(t, d, d)
               + ffn_flops(t, d, self.ffn_hidden, swiglu, cfg.n_experts, cfg.top_k_experts))
        heads = self.head_flops(t)
        return flops + self.n_encoder_layers * enc + cfg.n_layers * dec + heads
