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
    finally:
        stack.down(cfg)
