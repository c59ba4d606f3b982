"""Running the pipelines of pipelines/: locally through kfp.local, or on a Kubeflow Pipelines host.

    compile_pipeline(cfg, "retrain")                 # -> pipelines/retrain.yaml on cfg's image
    run_local(cfg, "retrain", "debug", overrides)    # kfp.local subprocess runner, same components
    submit(cfg, "retrain", "full", overrides)        # a run on KFP_HOST
    schedule(cfg, "retrain", "full", overrides, cron)  # a recurring run on KFP_HOST

Locally every component runs as a subprocess of this Python (SubprocessRunner(use_venv=False):
the project's own environment, nothing installed), against the endpoints this process resolves
(the embedded stack's, or the environment's), which are exported to the subprocesses. On a
cluster the pipeline is compiled on `pipelines.image` and the endpoints come from the pods'
environment (infra/pipelines/).
"""
from __future__ import annotations

import importlib
import os
import tempfile
import time
from pathlib import Path

from onerec.config import Config
from onerec.endpoints import MLFLOW_TRACKING_URI, REDIS_URL, resolve_endpoints

KFP_HOST = "KFP_HOST"            # the Kubeflow Pipelines API, e.g. http://ml-pipeline-ui.kubeflow:80
PIPELINES = {"retrain": "pipelines.retrain", "align": "pipelines.align"}


class PipelineError(RuntimeError):
    pass


def _module(name: str):
    if name not in PIPELINES:
        raise PipelineError(f"unknown pipeline '{name}' (pipelines: {', '.join(PIPELINES)})")
    return importlib.import_module(PIPELINES[name])


def pipeline_function(cfg: Config, name: str):
    module = _module(name)
    return getattr(module, f"{name}_pipeline")(cfg.pipelines.image)


def compile_pipeline(cfg: Config, name: str, path: str | Path | None = None) -> Path:
    """The pipeline's IR YAML on cfg's image (default path: the committed one beside it)."""
    from kfp import compiler

    path = Path(path) if path else _module(name).COMPILED
    compiler.Compiler().compile(pipeline_function(cfg, name), str(path))
    return path


def _arguments(preset: str, overrides: list[str]) -> dict:
    """Pipeline arguments: the preset as the components will load it, the overrides as given."""
    return {"preset": preset, "overrides": list(overrides)}


def run_local(cfg: Config, name: str, preset: str, overrides: list[str], as_of: str = "") -> dict:
    """Run the pipeline with kfp.local against this process's endpoints -> what it registered."""
    from kfp import local

    from onerec.registry import Registry

    endpoints = resolve_endpoints(cfg.stack.state_dir)
    env = {MLFLOW_TRACKING_URI: endpoints.require(MLFLOW_TRACKING_URI), REDIS_URL: endpoints.require(REDIS_URL)}
    reg = Registry.connect(env[MLFLOW_TRACKING_URI], cfg.registry.model_name)   # fail fast if MLflow is down
    before = {v.version for v in reg.versions()} if reg.exists() else set()
    # the components load the config themselves: pin the state directory they resolve, whatever their cwd
    state = f"stack.state_dir={Path(cfg.stack.state_dir).resolve()}"
    root = Path(cfg.stack.state_dir).resolve() / cfg.pipelines.local_root
    root.mkdir(parents=True, exist_ok=True)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    t0 = time.perf_counter()
    try:
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
        pipeline_function(cfg, name)(**_arguments(preset, [*overrides, state]), as_of=as_of)
    except RuntimeError as exc:
        raise PipelineError(f"pipeline '{name}' failed locally: {exc} (task logs above; outputs under {root})") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    new = [v for v in reg.versions() if v.version not in before]
    if not new:
        raise PipelineError(f"pipeline '{name}' finished but registered no version of '{reg.name}'")
    version = new[0]
    metrics = {k.replace("_at_", "@"): float(v) for k, v in version.tags.items() if k.startswith("test_")}
    return {"pipeline": name, "version": version.version, "aliases": reg.aliases(), "test_metrics": metrics,
            "beats_champion": version.tags.get("beats_champion") == "true",
            "evaluation": version.tags.get("evaluation", ""), "data_snapshot": version.tags.get("data_snapshot", ""),
            "run_id": version.run_id, "pipeline_root": str(root), "seconds": round(time.perf_counter() - t0, 1)}


def client(cfg: Config):
    """kfp.Client for KFP_HOST (the environment); a clear error when it is unset."""
    import kfp

    host = os.environ.get(KFP_HOST)
    if not host:
        raise PipelineError(f"{KFP_HOST} is not set: export the Kubeflow Pipelines API address, e.g. "
                            f"{KFP_HOST}=http://ml-pipeline-ui.kubeflow:80 (or use `onerec pipelines run` locally)")
    return kfp.Client(host=host, namespace=cfg.pipelines.namespace)


def submit(cfg: Config, name: str, preset: str, overrides: list[str], kfp_client=None) -> dict:
    """One run of the pipeline, compiled now on cfg's image, in cfg.pipelines.experiment."""
    kfp_client = kfp_client or client(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(cfg, name, Path(tmp) / f"{name}.yaml")
        result = kfp_client.create_run_from_pipeline_package(
            str(package), arguments=_arguments(preset, overrides), run_name=f"{name}-{preset}",
            experiment_name=cfg.pipelines.experiment, namespace=cfg.pipelines.namespace,
            enable_caching=False)
    return {"pipeline": name, "run_id": result.run_id, "experiment": cfg.pipelines.experiment}


def schedule(cfg: Config, name: str, preset: str, overrides: list[str], cron: str | None = None,
             kfp_client=None) -> dict:
    """A recurring run `<name>-<preset>` (KFP's 6-field cron, default pipelines.schedule_cron); at
    most one run at a time, no catch-up of missed runs; replaces an earlier one of that name."""
    cron = cron or cfg.pipelines.schedule_cron
    if len(cron.split()) != 6:
        raise PipelineError(f"--cron '{cron}': KFP cron has 6 fields, seconds first, e.g. '0 0 3 * * *'")
    kfp_client = kfp_client or client(cfg)
    experiment = kfp_client.create_experiment(cfg.pipelines.experiment, namespace=cfg.pipelines.namespace)
    job_name = f"{name}-{preset}"
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(cfg, name, Path(tmp) / f"{name}.yaml")   # before anything is deleted
        # idempotent by name: a re-applied schedule replaces the old one instead of doubling runs
        found = kfp_client.list_recurring_runs(experiment_id=experiment.experiment_id, page_size=100)
        replaced = [r.recurring_run_id for r in (found.recurring_runs or []) if r.display_name == job_name]
        for run_id in replaced:
            kfp_client.delete_recurring_run(run_id)
        job = kfp_client.create_recurring_run(
            experiment.experiment_id, job_name=job_name, cron_expression=cron,
            pipeline_package_path=str(package), params=_arguments(preset, overrides),
            max_concurrency=1, no_catchup=True, enable_caching=False)
    return {"pipeline": name, "recurring_run_id": job.recurring_run_id, "cron": cron,
            "experiment": cfg.pipelines.experiment, "replaced": replaced}
