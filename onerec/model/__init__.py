"""OneRec models: V1 (encoder-decoder + MoE), V2 (lazy decoder-only), constrained beam search.

    model = build_model(cfg.model, codebook_sizes=tok.codebook_sizes, n_kv_heads=1)
    logits, loss, aux = model(batch)                      # batch format: see common.py
    items, scores = topk_next_items(model, batch, trie.allowed, trie.item_of, beam_size=20, k=10)
"""
from __future__ import annotations

from onerec.config import ModelConfig

from .beam import dict_trie, generate, reference_beam_search, topk_next_items
from .common import GenerativeRecommender, Memory
from .layers import KVCache, MoE, RMSNorm, attend
from .v1 import OneRecV1
from .v2 import OneRecV2

ARCHS = {"v1": OneRecV1, "v2": OneRecV2}


def build_model(cfg: ModelConfig, **extra) -> GenerativeRecommender:
    """The model for cfg.arch; `extra`: codebook_sizes (required), n_kv_heads, n_side_features,
    n_user_features, ffn_mult, activation, moe_aux_coef, and n_encoder_layers (v1 only)."""
    if cfg.arch not in ARCHS:
        raise ValueError(f"model.arch '{cfg.arch}': choose one of {', '.join(ARCHS)}")
    if cfg.arch != "v1" and extra.pop("n_encoder_layers", None) is not None:
        raise ValueError("n_encoder_layers applies to arch v1 only (v2 has no encoder)")
    return ARCHS[cfg.arch](cfg, **extra)


__all__ = [
    "ARCHS", "GenerativeRecommender", "KVCache", "Memory", "MoE", "OneRecV1", "OneRecV2", "RMSNorm",
    "attend", "build_model", "dict_trie", "generate", "reference_beam_search", "topk_next_items",
]
