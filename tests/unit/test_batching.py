"""MicroBatcher: concurrent jobs share calls, results go back to their own callers, limits hold."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from onerec.batching import MicroBatcher, Overloaded


class Recorder:
    """A batch function that doubles its inputs and remembers every batch; `gate` holds a call."""

    def __init__(self):
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, items):
        self.entered.set()
        self.gate.wait(10)
        self.batches.append(list(items))
        if any(i < 0 for i in items):
            raise ValueError("negative input")
        return [2 * i for i in items]


def hold_worker(fn: Recorder, batcher: MicroBatcher, items: list[int]):
    """Submit `items` and return once the worker is inside fn with them, held there until
    fn.gate is set -> their future."""
    fn.gate.clear()
    fn.entered.clear()
    first = batcher.submit(items)
    assert fn.entered.wait(5)
    return first


def submit_while_held(fn: Recorder, batcher: MicroBatcher, jobs: list[list[int]]):
    """Hold the worker inside a first call, queue `jobs`, release -> (first future, job futures)."""
    first = hold_worker(fn, batcher, [1000])
    futures = [batcher.submit(job) for job in jobs]
    fn.gate.set()
    return first, futures


def test_jobs_queued_during_a_call_run_as_one_batch_and_each_caller_gets_its_own_results():
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch=64, max_wait_s=0.0, max_pending=100)
    first, futures = submit_while_held(fn, batcher, [[1], [2, 3], [4]])
    assert first.result(5) == [2000]
    assert [f.result(5) for f in futures] == [[2], [4, 6], [8]]
    assert fn.batches == [[1000], [1, 2, 3, 4]]
    batcher.close()


def test_a_batch_stops_growing_at_max_batch_and_never_splits_a_job():
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch=3, max_wait_s=0.0, max_pending=100)
    _, futures = submit_while_held(fn, batcher, [[1, 2], [3, 4], [5], [6, 7, 8, 9]])
    assert [f.result(5) for f in futures] == [[2, 4], [6, 8], [10], [12, 14, 16, 18]]
    assert fn.batches[1:] == [[1, 2, 3, 4], [5, 6, 7, 8, 9]]   # 2 + 2 >= 3; a job larger than max runs whole
    batcher.close()


def test_max_batch_one_runs_every_job_alone():
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch=1, max_wait_s=0.01, max_pending=100)
    _, futures = submit_while_held(fn, batcher, [[1], [2], [3]])
    assert [f.result(5) for f in futures] == [[2], [4], [6]]
    assert fn.batches[1:] == [[1], [2], [3]]
    batcher.close()


def test_the_wait_gathers_jobs_from_concurrent_threads():
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch=8, max_wait_s=0.5, max_pending=100)
    # the wait is on only after a batch of several (a lone caller never waits): make one first,
    # so a worker that gets a thread's job before the others' waits for them (a loaded CI machine
    # can start the 8 threads far enough apart that without the wait each runs alone)
    _, primed = submit_while_held(fn, batcher, [[100], [101]])
    assert [f.result(5) for f in primed] == [[200], [202]] and fn.batches[1:] == [[100, 101]]
    barrier = threading.Barrier(8)

    def call(i):
        barrier.wait()
        return batcher([i])

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(call, range(8))) == [[2 * i] for i in range(8)]
    concurrent = fn.batches[2:]
    assert len(concurrent) < 8 and sorted(sum(concurrent, [])) == list(range(8))
    batcher.close()


def test_an_exception_fails_the_jobs_of_its_batch_only_and_the_worker_carries_on():
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch=64, max_wait_s=0.0, max_pending=100)
    first, (bad, good) = submit_while_held(fn, batcher, [[-1], [5]])
    assert first.result(5) == [2000]
    with pytest.raises(ValueError, match="negative"):
        bad.result(5)
    with pytest.raises(ValueError, match="negative"):      # batched with the bad job
        good.result(5)
    assert batcher([6]) == [12]
    batcher.close()


def test_a_batch_function_returning_the_wrong_number_of_results_is_an_error():
    batcher = MicroBatcher(lambda items: items[:-1], max_batch=4, max_wait_s=0.0, max_pending=10)
    with pytest.raises(RuntimeError, match="returned 1 results for 2 items"):
        batcher([1, 2])
    batcher.close()


def test_more_waiting_jobs_than_max_pending_is_refused_and_the_rest_complete():
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch=64, max_wait_s=0.0, max_pending=2)
    first = hold_worker(fn, batcher, [1])
    queued = [batcher.submit([2]), batcher.submit([3])]
    with pytest.raises(Overloaded, match="2 requests are already waiting"):
        batcher.submit([4])
    fn.gate.set()
    assert first.result(5) == [2] and [f.result(5) for f in queued] == [[4], [6]]
    batcher.close()


def test_under_a_standing_queue_jobs_that_waited_longer_than_max_queue_are_shed_unrun():
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch=1, max_wait_s=0.0, max_pending=100, max_queue_s=0.05, standing_s=0.1)
    first = hold_worker(fn, batcher, [1])                 # runs at once: it waited ~0 ms
    stale = [batcher.submit([2]), batcher.submit([3])]
    threading.Event().wait(0.15)                          # 150 ms behind the held batch: the queue stands
    fn.gate.set()
    assert first.result(5) == [2]
    for future in stale:
        with pytest.raises(Overloaded, match=r"waited 1\d\d ms for a batch, more than the 50 ms allowed"):
            future.result(5)
    assert fn.batches == [[1]]                            # the shed jobs never reached fn
    assert batcher.submit([4]).result(5) == [8]           # a job that does not wait still runs
    batcher.close()


def test_a_burst_behind_one_slow_batch_is_not_shed():
    """The queue emptied within standing_s: the jobs waited long, but nothing stands, so they run."""
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch=64, max_wait_s=0.0, max_pending=100, max_queue_s=0.05, standing_s=1.0)
    first = hold_worker(fn, batcher, [1])
    late = [batcher.submit([2]), batcher.submit([3])]
    threading.Event().wait(0.15)
    fn.gate.set()
    assert first.result(5) == [2] and [f.result(5) for f in late] == [[4], [6]]
    batcher.close()


def test_close_finishes_queued_jobs_then_refuses_new_ones():
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch=1, max_wait_s=0.0, max_pending=10)
    first = hold_worker(fn, batcher, [1])
    later = batcher.submit([2])
    threading.Timer(0.05, fn.gate.set).start()
    batcher.close()
    assert first.result(0) == [2] and later.result(0) == [4]
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit([3])


def test_empty_jobs_resolve_at_once_and_bad_limits_are_refused():
    batcher = MicroBatcher(lambda items: items, max_batch=2, max_wait_s=0.0, max_pending=2)
    assert batcher([]) == []
    batcher.close()
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(lambda items: items, max_batch=0, max_wait_s=0.0, max_pending=2)


def test_only_concurrent_callers_make_a_batch_wait():
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch=64, max_wait_s=0.25, max_pending=100)
    assert batcher([1]) == [2] and batcher.wait_s(time.monotonic()) == 0.0   # a lone caller: no wait
    _, futures = submit_while_held(fn, batcher, [[2], [3]])
    [f.result(5) for f in futures]
    assert fn.batches[-1] == [2, 3] and batcher.wait_s(time.monotonic()) == 0.25  # after several: wait
    assert batcher([4]) == [8] and batcher.wait_s(time.monotonic()) == 0.0
    batcher.close()


def test_the_wait_ends_once_the_previous_batchs_callers_are_back():
    """max_wait_s of 5 s: a batch of 2 answered, both callers come back, and their batch runs at
    once rather than 5 s later."""
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch=64, max_wait_s=0.01, max_pending=100)
    _, futures = submit_while_held(fn, batcher, [[2], [3]])
    [f.result(5) for f in futures]                                   # the previous batch: 2 jobs
    assert fn.batches[-1] == [2, 3] and batcher.expected_jobs(time.monotonic()) == 2
    batcher.max_wait_s = 5.0
    fn.gate.clear()
    back = [batcher.submit([4])]
    threading.Event().wait(0.05)
    back.append(batcher.submit([5]))
    started = time.monotonic()
    fn.gate.set()
    assert [f.result(5) for f in back] == [[8], [10]] and time.monotonic() - started < 2.0
    assert fn.batches[-1] == [4, 5]
    batcher.close()


def test_a_job_that_arrived_during_a_batch_of_one_waits_for_its_peer():
    """Two callers: B arrives while A's batch runs; its batch then waits for A's next request
    instead of running alone (and making A's next request wait for it in turn)."""
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch=64, max_wait_s=0.5, max_pending=100)
    first = hold_worker(fn, batcher, [1])
    during = batcher.submit([2])
    fn.gate.set()
    assert first.result(5) == [2]
    threading.Event().wait(0.05)                                     # A's caller comes back
    again = batcher.submit([3])
    assert during.result(5) == [4] and again.result(5) == [6]
    assert fn.batches == [[1], [2, 3]]
    batcher.close()


