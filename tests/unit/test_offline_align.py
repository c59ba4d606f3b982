"""`onerec align` end to end on the debug slice: a reward model from the seen ratings, ECPO on a
saved model, the aligned model saved and servable, champion and aligned side by side."""
from __future__ import annotations

import torch

from onerec.config import load_config
from onerec.eval.baselines import offline_data
from onerec.model.data import catalogue_model, fit_tokenizer
from onerec.model.train import load_model, save_model
from onerec.rl.offline import align_saved_model


def test_align_a_saved_model_and_check_it_on_held_out_ratings(tmp_path, one_torch_thread):
    cfg = load_config("debug", ["align.steps=4", "align.lr=1e-3", "reward_model.epochs=3"])
    data = offline_data(cfg.data)
    tok = fit_tokenizer(data.split.train, data.dataset.items, cfg.tokenizer, cfg.seed)
    torch.manual_seed(0)
    champion = save_model(catalogue_model(cfg.model, tok, data.index, data.dataset.items), tmp_path / "champion",
                          tokenizer=tok)
    report = align_saved_model(cfg, champion, tmp_path / "aligned")
    model, aligned_tok = load_model(report["aligned_model"])
    assert aligned_tok is not None and aligned_tok.codebook_sizes == tok.codebook_sizes
    before, _ = load_model(champion)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.state_dict().values()))
    for name in ("champion", "aligned"):
        assert report[f"{name}_rated_in_holdout@10"] >= 0 and -1 <= report[f"{name}_expected_reward@10"] <= 1
    assert 0 <= report["reward_model_auc"] <= 1 and report["reward_source"] == "ratings"
    assert report["final_kl"] >= 0 and report["align_steps"] == 4
