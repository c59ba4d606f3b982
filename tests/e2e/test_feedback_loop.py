"""The feedback loop on the embedded stack (debug preset): the HTTP predictor serves simulated
users, their reactions go to Kafka, the reward joiner ties them to the exposures and writes one
row per exposure to the offline store and the A/B store (once, even when run again), and the
align pipeline (kfp.local) turns the champion and those rewards into a `challenger`."""
from __future__ import annotations

import os

import pytest
import redis

from onerec import stack
from onerec.endpoints import ENV_FILE_NAME, read_env_file
from serving.process import ServerProcess
from tests.conftest import stack_config
from tests.integration.test_serving_http import _register_two_versions

pytestmark = pytest.mark.e2e


def test_simulated_reactions_join_their_exposures_into_rewards(tmp_path, monkeypatch):
    from onerec.features.backfill import backfill
    from onerec.features.store import FEAST_DIR_VAR, apply_repo
    from onerec.simulate import simulate
    from onerec.abtest.store import ABStore
    from onerec.endpoints import ab_store_url
    from onerec.stream.rewards import RewardJoiner, load_rewards

    monkeypatch.setenv(FEAST_DIR_VAR, str(tmp_path / "feast"))
    cfg = stack_config(tmp_path / "state", "simulate.users=6", "simulate.sessions_per_user=2", "simulate.k=5",
                       "rewards.window_s=2")
    server = None
    try:
        stack.up(cfg)
        env_file = read_env_file(tmp_path / "state" / ENV_FILE_NAME)
        apply_repo(cfg)
        r = redis.Redis.from_url(env_file["REDIS_URL"])
        backfill(cfg, r, progress=False)
        _, champion, _ = _register_two_versions(cfg, env_file["MLFLOW_TRACKING_URI"], tmp_path)
        server = ServerProcess(["--preset", "debug", "--set", f"stack.state_dir={cfg.stack.state_dir}"],
                               {**os.environ, **env_file}, tmp_path / "server.log")
        server.start()

        report = simulate(cfg, server.url, env_file["KAFKA_BOOTSTRAP"], progress=False)
        assert report["requests"] == 12 and report["request_errors"] == 0
        assert report["reactions"] == report["published"] == 60
        assert report["real_reactions"] + report["modelled_reactions"] == 60
        assert report["response_auc"] > 0.5 and report["heldout_ratings"] > 0

        store = ABStore.open(ab_store_url(cfg.stack.state_dir))
        stats = RewardJoiner(cfg, env_file["KAFKA_BOOTSTRAP"], store).run(idle_exit_s=5)
        rows = load_rewards(cfg)
        assert stats["rows_written"] == len(rows) == 12 and stats["matched"] == 60
        assert stats["unmatched"] == 0 and stats["late"] == 0
        assert set(rows["request_id"]) == {f"sim-{report['run_id']}-{j}" for j in range(12)}
        assert (rows["reacted"] == 5).all() and set(rows["model_version"]) == {champion}
        # no A/B file: the exposures are in the A/B store without an experiment, served by the champion
        assert stats["ab_counted"] == 12 and store.experiments() == []
        served = store.model_exposures(champion, 0, 2**62)
        assert set(served["request_id"]) == set(rows["request_id"])
        assert served["reward"].sum() == pytest.approx(rows["reward"].sum())
        assert served["latency_ms"].notna().all() and (served["latency_ms"] > 0).all()
        assert stats["ab_events"] >= 60          # the reactions (and any organic events) for CUPED's pre-period

        again = RewardJoiner(cfg, env_file["KAFKA_BOOTSTRAP"], store).run(idle_exit_s=3)   # committed: nothing new
        assert again["rows_written"] == 0 and len(load_rewards(cfg)) == 12
        assert len(store.model_exposures(champion, 0, 2**62)) == 12

        from onerec.pipelines import run_local
        from onerec.registry import Registry

        aligned = run_local(cfg, "align", "debug", [f"stack.mlflow_port={cfg.stack.mlflow_port}"])
        reg = Registry.connect(env_file["MLFLOW_TRACKING_URI"], cfg.registry.model_name)
        assert reg.aliases() == {"champion": champion, "challenger": aligned["version"]}
        tags = reg.version(aligned["version"]).tags
        assert tags["aligned_from"] == champion and tags["align_method"] == cfg.align.method
        assert tags["reward_source"] == "joined"
    finally:
        if server is not None:
            server.stop()
            print(server.tail())
        stack.down(cfg)
