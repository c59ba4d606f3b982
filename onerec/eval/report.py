"""`onerec eval`: OneRec against popularity and SASRec, trained and tested in the same run.

    figures = run_eval(cfg, out_dir)                  # trains OneRec into out_dir/onerec
    figures = run_eval(cfg, out_dir, model_dir=path)  # tests a model `onerec train` saved

All three see the same leave-last-out split of cfg.data: trained on the train part, selected
(early stopping) on the valid item, tested on the last item with train + valid as input, ranked
against every item. History items stay in the ranking: the published protocol. Where the data
set is one the papers used, their numbers are printed beside ours (PUBLISHED). A hybrid model
(a dense head whose score joins the beam's, see onerec.model.common) also gets two ablation
rows, the same weights ranked by the beam alone and by the head alone; "OneRec beats SASRec"
is decided by the model's own ranking, not by an ablation.

A second table ranks the same models with the history's items masked (`exclude_history`): a
model that learned not to repeat the history (OneRec's repeat gate) gains little there, one
that did not gains the most, so the two tables together say how much of a lead is that alone.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import torch

from onerec.config import Config
from onerec.eval.baselines import Popularity, SASRec, item_attributes, offline_data
from onerec.eval.metrics import evaluate

KS = (5, 10)
COLUMNS = ("recall@5", "ndcg@5", "recall@10", "ndcg@10", "coverage@10")
TARGET = "TIGER"  # the bar issue 5 aims at

# Full ranking, leave-last-out (DESIGN.md, "Quality bars"). TIGER: Rajput et al., "Recommender
# Systems with Generative Retrieval", NeurIPS 2023, Table 1, which also reports SASRec.
PUBLISHED = {
    "amazon-beauty": {
        "TIGER": {"recall@5": 0.0454, "ndcg@5": 0.0321, "recall@10": 0.0648, "ndcg@10": 0.0384},
        "SASRec": {"recall@10": 0.0605, "ndcg@10": 0.0318},
    },
}


def run_eval(cfg: Config, out_dir: str | Path, *, model_dir: str | Path | None = None,
             progress: bool = True) -> dict:
    """Train (or load) OneRec, popularity and SASRec on cfg's data; print one table; return the
    figures (also written to out_dir/eval.json)."""
    from onerec.model.data import ItemCodes
    from onerec.model.train import evaluate_model, load_model, run_training

    out = Path(out_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = None
    if model_dir is not None:  # before minutes of baseline training, so a bad path fails at once
        loaded = load_model(model_dir, device)
        if loaded[1] is None:
            raise ValueError(f"{model_dir} holds no tokenizer/: save the model with its tokenizer")
    out.mkdir(parents=True, exist_ok=True)
    data = offline_data(cfg.data)
    test = data.seqs.for_test()
    rows: dict[str, dict] = {}

    masked: dict[str, dict] = {}

    def rank(name: str, score_fn) -> None:  # both protocols
        rows[name], masked[name] = (evaluate(score_fn, None, test.histories, test.targets, len(data.index),
                                             ks=KS, batch_size=cfg.eval.batch_size, exclude_history=ex)
                                    for ex in (False, True))

    rank("Popularity", Popularity(len(data.index)).fit(test.histories).score)  # counts the test input may use

    t0 = time.perf_counter()
    sas_cfg = cfg.eval.sasrec
    attrs = item_attributes(data.dataset.items, data.index) if sas_cfg.use_attributes else None
    sasrec = SASRec(len(data.index), sas_cfg, attributes=attrs, seed=cfg.seed)
    sasrec.fit(data.seqs.train, data.seqs.for_validation(), progress=progress and sys.stderr.isatty())
    sasrec_s = time.perf_counter() - t0
    rank("SASRec", sasrec.score)
    rows["SASRec"]["train_s"] = sasrec_s

    trained = None
    if model_dir is None:  # train it here; run_training tests it on the same split
        trained = run_training(cfg, out / "onerec", progress=progress)
        model_dir = out / "onerec"
        loaded = load_model(model_dir, device)  # the masked protocol and the ablations rank it again
    model, tok = loaded
    codes = ItemCodes.from_tokenizer(tok, data.index)
    name = f"OneRec-{model.arch.upper()}"
    for table, ex in ((rows, False), (masked, True)):
        if trained is not None and not ex:
            table[name] = {**{c: trained[f"test_{c}"] for c in COLUMNS},
                           "train_s": trained["tokenizer_s"] + trained["train_s"]}
        else:
            table[name] = evaluate_model(model, codes, test, cfg.train.beam_size, cfg.eval.batch_size,
                                         ks=KS, exclude_history=ex)
        ablations = _hybrid_ablations(cfg, model, codes, test, exclude_history=ex)
        table.update({f"{name}: {part}": m for part, m in ablations.items()})

    published = PUBLISHED.get(cfg.data.dataset, {})
    print(format_table(cfg, rows, published, len(test.targets), len(data.index)))
    print(format_table(cfg, masked, {}, len(test.targets), len(data.index), history="masked"))
    best = name  # the ablation rows are parts of it, not variants
    figures = {"preset": cfg.preset, "dataset": cfg.data.dataset, "users": len(test.targets),
               "items": len(data.index), "protocol": "leave-last-out, full ranking, history kept",
               "model_dir": str(model_dir)}
    for table, suffix in ((rows, ""), (masked, "_masked")):  # *_masked_*: the history masked
        for model_name, metrics in table.items():
            key = re.sub(r"[^a-z0-9]+", "_", model_name.lower()).strip("_") + suffix  # -> onerec_v2_beam_only
            figures.update({f"{key}_{m}": round(float(v), 4) for m, v in metrics.items() if m in COLUMNS})
            if "train_s" in metrics:
                figures[f"{key}_train_s"] = round(metrics["train_s"], 1)
        figures[f"onerec_beats_sasrec{suffix}"] = bool(
            table[best]["ndcg@10"] > table["SASRec"]["ndcg@10"] and
            table[best]["recall@10"] > table["SASRec"]["recall@10"])
    for m, v in published.get(TARGET, {}).items():
        figures[f"gap_to_{TARGET.lower()}_{m}"] = round(float(rows[best][m]) - v, 4)
    if trained is not None:
        figures["onerec_train_figures"] = {k: trained[k] for k in ("steps", "epochs", "stopped",
                                                                  "samples_per_s", "train_s")}
    (out / "eval.json").write_text(json.dumps(figures, indent=1) + "\n")
    return figures


def _hybrid_ablations(cfg: Config, model, codes, test, exclude_history: bool) -> dict[str, dict]:
    """For a model whose ranking fuses beam search with its dense head: the same weights ranked
    by the beam alone (dense_score_weight 0) and by the head alone, so the table shows what
    each part brings. {} for any other model."""
    import dataclasses

    from onerec.model.train import evaluate_dense_head, evaluate_model

    if model.dense is None or model.cfg.dense_score_weight == 0:
        return {}
    hybrid_cfg = model.cfg
    model.cfg = dataclasses.replace(hybrid_cfg, dense_score_weight=0.0)
    try:
        beam = evaluate_model(model, codes, test, cfg.train.beam_size, cfg.eval.batch_size, ks=KS,
                              exclude_history=exclude_history)
    finally:
        model.cfg = hybrid_cfg
    head = evaluate_dense_head(model, codes, test, cfg.eval.batch_size, ks=KS, exclude_history=exclude_history)
    return {"beam only": beam, "head only": head}


def format_table(cfg: Config, rows: dict[str, dict], published: dict[str, dict], n_users: int,
                 n_items: int, history: str = "kept") -> str:
    """One table: our models (this run) first, then the published figures, '-' where none."""
    head = f"{'model':<34}" + "".join(f"{c:>12}" for c in COLUMNS) + f"{'train s':>10}"
    lines = [f"{cfg.data.dataset}: {n_users} users, full ranking over {n_items} items, leave-last-out "
             f"(history items {history}), preset {cfg.preset}", head, "-" * len(head)]
    for name, metrics in rows.items():
        seconds = f"{metrics['train_s']:>10.0f}" if "train_s" in metrics else f"{'-':>10}"
        lines.append(f"{name + ' (this run)':<34}" + "".join(f"{metrics[c]:>12.4f}" for c in COLUMNS) + seconds)
    for name, metrics in published.items():
        lines.append(f"{name + ' (published)':<34}" +
                     "".join(f"{metrics[c]:>12.4f}" if c in metrics else f"{'-':>12}" for c in COLUMNS))
    return "\n".join(lines)