def test_pipelined_the_next_batch_is_prepared_while_the_last_one_runs():
    fn, prepared = Recorder(), []
    seen = threading.Event()

    def prepare(items):
        prepared.append(list(items))
        if len(prepared) == 2:
            seen.set()
        if any(i == 13 for i in items):
            raise KeyError("no features for 13")
        return [i + 1 for i in items]                 # fn gets prepare's output, not the items

    batcher = MicroBatcher(fn, max_batch=64, max_wait_s=0.0, max_pending=100, prepare=prepare)
    first = hold_worker(fn, batcher, [1])            # the runner is inside fn([2])
    second = batcher.submit([5])
    assert seen.wait(5) and prepared == [[1], [5]]   # prepared while batch 1 still runs
    assert not second.done()
    fn.gate.set()
    assert first.result(5) == [4] and second.result(5) == [12]
    with pytest.raises(KeyError, match="no features"):
        batcher([13])                                 # a failed prepare fails its own jobs only
    assert batcher([2]) == [6]
    batcher.close()


def test_pipelined_a_busy_runner_lets_the_next_batch_collect_until_it_is_nearly_free():
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch=64, max_wait_s=0.0, max_pending=100, prepare=lambda items: items)
    batcher([1])
    batcher._fn_s = 0.3                              # the runner's batches take ~300 ms
    first = hold_worker(fn, batcher, [1])
    batcher.submit([2])
    time.sleep(0.05)
    later = batcher.submit([3])                      # arrives 50 ms on, long before the runner is free
    fn.gate.set()
    assert later.result(5) == [6] and first.result(5) == [2]
    assert fn.batches[-1] == [2, 3]                  # one batch, though [2] waited alone for 50 ms
    batcher.close()


def test_pipelined_no_batch_closes_while_a_prepared_one_waits_for_the_runner():
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch=64, max_wait_s=0.0, max_pending=100, prepare=lambda items: items)
    first = hold_worker(fn, batcher, [1])
    batcher._fn_s = 1e-6                             # the runner "should be free" already: no collecting
    waiting = batcher.submit([2])                    # prepared, waits for the held runner
    time.sleep(0.05)
    third = batcher.submit([3])
    time.sleep(0.05)
    fourth = batcher.submit([4])                     # both still queued: [3] was not closed alone
    fn.gate.set()
    assert [f.result(5) for f in (first, waiting, third, fourth)] == [[2], [4], [6], [8]]
    assert fn.batches == [[1], [2], [3, 4]]
    batcher.close()
