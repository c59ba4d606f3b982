"""OneRec models: V1 (encoder-decoder + MoE), V2 (lazy decoder-only), constrained beam search.

    model = build_model(cfg.model, codebook_sizes=tok.codebook_sizes)   # knobs from cfg.model
    model = catalogue_model(cfg.model, tok, index, ds.items)   # same, + the per-item tables it asks for
    logits, loss, aux = model(batch)                      # batch format: see common.py
    items, scores = topk_next_items(model, batch, trie.allowed, trie.item_of, beam_size=20, k=10)

Training (`data.py`: examples and batches; `train.py`: the loop, checkpoints, saved models):

    data = build_examples(seqs.train, ItemCodes.from_tokenizer(tok, index), S, M)
    result = onerec.model.train.train(model, data, cfg.train, valid=seqs.for_validation())
    save_model(model, out, tokenizer=tok); model, tok = load_model(out)

Those names load on first use (PEP 562), so importing the models stays light (no pandas,
scikit-learn or tqdm). `onerec.model.train` is the module; its `train` function is not
re-exported (the name is taken by the module).
"""
from __future__ import annotations

import importlib

from onerec.config import ModelConfig

from .beam import dict_trie, generate, reference_beam_search, reference_topk_next_items, topk_next_items
from .common import GenerativeRecommender, Memory
from .layers import KVCache, MoE, RMSNorm, attend
from .v1 import OneRecV1
from .v2 import OneRecV2

ARCHS = {"v1": OneRecV1, "v2": OneRecV2}


def build_model(cfg: ModelConfig, **extra) -> GenerativeRecommender:
    """The model for cfg.arch, from the config alone: build_model(cfg.model, codebook_sizes=...).

    `extra`: codebook_sizes (required, the tokenizer's); the other knobs come from cfg (n_kv_heads,
    ffn_mult, activation, moe_aux_coef, n_encoder_layers for v1) unless given here, which wins:
    n_kv_heads, n_side_features, n_user_features, ffn_mult, activation, moe_aux_coef, and
    n_encoder_layers (v1 only)."""
    if cfg.arch not in ARCHS:
        raise ValueError(f"model.arch '{cfg.arch}': choose one of {', '.join(ARCHS)}")
    if cfg.arch != "v1" and extra.pop("n_encoder_layers", None) is not None:
        raise ValueError("n_encoder_layers applies to arch v1 only (v2 has no encoder)")
    from_cfg = {"n_kv_heads": cfg.n_kv_heads or None, "ffn_mult": cfg.ffn_mult,
                "activation": cfg.activation, "moe_aux_coef": cfg.moe_aux_coef}
    if cfg.arch == "v1":
        from_cfg["n_encoder_layers"] = cfg.n_encoder_layers or None
    return ARCHS[cfg.arch](cfg, **{**from_cfg, **extra})


_LAZY = {
    "ItemCodes": "data", "TrainExamples": "data", "build_examples": "data", "catalogue_model": "data",
    "context_batch": "data", "fit_tokenizer": "data",
    "CheckpointError": "train", "Tracker": "train", "TrainResult": "train", "evaluate_model": "train",
    "load_model": "train", "lr_at": "train", "run_training": "train", "save_model": "train",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [  # with the lazy names of _LAZY
    "ARCHS", "CheckpointError", "GenerativeRecommender", "ItemCodes", "KVCache", "Memory", "MoE",
    "OneRecV1", "OneRecV2", "RMSNorm", "Tracker", "TrainExamples", "TrainResult", "attend",
    "build_examples", "build_model", "catalogue_model", "context_batch", "dict_trie", "evaluate_model", "fit_tokenizer",
    "generate", "load_model", "lr_at", "reference_beam_search", "reference_topk_next_items",
    "run_training", "save_model", "topk_next_items",
]
