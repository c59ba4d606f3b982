"""The beam search in a child process (onerec/model_process.py): the same answers as on the
batcher's thread, errors that say what failed, a restart after the child dies, and the
predictor releasing swapped-out models from it."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from onerec.config import load_config
from onerec.model_process import ModelProcess, ModelProcessError
from onerec.serve import ServedModel
from tests.unit.test_serving import Features, served  # noqa: F401 - the saved debug models fixture

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def worker():
    w = ModelProcess(threads=1)
    yield w
    w.close()


def some_histories(here: ServedModel, n: int = 6) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.choice(np.arange(1, len(here.item_ids) + 1), size=int(rng.integers(1, 12))) for _ in range(n)]


def test_the_child_answers_what_the_thread_answers(served, worker):  # noqa: F811
    _, dirs, *_ = served
    directory, version = dirs["champion"]
    here = ServedModel.from_dir(directory, version, "champion")
    there = ServedModel.from_dir(directory, version, "champion", worker=worker)
    assert there.model is None and there.trie is None             # the weights live in the child only
    np.testing.assert_array_equal(there.item_ids, here.item_ids)
    histories = some_histories(here)
    items, scores = there.top_items(histories, 5, 10)
    want_items, want_scores = here.top_items(histories, 5, 10)
    np.testing.assert_array_equal(items, want_items)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
    assert there.semantic_ids(items[0]) == here.semantic_ids(want_items[0])


def test_errors_in_the_child_name_what_failed(served, worker, tmp_path):  # noqa: F811
    with pytest.raises(ModelProcessError, match="hparams.json: file not found"):
        worker.load(str(tmp_path))
    with pytest.raises(ModelProcessError, match="KeyError"):
        worker.top_items(str(tmp_path / "never-loaded"), [np.array([1])], 1, 1)
    _, dirs, *_ = served
    directory, _ = dirs["champion"]
    worker.load(directory)
    assert worker.top_items(directory, [np.array([1, 2])], 3, 5)[0].shape == (1, 3)   # it still serves


def test_a_dead_child_is_restarted_with_its_models(served):  # noqa: F811
    _, dirs, *_ = served
    directory, _ = dirs["champion"]
    w = ModelProcess(threads=1)
    try:
        w.load(directory)
        before = w.top_items(directory, [np.array([3, 4, 5])], 4, 8)
        w._proc.kill()
        w._proc.wait()
        after = w.top_items(directory, [np.array([3, 4, 5])], 4, 8)     # a new child, the model reloaded
        assert w.restarts == 1
        np.testing.assert_array_equal(after[0], before[0])
    finally:
        w.close()
    assert w._proc.returncode is not None                               # close() ends the child


def test_the_predictor_runs_the_model_in_the_child_and_frees_retired_models(served):  # noqa: F811
    from serving.predictor import OneRecPredictor

    cfg, dirs, histories, popular, _ = served
    cfg = load_config("debug", ["serving.model_process=true", "serving.model_threads=1"])
    p = OneRecPredictor("onerec", cfg, model_dirs=dirs, features=Features(histories, popular))
    try:
        assert p.load() and p.worker is not None
        user = next(iter(histories))
        answer = asyncio.run(p.predict({"instances": [{"user_id": user, "k": 5}]}))["predictions"][0]
        assert len(answer["items"]) == 5 and answer["fallback"] is None
        champion = p.recommender.models["champion"]
        p._retired.append((time.monotonic(), champion))    # as if just swapped out
        p.release_retired(grace_s=3600)                    # within the grace period: kept
        assert champion.top_items([np.array([1])], 1, 1)[0].shape == (1, 1)
        p.release_retired(grace_s=0)
        assert not p._retired
        with pytest.raises(ModelProcessError, match="KeyError"):
            champion.top_items([np.array([1])], 1, 1)      # freed in the child
    finally:
        p.stop()
    assert p.worker._proc.returncode is not None
