"""The serving beam width: what each width costs per request and what it changes in the top k.

    .venv/bin/python benchmarks/beam_width.py --model DIR [--preset small] [--set KEY=VALUE ...]
        [--widths 20,16,12,10] [--head N] [--k 10] [--batch-sizes 1,8,16] [--repeats 15] [--threads 1]
        [--json PATH]

`serving.beam_size` sets the beams of the constrained search per request (the hybrid also scores
the dense head's top `beam_size` items). A wider beam costs time per request; this measures what
it buys, on real users of the preset's data set, with a trained model (`--model`, an `onerec
train` output; the ranking of random weights says nothing):
  - quality: Recall@k and NDCG@k of the served top k (`topk_next_items`, k = --k) on the
    validation and the test split, every user, history kept (the published protocol);
  - latency: `ServedModel.top_items` in process (no HTTP, no feature lookup) on batches of real
    test histories, every width timed in turn within each repeat (so a slow phase of the machine
    hits all widths alike), median per batch after one warm-up.
With --head N the dense head's top N items are scored at every width (`serving.head_candidates`),
so only the beams change; without it, each width is also the head's (the old coupling).
The first width is the baseline: each row prints its latency ratio to it and its metric deltas.
Figures last, as one JSON line.
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

from onerec.cli import emit_figures  # noqa: E402
from onerec.config import load_config  # noqa: E402
from onerec.eval.baselines import offline_data  # noqa: E402
from onerec.model.train import evaluate_model  # noqa: E402
from onerec.serve import ServedModel  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a saved `onerec train` output")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--widths", default="20,16,12,10", help="beam widths; the first is the baseline")
    parser.add_argument("--head", type=int, help="the hybrid's head items at every width (default: the width)")
    parser.add_argument("--k", type=int, default=10, help="items per request")
    parser.add_argument("--batch-sizes", default="1,8,16", help="users per timed call")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the served model's: 1 on small)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    widths = [int(w) for w in args.widths.split(",")]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if max(min(widths), args.head or 0) < args.k:
        parser.error(f"--widths: every width must be >= --k ({args.k}): the k best items are k beams")
    torch.set_num_threads(args.threads)
    cfg = load_config(args.preset, args.overrides)
    data = offline_data(cfg.data)
    served = ServedModel.from_dir(args.model, "benchmark", "champion")
    if not np.array_equal(served.item_ids, data.index.item_ids):  # the splits' item indices are the model's
        parser.error(f"--model {args.model} was trained on another catalogue than {cfg.data.dataset}")
    splits = {"valid": data.seqs.for_validation(), "test": data.seqs.for_test()}
    figures = {"benchmark": "beam_width", "preset": cfg.preset, "dataset": cfg.data.dataset,
               "model": str(args.model), "k": args.k, "widths": widths, "batch_sizes": batch_sizes,
               "head": args.head, "threads": args.threads, "repeats": args.repeats}

    for w in widths:
        for name, split in splits.items():
            metrics = evaluate_model(served.model, served.codes, split, w, cfg.eval.batch_size, trie=served.trie,
                                     head_k=args.head)
            figures.update({f"w{w}_{name}_{m}": round(metrics[f"{m}@{args.k}"], 4) for m in ("recall", "ndcg")})
        print(f"[{time.strftime('%H:%M:%S')}] width {w}: test R@{args.k} {figures[f'w{w}_test_recall']}",
              file=sys.stderr, flush=True)

    test = splits["test"].histories
    times = {(w, b): [] for w in widths for b in batch_sizes}
    for r in range(args.repeats + 1):                       # repeat 0 warms up
        for b in batch_sizes:
            start = (r * b) % max(1, len(test) - b)
            batch = [np.asarray(h, dtype=np.int64) for h in test[start:start + b]]
            for w in widths:
                t0 = time.perf_counter()
                served.top_items(batch, args.k, w, args.head)
                if r:
                    times[w, b].append(time.perf_counter() - t0)
    for (w, b), secs in times.items():
        figures[f"w{w}_batch{b}_median_ms"] = round(statistics.median(secs) * 1000, 2)

    base = widths[0]
    print(f"\nServing beam width ({cfg.preset}, {cfg.data.dataset}, k {args.k}, {args.threads} torch thread(s))")
    print(f"  {'width':>5} | {'valid R / N':>15} | {'test R / N':>15} | " +
          " | ".join(f"batch {b:>2} ms (x{base})" for b in batch_sizes))
    for w in widths:
        cells = []
        for b in batch_sizes:
            ratio = figures[f"w{base}_batch{b}_median_ms"] / figures[f"w{w}_batch{b}_median_ms"]
            figures[f"speedup_w{w}_batch{b}"] = round(ratio, 2)
            cells.append(f"{figures[f'w{w}_batch{b}_median_ms']:>7.1f} ({ratio:4.2f}x)")
        print(f"  {w:>5} | {figures[f'w{w}_valid_recall']:.4f} / {figures[f'w{w}_valid_ndcg']:.4f} | "
              f"{figures[f'w{w}_test_recall']:.4f} / {figures[f'w{w}_test_ndcg']:.4f} | " + " | ".join(cells))
    figures.update(cpu_count=os.cpu_count(), torch=torch.__version__, python=platform.python_version(),
                   date=time.strftime("%Y-%m-%d"))
    emit_figures(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
