"""The main job on the debug preset, through the CLI, on its own ports and state directory."""
import json

import pytest

from onerec import stack
from onerec.cli import main
from tests.conftest import stack_config

pytestmark = pytest.mark.e2e


def test_demo_runs_end_to_end_and_reports_figures(tmp_path, capsys):
    cfg = stack_config(tmp_path / "state")
    args = ["--config", "debug", "--set", f"stack.state_dir={cfg.stack.state_dir}",
            "--set", f"stack.kafka_port={cfg.stack.kafka_port}",
            "--set", f"stack.redis_port={cfg.stack.redis_port}",
            "--set", f"stack.mlflow_port={cfg.stack.mlflow_port}"]
    try:
        assert main(["demo", *args, "--json", str(tmp_path / "demo.json")]) == 0
        out = capsys.readouterr().out
        figures = json.loads(out.strip().splitlines()[-1])
        assert figures == json.loads((tmp_path / "demo.json").read_text())
        assert figures["users"] == cfg.data.max_users
        assert figures["train"] + figures["valid"] + figures["test"] == figures["interactions"]
        assert figures["history_events"] + figures["live_events"] + figures["holdout_events"] == figures["interactions"]
        assert figures["holdout_events"] > 0                  # never replayed, backfilled or trained on
        assert figures["backfill_applied"] == figures["backfill_history_events"] == figures["history_events"]
        assert figures["replay_published"] == figures["live_events"] > 0
        assert figures["ingest_consumed"] == figures["ingest_written"] == figures["live_events"]
        assert figures["ingest_dlq"] == figures["ingest_duplicates"] == 0
        assert figures["sample_user_history_len"] > 0
        # the retrain pipeline registered a first version, which is champion and challenger
        assert figures["retrain_version"] == "1" and figures["retrain_beats_champion"]
        assert figures["retrain_aliases"] == {"champion": "1", "challenger": "1"}
        assert 0 <= figures["onerec_test_recall@10"] <= 1 and "onerec_test_ndcg@10" in figures
        # the predictor served the sample user from the champion, with features from Feast online
        assert figures["served_model_version"] == "1" and figures["served_fallback"] is None
        assert len(set(figures["served_items"])) == 5 and figures["served_exposures_sent"] == 1

        # the closed loop: feedback joined, an aligned challenger, an A/B test over HTTP, a drill
        assert figures["feedback_requests"] > 0 and figures["feedback_request_errors"] == 0
        # every simulated request is a joined row, and the sample user of step 7 too (no reaction)
        assert figures["feedback_join_rows_written"] == figures["feedback_requests"] + figures["served_exposures_sent"]
        assert figures["feedback_join_matched"] == figures["feedback_reactions"]
        assert figures["align_version"] == "2" and figures["ab_request_errors"] == 0
        arms = figures["ab_by_variant"]
        assert len(arms) == 2 and {a.split("/")[1] for a in arms} == {"v1", "v2"}   # both models served
        assert figures["ab_join_rows"] == figures["ab_requests"]
        # the scorecard of the A/B store: every simulated user in one of the two variants
        ab = figures["ab"]
        assert sorted(ab["users"]) == sorted(a.split("/")[0] for a in arms)
        assert sum(ab["users"].values()) == cfg.simulate.users and sum(ab["exposures"].values()) == figures["ab_requests"]
        assert ab["diff_low"] <= ab["diff"] <= ab["diff_high"] and 0 <= ab["p_value"] <= 1
        assert figures["ab_decision"] == ab["decision"] in ("ship", "keep running", "stop")
        if min(ab["users"].values()) < cfg.abtest.min_users:
            assert figures["ab_decision"] in ("keep running", "stop")
        shipped = figures["ab_decision"] == "ship"
        if shipped:                                   # the guardrail watched the new champion
            assert figures["guardrail_start"] == "waiting" and figures["guardrail"]["state"] in ("ok", "rolled_back")
        kept = shipped and figures["guardrail"]["state"] != "rolled_back"
        assert figures["champion_after_ab"] == ("2" if kept else "1")
        # the dashboard served the same numbers as its API
        assert figures["dashboard_decision"] == figures["ab_decision"] and figures["dashboard_numbers_checked"] == 7
        if kept:                                      # a drill needs an earlier champion to go back to
            assert figures["rollback_drill"] == "v2 -> v1 -> v2" and figures["rollback_serving_s"] < 10
        elif not shipped:
            assert figures["rollback_drill"].startswith("skipped")

        import mlflow
        run = mlflow.MlflowClient(f"http://127.0.0.1:{cfg.stack.mlflow_port}").get_run(figures["mlflow_run_id"])
        assert run.data.metrics["live_events"] == figures["live_events"]
        assert main(["stack", "status", *args]) == 0
    finally:
        stack.down(cfg)
