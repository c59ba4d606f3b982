"""`onerec ...`: every user-facing action. Each command is a thin wrapper over a library call.

Common options on every command: --config PRESET|FILE (default: $ONEREC_PRESET or `small`),
--set KEY=VALUE (repeatable). Commands that report figures print them last as one JSON line
and take --json PATH.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

from onerec.config import Config, ConfigError, load_config

DEFAULT_PRESET = os.environ.get("ONEREC_PRESET", "small")


def emit_figures(figures: dict, json_path: str | None) -> None:
    """The machine-readable result: the last line of stdout, and optionally a file."""
    line = json.dumps(figures, sort_keys=True, default=str)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(line + "\n")
    print(line, flush=True)


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- commands

def cmd_stack(cfg: Config, args: argparse.Namespace) -> int:
    from onerec import stack

    if args.action == "up":
        t0 = time.monotonic()
        statuses = stack.up(cfg, _progress)
        print(stack.format_status(statuses))
        print(f"stack healthy in {time.monotonic() - t0:.1f}s; endpoints in "
              f"{Path(cfg.stack.state_dir) / 'stack.env'}")
    elif args.action == "down":
        stopped = stack.down(cfg)
        print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
    elif args.action == "status":
        statuses = stack.status(cfg)
        print(stack.format_status(statuses))
        return 0 if all(s.state == "healthy" for s in statuses) else 3
    elif args.action == "logs":
        print(stack.logs(cfg, args.parts, args.lines))
    return 0


def cmd_data_describe(cfg: Config, args: argparse.Namespace) -> int:
    from onerec.data import describe, format_table, load_dataset

    stats = describe(load_dataset(cfg.data))
    print(format_table(stats))
    emit_figures(stats, args.json)
    return 0


def cmd_config_show(cfg: Config, args: argparse.Namespace) -> int:
    import yaml

    from onerec.config import to_dict
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def _redis(cfg: Config):
    import redis

    from onerec.endpoints import REDIS_URL, resolve_endpoints
    return redis.Redis.from_url(resolve_endpoints(cfg.stack.state_dir).require(REDIS_URL))


def cmd_features_apply(cfg: Config, args: argparse.Namespace) -> int:
    from onerec.features.store import apply_repo

    print("applied: " + ", ".join(apply_repo(cfg)))
    return 0


def cmd_features_backfill(cfg: Config, args: argparse.Namespace) -> int:
    from onerec.features.backfill import backfill

    emit_figures(backfill(cfg, _redis(cfg)), args.json)
    return 0


def cmd_replay(cfg: Config, args: argparse.Namespace) -> int:
    from onerec.endpoints import KAFKA_BOOTSTRAP, resolve_endpoints
    from onerec.stream.replay import parse_speed, replay

    speed = None if args.max else parse_speed(args.speed)
    bootstrap = resolve_endpoints(cfg.stack.state_dir).require(KAFKA_BOOTSTRAP)
    emit_figures(replay(cfg, bootstrap, speed, args.limit), args.json)
    return 0


def cmd_ingest(cfg: Config, args: argparse.Namespace) -> int:
    from onerec.stream.ingest import open_ingestor

    ingestor = open_ingestor(cfg)
    ingestor.install_signal_handlers()
    if cfg.ingest.metrics_port:
        ingestor.metrics.serve(cfg.ingest.metrics_port)
    _progress(f"ingesting {cfg.kafka.user_events.name} as group {cfg.ingest.group_id}")
    emit_figures(ingestor.run(idle_exit_s=args.idle_exit, max_records=args.max_records).as_dict(), args.json)
    return 0


def cmd_simulate(cfg: Config, args: argparse.Namespace) -> int:
    from onerec.endpoints import KAFKA_BOOTSTRAP, resolve_endpoints
    from onerec.simulate import simulate

    bootstrap = resolve_endpoints(cfg.stack.state_dir).require(KAFKA_BOOTSTRAP)
    emit_figures(simulate(cfg, args.url, bootstrap), args.json)
    return 0


def cmd_rewards_join(cfg: Config, args: argparse.Namespace) -> int:
    from onerec.stream.rewards import open_joiner

    joiner = open_joiner(cfg)
    joiner.install_signal_handlers()
    _progress(f"joining {cfg.kafka.exposures.name} x {cfg.kafka.user_events.name} as group {cfg.rewards.group_id}")
    emit_figures(joiner.run(idle_exit_s=args.idle_exit, max_rows=args.max_rows), args.json)
    return 0


def cmd_rewards_show(cfg: Config, args: argparse.Namespace) -> int:
    from onerec.abtest.store import ABStore
    from onerec.endpoints import ab_store_url
    from onerec.stream.rewards import load_rewards

    experiments = ABStore.open(ab_store_url(cfg.stack.state_dir)).experiments()
    emit_figures({"offline_rows": len(load_rewards(cfg)), "experiments": experiments}, args.json)
    return 0


def cmd_abtest_report(cfg: Config, args: argparse.Namespace) -> int:
    from onerec.abtest.dashboard import open_dashboard

    try:
        card = open_dashboard(cfg, args.metrics_url).card(args.experiment)
    except KeyError as exc:
        print(f"error: {str(exc).strip(chr(39))}", file=sys.stderr)
        return 2
    _progress(f"{card['experiment']}: {card['decision']} ({card['decision_reason']})")
    emit_figures(card, args.json)
    return 0


def cmd_dashboard(cfg: Config, args: argparse.Namespace) -> int:
    import uvicorn

    from onerec.abtest.dashboard import create_app, open_dashboard

    host, port = args.host or cfg.abtest.dashboard_host, args.port or cfg.abtest.dashboard_port
    _progress(f"A/B dashboard on http://{host}:{port}/ ({'actions need the token' if cfg.abtest.action_token else 'read-only'})")
    uvicorn.run(create_app(open_dashboard(cfg, args.metrics_url)), host=host, port=port, log_level="warning")
    return 0


def cmd_guardrail_watch(cfg: Config, args: argparse.Namespace) -> int:
    from onerec.abtest.guardrail import open_watcher

    watcher, stop = open_watcher(cfg, args.metrics_url), threading.Event()
    if args.once:
        emit_figures(watcher.check(), args.json)
        return 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    _progress(f"watching the champion of '{cfg.registry.model_name}' every {cfg.abtest.watch_interval_s:g} s")
    watcher.run(stop, on_look=lambda look: _progress(json.dumps(look, default=str)) if look["state"] != "idle" else None)
    return 0


def cmd_align(cfg: Config, args: argparse.Namespace) -> int:
    from onerec.rl.offline import align_saved_model

    emit_figures(align_saved_model(cfg, args.model, args.out, args.rewards, _progress), args.json)
    return 0


def cmd_train(cfg: Config, args: argparse.Namespace) -> int:
    from onerec.model.train import run_training

    _progress(f"training {cfg.model.arch} on {cfg.data.dataset} ({cfg.preset}) into {args.out}")
    emit_figures(run_training(cfg, args.out, resume=args.resume), args.json)
    return 0


def cmd_eval(cfg: Config, args: argparse.Namespace) -> int:
    from onerec.eval.report import run_eval

    _progress(f"evaluating on {cfg.data.dataset} ({cfg.preset}): popularity, SASRec, OneRec {cfg.model.arch}")
    emit_figures(run_eval(cfg, args.out, model_dir=args.model), args.json)
    return 0


class _ArchOverride(argparse.Action):
    """--arch v1 is --set model.arch=v1."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.overrides = [*namespace.overrides, f"model.arch={values}"]


