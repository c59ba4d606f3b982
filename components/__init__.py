"""KFP v2 components of the retrain and align pipelines: thin wrappers over `onerec.retrain`
and `onerec.rl.offline`.

Each function below is a lightweight Python component body: self-contained (imports inside),
so KFP can ship its source to a container built from infra/docker/Dockerfile, which
already holds onerec and kfp (hence install_kfp_package=False: nothing is pip-installed at run
time). `retrain_components(image)` / `align_components(image)` turn them into components on one base
image, the pipeline's parameter. Every component takes the preset and --set overrides, so the config is resolved the
same way in every step; endpoints (MLFLOW_TRACKING_URI, REDIS_URL) come from the environment.
"""
# no `from __future__ import annotations`: KFP reads the real annotation objects

from types import SimpleNamespace
from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output


def snapshot_features(preset: str, overrides: List[str], as_of: str, snapshot: Output[Dataset]) -> str:
    """Point-in-time features from the Feast offline store; returns the snapshot id."""
    from onerec.config import load_config
    from onerec.retrain import snapshot_features

    meta = snapshot_features(load_config(preset, overrides), snapshot.path, as_of or None)
    snapshot.metadata.update(meta)
    return meta["id"]


def build_training_set(preset: str, overrides: List[str], snapshot: Input[Dataset],
                       training_set: Output[Dataset]):
    from onerec.config import load_config
    from onerec.retrain import build_training_set

    training_set.metadata.update(build_training_set(load_config(preset, overrides), snapshot.path,
                                                    training_set.path))


def fit_tokenizer(preset: str, overrides: List[str], training_set: Input[Dataset], tokenizer: Output[Model]):
    from onerec.config import load_config
    from onerec.retrain import fit_tokenizer_step

    tokenizer.metadata.update(fit_tokenizer_step(load_config(preset, overrides), training_set.path,
                                                 tokenizer.path))


def train_model(preset: str, overrides: List[str], pipeline_run: str, training_set: Input[Dataset],
                tokenizer: Input[Model], model: Output[Model]) -> str:
    """Trains and tracks the run in MLflow; returns the MLflow run id."""
    from onerec.config import load_config
    from onerec.retrain import train_step

    figures = train_step(load_config(preset, overrides), training_set.path, tokenizer.path, model.path,
                         tags={"pipeline_run_id": pipeline_run})
    model.metadata.update({k: v for k, v in figures.items() if isinstance(v, (int, float, str))})
    return figures["mlflow_run_id"]


def evaluate_model(preset: str, overrides: List[str], run_id: str, training_set: Input[Dataset],
                   model: Input[Model], metrics: Output[Metrics]) -> bool:
    """The new model against the champion on the same held-out set; the verdict goes to the
    MLflow run (evaluation.json). Returns whether it beats the champion."""
    from onerec.config import load_config
    from onerec.retrain import evaluate_step

    verdict = evaluate_step(load_config(preset, overrides), training_set.path, model.path, run_id)
    for key, value in verdict["candidate"].items():
        metrics.log_metric(key, value)
    return verdict["beats_champion"]


def register_model(preset: str, overrides: List[str], run_id: str, pipeline_run: str) -> str:
    """A new registered model version (every run, its evaluation in tags); returns its number."""
    from onerec.config import load_config
    from onerec.retrain import register_step

    return register_step(load_config(preset, overrides), run_id, pipeline_run)


def set_challenger(preset: str, overrides: List[str], version: str) -> str:
    """Alias `challenger` (and `champion` when there is none) -> version; the aliases as JSON."""
    import json

    from onerec.config import load_config
    from onerec.retrain import set_challenger_step

    return json.dumps(set_challenger_step(load_config(preset, overrides), version))


def align_model(preset: str, overrides: List[str], as_of: str, model: Output[Model]) -> str:
    """The champion aligned on the joined exposure rows, tracked in MLflow; returns the run id."""
    from onerec.config import load_config
    from onerec.rl.offline import align_step

    report = align_step(load_config(preset, overrides), model.path, as_of)
    model.metadata.update({k: v for k, v in report.items() if isinstance(v, (int, float, str))})
    return report["mlflow_run_id"]


def register_challenger(preset: str, overrides: List[str], run_id: str, pipeline_run: str) -> str:
    """A new version from the align run, aliased `challenger`; returns its number."""
    from onerec.config import load_config
    from onerec.rl.offline import register_challenger_step

    return register_challenger_step(load_config(preset, overrides), run_id, pipeline_run)


RETRAIN_STEPS = (snapshot_features, build_training_set, fit_tokenizer, train_model, evaluate_model,
                 register_model, set_challenger)
ALIGN_STEPS = (align_model, register_challenger)


def _components(image: str, steps) -> SimpleNamespace:
    make = dsl.component(base_image=image, install_kfp_package=False)
    return SimpleNamespace(**{fn.__name__: make(fn) for fn in steps})


def retrain_components(image: str) -> SimpleNamespace:
    """Every retrain step as a KFP component on base image `image`, by function name."""
    return _components(image, RETRAIN_STEPS)


def align_components(image: str) -> SimpleNamespace:
    """Every align step as a KFP component on base image `image`, by function name."""
    return _components(image, ALIGN_STEPS)
