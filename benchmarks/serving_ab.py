"""Two predictor variants under the same load, servers alternating, so a machine whose speed drifts
between minutes hits both alike (one `benchmarks/serving.py` run per variant cannot tell a 10 %
change from that drift).

    .venv/bin/python benchmarks/serving_ab.py --model DIR [--preset small] [--set KEY=VALUE ...]
        --baseline=--set=serving.pipeline=false [--variant=ARGS] [--concurrency 32] [--rounds 3]
        [--seconds 8] [--json PATH]

--baseline and --variant are extra `python -m serving` arguments (any KServe option or --set),
either may be empty (write them `--baseline=...`: a value starting with -- is not taken as one
otherwise). One embedded stack, one registered champion (`--model`, or seeded random
weights); each round starts the baseline's server, measures every --concurrency level, stops it,
then the same for the variant. Prints per level each round's QPS and p50 / p99 ms, the medians,
and the variant / baseline ratio of the median QPS; figures last, as one JSON line.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))    # the repo root, when run as a script

import importlib.util  # noqa: E402

from onerec import stack  # noqa: E402
from onerec.cli import emit_figures  # noqa: E402
from onerec.config import load_config  # noqa: E402
from onerec.features import store as feast_store  # noqa: E402

# `serving` is the predictor's package: the load benchmark's module is loaded by its path
_spec = importlib.util.spec_from_file_location("serving_benchmark", Path(__file__).with_name("serving.py"))
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench                 # before it runs: its dataclasses look themselves up there
_spec.loader.exec_module(bench)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--model", type=Path, help="a saved `onerec train` output (default: random init)")
    parser.add_argument("--baseline", default="", help="extra server arguments of the baseline")
    parser.add_argument("--variant", default="", help="extra server arguments of the variant")
    parser.add_argument("--concurrency", default="32", help="comma-separated client thread counts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per level")
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    levels = sorted({int(c) for c in args.concurrency.split(",")})
    if not levels or levels[0] < 1 or args.rounds < 1:
        parser.error("--concurrency: positive integers; --rounds >= 1")
    variants = {"baseline": shlex.split(args.baseline), "variant": shlex.split(args.variant)}

    def on_term(*_):
        raise SystemExit(143)  # unwinds through the finally below: the stack is always stopped
    signal.signal(signal.SIGTERM, on_term)

    tmp = Path(tempfile.mkdtemp(prefix="onerec-bench-serving-ab-"))
    base = stack.isolated_overrides(tmp / "stack")
    cfg = load_config(args.preset, [*base, *args.overrides])
    os.environ[feast_store.FEAST_DIR_VAR] = str(tmp / "feast")
    rounds: dict[str, dict[int, list[dict]]] = {name: {c: [] for c in levels} for name in variants}
    try:
        from serving.process import ServerProcess

        online = bench.start_online(cfg, args.model, tmp)
        server_args = ["--preset", args.preset, *(f"--set={o}" for o in [*base, *args.overrides])]
        for r in range(args.rounds):
            for name, extra in variants.items():
                with ServerProcess([*server_args, *extra], dict(os.environ), tmp / f"{name}-{r}.log",
                                   model_name=cfg.registry.model_name) as server:
                    for c in levels:
                        call = bench.http_caller(server.url, cfg.registry.model_name, args.k, c)
                        row = bench.closed_loop(call, online.users, c, args.seconds, args.warmup_s)
                        rounds[name][c].append(row)
                        bench.log(f"round {r} {name:<8} C={c:<3} {row}")
    finally:
        stack.down(cfg)

    figures = {"benchmark": "serving_ab", "preset": cfg.preset, "model": str(args.model or "random init (seeded)"),
               "baseline": args.baseline, "variant": args.variant, "rounds": args.rounds,
               "seconds_per_level": args.seconds, "concurrency": levels}
    print(f"\nServing A/B ({cfg.preset}, {args.rounds} alternating rounds; baseline {args.baseline!r}, "
          f"variant {args.variant!r}): QPS, p50 / p99 ms per round")
    for c in levels:
        for name in variants:
            rows = rounds[name][c]
            for key in ("qps", "p50_ms", "p99_ms", "errors"):
                values = [row[key] for row in rows]
                figures[f"{name}_c{c}_{key}"] = values
                if key != "errors" and None not in values:
                    figures[f"{name}_c{c}_{key}_median"] = round(statistics.median(values), 2)
            print(f"  C={c:<3} {name:<8} " + ", ".join(
                f"{row['qps']:.0f} qps {row['p50_ms']} / {row['p99_ms']}" + (f" {row['errors']} err" if row["errors"] else "")
                for row in rows))
        qps = [figures.get(f"{name}_c{c}_qps_median") for name in variants]
        figures[f"qps_ratio_c{c}"] = round(qps[1] / qps[0], 3) if all(qps) else None
        print(f"  C={c:<3} variant / baseline median QPS: {figures[f'qps_ratio_c{c}']}x")
    emit_figures(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
