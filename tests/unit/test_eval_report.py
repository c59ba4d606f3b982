"""`onerec eval` end to end on the debug preset, and its table."""
import json

import pytest

from onerec.cli import main
from onerec.config import load_config
from onerec.eval.report import COLUMNS, PUBLISHED, format_table
from tests.conftest import data_root


def test_eval_trains_all_three_then_tests_a_saved_model_the_same(tmp_path, capsys):
    args = ["eval", "--preset", "debug", "--set", f"data.root={data_root()}", "--set", "train.epochs=1"]
    assert main([*args, "--out", str(tmp_path / "a"), "--json", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures == json.loads((tmp_path / "a.json").read_text())
    # debug's model is the hybrid: the table also shows its beam and its dense head alone
    for model in ("popularity", "sasrec", "onerec_v2", "onerec_v2_beam_only", "onerec_v2_head_only"):
        for column in COLUMNS:
            assert 0.0 <= figures[f"{model}_{column}"] <= 1.0, (model, column)
    assert figures["onerec_v2_recall@10"] > 0 and figures["users"] == 100
    assert "OneRec-V2 (this run)" in out and "published" not in out  # ml-100k: no published row
    assert "OneRec-V2: beam only (this run)" in out and "OneRec-V2: head only (this run)" in out
    # the second table: the same models with the history masked, which can only move a target up
    assert "(history items masked)" in out and isinstance(figures["onerec_beats_sasrec_masked"], bool)
    for model in ("popularity", "sasrec", "onerec_v2", "onerec_v2_head_only"):
        assert figures[f"{model}_masked_recall@10"] >= figures[f"{model}_recall@10"], model
    assert figures["popularity_masked_recall@10"] > figures["popularity_recall@10"]  # it ranks history first
    # the saved model, tested again through --model, gives the same figures
    assert main([*args, "--out", str(tmp_path / "b"), "--model", figures["model_dir"]]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k: v for k, v in again.items() if k.startswith("onerec_v2_") and "train_s" not in k} == \
        {k: v for k, v in figures.items() if k.startswith("onerec_v2_") and "train_s" not in k}


def test_eval_rejects_a_model_dir_without_a_model(tmp_path):
    cfg = load_config("debug", [f"data.root={data_root()}", "eval.sasrec.max_epochs=1"])
    from onerec.eval.report import run_eval
    from onerec.model.train import CheckpointError

    with pytest.raises(CheckpointError, match="hparams.json"):
        run_eval(cfg, tmp_path / "out", model_dir=tmp_path / "nothing-here", progress=False)


def test_table_puts_published_numbers_beside_ours():
    cfg = load_config("debug", ["data.dataset=amazon-beauty"])
    ours = {c: 0.01 * (i + 1) for i, c in enumerate(COLUMNS)}
    table = format_table(cfg, {"SASRec": {**ours, "train_s": 12.0}}, PUBLISHED["amazon-beauty"], 10, 20)
    lines = table.splitlines()
    assert "history items kept" in lines[0]
    tiger = next(line for line in lines if line.startswith("TIGER (published)"))
    assert tiger.split()[2:] == ["0.0454", "0.0321", "0.0648", "0.0384", "-"]
    sasrec_published = next(line for line in lines if line.startswith("SASRec (published)"))
    assert sasrec_published.split()[2:] == ["-", "-", "0.0605", "0.0318", "-"]
    assert next(line for line in lines if line.startswith("SASRec (this run)")).split()[-1] == "12"
