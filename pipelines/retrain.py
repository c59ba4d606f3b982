"""The retrain pipeline: feature snapshot -> training set -> tokenizer -> train -> evaluate
against the champion -> register; alias `challenger` only when the new model beats the champion
(registry.margin) or there is none.

    retrain = retrain_pipeline(image)           # the pipeline function on one base image
    compile_pipeline(cfg, "retrain")            # onerec.pipelines: -> pipelines/retrain.yaml

`retrain.yaml` beside this file is its compiled IR, on the image of the `full` preset;
tests/unit/test_pipelines.py recompiles and fails on any difference. Run it with
`onerec pipelines run|submit|schedule retrain` (onerec/pipelines.py).
"""
# no `from __future__ import annotations`: KFP reads the real annotation objects
from pathlib import Path
from typing import List

from kfp import dsl

from components import retrain_components
from pipelines import on_cluster

NAME = "onerec-retrain"
COMPILED = Path(__file__).with_name("retrain.yaml")


def retrain_pipeline(image: str):
    c = retrain_components(image)

    @dsl.pipeline(name=NAME, description="Retrain the semantic-ID tokenizer and OneRec on a point-in-time "
                  "feature snapshot; register it, and alias it `challenger` if it beats the champion.")
    def retrain(preset: str = "full", overrides: List[str] = [], as_of: str = ""):
        cfg = dict(preset=preset, overrides=overrides)
        run = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        snap = c.snapshot_features(**cfg, as_of=as_of)
        data = c.build_training_set(**cfg, snapshot=snap.outputs["snapshot"])
        tok = c.fit_tokenizer(**cfg, training_set=data.outputs["training_set"])
        train = c.train_model(**cfg, pipeline_run=run, training_set=data.outputs["training_set"],
                              tokenizer=tok.outputs["tokenizer"])
        verdict = c.evaluate_model(**cfg, run_id=train.outputs["Output"], training_set=data.outputs["training_set"],
                                   model=train.outputs["model"])
        version = c.register_model(**cfg, run_id=train.outputs["Output"], pipeline_run=run).after(verdict)
        # on the task's single output: kfp.local resolves `<task>-Output` channels in conditions
        with dsl.Condition(verdict.outputs["Output"] == True, name="beats-champion"):  # noqa: E712
            alias = c.set_challenger(**cfg, version=version.output)
        on_cluster((snap, data, tok, train, verdict, version, alias), feast_task=snap)

    return retrain

