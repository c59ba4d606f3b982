"""OneRec training: example building, the LR schedule, learning (both archs), constrained decoding
after training, checkpoint resume == uninterrupted, corrupted checkpoints, determinism, saved
models, config plumbing and MLflow. Tiny synthetic data; each test takes seconds on a CPU."""
from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import math
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from onerec.cli import build_parser
from onerec.config import (
    ConfigError,
    ModelConfig,
    TokenizerConfig,
    TrainConfig,
    load_config,
)
from onerec.eval import EvalSet
from onerec.model import OneRecV1, build_model, generate, topk_next_items
from onerec.model.common import GenerativeRecommender
from onerec.model.data import ItemCodes, build_examples, catalogue_model, context_batch, fit_tokenizer
from onerec.model.train import (
    CHECKPOINT_META,
    CHECKPOINT_TENSORS,
    CheckpointError,
    Tracker,
    evaluate_model,
    load_model,
    lr_at,
    param_groups,
    save_model,
    train,
)
from onerec.tokenizer import SemanticIdTokenizer

N_ITEMS, SIZES = 24, [4, 4, 3]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def item_codes(seed: int = 0) -> ItemCodes:
    """N_ITEMS distinct codes out of the 48 in SIZES: half the code space is no item's."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(math.prod(SIZES), generator=g)[:N_ITEMS]
    codes = torch.stack([flat // 12, flat // 3 % 4, flat % 3], dim=1)                 # (N, 3)
    return ItemCodes(torch.cat([torch.full((1, 3), -1), codes]), list(SIZES))


def cycle_sequences(n_users: int = 6, length: int = 10, seed: int = 0):
    """Walks along one fixed cycle through all items: the next item is a function of the last one.
    -> (train sequences, next item after each: the validation target)."""
    order = np.random.default_rng(seed).permutation(N_ITEMS) + 1                       # items 1..N
    walks = [order[(4 * u + np.arange(length + 1)) % N_ITEMS] for u in range(n_users)]
    return [w[:-1] for w in walks], np.array([w[-1] for w in walks])


def model_config(arch: str = "v2", **kw) -> ModelConfig:
    base = {"arch": arch, "d_model": 32, "n_heads": 4, "n_layers": 2, "n_experts": 2, "top_k_experts": 1,
            "max_seq_len": 6, "session_len": 2, "dropout": 0.0, "n_kv_heads": 2, "n_encoder_layers": 1}
    return ModelConfig(**{**base, **kw})


def train_config(**kw) -> TrainConfig:
    base = {"batch_size": 16, "lr": 5e-3, "weight_decay": 0.0, "betas": (0.9, 0.98), "warmup_steps": 10,
            "epochs": 40, "grad_clip": 1.0, "eval_every": 0, "patience": 0, "beam_size": 10,
            "time_budget_s": 0.0, "num_threads": 0, "checkpoint_every": 0, "valid_users": 0}
    return TrainConfig(**{**base, **kw})


def setup(arch: str = "v2", seed: int = 0, **model_kw):
    codes = item_codes()
    seqs, targets = cycle_sequences()
    data = build_examples(seqs, codes, max_seq_len=6, session_len=2)
    valid = EvalSet(np.arange(len(seqs)), seqs, targets)
    torch.manual_seed(seed)
    model = build_model(model_config(arch, **model_kw), codebook_sizes=SIZES)
    return model, data, valid


def weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- data


def test_examples_from_a_hand_made_sequence():
    codes = item_codes()
    data = build_examples([np.array([1, 2, 3, 4]), np.array([5, 6]), np.array([7])], codes,
                          max_seq_len=2, session_len=2)
    assert len(data) == 3 + 1                                   # positions t >= 1; [7] gives none
    b = data.batch(torch.arange(len(data)))
    assert b["context"].shape == (4, 2, 3) and b["context_mask"].shape == (4, 2)
    assert b["target"].shape == (4, 2, 3) and b["target_mask"].shape == (4, 2)
    t = codes.table
    # user 0, t=1: context [pad, 1] -> target [2, 3]
    assert b["context_mask"][0].tolist() == [False, True]
    assert torch.equal(b["context"][0], torch.stack([t[0], t[1]])) and (b["context"][0, 0] == -1).all()
    assert torch.equal(b["target"][0], torch.stack([t[2], t[3]])) and b["target_mask"][0].all()
    # user 0, t=3: context [2, 3] (the last max_seq_len) -> target [4, cut short]
    assert torch.equal(b["context"][2], torch.stack([t[2], t[3]])) and b["context_mask"][2].all()
    assert b["target_mask"][2].tolist() == [True, False]
    assert torch.equal(b["target"][2, 0], t[4]) and (b["target"][2, 1] == 0).all()  # padding: a valid token
    # user 1, t=1: never crosses into user 0's items
    assert b["context_mask"][3].tolist() == [False, True] and torch.equal(b["context"][3, 1], t[5])
    assert torch.equal(b["target"][3, 0], t[6]) and b["target_mask"][3].tolist() == [True, False]
    # the dense head's labels: the same items as the codes, 0 where the session was cut short
    assert b["target_items"].tolist() == [[2, 3], [3, 4], [4, 0], [6, 0]]
    # a batch of short examples only is trimmed to what it needs
    short = data.batch(torch.tensor([0]))
    assert short["context"].shape == (1, 1, 3) and short["target"].shape == (1, 2, 3)


def test_examples_reject_bad_input_and_shuffle_by_seed():
    codes = item_codes()
    with pytest.raises(ValueError, match=r"item indices 1\.\.24"):
        build_examples([np.array([0, 1])], codes, 4, 2)
    with pytest.raises(ValueError, match="2 or more items"):
        build_examples([np.array([3])], codes, 4, 2)
    data = build_examples(cycle_sequences()[0], codes, 6, 2)
    a, b, c = (torch.cat(data.epoch_batches(16, e, s)) for e, s in ((0, 0), (0, 0), (1, 0)))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert sorted(a.tolist()) == list(range(len(data)))


def test_context_batch_keeps_the_newest_items_left_padded():
    codes = item_codes()
    ctx = context_batch([[1, 2, 3, 4, 5], [6], []], codes, max_seq_len=3)
    assert ctx["context"].shape == (3, 3, 3)
    assert ctx["context_mask"].tolist() == [[True] * 3, [False, False, True], [False] * 3]
    assert torch.equal(ctx["context"][0], codes.table[[3, 4, 5]])
    assert torch.equal(ctx["context"][1, 2], codes.table[6]) and (ctx["context"][2] == -1).all()
    assert ctx["context_items"].tolist() == [[3, 4, 5], [0, 0, 6], [0, 0, 0]]     # 0 = padding


def test_catalogue_model_fills_the_tables_its_config_asks_for():
    from onerec.eval.baselines import ItemIndex

    ids = np.array([3, 8, 20, 41])
    items = pd.DataFrame({"item_id": ids, "attributes": [[7], [7, 9], [], [9, 11]]})
    tok = SemanticIdTokenizer.fit(ids, np.random.default_rng(0).normal(size=(4, 6)), levels=2, codebook_size=2)
    plain = catalogue_model(model_config(item_embedding=False), tok, ItemIndex(np.array([3, 8, 20])), items[:3])
    assert plain.context.item is None and plain.dense is None      # no table: nothing to match
    full = catalogue_model(model_config(item_embedding=True, item_attributes=True, dense_loss_weight=0.5),
                           tok, ItemIndex(ids), items)
    assert full.context.item.num_embeddings == 5
    assert full.context.attributes.tolist() == [[0, 0], [1, 0], [1, 2], [0, 0], [2, 3]]   # remapped, 0 = none
    assert torch.equal(full.item_codes[1:], torch.from_numpy(tok.encode(ids).astype(np.int64)))
    assert full.hparams["extra"]["n_attributes"] == 3 and full.hparams["extra"]["attribute_slots"] == 2
    with pytest.raises(ValueError, match="not the catalogue's 3"):
        catalogue_model(model_config(item_embedding=True), tok, ItemIndex(np.array([3, 8, 20])), items[:3])
    with pytest.raises(ValueError, match="has none of.*set model.item_attributes=false"):
        catalogue_model(model_config(item_embedding=True, item_attributes=True), tok, ItemIndex(ids),
                        items[["item_id"]])


# --------------------------------------------------------------------------- optimizer, schedule


def test_lr_warms_up_linearly_then_decays_by_cosine():
    cfg = train_config(lr=1.0, warmup_steps=10)
    lrs = [lr_at(s, cfg, 110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in itertools.pairwise(lrs[:10]))              # rising
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))             # then falling
    assert lrs[60] == pytest.approx(0.5)                                    # cosine midpoint
    assert lrs[-1] < 1e-3 and lr_at(110, cfg, 110) == 0.0
    assert lr_at(0, train_config(lr=1.0, warmup_steps=0), 10) == 1.0


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model, _, _ = setup()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert not any("norm" in n or n.startswith(("emb.", "position.", "context.")) for n in decayed)
    assert "heads.0.weight" in decayed and any(".w_in" in n for n in decayed)   # linears, experts
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# --------------------------------------------------------------------------- learning and decoding


@pytest.mark.parametrize("arch", ["v1", "v2"])
def test_overfits_tiny_data_and_decodes_only_valid_items(arch):
    model, data, valid = setup(arch)
    result = train(model, data, train_config(), valid=valid, progress=False)
    assert result.stopped == "epochs" and result.steps == 40 * 4
    assert result.history[-1]["loss"] < 0.05, [round(r["loss"], 3) for r in result.history[::8]]
    assert result.history[0]["loss"] > 1.0
    assert result.best["recall@5"] == 1.0 and result.samples_per_s > 0

    trie = data.codes.trie()
    ctx = context_batch(valid.histories, data.codes, 6)
    rows, _ = topk_next_items(model, ctx, trie.allowed, trie.item_of, beam_size=10, k=10)
    assert torch.equal(rows[:, 0] + 1, torch.as_tensor(valid.targets))   # top 1 = the true next item
    valid_codes = {tuple(c) for c in data.codes.table[1:].tolist()}
    items, _ = generate(model, ctx, trie.allowed, trie.item_of, beam_size=10, session_len=2)
    assert (items >= 0).all() and (items < N_ITEMS).all()                # every beam a real item
    assert all(tuple(c) in valid_codes for c in data.codes.table[items.flatten() + 1].tolist())
    assert (items[..., 0] != items[..., 1]).all()                         # no repeat in a session
    assert evaluate_model(model, data.codes, valid, beam_size=10, ks=(1, 10))["recall@1"] == 1.0


def test_early_stopping_and_time_budget(tmp_path):
    model, data, valid = setup()
    result = train(model, data, train_config(lr=1e-9, eval_every=1, patience=2), valid=valid, progress=False)
    assert result.stopped == "early_stop" and result.steps == 3 and result.best_step == 1
    model, data, valid = setup()
    result = train(model, data, train_config(time_budget_s=1e-6), valid=valid, progress=False,
                   checkpoint_dir=tmp_path)
    assert result.stopped == "time_budget" and result.steps == 1 and len(result.history) == 1
    assert (tmp_path / CHECKPOINT_META).is_file()


# --------------------------------------------------------------------------- determinism, resume


def test_same_seed_same_weights_other_seed_not():
    cfg = train_config(epochs=2)
    runs = []
    for seed in (0, 0, 1):
        model, data, valid = setup(dropout=0.2)
        train(model, data, cfg, valid=valid, seed=seed, progress=False)
        runs.append(weights(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


@pytest.mark.parametrize("arch", ["v1", "v2"])
def test_resume_gives_the_uninterrupted_run(tmp_path, arch):
    """Dropout on, so the RNG state must travel too; split mid-epoch (step 9 of 4-step epochs)."""
    cfg = train_config(epochs=5, eval_every=3, checkpoint_every=4)
    model, data, valid = setup(arch, dropout=0.2)
    whole = train(model, data, cfg, valid=valid, seed=3, progress=False)
    expected = weights(model)

    model, data, valid = setup(arch, dropout=0.2)
    first = train(model, data, cfg, valid=valid, seed=3, progress=False, checkpoint_dir=tmp_path, max_steps=9)
    assert first.stopped == "max_steps" and first.steps == 9
    model, data, valid = setup(arch, seed=99, dropout=0.2)                  # other initial weights
    rest = train(model, data, cfg, valid=valid, seed=3, progress=False, checkpoint_dir=tmp_path, resume=True)
    assert rest.steps == whole.steps == 20 and rest.stopped == "epochs"
    got = weights(model)
    assert all(torch.equal(got[k], expected[k]) for k in expected), \
        [k for k in expected if not torch.equal(got[k], expected[k])]
    assert [r["step"] for r in rest.history] == [r["step"] for r in whole.history]
    for a, b in zip(rest.history, whole.history):
        assert a["valid_ndcg@10"] == b["valid_ndcg@10"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    # a finished run resumes to itself without training
    again = train(model, data, cfg, valid=valid, seed=3, progress=False, checkpoint_dir=tmp_path, resume=True)
    assert again.steps == 20 and again.stopped == "epochs" and again.best_step == whole.best_step


# --------------------------------------------------------------------------- broken checkpoints


@pytest.fixture
def checkpoint(tmp_path):
    model, data, valid = setup()
    train(model, data, train_config(epochs=1), valid=valid, progress=False, checkpoint_dir=tmp_path)
    return tmp_path


def resume_from(directory, cfg=None, **model_kw):
    model, data, valid = setup(**model_kw)
    return train(model, data, cfg or train_config(epochs=1), valid=valid, progress=False,
                 checkpoint_dir=directory, resume=True)


def test_truncated_or_foreign_tensor_file_is_a_clear_error(checkpoint):
    path = checkpoint / CHECKPOINT_TENSORS
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file.*truncated"):
        resume_from(checkpoint)
    path.write_bytes(b"PK\x03\x04 this is a zip, or a pickle, not safetensors")
    with pytest.raises(CheckpointError, match=f"{CHECKPOINT_TENSORS}: not a readable safetensors"):
        resume_from(checkpoint)
    (checkpoint / CHECKPOINT_META).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        resume_from(checkpoint)


def test_checkpoint_of_another_model_or_config_names_the_difference(checkpoint):
    with pytest.raises(CheckpointError, match=r"model\.cfg\.d_model: checkpoint 32, this run 64"):
        resume_from(checkpoint, d_model=64)
    with pytest.raises(CheckpointError, match=r"train\.lr: checkpoint 0\.005, this run 0\.02"):
        resume_from(checkpoint, train_config(epochs=1, lr=0.02))
    resume_from(checkpoint, train_config(epochs=1, patience=5, beam_size=12))   # allowed to change


def test_tensor_of_the_wrong_shape_or_a_torn_pair_is_a_clear_error(checkpoint):
    path = checkpoint / CHECKPOINT_TENSORS
    tensors = load_file(path)
    with open(path, "rb") as f:                                  # keep the id that pairs it with the json
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    tensors["model.heads.0.weight"] = torch.zeros(5, 7)
    save_file(tensors, path, metadata=header["__metadata__"])
    with pytest.raises(CheckpointError, match=r"'model\.heads\.0\.weight' is torch\.float32 \(5, 7\), "
                                              r"the model has torch\.float32 \(4, 32\)"):
        resume_from(checkpoint)
    save_file(tensors, path, metadata={"id": "another"})
    with pytest.raises(CheckpointError, match="different checkpoints"):
        resume_from(checkpoint)


# --------------------------------------------------------------------------- saved models


def test_saved_model_loads_without_training_state(tmp_path):
    model, data, valid = setup("v1")
    train(model, data, train_config(epochs=2), valid=valid, progress=False)
    emb = np.random.default_rng(0).normal(size=(N_ITEMS, 8))
    tok = SemanticIdTokenizer.fit(np.arange(1, N_ITEMS + 1), emb, levels=1, codebook_size=4)
    save_model(model, tmp_path / "bad", tokenizer=tok)                 # 2 code positions, the model 3
    with pytest.raises(CheckpointError, match="codebook sizes"):
        load_model(tmp_path / "bad")
    save_model(model, tmp_path / "m")
    clone, none = load_model(tmp_path / "m")
    assert none is None and isinstance(clone, OneRecV1) and not clone.training
    batch = data.batch(torch.arange(8))
    with torch.no_grad():
        for a, b in zip(model.eval()(batch)[0], clone(batch)[0]):
            assert torch.equal(a, b)
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors"):
        load_model(tmp_path / "m")
    with pytest.raises(CheckpointError, match="file not found"):
        load_model(tmp_path / "nowhere")


# --------------------------------------------------------------------------- config plumbing


def test_model_config_defaults_agree_with_the_model_constructors():
    """ModelConfig's defaults (for hand-built configs) must say what the constructors do."""
    kw = {**inspect.signature(GenerativeRecommender.__init__).parameters,
          **inspect.signature(OneRecV1.__init__).parameters}
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.default is not dataclasses.MISSING}
    assert set(defaults) == {"n_kv_heads", "ffn_mult", "activation", "moe_aux_coef", "n_encoder_layers",
                             "item_embedding", "item_attributes", "dense_loss_weight", "dense_score_weight",
                             "repeat_gate"}
    # read from cfg, sized by n_items / n_attributes: off by default
    assert defaults.pop("item_embedding") is False and kw["n_items"].default == 0
    assert defaults.pop("item_attributes") is False and kw["n_attributes"].default == 0
    assert defaults.pop("dense_loss_weight") == 0.0 and defaults.pop("dense_score_weight") == 0.0
    assert defaults.pop("repeat_gate") is False
    for name, value in defaults.items():
        model_default = kw[name].default
        assert value == (0 if model_default is None else model_default), name   # 0 = None = "same as"


