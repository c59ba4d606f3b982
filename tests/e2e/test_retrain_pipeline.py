"""The retrain pipeline end to end through kfp.local on the debug preset, against the embedded
stack's real MLflow and Feast (Redis online store, parquet offline store), via the CLI."""
from __future__ import annotations

import json

import pytest

from onerec import stack
from onerec.cli import main
from onerec.endpoints import resolve_endpoints
from onerec.registry import CHALLENGER, CHAMPION, Registry
from tests.conftest import stack_config

pytestmark = pytest.mark.e2e


def _figures(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_retrain_registers_aliases_only_a_better_model_and_everything_loads_back(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from onerec.model.train import load_model

    cfg = stack_config(tmp_path / "state")
    args = ["--config", "debug", "--set", f"stack.state_dir={cfg.stack.state_dir}",
            *[a for part in ("kafka", "redis", "mlflow")
              for a in ("--set", f"stack.{part}_port={getattr(cfg.stack, part + '_port')}")]]
    try:
        assert main(["stack", "up", *args]) == 0
        assert main(["features", "apply", *args]) == 0
        assert main(["features", "backfill", *args]) == 0
        capsys.readouterr()

        # first run: no champion yet, so the new version gets both aliases
        assert main(["pipelines", "run", "retrain", *args]) == 0
        first = _figures(capsys)
        assert first["beats_champion"] and first["evaluation"] == "no champion yet"
        assert first["aliases"] == {CHAMPION: first["version"], CHALLENGER: first["version"]}

        uri = resolve_endpoints(cfg.stack.state_dir).mlflow_tracking_uri
        reg = Registry(MlflowClient(uri, registry_uri=uri), cfg.registry.model_name)
        version = reg.version(first["version"])
        assert version.tags["data_snapshot"] == first["data_snapshot"] and version.tags["pipeline_run_id"]
        assert float(version.tags["test_ndcg_at_10"]) >= 0
        (event,) = [e for e in reg.audit_trail() if e.alias == CHAMPION]
        assert (event.who, event.from_version, event.to_version) == ("retrain-pipeline", None, first["version"])

        # the run: config, snapshot identity, commit, per-epoch metrics, evaluation, signature
        client = MlflowClient(uri)
        run = client.get_run(first["run_id"])
        assert run.data.params["config.preset"] == "debug"
        assert run.data.tags["data_snapshot"] == first["data_snapshot"] and run.data.tags["git_commit"]
        assert len(client.get_metric_history(run.info.run_id, "valid_ndcg_at_10")) == cfg.train.epochs
        listed = {f.path for f in client.list_artifacts(run.info.run_id)}
        assert "evaluation.json" in listed and "model" in listed

        # the registered version loads back: weights + tokenizer from safetensors/JSON, MLmodel signature
        model_dir = reg.download(first["version"], tmp_path / "download")
        model, tok = load_model(model_dir)
        assert tok is not None and model.num_params() > 0
        mlmodel = (model_dir / "MLmodel").read_text()
        assert "history_item_ids" in mlmodel and "onerec" in mlmodel

        # second run, trained to be worse: registered, but no alias moves
        assert main(["pipelines", "run", "retrain", *args, "--set", "train.lr=1e-7"]) == 0
        second = _figures(capsys)
        assert second["version"] != first["version"] and not second["beats_champion"]
        assert "<=" in second["evaluation"] and f"champion v{first['version']}" in second["evaluation"]
        assert reg.aliases() == {CHAMPION: first["version"], CHALLENGER: first["version"]}
        assert reg.version(second["version"]).tags["beats_champion"] == "false"

        # point in time: a snapshot as of T holds no event after T, and each user's sequence is
        # the data's last features.sequence_length items up to that user's state at or before T
        _check_point_in_time(cfg, tmp_path / "snapshot")
    finally:
        stack.down(cfg)


def _check_point_in_time(cfg, out) -> None:
    import numpy as np
    import pandas as pd

    from onerec.data import load_dataset, online_split
    from onerec.retrain import SNAPSHOT_USERS, snapshot_features

    history = online_split(load_dataset(cfg.data).interactions, cfg.data).history
    t = int(history["timestamp"].quantile(0.5))
    meta = snapshot_features(cfg, out, as_of=pd.Timestamp(t, unit="s", tz="UTC").isoformat())
    users = pd.read_parquet(out / SNAPSHOT_USERS).dropna(subset=["seq_item_ids"])
    users = users[users["seq_item_ids"].map(len) > 0]
    assert 0 < meta["users"] == len(users) < history["user_id"].nunique()   # some users start after T
    by_user = {u: g.sort_values("timestamp", kind="stable") for u, g in history.groupby("user_id")}
    for user, items, times in zip(users["user_id"], users["seq_item_ids"], users["seq_event_times_ms"]):
        assert max(times) <= t * 1000, f"user {user}: the snapshot leaks an event after T"
        seen = by_user[user][by_user[user]["timestamp"] * 1000 <= max(times)]
        want = seen["item_id"].to_numpy()[-cfg.features.sequence_length:]
        assert np.array_equal(np.sort(items), np.sort(want)), f"user {user}: not the data's items up to T"
