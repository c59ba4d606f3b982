"""Training-throughput benchmark: OneRec V1 (encoder-decoder) against V2 (lazy decoder-only).

    .venv/bin/python benchmarks/train.py [--preset small] [--set KEY=VALUE ...] [--steps 60]
                                         [--warmup 10] [--windows 5] [--batch-size N] [--threads N]
                                         [--device cpu|cuda] [--v1-full-encoder] [--json PATH]

The data path of `onerec train`: the preset's data set, leave-last-out split, the tokenizer fit on
the train events (`fit_tokenizer`), training examples from `build_examples`. Then, in the same
run, V1 (baseline) and V2 (ours) with the same model config except `arch` (d_model, heads,
layers, experts, max_seq_len, session_len, ...; V1's `n_encoder_layers` from the config, 0 =
n_layers; `--v1-full-encoder` adds a V1 with n_encoder_layers = n_layers): each model is built
with the seed, gets the library's optimizer (`make_optimizer`) and LR schedule (`lr_at`), and
takes the same training steps on the same batches (the preset seed's epoch-0 order): `--warmup`
untimed steps, then `--steps` timed steps in `--windows` windows. The archs take turns window by
window (the order alternating), so load from other work hits both alike.

A step is the one of `onerec.model.train._train` (replicated here, as the loop has no step
function): batch gathering (`TrainExamples.batch`), forward (bf16 autocast on CUDA),
zero_grad, backward, global-norm clipping, AdamW step. Figures per arch: examples/s (median over
the windows) and ms/step, parameters, forward FLOPs per sample (`model.flops_per_sample`) at the
preset's shapes (max_seq_len, session_len x levels), at the data's mean context length, and at
the shapes the timed batches had (batches are trimmed to their longest context/session), and
achieved GFLOP/s = 3 x forward FLOPs (executed shapes) x examples/s (the usual "backward = 2 x
forward" convention; matmuls only, see onerec/model/common.py). The loss of the first step and of
the last window are printed; a non-finite loss stops the benchmark.

Prints a table, then, as the last line of stdout, one JSON line with every figure.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when run as a script

import torch  # noqa: E402

from onerec.cli import emit_figures  # noqa: E402
from onerec.config import load_config  # noqa: E402
from onerec.eval.baselines import offline_data  # noqa: E402
from onerec.model.data import ItemCodes, build_examples, catalogue_model, fit_tokenizer  # noqa: E402
from onerec.model.layers import MoE  # noqa: E402
from onerec.model.train import _autocast, lr_at, make_optimizer, train_step  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- one arch


class Runner:
    """One model, its optimizer and RNG state, stepping through the shared batch list."""

    def __init__(self, name: str, model_cfg, catalogue, train_cfg, total_steps: int, seed: int,
                 device: torch.device):
        self.name, self.train_cfg, self.total_steps, self.device = name, train_cfg, total_steps, device
        torch.manual_seed(seed)                                   # initial weights, as run_training
        self.model = catalogue_model(model_cfg, *catalogue).to(device)  # catalogue = (tok, index, items)
        self.opt = make_optimizer(self.model, train_cfg)
        torch.manual_seed(seed)                                   # dropout draws, as _train
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.step = 0
        self.losses: list[float] = []                             # every step's loss, in order
        self.windows: list[dict] = []                             # timed windows

    def train_step(self, data, idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """onerec.model.train.train_step (batch gathering included, as the loop's samples/s)."""
        t0 = time.perf_counter()
        cpu_batch = data.batch(idx)
        batch_s = time.perf_counter() - t0
        loss, _ = train_step(self.model, self.opt, cpu_batch, lr_at(self.step, self.train_cfg, self.total_steps),
                             self.train_cfg.grad_clip, self.device)
        self.step += 1
        shape = {"context": cpu_batch["context"].shape[1], "target": cpu_batch["target"].shape[1],
                 "batch_s": batch_s}
        return loss.detach(), shape

    def run(self, data, batches: list[torch.Tensor], timed: bool) -> None:
        """Steps on `batches`; a timed window records seconds, examples and the batch shapes."""
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, self.device)
        losses, shapes = [], []
        sync(self.device)
        t0 = time.perf_counter()
        for idx in batches:
            loss, shape = self.train_step(data, idx)
            losses.append(loss)
            shapes.append((len(idx), shape))
        sync(self.device)
        seconds = time.perf_counter() - t0
        self.rng = torch.get_rng_state()
        if self.cuda_rng is not None:
            self.cuda_rng = torch.cuda.get_rng_state(self.device)
        values = [float(v) for v in torch.stack(losses).float().cpu()]
        if not all(math.isfinite(v) for v in values):
            raise FloatingPointError(f"{self.name}: non-finite training loss at steps "
                                     f"{self.step - len(values)}..{self.step - 1}: {values}")
        self.losses.extend(values)
        if timed:
            examples = sum(n for n, _ in shapes)
            self.windows.append({"seconds": seconds, "steps": len(batches), "examples": examples,
                                 "shapes": shapes, "loss": statistics.fmean(values)})

    @torch.no_grad()
    def moe_padding(self, data, idx: torch.Tensor) -> float | None:
        """Executed / routed expert rows of the MoE fast path on one batch: E x C_max / (N x k)
        (1.0 = perfectly balanced experts; the dispatch pads every expert to the busiest one)."""
        ratios = []

        def hook(module, inputs, _output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            probs = module.router(x).float().softmax(dim=-1)
            expert = probs.topk(module.top_k, dim=-1).indices.reshape(-1)
            counts = torch.bincount(expert, minlength=module.n_experts)
            ratios.append(float(module.n_experts * counts.max()) / expert.numel())

        handles = [m.register_forward_hook(hook) for m in self.model.modules() if isinstance(m, MoE)]
        if not handles:
            return None
        try:
            self.model.eval()
            batch = {k: v.to(self.device) for k, v in data.batch(idx).items()}
            with _autocast(self.device):
                self.model(batch)
        finally:
            for h in handles:
                h.remove()
        return statistics.fmean(ratios)


# --------------------------------------------------------------------------- figures


def summarize(r: Runner, data, levels: int, mean_ctx: float, preset_shapes: tuple[int, int],
              moe_padding: float | None) -> dict:
    model = r.model
    rates = [w["examples"] / w["seconds"] for w in r.windows]
    ms_step = [1000 * w["seconds"] / w["steps"] for w in r.windows]
    shapes = [s for w in r.windows for s in w["shapes"]]
    examples = sum(n for n, _ in shapes)
    # executed forward FLOPs per example: each timed batch at its trimmed (S_b, M_b x L) shape
    executed = sum(n * model.flops_per_sample(s["context"], s["target"] * levels) for n, s in shapes) / examples
    batch_ms = 1000 * sum(s["batch_s"] for _, s in shapes) / len(shapes)
    rate = statistics.median(rates)
    s_max, t_max = preset_shapes
    out = {
        "examples_per_s": round(rate, 1),
        "window_examples_per_s": [round(x, 1) for x in rates],
        "ms_per_step": round(statistics.median(ms_step), 2),
        "batch_gather_ms_per_step": round(batch_ms, 2),
        "params": model.num_params(),
        "flops_per_sample_preset": model.flops_per_sample(s_max, t_max),
        "flops_per_sample_mean_context": model.flops_per_sample(round(mean_ctx), t_max),
        "flops_per_sample_executed": round(executed),
        "gflop_per_s": round(3 * executed * rate / 1e9, 3),
        "mean_batch_context": round(statistics.fmean(s["context"] for _, s in shapes), 2),
        "mean_batch_target_items": round(statistics.fmean(s["target"] for _, s in shapes), 2),
        "loss_first_step": round(r.losses[0], 4),
        "loss_first_window": round(r.windows[0]["loss"], 4),
        "loss_last_window": round(r.windows[-1]["loss"], 4),
        "loss_decreased": r.windows[-1]["loss"] < r.losses[0],
        "moe_padding": None if moe_padding is None else round(moe_padding, 3),
    }
    if model.arch == "v1":
        out["n_encoder_layers"] = model.n_encoder_layers
    return out


def human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. data.dataset=amazon-beauty (repeatable)")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per arch")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per arch first")
    parser.add_argument("--windows", type=int, default=5, help="timed windows (examples/s = their median)")
    parser.add_argument("--batch-size", type=int, default=0, help="default: the preset's train.batch_size")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads; default the preset's train.num_threads, else torch's")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda (bf16 autocast, as training)")
    parser.add_argument("--v1-full-encoder", action="store_true",
                        help="also time V1 with n_encoder_layers = n_layers")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.steps < args.windows or args.windows < 1 or args.warmup < 0:
        parser.error("need --windows >= 1, --steps >= --windows and --warmup >= 0")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")

    load_start = round(os.getloadavg()[0], 2)           # other work on the machine skews every figure
    wall0 = time.perf_counter()
    overrides = list(args.overrides)
    if args.batch_size:
        overrides.append(f"train.batch_size={args.batch_size}")
    cfg = load_config(args.preset, overrides)
    threads = args.threads or cfg.train.num_threads
    if threads:
        torch.set_num_threads(threads)
    busy = os.getloadavg()[0] + torch.get_num_threads() - (os.cpu_count() or 1)
    if torch.get_num_threads() > 1 and device.type == "cpu" and busy > 0.5:
        log(f"warning: {torch.get_num_threads()} torch threads with a 1-minute load average of "
            f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores: oversubscribed intra-op threads can "
            f"make every step many times slower (2026-11-24, small: ~20x); compare with --threads 1")

    # ---- the data path of `onerec train` (run_training)
    log(f"loading {cfg.data.dataset} (preset {cfg.preset})")
    data_set = offline_data(cfg.data)
    t0 = time.perf_counter()
    tok = fit_tokenizer(data_set.split.train, data_set.dataset.items, cfg.tokenizer, cfg.seed)
    tokenizer_s = time.perf_counter() - t0
    codes = ItemCodes.from_tokenizer(tok, data_set.index)
    S, M, L = cfg.model.max_seq_len, cfg.model.session_len, codes.levels
    data = build_examples(data_set.seqs.train, codes, S, M)
    mean_ctx = float((data.pos - data.start).clamp(max=S).float().mean())
    mean_tgt = float((data.end - data.pos).clamp(max=M).float().mean())
    steps_per_epoch = data.steps_per_epoch(cfg.train.batch_size)
    total_steps = cfg.train.epochs * steps_per_epoch      # the LR schedule's span, as in training
    need = args.warmup + args.steps
    order = data.epoch_batches(cfg.train.batch_size, 0, cfg.seed)
    batches = [order[i % len(order)] for i in range(need)]  # wraps (same order) past one epoch
    if any(len(b) < cfg.train.batch_size for b in batches):
        log("note: the epoch's last, smaller batch is among the steps (examples/s counts its examples)")
    log(f"{len(data)} examples, codebooks {tok.codebook_sizes}, tokenizer {tokenizer_s:.1f}s; "
        f"mean context {mean_ctx:.1f}/{S} events, mean target {mean_tgt:.2f}/{M} items")

    # ---- the archs: same config but arch
    variants = [("v1", dataclasses.replace(cfg.model, arch="v1")),
                ("v2", dataclasses.replace(cfg.model, arch="v2"))]
    if args.v1_full_encoder:
        variants.append(("v1_full_encoder", dataclasses.replace(cfg.model, arch="v1", n_encoder_layers=0)))
    catalogue = (tok, data_set.index, data_set.dataset.items)
    runners = [Runner(name, mcfg, catalogue, cfg.train, total_steps, cfg.seed, device)
               for name, mcfg in variants]
    for r in runners:
        log(f"{r.name}: {r.model.num_params():,} params, {args.warmup} warmup steps")
        r.run(data, batches[:args.warmup], timed=False)
    bounds = [args.warmup + (args.steps * w) // args.windows for w in range(args.windows + 1)]
    for w in range(args.windows):
        window = batches[bounds[w]:bounds[w + 1]]
        for r in (runners if w % 2 == 0 else runners[::-1]):   # alternate who goes first
            r.run(data, window, timed=True)
        log(f"window {w + 1}/{args.windows}: " + ", ".join(
            f"{r.name} {r.windows[-1]['examples'] / r.windows[-1]['seconds']:.0f} ex/s" for r in runners))
    load_end = round(os.getloadavg()[0], 2)

    res = {r.name: summarize(r, data, L, mean_ctx, (S, M * L), r.moe_padding(data, batches[-1]))
           for r in runners}
    ratio = res["v2"]["examples_per_s"] / res["v1"]["examples_per_s"]
    flops_ratio = res["v2"]["flops_per_sample_preset"] / res["v1"]["flops_per_sample_preset"]
    m = cfg.model
    figures = {
        "benchmark": "train", "preset": cfg.preset, "dataset": cfg.data.dataset, "overrides": args.overrides,
        "examples": len(data), "users": len(data_set.seqs.users), "items": len(data_set.index),
        "codebook_sizes": tok.codebook_sizes, "tokenizer_s": round(tokenizer_s, 1),
        "d_model": m.d_model, "n_heads": m.n_heads, "n_kv_heads": m.n_kv_heads or m.n_heads,
        "n_layers": m.n_layers, "n_encoder_layers_cfg": m.n_encoder_layers, "n_experts": m.n_experts,
        "top_k_experts": m.top_k_experts, "ffn_mult": m.ffn_mult, "activation": m.activation,
        "dropout": m.dropout, "max_seq_len": S, "session_len": M, "levels": L,
        "mean_context": round(mean_ctx, 2), "mean_target_items": round(mean_tgt, 3),
        "batch_size": cfg.train.batch_size, "warmup": args.warmup, "steps": args.steps, "windows": args.windows,
        "lr_schedule_steps": f"{args.warmup + args.steps} of {total_steps} (warmup {cfg.train.warmup_steps})",
        **{f"{name}_{k}": v for name, fig in res.items() for k, v in fig.items()},
        "ratio_v2_v1_examples_per_s": round(ratio, 3),
        "ratio_v2_v1_flops_per_sample": round(flops_ratio, 3),
        "flops_convention": "matmul FLOPs (2 per MAC) of one forward; GFLOP/s = 3 x forward x examples/s",
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "loadavg_1m_start": load_start, "loadavg_1m_end": load_end,
        "torch": torch.__version__, "python": platform.python_version(),
        "wall_s": round(time.perf_counter() - wall0, 1), "date": time.strftime("%Y-%m-%d"),
    }

    names = [r.name for r in runners]
    def row(label, key, fmt=str):
        return (label, [fmt(res[n][key]) if res[n].get(key) is not None else "-" for n in names])
    rows = [
        row("examples/s (median of windows)", "examples_per_s", lambda v: f"{v:,.0f}"),
        row("ms/step", "ms_per_step", lambda v: f"{v:.1f}"),
        row("  of which batch gathering, ms", "batch_gather_ms_per_step", lambda v: f"{v:.1f}"),
        row("params", "params", lambda v: f"{v:,}"),
        row("n_encoder_layers", "n_encoder_layers"),
        row(f"fwd FLOPs/sample @ preset ({S} ctx, {M}x{L} tgt)", "flops_per_sample_preset", human),
        row(f"fwd FLOPs/sample @ mean ctx ({mean_ctx:.1f})", "flops_per_sample_mean_context", human),
        row("fwd FLOPs/sample @ timed batch shapes", "flops_per_sample_executed", human),
        row("achieved GFLOP/s (3 x fwd x ex/s)", "gflop_per_s", lambda v: f"{v:.2f}"),
        row("MoE executed/routed expert rows", "moe_padding", lambda v: f"{v:.2f}"),
        row("loss: first step -> last window", "loss_first_step", lambda v: f"{v:.3f}"),
    ]
    for i, n in enumerate(names):
        rows[-1][1][i] += f" -> {res[n]['loss_last_window']:.3f}"
    width = max(len(r[0]) for r in rows)
    col = max(14, *(len(c) for _, cells in rows for c in cells))
    print(f"\nTraining benchmark (preset {cfg.preset}, {cfg.data.dataset}, {len(data):,} examples, "
          f"batch {cfg.train.batch_size}, {args.steps} timed steps after {args.warmup}, {device}, "
          f"{torch.get_num_threads()} threads)")
    print(f"  {'':<{width}}  " + "  ".join(f"{n:>{col}}" for n in names))
    for label, cells in rows:
        print(f"  {label:<{width}}  " + "  ".join(f"{c:>{col}}" for c in cells))
    print(f"  {'ratio v2/v1 examples/s':<{width}}  {ratio:.2f}")
    print(f"  {'ratio v2/v1 FLOPs/sample @ preset':<{width}}  {flops_ratio:.2f}")
    print(f"  {'cpus, load average (1 min) start/end':<{width}}  {os.cpu_count()}, {load_start}/{load_end}")
    emit_figures(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