def cmd_demo(cfg: Config, args: argparse.Namespace) -> int:
    from onerec.demo import run_demo

    emit_figures(run_demo(cfg, _progress, preset=args.config, overrides=args.overrides), args.json)
    return 0


def cmd_pipelines(cfg: Config, args: argparse.Namespace) -> int:
    from onerec import pipelines

    # the components load the config themselves: hand them the preset and overrides as given
    preset, overrides = args.config, args.overrides
    if args.action == "compile":
        print(pipelines.compile_pipeline(cfg, args.pipeline, args.output))
        return 0
    _progress(f"{args.action} pipeline '{args.pipeline}' (preset {preset})")
    if args.action == "run":
        figures = pipelines.run_local(cfg, args.pipeline, preset, overrides, as_of=args.as_of or "")
    elif args.action == "submit":
        figures = pipelines.submit(cfg, args.pipeline, preset, overrides)
    else:
        figures = pipelines.schedule(cfg, args.pipeline, preset, overrides, cron=args.cron)
    emit_figures(figures, args.json)
    return 0


def _registry(cfg: Config):
    from onerec.endpoints import MLFLOW_TRACKING_URI, resolve_endpoints
    from onerec.registry import Registry

    uri = resolve_endpoints(cfg.stack.state_dir).require(MLFLOW_TRACKING_URI)
    return Registry.connect(uri, cfg.registry.model_name)


