"""The retrain pipeline's compiled IR, its wiring, and submit/schedule against a recording client."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from onerec import pipelines
from onerec.config import PROJECT_ROOT, load_config

sys.path.insert(0, str(PROJECT_ROOT))          # pipelines/ and components/ live at the project root


def _documents(path: Path) -> tuple[dict, dict]:
    """The pipeline spec and the Kubernetes platform spec of a compiled package."""
    spec, platform = yaml.safe_load_all(Path(path).read_text())
    return spec, platform


def _compiled(tmp_path: Path, preset: str = "full", *overrides: str) -> dict:
    path = pipelines.compile_pipeline(load_config(preset, list(overrides)), "retrain", tmp_path / "retrain.yaml")
    return _documents(path)[0]


def test_committed_yaml_is_what_the_code_compiles_to(tmp_path):
    from pipelines.retrain import COMPILED

    fresh = pipelines.compile_pipeline(load_config("full"), "retrain", tmp_path / "retrain.yaml")
    assert fresh.read_text() == COMPILED.read_text(), (
        "pipelines/retrain.yaml is stale: run `onerec pipelines compile retrain --config full` and commit it")


def test_every_component_runs_on_the_configured_image_without_installing_anything(tmp_path):
    spec = _compiled(tmp_path, "full", "pipelines.image=registry.example/onerec:test")
    executors = spec["deploymentSpec"]["executors"]
    assert len(executors) == 7
    for name, executor in executors.items():
        container = executor["container"]
        assert container["image"] == "registry.example/onerec:test", name
        assert "pip install" not in " ".join(container["command"]), name


def test_set_challenger_runs_only_inside_the_beats_champion_condition(tmp_path):
    spec = _compiled(tmp_path)
    root = spec["root"]["dag"]["tasks"]
    assert "set-challenger" not in root
    condition = root["condition-1"]
    assert condition["triggerPolicy"]["condition"].startswith(
        "inputs.parameter_values['pipelinechannel--evaluate-model-Output'] == true")
    inner = spec["components"]["comp-condition-1"]["dag"]["tasks"]
    assert list(inner) == ["set-challenger"]
    # register runs on every path (a worse model is still a version, just without the alias)
    assert "register-model" in root and "evaluate-model" in root["register-model"]["dependentTasks"]


def test_no_task_is_cached(tmp_path):
    spec = _compiled(tmp_path)
    tasks = dict(spec["root"]["dag"]["tasks"], **spec["components"]["comp-condition-1"]["dag"]["tasks"])
    steps = {name: t for name, t in tasks.items() if name != "condition-1"}
    assert len(steps) == 7
    assert {name: t["cachingOptions"].get("enableCache", False) for name, t in steps.items()} == dict.fromkeys(steps, False)


def test_on_a_cluster_every_step_reads_the_endpoints_configmap_and_the_snapshot_mounts_feast(tmp_path):
    from pipelines import ENDPOINT_KEYS, ENDPOINTS_CONFIGMAP, FEAST_MOUNT, FEAST_PVC

    from onerec.endpoints import MLFLOW_TRACKING_URI, REDIS_URL
    from onerec.features.store import FEAST_DIR_VAR

    assert {MLFLOW_TRACKING_URI, REDIS_URL, FEAST_DIR_VAR} == set(ENDPOINT_KEYS)
    spec, platform = _documents(pipelines.compile_pipeline(load_config("full"), "retrain", tmp_path / "r.yaml"))
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == set(spec["deploymentSpec"]["executors"])
    for name, executor in executors.items():
        (env,) = executor["configMapAsEnv"]
        assert env["configMapName"] == ENDPOINTS_CONFIGMAP, name
        assert {e["envVar"] for e in env["keyToEnv"]} == set(ENDPOINT_KEYS), name
    (mount,) = executors["exec-snapshot-features"]["pvcMount"]
    assert (mount["mountPath"], mount["constant"]) == (FEAST_MOUNT, FEAST_PVC)
    # the mount path is what the ConfigMap tells the steps (infra/base)
    configmap = yaml.safe_load((PROJECT_ROOT / "infra/base/endpoints-configmap.yaml").read_text())
    assert configmap["data"][FEAST_DIR_VAR] == FEAST_MOUNT


class RecordingClient:
    """Stands in for kfp.Client: records what would be sent to a Kubeflow Pipelines host."""

    def __init__(self, existing: tuple[tuple[str, str], ...] = ()):
        self.calls = []
        self.recurring = list(existing)                          # (id, display name)

    def create_run_from_pipeline_package(self, package, **kwargs):
        self.calls.append(("run", _documents(package)[0], kwargs))
        return SimpleNamespace(run_id="run-1")

    def create_experiment(self, name, namespace=None):
        self.calls.append(("experiment", name, namespace))
        return SimpleNamespace(experiment_id="exp-1")

    def list_recurring_runs(self, experiment_id, page_size):
        return SimpleNamespace(recurring_runs=[SimpleNamespace(recurring_run_id=i, display_name=n)
                                               for i, n in self.recurring])

    def delete_recurring_run(self, recurring_run_id):
        self.calls.append(("delete", recurring_run_id))
        self.recurring = [(i, n) for i, n in self.recurring if i != recurring_run_id]

    def create_recurring_run(self, experiment_id, **kwargs):
        self.calls.append(("recurring", _documents(kwargs["pipeline_package_path"])[0],
                           dict(kwargs, experiment_id=experiment_id)))
        return SimpleNamespace(recurring_run_id="rr-1")


def test_submit_sends_a_freshly_compiled_package_with_the_preset_and_overrides():
    cfg = load_config("full", ["pipelines.image=img:7"])
    kfp = RecordingClient()
    out = pipelines.submit(cfg, "retrain", "full", ["train.epochs=3"], kfp_client=kfp)
    assert out == {"pipeline": "retrain", "run_id": "run-1", "experiment": cfg.pipelines.experiment}
    (kind, spec, kwargs), = kfp.calls
    assert kind == "run" and spec["pipelineInfo"]["name"] == "onerec-retrain"
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {"img:7"}
    assert kwargs["arguments"] == {"preset": "full", "overrides": ["train.epochs=3"]}
    assert kwargs["experiment_name"] == cfg.pipelines.experiment and kwargs["enable_caching"] is False


def test_schedule_creates_one_recurring_run_with_the_cron():
    cfg = load_config("full")
    kfp = RecordingClient()
    out = pipelines.schedule(cfg, "retrain", "full", [], cron="0 30 2 * * *", kfp_client=kfp)
    assert out["recurring_run_id"] == "rr-1" and out["cron"] == "0 30 2 * * *"
    assert kfp.calls[0] == ("experiment", cfg.pipelines.experiment, cfg.pipelines.namespace)
    kind, spec, kwargs = kfp.calls[1]
    assert kind == "recurring" and kwargs["cron_expression"] == "0 30 2 * * *"
    assert kwargs["experiment_id"] == "exp-1" and kwargs["max_concurrency"] == 1 and kwargs["no_catchup"]


def test_schedule_is_idempotent_by_name():
    kfp = RecordingClient(existing=(("rr-old", "retrain-full"), ("rr-other", "retrain-small")))
    out = pipelines.schedule(load_config("full"), "retrain", "full", [], kfp_client=kfp)
    assert out["replaced"] == ["rr-old"]
    assert [c for c in kfp.calls if c[0] == "delete"] == [("delete", "rr-old")]
    assert kfp.calls[-1][0] == "recurring" and kfp.calls[-1][2]["job_name"] == "retrain-full"


def test_schedule_defaults_to_the_preset_cron_and_rejects_five_field_cron():
    cfg = load_config("full")
    kfp = RecordingClient()
    assert pipelines.schedule(cfg, "retrain", "full", [], kfp_client=kfp)["cron"] == cfg.pipelines.schedule_cron
    with pytest.raises(pipelines.PipelineError, match="6 fields"):
        pipelines.schedule(cfg, "retrain", "full", [], cron="0 3 * * *", kfp_client=RecordingClient())


def test_remote_commands_need_kfp_host_and_local_runs_need_the_stack(monkeypatch, tmp_path):
    monkeypatch.delenv(pipelines.KFP_HOST, raising=False)
    with pytest.raises(pipelines.PipelineError, match="KFP_HOST is not set"):
        pipelines.submit(load_config("full"), "retrain", "full", [])
    cfg = load_config("debug", [f"stack.state_dir={tmp_path}"])
    from onerec.endpoints import EndpointError

    with pytest.raises(EndpointError, match="MLFLOW_TRACKING_URI is not set"):
        pipelines.run_local(cfg, "retrain", "debug", [])
    with pytest.raises(pipelines.PipelineError, match="unknown pipeline 'rank'"):
        pipelines.compile_pipeline(cfg, "rank", tmp_path / "x.yaml")


def test_committed_align_yaml_is_what_the_code_compiles_to_and_registers_after_aligning(tmp_path):
    from pipelines.align import COMPILED

    fresh = pipelines.compile_pipeline(load_config("full"), "align", tmp_path / "align.yaml")
    assert fresh.read_text() == COMPILED.read_text(), (
        "pipelines/align.yaml is stale: run `onerec pipelines compile align --config full` and commit it")
    spec, platform = _documents(fresh)
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"align-model", "register-challenger"}
    assert tasks["register-challenger"]["dependentTasks"] == ["align-model"]
    assert all(not t.get("cachingOptions", {}).get("enableCache") for t in tasks.values())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert all(e["configMapAsEnv"][0]["configMapName"] == "onerec-endpoints" for e in executors.values())
    assert [e for e in executors if executors[e].get("pvcMount")] == ["exec-align-model"]
