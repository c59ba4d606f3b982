"""Training OneRec: a flat loop (nanoGPT style), validation by constrained beam search, resumable
checkpoints, MLflow tracking, and saved models.

    result = train(model, data, cfg.train, valid=seqs.for_validation(), seed=cfg.seed,
                   checkpoint_dir=out / "checkpoint", resume=True)
    evaluate_model(model, data.codes, seqs.for_test(), beam_size=cfg.train.beam_size)
    save_model(model, out, tokenizer=tok); model, tok = load_model(out)
    figures = run_training(cfg, out)          # all of it, what `onerec train` runs

The loop: AdamW (no weight decay on norms, biases and embeddings), linear warmup then cosine
decay to 0 over `epochs` (`lr_at`), global-norm gradient clipping, bf16 autocast on CUDA only.
Validation (every `eval_every` steps, or after every epoch when 0) is the full-ranking
leave-last-out protocol of `onerec.eval`: beam search constrained to the catalogue's semantic
IDs gives each user's top 10 items, which become a (B, N) score matrix (every other item -inf)
for `onerec.eval.evaluate`. The weights with the best valid NDCG@10 are kept and restored at the
end; `patience` validations without improvement stop training, and so does `time_budget_s`.

Checkpoints (`checkpoint_dir`): `checkpoint.safetensors` (weights, best weights, AdamW moments,
RNG states) + `checkpoint.json` (step, history, best, seeds, the model's hparams and a hash of
the config that shapes the trajectory). Only safetensors and JSON are ever read back: no pickle,
no torch.load. A run resumed from a checkpoint takes the same steps as an uninterrupted one:
the batches of an epoch are a function of (seed, epoch), the LR a function of the step, and
the dropout RNG state is restored. `eval_every`, `patience`, `beam_size`, `time_budget_s`,
`num_threads` and `checkpoint_every` may change between the runs (they decide when to stop or
what to report, not what a step computes); anything else that differs is an error.

MLflow: only when a tracking URI is given or MLFLOW_TRACKING_URI is set (mlflow is imported then
and only then: it takes seconds). Metric names replace '@' by '_at_' (MLflow's allowed set).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn
from tqdm.auto import tqdm

from onerec.config import Config, ModelConfig, TrainConfig, to_dict
from onerec.eval.baselines import SELECT_METRIC, EvalSet, OfflineData, Popularity, offline_data
from onerec.eval.metrics import evaluate

from . import build_model, distributed
from .beam import topk_next_items
from .common import GenerativeRecommender
from .data import ItemCodes, TrainExamples, build_examples, catalogue_model, context_batch, fit_tokenizer

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "onerec-checkpoint", 1
CHECKPOINT_TENSORS, CHECKPOINT_META = "checkpoint.safetensors", "checkpoint.json"
MODEL_FORMAT, MODEL_VERSION = "onerec-model", 1
MODEL_TENSORS, MODEL_META, TOKENIZER_DIR = "model.safetensors", "hparams.json", "tokenizer"
MLMODEL = "MLmodel"           # MLflow's model descriptor: the signature (written only when tracked)
EVAL_KS = (5, 10)
# TrainConfig fields that may differ between a checkpoint and the run resuming it (see above).
RESUMABLE_CHANGES = ("eval_every", "patience", "beam_size", "time_budget_s", "num_threads",
                     "checkpoint_every", "valid_users")


class CheckpointError(ValueError):
    """A checkpoint or saved model is missing, corrupted, or belongs to another model/config."""


# --------------------------------------------------------------------------- schedule, optimizer


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """LR of optimizer step `step` (0-based): linear warmup lr * (step + 1) / warmup_steps, then
    cosine from lr down to 0 at `total_steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices (linears, MoE experts) decay; norms, biases and embedding tables
    do not (decaying an embedding row shrinks rare items that get few gradient updates)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)


# --------------------------------------------------------------------------- MLflow


class Tracker:
    """An MLflow run when `uri` is set (else MLFLOW_TRACKING_URI), otherwise nothing at all: mlflow
    is not even imported. Uses MlflowClient, so no global MLflow state is touched."""

    def __init__(self, uri: str | None = None, experiment: str = "onerec-train", run_name: str | None = None,
                 enabled: bool = True):
        self.uri = (uri or os.environ.get("MLFLOW_TRACKING_URI") or None) if enabled else None
        self.client = self.run_id = None
        if self.uri:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(self.uri)
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
            self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id

    @property
    def active(self) -> bool:
        return self.client is not None

    def log_params(self, params: Mapping) -> None:
        if self.active:
            from mlflow.entities import Param

            rows = [Param(k, str(v)[:6000]) for k, v in _flatten(params).items()]
            for i in range(0, len(rows), 100):                # MLflow takes <= 100 params per batch
                self.client.log_batch(self.run_id, params=rows[i:i + 100])

    def log_metrics(self, metrics: Mapping, step: int) -> None:
        if self.active:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            rows = [Metric(metric_name(k), float(v), now, step) for k, v in metrics.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
            self.client.log_batch(self.run_id, metrics=rows)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.active:
            from mlflow.entities import RunTag

            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def write_mlmodel(self, model_dir: Path, flavor: Mapping) -> None:
        """model_dir/MLmodel: the MLflow model descriptor with the serving signature (a history
        of item ids in; top-K item ids and scores out) and an `onerec` flavor. No pyfunc: loading
        goes through onerec.model.load_model (safetensors + JSON), never a pickle."""
        if self.active:
            from mlflow.models import Model
            from mlflow.models.signature import ModelSignature
            from mlflow.types.schema import Array, ColSpec, Schema

            signature = ModelSignature(
                inputs=Schema([ColSpec(Array("long"), "history_item_ids")]),
                outputs=Schema([ColSpec(Array("long"), "item_ids"), ColSpec(Array("double"), "scores")]))
            Model(run_id=self.run_id, signature=signature, flavors={"onerec": dict(flavor)}).save(
                str(model_dir / MLMODEL))

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file or a whole folder."""
        if self.active:
            log = self.client.log_artifacts if Path(path).is_dir() else self.client.log_artifact
            log(self.run_id, str(path), artifact_path)

    def close(self, failed: bool = False) -> None:
        if self.active:
            self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")
            self.client = None


def source_version() -> str:
    """The code's git commit: ONEREC_GIT_COMMIT (baked into the pipeline image), else `git rev-parse
    HEAD` in the project, else 'unknown'."""
    import subprocess

    from onerec.config import PROJECT_ROOT

    if os.environ.get("ONEREC_GIT_COMMIT"):
        return os.environ["ONEREC_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def metric_name(key: str) -> str:
    """'valid_ndcg@10' -> 'valid_ndcg_at_10' (MLflow forbids '@')."""
    return key.replace("@", "_at_")


def _flatten(tree: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, Mapping) else {key: v})
    return out


# --------------------------------------------------------------------------- evaluation


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


@torch.no_grad()
def evaluate_model(model: GenerativeRecommender, codes: ItemCodes, eval_set: EvalSet, beam_size: int,
                   batch_size: int = 256, ks: Sequence[int] = EVAL_KS, trie=None,
                   exclude_history: bool = False, head_k: int | None = None) -> dict:
    """Full-ranking metrics of `model` on (users, histories, targets) as in `onerec.eval.evaluate`:
    constrained beam search gives the top beam_size items per user; score = beam_size - rank for
    those, -inf for all other items (so a target outside the top list ranks last, and R@k/N@k for
    k <= max(ks) are exact). Items of the history stay in the ranking unless `exclude_history`
    (then a history item's place goes to the next of the beam_size: exact while at most
    beam_size - max(ks) of them are in the list). head_k: the hybrid's head items beside the
    beams (topk_next_items); the list is then max(beam_size, head_k) long."""
    device = next(model.parameters()).device
    trie = (codes.trie() if trie is None else trie).to(device)
    kmax, ranked = max(ks), beam_size if head_k is None else max(beam_size, head_k)
    if ranked < kmax:
        raise ValueError(f"beam_size={beam_size} must be >= {kmax} to rank the top {kmax} items")
    rank_score = torch.arange(ranked, 0, -1, dtype=torch.float32, device=device)      # (W,) best = W

    def score(histories, users=None) -> torch.Tensor:
        ctx = context_batch(histories, codes, model.cfg.max_seq_len, device)
        with _autocast(device):
            rows, _ = topk_next_items(model, ctx, trie.allowed, trie.item_of, beam_size, ranked, head_k)  # (B, W)
        scores = torch.full((len(histories), codes.n_items), -math.inf, device=device)   # (B, N)
        ok = rows >= 0
        user = torch.arange(len(histories), device=device)[:, None].expand_as(rows)
        scores[user[ok], rows[ok]] = rank_score.expand_as(rows)[ok]   # trie row r = item index r + 1
        return scores

    return evaluate(score, None, eval_set.histories, eval_set.targets, codes.n_items, ks=ks,
                    batch_size=batch_size, exclude_history=exclude_history)


@torch.no_grad()
def evaluate_dense_head(model: GenerativeRecommender, codes: ItemCodes, eval_set: EvalSet,
                        batch_size: int = 256, ks: Sequence[int] = EVAL_KS,
                        exclude_history: bool = False) -> dict:
    """The ablation of the hybrid: every item ranked by the dense head alone (no beam search,
    no semantic IDs at ranking time), as `evaluate_model` ranks by the model's own config."""
    if model.dense is None:
        raise ValueError("the model has no dense head (model.dense_loss_weight = 0)")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    def score(histories, users=None) -> torch.Tensor:
        with _autocast(device):  # as evaluate_model runs the hybrid
            memory = model.encode(context_batch(histories, codes, model.cfg.max_seq_len, device))
            return model.head_logits(memory)                                       # (B, N) fp32

    try:
        return evaluate(score, None, eval_set.histories, eval_set.targets, codes.n_items, ks=ks,
                        batch_size=batch_size, exclude_history=exclude_history)
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    history: list[dict]            # one row per validation (or per epoch without valid data)
    best: dict                     # valid metrics of the kept weights ({} without valid data)
    best_step: int                 # step of the kept weights (the last step without valid data)
    steps: int                     # optimizer steps taken in all (across resumes)
    epochs: float                  # steps / steps_per_epoch
    stopped: str                   # epochs | early_stop | time_budget | max_steps
    samples_per_s: float           # training examples per second of training (validation excluded)
    train_s: float                 # seconds spent in training steps, all runs together
    wall_s: float                  # wall time of this call
    checkpoint: Path | None = None

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["checkpoint"] = None if self.checkpoint is None else str(self.checkpoint)
        return out


@dataclass
class _State:
    """What a checkpoint carries besides tensors."""
    step: int = 0
    history: list = field(default_factory=list)
    best_metric: float = -math.inf
    best_step: int = -1
    bad_evals: int = 0
    train_s: float = 0.0
    samples: int = 0
    window: dict = field(default_factory=lambda: dict.fromkeys(_WINDOW, 0.0))  # since the last validation
    finished: str | None = None


_WINDOW = ("loss", "ce", "moe_aux", "steps", "samples", "seconds")


def trajectory_config(model: GenerativeRecommender, data: TrainExamples, cfg: TrainConfig, seed: int) -> dict:
    """Everything a training step depends on; a checkpoint resumes only a run with the same."""
    train = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE_CHANGES}
    train["betas"] = list(train["betas"])
    return {"model": model.hparams, "train": train, "seed": seed, "data": data.fingerprint(),
            "n_examples": len(data)}


def config_hash(trajectory: dict) -> str:
    return hashlib.sha256(json.dumps(trajectory, sort_keys=True).encode()).hexdigest()[:16]


def train(model: GenerativeRecommender, data: TrainExamples, cfg: TrainConfig, *,
          valid: EvalSet | None = None, seed: int = 0, checkpoint_dir: str | Path | None = None,
          resume: bool = False, tracker: Tracker | None = None, max_steps: int | None = None,
          progress: bool = True, device: str | torch.device | None = None) -> TrainResult:
    """Train `model` on `data` in place and return what happened; see the module docstring.

    valid: users' (histories, targets) to validate on, e.g. `UserSequences.for_validation()`;
      without it there is no early stopping and the last weights are kept.
    seed: dropout draws and batch order (initial weights are the caller's: seed before building).
    checkpoint_dir: where checkpoints go (every `checkpoint_every` steps and when training stops);
      resume: continue from the checkpoint there, if there is one.
    tracker: an MLflow `Tracker`; None opens one from MLFLOW_TRACKING_URI (or none) and closes it.
    max_steps: stop at this global step (with a checkpoint), e.g. to split a run in two; the LR
      schedule still spans all `epochs`.
    time_budget_s (cfg) counts the wall time of this call; a run stopped by it is validated once
      more and can be resumed.
    device: default CUDA when available, else CPU (under torchrun: this rank's GPU).
    Under torchrun (WORLD_SIZE > 1) training is data-parallel, see onerec.model.distributed;
    the tracker and checkpoints are then rank 0's alone.
    """
    wall0 = time.perf_counter()
    group = distributed.from_env()
    device = torch.device(device or (group.device() if group else "cuda" if torch.cuda.is_available() else "cpu"))
    threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    own_tracker = tracker is None
    tracker = Tracker(enabled=group is None or group.main) if own_tracker else tracker
    try:
        result = _train(model, data, cfg, valid, seed, checkpoint_dir, resume, tracker, max_steps,
                        progress, device, wall0, group)
    except BaseException:
        if own_tracker:
            tracker.close(failed=True)
        raise
    finally:
        torch.set_num_threads(threads)
    if own_tracker:
        tracker.close()
    return result


def train_step(model: GenerativeRecommender, opt: torch.optim.Optimizer, batch: Mapping[str, torch.Tensor],
               lr: float, grad_clip: float, device: torch.device) -> tuple[torch.Tensor, dict]:
    """One optimizer step on one batch (TrainExamples.batch: (B, S_b, L) context -> (B, M_b, L)
    target); -> (loss, aux), not synced with the device."""
    model.train()
    for group in opt.param_groups:
        group["lr"] = lr
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    with _autocast(device):
        _, loss, aux = model(batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss, aux


STOPS = (None, "early_stop", "epochs", "time_budget", "max_steps")   # codes rank 0 broadcasts


def _train(model, data, cfg, valid, seed, checkpoint_dir, resume, tracker, max_steps, progress,
           device, wall0, group: distributed.Group | None = None) -> TrainResult:
    main = group is None or group.main
    model.to(device)
    opt = make_optimizer(model, cfg)
    steps_per_epoch = data.steps_per_epoch(cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    trajectory = trajectory_config(model, data, cfg, seed)
    ckpt_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
    trie = data.codes.trie().to(device) if valid is not None else None

    state, best_state = _State(), {}
    if resume and ckpt_dir is None:
        raise ValueError("resume=True needs checkpoint_dir: the folder holding the checkpoint")
    if resume and (ckpt_dir / CHECKPOINT_META).is_file():
        state, best_state = load_checkpoint(ckpt_dir, model, opt, trajectory, device)
        log.info("resumed from %s at step %d", ckpt_dir, state.step)
    else:
        if resume:
            log.warning("no checkpoint in %s: training from the start", ckpt_dir)
        torch.manual_seed(seed)                           # dropout draws
    forward = group.wrap(model) if group else model       # DDP: same weights on every rank from here
    tracker.log_params({"train": dataclasses.asdict(cfg), "model": model.hparams, "seed": seed,
                        "n_examples": len(data), "steps_per_epoch": steps_per_epoch,
                        "num_params": model.num_params()})

    def validate() -> None:
        """One history row: the mean train loss since the last one, speed, valid metrics."""
        w = state.window
        n = max(w["steps"], 1)
        row = {"step": state.step, "epoch": state.step / steps_per_epoch,
               "lr": lr_at(max(state.step - 1, 0), cfg, total_steps), "loss": w["loss"] / n,
               "ce": w["ce"] / n, "moe_aux": w["moe_aux"] / n,
               "samples_per_s": w["samples"] / max(w["seconds"], 1e-9), "train_s": state.train_s}
        if not math.isfinite(row["loss"]):
            raise FloatingPointError(f"training loss is {row['loss']} before step {state.step} (lr "
                                     f"{row['lr']:.2e}); lower train.lr or raise train.warmup_steps")
        if valid is not None:
            metrics = evaluate_model(model, data.codes, valid, cfg.beam_size, cfg.batch_size, trie=trie)
            row.update({f"valid_{k}": v for k, v in metrics.items()})
            if metrics[SELECT_METRIC] > state.best_metric:
                state.best_metric, state.best_step, state.bad_evals = metrics[SELECT_METRIC], state.step, 0
                best_state.update({k: v.detach().clone() for k, v in model.state_dict().items()})
            else:
                state.bad_evals += 1
        row["elapsed_s"] = time.perf_counter() - wall0
        state.history.append(row)
        state.window = dict.fromkeys(_WINDOW, 0.0)
        tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, state.step)
        log.info(_format_row(row))
        if progress:
            bar.write(_format_row(row), file=sys.stderr)

    stop = state.finished
    bar = tqdm(total=total_steps, initial=state.step, unit="step", desc="train", dynamic_ncols=True,
               disable=not (progress and main and sys.stderr.isatty()))  # a bar on terminals, not in logs
    sums = torch.zeros(3, device=device)                  # loss, ce, moe_aux since the last sync
    while stop is None and state.step < total_steps:
        epoch = state.step // steps_per_epoch
        batches = data.epoch_batches(cfg.batch_size, epoch, seed)
        for idx in batches[state.step - epoch * steps_per_epoch:]:
            t0 = time.perf_counter()
            loss, aux = train_step(forward, opt, data.batch(group.shard(idx) if group else idx),
                                   lr_at(state.step, cfg, total_steps), cfg.grad_clip, device)
            sums += torch.stack([loss.detach(), aux["ce"].detach(), aux["moe_aux"].detach()]).float()
            state.step += 1
            w = state.window
            w["steps"] += 1
            w["samples"] += len(idx)
            state.samples += len(idx)

            end_of_epoch = state.step % steps_per_epoch == 0
            eval_now = (state.step % cfg.eval_every == 0) if cfg.eval_every else end_of_epoch
            eval_now = eval_now or state.step == total_steps
            if eval_now or state.step % 10 == 0:          # sync with the device now and then only
                _flush(sums, w)
            seconds = time.perf_counter() - t0
            w["seconds"] += seconds
            state.train_s += seconds
            bar.update(1)
            if state.step % 10 == 0:
                bar.set_postfix(loss=f"{w['loss'] / max(w['steps'], 1):.3f}",
                                samples_s=f"{w['samples'] / max(w['seconds'], 1e-9):.0f}",
                                best=f"{max(state.best_metric, 0.0):.4f}", refresh=False)

            if eval_now and main:
                validate()
                if valid is not None and cfg.patience and state.bad_evals >= cfg.patience:
                    stop = "early_stop"
            if stop is None and state.step == total_steps:
                stop = "epochs"
            if stop is None and cfg.time_budget_s and time.perf_counter() - wall0 >= cfg.time_budget_s:
                stop = "time_budget"
                if not eval_now and main:
                    _flush(sums, state.window)
                    validate()                            # the steps since the last one count too
            if stop is None and max_steps is not None and state.step >= max_steps:
                stop = "max_steps"
            if group:
                stop = STOPS[group.agree(STOPS.index(stop))]   # every rank leaves at rank 0's step
            if main and ckpt_dir is not None and (stop is not None or (cfg.checkpoint_every
                                                              and state.step % cfg.checkpoint_every == 0)):
                _flush(sums, state.window)
                state.finished = stop if stop in ("epochs", "early_stop") else None
                save_checkpoint(ckpt_dir, model, opt, state, best_state, trajectory, seed)
            if stop is not None:
                break
    bar.close()
    if stop is None:                                      # resumed a run that had already finished
        stop = state.finished or "epochs"
    if best_state:
        model.load_state_dict(best_state)
    model.eval()
    best = next((r for r in state.history if r["step"] == state.best_step), {})
    return TrainResult(
        history=state.history,
        best={k[len("valid_"):]: v for k, v in best.items() if k.startswith("valid_")},
        best_step=state.best_step if best_state else state.step,
        steps=state.step, epochs=state.step / steps_per_epoch, stopped=stop,
        samples_per_s=state.samples / max(state.train_s, 1e-9), train_s=state.train_s,
        wall_s=time.perf_counter() - wall0, checkpoint=ckpt_dir)


def _flush(sums: torch.Tensor, window: dict) -> None:
    """Move the on-device loss sums into the window (a sync)."""
    for key, value in zip(("loss", "ce", "moe_aux"), sums.tolist()):
        window[key] += value
    sums.zero_()


def _format_row(row: dict) -> str:
    valid = f"  valid {SELECT_METRIC} {row[f'valid_{SELECT_METRIC}']:.4f}" if f"valid_{SELECT_METRIC}" in row else ""
    return (f"step {row['step']:6d}  epoch {row['epoch']:6.2f}  loss {row['loss']:.4f}  "
            f"{row['samples_per_s']:.0f} samples/s{valid}  ({row['elapsed_s']:.0f} s)")


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(directory: Path, model: nn.Module, opt: torch.optim.Optimizer, state: _State,
                    best_state: Mapping[str, torch.Tensor], trajectory: dict, seed: int) -> Path:
    """Write checkpoint.safetensors + checkpoint.json (each written to a temp file, then renamed;
    a shared random id in both tells a torn pair apart)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"best.{k}": v for k, v in best_state.items()})
    opt_sd = opt.state_dict()
    for i, param_state in opt_sd["state"].items():
        tensors.update({f"optim.{i}.{k}": torch.as_tensor(v) for k, v in param_state.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    ckpt_id = uuid.uuid4().hex
    meta = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "id": ckpt_id,
            "config_hash": config_hash(trajectory), "trajectory": trajectory, "seed": seed,
            "param_groups": opt_sd["param_groups"], "state": dataclasses.asdict(state)}
    meta["state"]["best_metric"] = None if state.best_metric == -math.inf else state.best_metric
    _atomic(directory / CHECKPOINT_TENSORS, lambda p: save_file(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(p), metadata={"id": ckpt_id}))
    _atomic(directory / CHECKPOINT_META, lambda p: p.write_text(json.dumps(meta, indent=1) + "\n"))
    return directory


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def _read_json(path: Path, fmt: str, version: int, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found; {what}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); the file is corrupted") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path}: format is {got!r}, expected {fmt!r}")
    if meta.get("version") != version:
        raise CheckpointError(f"{path}: format version {meta.get('version')!r}, this code reads {version}")
    return meta


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc}); it is truncated or "
                              "corrupted: delete it (and its .json) to start over") from None


def _diff(a, b, prefix: str = "") -> list[str]:
    """Paths where two JSON-like trees differ: ['train.lr: 0.001 != 0.002', ...]."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: checkpoint {a!r}, this run {b!r}"]


def _check_state_dict(path: Path, tensors: Mapping[str, torch.Tensor], prefix: str,
                      expected: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """tensors[prefix + name] for every name of `expected`, checked for presence, shape and dtype."""
    got = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match the model: missing {missing[:3]}"
                              f"{' ...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                              f"{' ...' if len(unexpected) > 3 else ''} (prefix '{prefix}')")
    for name, ref in expected.items():
        if got[name].shape != ref.shape or got[name].dtype != ref.dtype:
            raise CheckpointError(f"{path}: tensor '{prefix}{name}' is {got[name].dtype} "
                                  f"{tuple(got[name].shape)}, the model has {ref.dtype} {tuple(ref.shape)}")
    return got


def load_checkpoint(directory: Path, model: nn.Module, opt: torch.optim.Optimizer, trajectory: dict,
                    device: torch.device) -> tuple[_State, dict[str, torch.Tensor]]:
    """Restore model, optimizer and RNG from `directory`; returns (state, best weights).
    Raises CheckpointError naming the file and the problem: missing or corrupted files, a
    checkpoint of another model or config (which keys differ), tensors of the wrong shape."""
    meta_path, tensor_path = directory / CHECKPOINT_META, directory / CHECKPOINT_TENSORS
    meta = _read_json(meta_path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "nothing to resume from")
    if meta.get("config_hash") != config_hash(trajectory):
        diffs = _diff(meta.get("trajectory"), json.loads(json.dumps(trajectory)))
        raise CheckpointError(f"{directory}: the checkpoint belongs to another model, config or data set "
                              f"({'; '.join(diffs[:5]) or 'config hash differs'}); resume with the same "
                              "config, or train into a fresh --out directory")
    tensors, metadata = _read_tensors(tensor_path)
    if metadata.get("id") != meta.get("id"):
        raise CheckpointError(f"{tensor_path} and {meta_path} are from different checkpoints (a write "
                              "was interrupted); delete both to start over")
    weights = _check_state_dict(tensor_path, tensors, "model.", model.state_dict())
    best = {k[len("best."):]: v.to(device) for k, v in tensors.items() if k.startswith("best.")}
    if best:
        _check_state_dict(tensor_path, tensors, "best.", model.state_dict())
    model.load_state_dict(weights)
    opt_state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = value
    groups = meta.get("param_groups")
    try:
        for g in groups:
            g["betas"] = tuple(g["betas"])
        opt.load_state_dict({"state": opt_state, "param_groups": groups})
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{directory}: optimizer state does not fit the model ({exc})") from None
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    raw = dict(meta.get("state") or {})
    raw["best_metric"] = -math.inf if raw.get("best_metric") is None else raw["best_metric"]
    try:
        state = _State(**raw)
    except TypeError as exc:
        raise CheckpointError(f"{meta_path}: 'state' is malformed ({exc})") from None
    return state, best


# --------------------------------------------------------------------------- saved models


def save_model(model: GenerativeRecommender, directory: str | Path, tokenizer=None, extra: dict | None = None) -> Path:
    """model.safetensors (weights) + hparams.json (model.hparams, + `extra` facts) + tokenizer/
    (when given): everything to serve the model, no training state."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(directory / MODEL_TENSORS), metadata={"format": MODEL_FORMAT})
    meta = {"format": MODEL_FORMAT, "version": MODEL_VERSION, "arch": model.arch,
            "hparams": model.hparams, "num_params": model.num_params(), **(extra or {})}
    (directory / MODEL_META).write_text(json.dumps(meta, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(directory / TOKENIZER_DIR)
    return directory


def load_tokenizer(directory: str | Path):
    """-> the tokenizer saved beside a model in `directory` (its tokenizer/), or None."""
    from onerec.tokenizer import SemanticIdTokenizer

    path = Path(directory) / TOKENIZER_DIR
    return SemanticIdTokenizer.load(path) if path.is_dir() else None


def load_model(directory: str | Path, device: str | torch.device = "cpu"):
    """-> (model in eval mode, tokenizer or None) from a `save_model` directory. The tokenizer's
    codebook sizes must be the model's."""
    directory = Path(directory)
    meta = _read_json(directory / MODEL_META, MODEL_FORMAT, MODEL_VERSION, "save a model there first")
    try:
        hp = meta["hparams"]
        model = build_model(ModelConfig(**hp["cfg"]), **hp["extra"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory / MODEL_META}: 'hparams' do not describe a model ({exc})") from None
    tensors, _ = _read_tensors(directory / MODEL_TENSORS)
    model.load_state_dict(_check_state_dict(directory / MODEL_TENSORS, tensors, "", model.state_dict()))
    tokenizer = load_tokenizer(directory)
    if tokenizer is not None and tokenizer.codebook_sizes != model.codebook_sizes:
        raise CheckpointError(f"{directory}: tokenizer codebook sizes {tokenizer.codebook_sizes} != the "
                              f"model's {model.codebook_sizes}; they were not saved together")
    return model.to(device).eval(), tokenizer


# --------------------------------------------------------------------------- end to end


def run_training(cfg: Config, out_dir: str | Path, *, resume: bool = False, progress: bool = True,
                 tracking_uri: str | None = None, data_set: OfflineData | None = None,
                 tokenizer=None, run_tags: Mapping[str, str] | None = None) -> dict:
    """`onerec train`: the preset's data set -> leave-last-out split -> tokenizer (train events
    only) -> model -> train with validation -> test -> out_dir/{model.safetensors, hparams.json,
    MLmodel, tokenizer/, checkpoint/, metrics.json}. Returns the figures (also in metrics.json),
    with the MLflow run id when tracked.

    resume: continue from out_dir/checkpoint with the tokenizer saved in out_dir/tokenizer.
    tracking_uri: MLflow; default MLFLOW_TRACKING_URI, else the embedded stack's env file, else none.
    data_set / tokenizer: train on these (the retrain pipeline's snapshot and its fitted
    tokenizer) instead of loading cfg.data and fitting one. run_tags: extra MLflow run tags.
    """
    from onerec.endpoints import resolve_endpoints
    from onerec.tokenizer import SemanticIdTokenizer

    wall0 = time.perf_counter()
    out = Path(out_dir)
    threads = torch.get_num_threads()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    data_set = data_set or offline_data(cfg.data)
    ds, split, index, seqs = data_set.dataset, data_set.split, data_set.index, data_set.seqs
    tok_dir = out / TOKENIZER_DIR
    t0 = time.perf_counter()
    group = distributed.from_env()
    main = group is None or group.main                    # under torchrun only rank 0 writes and tracks
    if tokenizer is not None:
        tok = tokenizer
    elif resume and tok_dir.is_dir():
        tok = SemanticIdTokenizer.load(tok_dir)
    else:                                                 # deterministic: every rank fits the same one
        tok = fit_tokenizer(split.train, ds.items, cfg.tokenizer, cfg.seed)
    if main:
        tok.save(tok_dir)
    tokenizer_s = time.perf_counter() - t0
    codes = ItemCodes.from_tokenizer(tok, index)
    data = build_examples(seqs.train, codes, cfg.model.max_seq_len, cfg.model.session_len)
    torch.manual_seed(cfg.seed)                           # initial weights
    model = catalogue_model(cfg.model, tok, index, ds.items)

    uri = tracking_uri or resolve_endpoints(cfg.stack.state_dir).mlflow_tracking_uri
    tracker = Tracker(uri, experiment=f"onerec-train-{cfg.data.dataset}",
                      run_name=f"{cfg.preset}-{cfg.model.arch}", enabled=main)
    try:
        if tracker.active:
            tracker.log_params({"config": to_dict(cfg)})
            tracker.set_tags({"git_commit": source_version(), **(run_tags or {})})
        valid = seqs.for_validation().sample(cfg.train.valid_users, cfg.seed)
        result = train(model, data, cfg.train, valid=valid, seed=cfg.seed,
                       checkpoint_dir=out / "checkpoint", resume=resume, tracker=tracker, progress=progress)
        if not main:
            return {"rank": group.rank, "steps": result.steps, "stopped": result.stopped}
        t0 = time.perf_counter()
        test = evaluate_model(model, codes, seqs.for_test(), cfg.train.beam_size, cfg.train.batch_size)
        test_s = time.perf_counter() - t0
        test_set = seqs.for_test()
        popularity = evaluate(Popularity(len(index)).fit(test_set.histories).score, None,
                              test_set.histories, test_set.targets, n_items=len(index))
        report = tok.report()
        figures = {
            "preset": cfg.preset, "dataset": cfg.data.dataset, "arch": cfg.model.arch,
            "num_params": model.num_params(), "users": len(seqs.users), "items": len(index),
            "train_examples": len(data), "codebook_sizes": tok.codebook_sizes,
            "tokenizer_collision_rate": round(report["collision_rate"], 4), "tokenizer_s": round(tokenizer_s, 1),
            "steps": result.steps, "epochs": round(result.epochs, 2), "stopped": result.stopped,
            "best_step": result.best_step, "samples_per_s": round(result.samples_per_s, 1),
            "train_s": round(result.train_s, 1), "test_eval_s": round(test_s, 1),
            **{f"valid_{k}": round(v, 4) for k, v in result.best.items() if k.startswith(("recall", "ndcg"))},
            **{f"test_{k}": round(v, 4) for k, v in test.items() if k.startswith(("recall", "ndcg", "coverage"))},
            "test_users": test["n_users"],
            "test_popularity_recall@10": round(popularity["recall@10"], 4),
            "exclude_history": False, "out": str(out),
        }
        if tracker.active:
            figures["mlflow_run_id"] = tracker.run_id
        save_model(model, out, tokenizer=tok, extra={"figures": figures})
        figures["wall_s"] = round(time.perf_counter() - wall0, 1)
        (out / "metrics.json").write_text(json.dumps({"figures": figures, "history": result.history},
                                                     indent=1, default=str) + "\n")
        tracker.log_metrics({f"test_{k}": v for k, v in test.items()}, result.steps)
        tracker.write_mlmodel(out, flavor={"model_format": MODEL_FORMAT, "model_version": MODEL_VERSION,
                                           "arch": model.arch, "tokenizer": TOKENIZER_DIR})
        for name in (MODEL_TENSORS, MODEL_META, MLMODEL, "metrics.json"):
            tracker.log_artifacts(out / name, "model")
        tracker.log_artifacts(tok_dir, f"model/{TOKENIZER_DIR}")
    except BaseException:
        tracker.close(failed=True)
        raise
    finally:
        torch.set_num_threads(threads)
    tracker.close()
    return figures