def cmd_model_list(cfg: Config, args: argparse.Namespace) -> int:
    from onerec.registry import format_versions

    reg = _registry(cfg)
    rows = reg.versions()
    print(format_versions(rows, cfg.registry.select_metric))
    if args.audit:
        for e in reg.audit_trail():
            print(f"{e.when}  {e.who:<16} {e.action:<15} {e.alias:<10} {e.from_version or '-':>3} -> "
                  f"{e.to_version or '-':<3} {e.reason}")
    return 0


def cmd_model_move(cfg: Config, args: argparse.Namespace) -> int:
    reg = _registry(cfg)
    if args.action == "promote":
        move = reg.promote(args.version, reason=args.reason, dry_run=args.dry_run)
    else:
        move = reg.rollback(args.to, reason=args.reason, dry_run=args.dry_run)
    print(move.describe())
    return 0


# --------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", "--preset", dest="config", default=DEFAULT_PRESET,
                        help="preset name (debug, small, full) or YAML path [%(default)s]")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set model.d_model=256 (repeatable)")
    json_out = argparse.ArgumentParser(add_help=False)
    json_out.add_argument("--json", metavar="PATH", help="also write the figures' JSON line here")

    parser = argparse.ArgumentParser(prog="onerec", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p_stack = sub.add_parser("stack", help="the embedded local stack (Kafka, Redis, MLflow)")
    stack_sub = p_stack.add_subparsers(dest="action", required=True)
    stack_sub.add_parser("up", parents=[common], help="start and wait until healthy (idempotent)")
    stack_sub.add_parser("down", parents=[common], help="stop what `up` started")
    stack_sub.add_parser("status", parents=[common], help="a health table; exit 3 if not all healthy")
    p_logs = stack_sub.add_parser("logs", parents=[common], help="the last lines of each part's log")
    p_logs.add_argument("parts", nargs="*", help="kafka, redis, mlflow (default: all)")
    p_logs.add_argument("-n", "--lines", type=int, default=40)
    p_stack.set_defaults(func=cmd_stack)

    p_data = sub.add_parser("data", help="data sets")
    data_sub = p_data.add_subparsers(dest="action", required=True)
    data_sub.add_parser("describe", parents=[common, json_out],
                        help="users, items, interactions, time span, sparsity").set_defaults(func=cmd_data_describe)

    p_config = sub.add_parser("config", help="configuration")
    config_sub = p_config.add_subparsers(dest="action", required=True)
    config_sub.add_parser("show", parents=[common], help="print the resolved config").set_defaults(func=cmd_config_show)

    p_features = sub.add_parser("features", help="the Feast feature store")
    features_sub = p_features.add_subparsers(dest="action", required=True)
    features_sub.add_parser("apply", parents=[common],
                            help="register feature_repo/ (entities, views, services)").set_defaults(func=cmd_features_apply)
    features_sub.add_parser("backfill", parents=[common, json_out],
                            help="history (before T0) -> offline store -> materialize online").set_defaults(
                                func=cmd_features_backfill)

    p_replay = sub.add_parser("replay", parents=[common, json_out],
                              help="publish the live part (from T0) to Kafka in event-time order")
    pace = p_replay.add_mutually_exclusive_group()
    pace.add_argument("--speed", default="1000x", help="event time / wall time, e.g. 100x [%(default)s]")
    pace.add_argument("--max", action="store_true", help="as fast as possible")
    p_replay.add_argument("--limit", type=int, help="only the first N live events")
    p_replay.set_defaults(func=cmd_replay)

    p_ingest = sub.add_parser("ingest", parents=[common, json_out],
                              help="consume user events into the feature store (a consumer-group member)")
    p_ingest.add_argument("--idle-exit", type=float, metavar="S", help="stop after S seconds without records")
    p_ingest.add_argument("--max-records", type=int, metavar="N", help="stop after N records")
    p_ingest.set_defaults(func=cmd_ingest)

    p_sim = sub.add_parser("simulate", parents=[common, json_out],
                           help="simulated users request recommendations over HTTP and react on Kafka")
    p_sim.add_argument("--url", default=os.environ.get("ONEREC_PREDICTOR_URL", "http://127.0.0.1:8080"),
                       help="the predictor (KServe v1) [ONEREC_PREDICTOR_URL or %(default)s]")
    p_sim.set_defaults(func=cmd_simulate)

    p_rewards = sub.add_parser("rewards", help="the reward joiner: exposures x reactions -> rewards")
    rewards_sub = p_rewards.add_subparsers(dest="action", required=True)
    p_join = rewards_sub.add_parser("join", parents=[common, json_out],
                                    help="join exposures and reactions (a consumer-group member)")
    p_join.add_argument("--idle-exit", type=float, metavar="S", help="close everything and stop after S idle seconds")
    p_join.add_argument("--max-rows", type=int, metavar="N", help="stop after N rows")
    p_join.set_defaults(func=cmd_rewards_join)
    rewards_sub.add_parser("show", parents=[common, json_out],
                           help="joined rows in the offline store, experiments in the A/B store").set_defaults(
                               func=cmd_rewards_show)

    metrics = argparse.ArgumentParser(add_help=False)
    metrics.add_argument("--metrics-url", default=os.environ.get("ONEREC_PREDICTOR_METRICS_URL"),
                         help="the predictor's Prometheus metrics, for the error-rate guardrail "
                              "[ONEREC_PREDICTOR_METRICS_URL; unset: not checked]")
    p_abtest = sub.add_parser("abtest", help="A/B experiments: the scorecard")
    abtest_sub = p_abtest.add_subparsers(dest="action", required=True)
    p_report = abtest_sub.add_parser("report", parents=[common, json_out, metrics],
                                     help="one experiment's scorecard (what the dashboard shows) as JSON")
    p_report.add_argument("experiment")
    p_report.set_defaults(func=cmd_abtest_report)
    p_dash = sub.add_parser("dashboard", parents=[common, metrics], help="the A/B dashboard (web) and its JSON API")
    p_dash.add_argument("--host", help="[abtest.dashboard_host]")
    p_dash.add_argument("--port", type=int, help="[abtest.dashboard_port]")
    p_dash.set_defaults(func=cmd_dashboard)
    p_guard = sub.add_parser("guardrail", help="the automatic guardrail on newly promoted champions")
    guard_sub = p_guard.add_subparsers(dest="action", required=True)
    p_watch = guard_sub.add_parser("watch", parents=[common, json_out, metrics],
                                   help="roll a newly promoted champion back when it breaches a guardrail")
    p_watch.add_argument("--once", action="store_true", help="one look, print it, exit")
    p_watch.set_defaults(func=cmd_guardrail_watch)

    p_align = sub.add_parser("align", parents=[common, json_out],
                             help="align a saved model with a reward model (align.method), check it on held-out ratings")
    p_align.add_argument("--model", required=True, metavar="DIR", help="a saved `onerec train` output (the champion)")
    p_align.add_argument("--out", required=True, metavar="DIR", help="where the aligned model is saved")
    p_align.add_argument("--rewards", choices=["ratings", "joined"], default="ratings",
                         help="the reward model's data: seen real ratings, or joined exposure rows [%(default)s]")
    p_align.set_defaults(func=cmd_align)

    arch = argparse.ArgumentParser(add_help=False)
    arch.add_argument("--arch", choices=["v1", "v2"], action=_ArchOverride, help="shortcut for --set model.arch=...")
    p_train = sub.add_parser("train", parents=[common, json_out, arch],
                             help="fit the tokenizer, train OneRec, test it (leave-last-out), save it")
    p_train.add_argument("--out", metavar="DIR", required=True,
                         help="writes model.safetensors, hparams.json, tokenizer/, checkpoint/, metrics.json")
    p_train.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint")
    p_train.set_defaults(func=cmd_train)

    p_eval = sub.add_parser("eval", parents=[common, json_out, arch],
                            help="OneRec vs popularity and SASRec on one leave-last-out split: one table")
    p_eval.add_argument("--out", metavar="DIR", required=True,
                        help="writes eval.json and, unless --model, the trained OneRec in DIR/onerec")
    p_eval.add_argument("--model", metavar="DIR", help="test this saved model (onerec train --out) instead")
    p_eval.set_defaults(func=cmd_eval)

    p_pipes = sub.add_parser("pipelines", help="Kubeflow pipelines: compile, run locally, submit, schedule")
    pipes_sub = p_pipes.add_subparsers(dest="action", required=True)
    p_compile = pipes_sub.add_parser("compile", parents=[common],
                                     help="write the pipeline's IR YAML (default: the committed one beside it)")
    p_compile.add_argument("--output", metavar="PATH", help="write here instead")
    p_run = pipes_sub.add_parser("run", parents=[common, json_out],
                                 help="run it here with kfp.local against the embedded stack (or the environment's)")
    p_run.add_argument("--as-of", metavar="TIME", help="feature snapshot time (ISO; default: the newest features)")
    p_submit = pipes_sub.add_parser("submit", parents=[common, json_out], help="one run on KFP_HOST")
    p_schedule = pipes_sub.add_parser("schedule", parents=[common, json_out], help="a recurring run on KFP_HOST")
    p_schedule.add_argument("--cron", metavar="EXPR",
                            help="KFP cron, 6 fields, seconds first [pipelines.schedule_cron]")
    from onerec.pipelines import PIPELINES as pipeline_names   # light: kfp is imported when one runs

    for p in (p_compile, p_run, p_submit, p_schedule):
        p.add_argument("pipeline", choices=sorted(pipeline_names))
        p.set_defaults(func=cmd_pipelines)

    p_model = sub.add_parser("model", help="the MLflow model registry: list, promote, rollback")
    model_sub = p_model.add_subparsers(dest="action", required=True)
    p_list = model_sub.add_parser("list", parents=[common], help="versions, aliases, key metrics, age")
    p_list.add_argument("--audit", action="store_true", help="also print the audit trail of alias moves")
    p_list.set_defaults(func=cmd_model_list)
    why = argparse.ArgumentParser(add_help=False)
    why.add_argument("--reason", default="", help="why: recorded in the audit trail")
    why.add_argument("--dry-run", action="store_true", help="say what would change, change nothing")
    p_promote = model_sub.add_parser("promote", parents=[common, why],
                                     help="champion := VERSION (default: the challenger)")
    p_promote.add_argument("version", nargs="?", help="default: the version aliased `challenger`")
    p_promote.set_defaults(func=cmd_model_move)
    p_rollback = model_sub.add_parser("rollback", parents=[common, why],
                                      help="champion := the champion before it (or --to VERSION)")
    p_rollback.add_argument("--to", metavar="VERSION", help="roll back to this version")
    p_rollback.set_defaults(func=cmd_model_move)

    sub.add_parser("demo", parents=[common, json_out],
                   help="the main job end to end on the embedded stack").set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Deprecation notices of libraries (kafka-python's resource API, dask's downcasting inside
    # Feast's materialize) say nothing to a user of this CLI; tests still see them.
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"dask")
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        return args.func(cfg, args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("ONEREC_DEBUG"):
            raise
        # Our own errors carry the whole story in their message; others get their type too.
        known = type(exc).__module__.startswith("onerec")
        print(f"error: {exc if known else f'{type(exc).__name__}: {exc}'}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
