"""Beam-search latency: the tensorized trie + KV cache vs the plain reference, on the same batches.

    .venv/bin/python benchmarks/generate.py [--preset small] [--set KEY=VALUE ...] [--model DIR]
        [--batch-size 64] [--beam-size 20] [--session-len 1] [--repeats 5] [--ref-users 8]
        [--threads N] [--device cpu|cuda] [--json PATH]

Real inputs: the preset's data set, its leave-last-out split and a tokenizer fitted on the train
events (`onerec train`'s path); contexts are real users' test histories (the newest
model.max_seq_len items). The model is `--model DIR` (a saved `onerec train` output) or, by
default, the preset's model with seeded random weights: latency depends on shapes, not weights,
but which beams survive does, so a trained model gives the more realistic trie traffic.

Per batch of --batch-size users (median and p90 over --repeats, after one warm-up):
  (a) baseline: `reference_beam_search`: one user and one beam at a time, the whole prefix
      re-decoded each step, children read from a nested-dict trie. It is slow, so it runs on the
      first --ref-users users of the batch and its per-batch figure is scaled up linearly
      (its cost is per user: it has no batching);
  (b) ours: `generate`: all users x beams in one batch, KV cache, `CodeTrie` masks;
  (c) `generate` driven by the dict trie (`DictTrie`): separates the trie's share from the
      cache/batching share.
(a) and (b) must return the same items (and scores to 1e-4) on the reference users.
Prints a table, then the figures as one JSON line (last line of stdout).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when run as a script

import torch

from onerec.cli import emit_figures
from onerec.config import load_config
from onerec.eval.baselines import offline_data
from onerec.model import dict_trie, generate, reference_beam_search
from onerec.model.data import ItemCodes, catalogue_model, context_batch, fit_tokenizer
from onerec.model.train import load_model
from onerec.tokenizer.trie import DictTrie


def timed(fn, device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


def summary_ms(seconds: list[float], scale: float = 1.0) -> dict:
    ordered = sorted(s * scale * 1000 for s in seconds)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return {"median_ms": round(statistics.median(ordered), 2), "p90_ms": round(p90, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--model", type=Path, help="a saved `onerec train` output (default: random init)")
    parser.add_argument("--batch-size", type=int, default=64, help="users per batch")
    parser.add_argument("--beam-size", type=int, default=None, help="default: the preset's train.beam_size")
    parser.add_argument("--session-len", type=int, default=1, help="items generated per user")
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ref-users", type=int, default=8, help="users the reference runs on, per repeat")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    torch.set_num_threads(args.threads)
    load_start = round(os.getloadavg()[0], 2)

    cfg = load_config(args.preset, args.overrides)
    beam = args.beam_size or cfg.train.beam_size
    data = offline_data(cfg.data)
    if args.model:
        model, tok = load_model(args.model, device)
        if tok is None:
            parser.error(f"--model {args.model}: no tokenizer/ saved with the model")
    else:
        tok = fit_tokenizer(data.split.train, data.dataset.items, cfg.tokenizer, cfg.seed)
        torch.manual_seed(cfg.seed)
        model = catalogue_model(cfg.model, tok, data.index, data.dataset.items).to(device).eval()
    if args.session_len * model.n_levels > model.max_target_len:
        parser.error(f"--session-len {args.session_len}: the model decodes at most {model.cfg.session_len} items")
    codes = ItemCodes.from_tokenizer(tok, data.index)
    tensor_trie = codes.trie().to(device)
    plain_trie = DictTrie.from_codes(codes.table[1:], sizes=codes.sizes)
    nested = dict_trie(codes.table[1:])
    test = data.seqs.for_test()
    n_batches = max(1, args.repeats + 1)
    starts = [(i * args.batch_size) % max(1, len(test.targets) - args.batch_size) for i in range(n_batches)]
    batches = [context_batch(test.histories[s:s + args.batch_size], codes, model.cfg.max_seq_len, device)
               for s in starts]
    ref_users = min(args.ref_users, args.batch_size)

    def ours(ctx, trie):
        return generate(model, ctx, trie.allowed, trie.item_of, beam, args.session_len, args.topk)

    times = {"reference": [], "ours": [], "ours_dict_trie": []}
    agree, max_score_diff = True, 0.0
    with torch.no_grad():
        for i, ctx in enumerate(batches):  # batch 0 warms up (allocations, first-call costs)
            t_ours, (items, scores) = timed(lambda: ours(ctx, tensor_trie), device)
            t_dict, _ = timed(lambda: ours(ctx, plain_trie), device)
            head = {k: v[:ref_users] for k, v in ctx.items()}
            t_ref, (ref_items, ref_scores) = timed(
                lambda: reference_beam_search(model, head, nested, beam, args.session_len, args.topk), device)
            agree &= torch.equal(items[:ref_users].cpu(), ref_items.cpu())
            finite = torch.isfinite(ref_scores)
            max_score_diff = max(max_score_diff, float((scores[:ref_users].cpu() - ref_scores)[finite].abs().max()))
            if i:
                times["ours"].append(t_ours)
                times["ours_dict_trie"].append(t_dict)
                times["reference"].append(t_ref * args.batch_size / ref_users)  # per-user cost, scaled
    figures = {"benchmark": "generate", "preset": cfg.preset, "dataset": cfg.data.dataset,
               "model": str(args.model) if args.model else "random init (seeded)", "arch": model.arch,
               "device": str(device), "threads": args.threads, "batch_size": args.batch_size, "beam_size": beam,
               "session_len": args.session_len, "topk": args.topk, "levels": model.n_levels,
               "codebook_sizes": codes.sizes, "items": codes.n_items, "repeats": args.repeats,
               "reference_users_per_repeat": ref_users}
    for name, secs in times.items():
        figures.update({f"{name}_{k}": v for k, v in summary_ms(secs).items()})
    figures["ratio_reference_over_ours"] = round(figures["reference_median_ms"] / figures["ours_median_ms"], 1)
    figures["ratio_dict_trie_over_tensor_trie"] = round(figures["ours_dict_trie_median_ms"] /
                                                        figures["ours_median_ms"], 2)
    figures.update(items_agree=bool(agree), max_score_diff=round(max_score_diff, 6),
                   cpu_count=os.cpu_count(), loadavg_1m_start=load_start,
                   loadavg_1m_end=round(os.getloadavg()[0], 2), torch=torch.__version__,
                   python=platform.python_version(), date=time.strftime("%Y-%m-%d"))
    rows = [
        (f"(a) reference (dict trie, no cache), per batch of {args.batch_size}",
         f"{figures['reference_median_ms']:,.0f} ms (p90 {figures['reference_p90_ms']:,.0f}; "
         f"measured on {ref_users} users, scaled)"),
        ("(b) ours: generate + CodeTrie + KV cache", f"{figures['ours_median_ms']:,.1f} ms (p90 {figures['ours_p90_ms']:,.1f})"),
        ("(c) generate + DictTrie", f"{figures['ours_dict_trie_median_ms']:,.1f} ms"),
        ("ratio (a)/(b)", f"{figures['ratio_reference_over_ours']}x"),
        ("ratio (c)/(b): the trie's share", f"{figures['ratio_dict_trie_over_tensor_trie']}x"),
        ("(a) == (b): items, max |score diff|", f"{agree}, {figures['max_score_diff']}"),
    ]
    print(f"\nBeam search ({cfg.preset}, {cfg.data.dataset}, {figures['model']}, {device}, beam {beam}, "
          f"{args.session_len} item(s) x {model.n_levels} levels, {codes.n_items} items)")
    for label, value in rows:
        print(f"  {label:<58} {value}")
    emit_figures(figures, args.json)
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