def test_build_model_takes_every_knob_from_the_config():
    cfg = model_config("v1", n_kv_heads=1, ffn_mult=2, activation="gelu", moe_aux_coef=0.5,
                       n_encoder_layers=3)
    extra = build_model(cfg, codebook_sizes=SIZES).hparams["extra"]
    assert extra["n_kv_heads"] == 1 and extra["ffn_mult"] == 2 and extra["activation"] == "gelu"
    assert extra["moe_aux_coef"] == 0.5 and extra["n_encoder_layers"] == 3
    assert build_model(cfg, codebook_sizes=SIZES, n_kv_heads=4).hparams["extra"]["n_kv_heads"] == 4
    plain = build_model(model_config("v1", n_kv_heads=0, n_encoder_layers=0), codebook_sizes=SIZES)
    assert plain.n_kv_heads == 4 and plain.n_encoder_layers == 2                 # 0 = n_heads / n_layers
    assert "n_encoder_layers" not in build_model(model_config("v2"), codebook_sizes=SIZES).hparams["extra"]


def test_fit_tokenizer_uses_the_config_values():
    rng = np.random.default_rng(0)
    inter = pd.DataFrame({"user_id": np.repeat(np.arange(40), 10), "item_id": rng.integers(0, 60, 400),
                          "timestamp": np.tile(np.arange(10), 40)})
    items = pd.DataFrame({"item_id": np.arange(60)})
    cfg = TokenizerConfig(levels=2, codebook_size=64, codebook_scale=1.0, kmeans_iters=3, embedding_dim=12,
                          cooc_window=2, side_dim=4, side_weight=0.3, ppmi_smoothing=0.75)
    report = fit_tokenizer(inter, items, cfg, seed=0).report()
    assert report["dim"] == 12 and report["n_iter"] == 3 and report["scale"] == 1.0
    assert report["codebook_sizes"][:2] == [8, 8]                              # ceil(1.0 * 60 ** 0.5) -> 8


