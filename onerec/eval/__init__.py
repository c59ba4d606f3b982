"""Offline evaluation: full-ranking leave-last-out metrics and the baselines OneRec must beat.

    from onerec.eval import ItemIndex, Popularity, SASRec, SASRecConfig, evaluate, user_sequences
"""
from onerec.eval.baselines import (
    EvalSet,
    ItemIndex,
    Popularity,
    SASRec,
    SASRecConfig,
    UserSequences,
    item_attributes,
    user_sequences,
)
from onerec.eval.metrics import (
    coverage,
    evaluate,
    mask_scores,
    ndcg_at_k,
    rank_of_target,
    recall_at_k,
)

__all__ = [
    "EvalSet", "ItemIndex", "Popularity", "SASRec", "SASRecConfig", "UserSequences", "coverage",
    "evaluate", "item_attributes", "mask_scores", "ndcg_at_k", "rank_of_target", "recall_at_k",
    "user_sequences",
]
