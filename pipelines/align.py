"""The align pipeline: the champion aligned on the joined exposure rows (reward model + the
preset's align.method), tracked in MLflow, registered, and aliased `challenger`, the A/B test's
treatment (serving.ab_config routes a share of users to it).

    align = align_pipeline(image)
    compile_pipeline(cfg, "align")          # -> pipelines/align.yaml (committed)

`align.yaml` beside this file is its compiled IR on the `full` preset's image;
tests/unit/test_pipelines.py recompiles and fails on any difference. Run it with
`onerec pipelines run|submit|schedule align` (onerec/pipelines.py).
"""
# no `from __future__ import annotations`: KFP reads the real annotation objects
from pathlib import Path
from typing import List

from kfp import dsl

from components import align_components
from pipelines import on_cluster

NAME = "onerec-align"
COMPILED = Path(__file__).with_name("align.yaml")


def align_pipeline(image: str):
    c = align_components(image)

    @dsl.pipeline(name=NAME, description="Align the champion with the rewards users gave (reward model + "
                  "ECPO/GBPO/DPO); register it and alias it `challenger` for the A/B test.")
    def align(preset: str = "full", overrides: List[str] = [], as_of: str = ""):
        cfg = dict(preset=preset, overrides=overrides)
        aligned = c.align_model(**cfg, as_of=as_of)
        version = c.register_challenger(**cfg, run_id=aligned.outputs["Output"],
                                        pipeline_run=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        on_cluster((aligned, version), feast_task=aligned)           # the joined rows are on the volume

    return align