def test_every_preset_has_the_training_keys_and_they_are_checked():
    for preset in ("debug", "small", "full"):
        cfg = load_config(preset)
        assert cfg.train.beam_size >= 10 and len(cfg.train.betas) == 2
        assert cfg.tokenizer.embedding_dim > cfg.tokenizer.side_dim
    assert load_config("debug", ["train.betas=[0.8, 0.9]"]).train.betas == (0.8, 0.9)
    for override, key in [("train.beam_size=5", "train.beam_size"), ("train.betas=[0.9]", "train.betas"),
                          ("train.betas=[0.9, 1.5]", "train.betas"), ("train.lr=0", "train.lr"),
                          ("model.n_kv_heads=3", "model.n_kv_heads"), ("model.activation=relu", "model.activation"),
                          ("tokenizer.side_dim=64", "tokenizer.side_dim"), ("train.lrr=1", "train.lrr")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config("debug", [override])


def test_cli_train_flags():
    args = build_parser().parse_args(["train", "--preset", "debug", "--set", "train.epochs=1",
                                      "--arch", "v1", "--out", "x", "--resume"])
    assert args.config == "debug" and args.out == "x" and args.resume
    assert args.overrides == ["train.epochs=1", "model.arch=v1"]


# --------------------------------------------------------------------------- MLflow


def test_no_mlflow_import_without_a_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setitem(sys.modules, "mlflow", None)             # any `import mlflow` would now fail
    model, data, valid = setup()
    assert not Tracker().active
    train(model, data, train_config(epochs=1), valid=valid, progress=False)


@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")  # inside mlflow's sqlalchemy store
def test_mlflow_run_gets_params_metrics_and_artifacts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                                  # the sqlite store's default artifact root
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, experiment="test-train", run_name="tiny")
    model, data, valid = setup()
    train(model, data, train_config(epochs=2), valid=valid, progress=False, tracker=tracker)
    save_model(model, tmp_path / "m")
    tracker.log_artifacts(tmp_path / "m", "model")
    run_id, client = tracker.run_id, tracker.client
    tracker.close()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.005" and "model.cfg.d_model" in run.data.params
    assert run.data.metrics["valid_ndcg_at_10"] >= 0 and "loss" in run.data.metrics
    assert [m.step for m in client.get_metric_history(run_id, "valid_ndcg_at_10")] == [4, 8]
    assert {f.path for f in client.list_artifacts(run_id, "model")} == {"model/model.safetensors", "model/hparams.json"}
