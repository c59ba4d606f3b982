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


def _allowed_cpus(pid: int, tid: int | None = None) -> set[int]:
    import os
    return set(os.sched_getaffinity(tid or pid))


def test_model_cpus_leave_the_server_the_others(monkeypatch):
    import os

    from onerec.model_process import model_cpus

    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1, 2, 3})
    assert model_cpus(1) == {3} and model_cpus(2) == {2, 3}
    assert model_cpus(0) == set() and model_cpus(4) == set()       # torch's default / nothing left over


def test_a_pinned_child_runs_every_thread_on_its_cpus(served):  # noqa: F811
    import os

    _, dirs, *_ = served
    cpu = min(os.sched_getaffinity(0))
    w = ModelProcess(threads=1, cpus={cpu})
    try:
        w.load(dirs["champion"][0])                                 # torch and the control thread are up
        tasks = os.listdir(f"/proc/{w._proc.pid}/task")
        assert len(tasks) >= 2
        assert all(_allowed_cpus(int(tid)) == {cpu} for tid in tasks)
    finally:
        w.close()


def test_pin_threads_pins_threads_already_running():
    import os
    import threading

    from onerec.model_process import pin_threads

    before = set(os.sched_getaffinity(0))
    started, stop = threading.Event(), threading.Event()
    tid = []

    def run():
        tid.append(threading.get_native_id())
        started.set()
        stop.wait(5)

    thread = threading.Thread(target=run)
    thread.start()
    started.wait(5)
    try:
        pin_threads({min(before)})
        assert _allowed_cpus(tid[0]) == {min(before)} == _allowed_cpus(0)
    finally:
        pin_threads(before)
        stop.set()
        thread.join()
