"""Semantic-ID tokenizer: item embeddings -> balanced RQ-KMeans codes -> prefix trie.

    from onerec.tokenizer import SemanticIdTokenizer, item_embeddings

    item_ids, emb = item_embeddings(ds.interactions, ds.items, dim=64, seed=cfg.seed)
    tok = SemanticIdTokenizer.fit(item_ids, emb, cfg.tokenizer.levels, cfg.tokenizer.codebook_size)
    trie = tok.trie()                    # CodeTrie for constrained decoding
    tok.save(out_dir)                    # tokenizer.safetensors + tokenizer.json
"""
from onerec.tokenizer.embeddings import item_embeddings
from onerec.tokenizer.rqkmeans import (
    SemanticIdTokenizer,
    TokenizerError,
    balanced_assign,
    balanced_assign_reference,
    scaled_codebook_size,
)
from onerec.tokenizer.trie import CodeTrie, DictTrie

__all__ = [
    "CodeTrie", "DictTrie", "SemanticIdTokenizer", "TokenizerError", "balanced_assign",
    "balanced_assign_reference", "item_embeddings", "scaled_codebook_size",
]
