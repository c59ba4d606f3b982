"""`make demo`: the main job end to end, as far as the platform is built today.

Built and run here: the embedded stack; the data set and its splits; the Feast repo applied and
the history (before T0) backfilled into the offline store and materialized online; the live part
replayed to Kafka and ingested into Feast by the streaming ingestor; one user's online features;
the retrain pipeline through kfp.local (a point-in-time snapshot of those features, the
semantic-ID tokenizer, OneRec trained and tracked in MLflow, evaluated against the registry's
champion on the snapshot's leave-last-out test items, registered, aliased `challenger` (and
`champion` on a first run) only if it beats the champion); the KServe predictor, in process,
serving one user from the registry's champion and Feast online, its exposure sent to Kafka;
the closed loop (onerec/loop.py: HTTP predictor, simulated feedback, rewards into the A/B store,
the align pipeline, an A/B test read from its scorecard, promotion on "ship" with the automatic
guardrail watching the new champion, a rollback drill); the A/B dashboard served over HTTP, its
page checked against its API; an MLflow run recording the figures.

The OneRec figures are the pipeline's: trained and tested on the feature store's sequences
(each user's last features.sequence_length items), not the data set's full histories that
`onerec eval` and benchmarks/RESULTS.md use, so they differ from those.
"""
from __future__ import annotations

import asyncio
import sys
import time
from typing import Callable

import pandas as pd
import redis
import yaml

from onerec import stack
from onerec.config import Config, to_dict
from onerec.data import describe, format_table, leave_last_out, load_dataset, online_split
from onerec.endpoints import KAFKA_BOOTSTRAP, MLFLOW_TRACKING_URI, REDIS_URL, resolve_endpoints
from onerec.features import store as feast_store
from onerec.features.backfill import backfill
from onerec.features.schema import ONLINE_SERVICE
from onerec.model.train import metric_name
from onerec.pipelines import run_local
from onerec.stream.ingest import open_ingestor
from onerec.stream.replay import replay

def run_demo(cfg: Config, progress: Callable[[str], None], preset: str | None = None,
             overrides: tuple[str, ...] | list[str] = ()) -> dict:
    """preset / overrides: how cfg was loaded (the pipeline's steps load it the same way)."""
    figures: dict = {"preset": cfg.preset, "dataset": cfg.data.dataset}
    started = time.monotonic()

    progress("1/10 embedded stack up (Kafka, Redis, MLflow)")
    statuses = stack.up(cfg, progress)
    print(stack.format_status(statuses))
    figures["stack_healthy_s"] = round(time.monotonic() - started, 1)
    endpoints = resolve_endpoints(cfg.stack.state_dir)
    bootstrap = endpoints.require(KAFKA_BOOTSTRAP)

    progress("2/10 load and split the data set")
    dataset = load_dataset(cfg.data)
    stats = describe(dataset)
    print(format_table(stats))
    offline = leave_last_out(dataset.interactions)
    online = online_split(dataset.interactions, cfg.data)
    figures.update(users=stats["users"], items=stats["items"], interactions=stats["interactions"],
                   train=len(offline.train), valid=len(offline.valid), test=len(offline.test),
                   history_events=len(online.history), live_events=len(online.live),
                   holdout_events=len(online.holdout), t0=online.t0)

    progress("3/10 Feast: apply feature_repo/, backfill the history, materialize online")
    print("applied: " + ", ".join(feast_store.apply_repo(cfg)))
    redis_client = redis.Redis.from_url(endpoints.require(REDIS_URL))
    figures.update({f"backfill_{k}": v for k, v in backfill(cfg, redis_client).items()})

    progress(f"4/10 replay the live stream to Kafka `{cfg.kafka.user_events.name}` and ingest it into Feast")
    replayed = replay(cfg, bootstrap, speed=None)
    figures.update(replay_published=replayed["published"], replay_events_per_s=replayed["events_per_s"])
    ingestor = open_ingestor(cfg)
    t = time.monotonic()
    ingested = ingestor.run(idle_exit_s=5)
    figures.update({f"ingest_{k}": v for k, v in ingested.as_dict().items() if k != "dlq_reasons"})
    figures["ingest_seconds"] = round(time.monotonic() - t, 1)  # group join and 5 s idle wait included

    progress("5/10 read one user's features from the online store (FeatureService recommender_online)")
    user = int(online.live["user_id"].iloc[-1])
    store = feast_store.open_store(cfg)
    row = store.get_online_features(features=store.get_feature_service(ONLINE_SERVICE),
                                    entity_rows=[{"user_id": user}]).to_dict()
    for name, values in sorted(row.items()):
        value = values[0]
        print(f"  {name:20s} {value[-5:] if isinstance(value, list) else value}")
    figures["sample_user"], figures["sample_user_history_len"] = user, len(row["seq_item_ids"][0] or [])

    progress("6/10 retrain pipeline (kfp.local): feature snapshot -> tokenizer -> train OneRec -> evaluate "
             "against the champion -> register in MLflow")
    # the snapshot as of the replayed stream's end: the data set's own clock. The loop's simulated
    # reactions are stamped with the wall clock (years later); on a stack that already ingested a
    # loop's reactions, "the newest features" would be those users alone, each with the same
    # recommended items repeated (a retrain that tests at R@10 1.0 on its own feedback loop)
    live_end = pd.Timestamp(int(online.live["timestamp"].max()) + 1, unit="s", tz="UTC").isoformat()
    retrained = run_local(cfg, "retrain", preset or cfg.preset, list(overrides), as_of=live_end)
    figures.update({f"retrain_{k}": v for k, v in retrained.items() if k not in ("pipeline", "pipeline_root")})
    figures.update({f"onerec_{k}": v for k, v in retrained["test_metrics"].items()})
    print(f"  registered {cfg.registry.model_name} v{retrained['version']} ({retrained['evaluation']}); "
          f"aliases now {retrained['aliases']}")
    print(f"  OneRec {cfg.model.arch} on the snapshot's test users: Recall@10 "
          f"{retrained['test_metrics']['test_recall@10']:.4f} NDCG@10 {retrained['test_metrics']['test_ndcg@10']:.4f}")

    progress("7/10 serve the sample user through the KServe predictor (in process: registry champion, Feast online)")
    OneRecPredictor = predictor_class()  # noqa: N806 - a class
    from onerec.exposures import ExposureLog

    exposures = ExposureLog(bootstrap, cfg.kafka.exposures.name)
    predictor = OneRecPredictor("onerec", cfg, tracking_uri=endpoints.require(MLFLOW_TRACKING_URI),
                                exposures=exposures)
    predictor.load()
    try:
        (served,) = asyncio.run(predictor.predict({"instances": [{"user_id": user, "k": 5}]}))["predictions"]
    finally:
        predictor.stop()
    print(f"  user {user}: items {served['items']} (champion v{served['model_version']}, variant "
          f"{served['variant']}, fallback {served['fallback']})")
    figures.update(served_items=served["items"], served_model_version=served["model_version"],
                   served_fallback=served["fallback"], served_exposures_sent=exposures.sent)

    progress("8/10 the closed loop: serve over HTTP -> simulated users react -> rewards -> align pipeline -> "
             "A/B 50/50 -> promote if significant -> rollback drill")
    from onerec.loop import closed_loop

    figures.update(closed_loop(cfg, preset or cfg.preset, list(overrides), progress))
    ab = figures["ab"]
    print(f"  A/B {figures['ab_experiment']}: {cfg.abtest.primary_metric} champion {_num(ab['metric_control'])} vs "
          f"aligned challenger {_num(ab['metric_treatment'])}, diff {_num(ab['diff'])} "
          f"[{_num(ab['diff_low'])}, {_num(ab['diff_high'])}] (CUPED variance -{_num(ab['cuped_variance_reduction'])}) "
          f"-> {figures['ab_decision']} ({ab['reason']}); champion now v{figures['champion_after_ab']}; "
          f"guardrail {figures.get('guardrail', {}).get('state', 'not needed (nothing promoted)')}; "
          f"rollback drill {figures['rollback_drill']}")

    progress("9/10 the A/B dashboard over HTTP: the experiment's page shows the API's numbers")
    figures.update(check_dashboard(cfg, figures["ab_experiment"]))
    print(f"  {figures['dashboard_page_url']}: decision {figures['dashboard_decision']}, "
          f"{figures['dashboard_numbers_checked']} numbers equal to the API's")

    progress("10/10 record the run in MLflow")
    figures["mlflow_run_id"] = _log_to_mlflow(cfg, endpoints.require(MLFLOW_TRACKING_URI), figures)

    figures["seconds"] = round(time.monotonic() - started, 1)
    print(f"\nDemo done. The stack keeps running: MLflow UI at {endpoints.mlflow_tracking_uri}; the A/B dashboard "
          f"with `onerec dashboard --config {cfg.preset}`; stop the stack with `onerec stack down --config "
          f"{cfg.preset}` (or `make stack-down`).")
    return figures


def _num(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def check_dashboard(cfg: Config, experiment: str) -> dict:
    """Serve the dashboard, read the experiment's scorecard from its API and its page, and check
    that every number the page carries is the API's."""
    import json
    import urllib.parse
    import urllib.request

    from onerec.abtest.dashboard import DashboardServer, create_app, open_dashboard, page_values

    with DashboardServer(create_app(open_dashboard(cfg))) as url:
        name = urllib.parse.quote(experiment)
        with urllib.request.urlopen(f"{url}/api/experiments/{name}", timeout=60) as resp:
            card = json.loads(resp.read())
        with urllib.request.urlopen(f"{url}/experiments/{name}", timeout=60) as resp:
            page = resp.read().decode()
    shown = page_values(page)
    expected = {f"{v['name']}:{field}": v[field] for v in card["variants"] for field in ("users", "exposures", "primary")}
    wrong = {k: (shown.get(k), v) for k, v in expected.items() if shown.get(k) != v}
    if wrong or shown.get("decision") != card["decision"]:
        raise RuntimeError(f"the dashboard page disagrees with its API: {wrong or shown.get('decision')}")
    return {"dashboard_page_url": f"{url}/experiments/{name}", "dashboard_decision": card["decision"],
            "dashboard_numbers_checked": len(expected) + 1, "dashboard_page_bytes": len(page)}


def predictor_class():
    """serving.predictor.OneRecPredictor, imported under a bare sys.argv: KServe parses the command
    line when first imported, and `onerec demo --config ...` would read as its --configure_logging."""
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        from serving.predictor import OneRecPredictor
    finally:
        sys.argv = argv
    return OneRecPredictor


def _log_to_mlflow(cfg: Config, tracking_uri: str, figures: dict) -> str:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("onerec-demo")
    with mlflow.start_run(run_name=f"demo-{cfg.preset}") as run:
        mlflow.log_params({"preset": cfg.preset, "dataset": cfg.data.dataset,
                           "live_fraction": cfg.data.live_fraction})
        mlflow.log_metrics({metric_name(k): float(v) for k, v in figures.items() if isinstance(v, (int, float))})
        mlflow.log_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), "config.yaml")
    return run.info.run_id
