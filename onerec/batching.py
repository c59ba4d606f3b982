"""Micro-batching: requests that arrive together run as one call (one feature lookup, one beam
search per variant), on one worker thread, so the server's event loop stays free to accept more.

    batcher = MicroBatcher(recommender.recommend, max_batch=32, max_wait_s=0.002, max_pending=1024)
    recs = batcher([req1, req2])                  # blocking, from any thread
    recs = await asyncio.wrap_future(batcher.submit([req1]))   # from the event loop

The worker takes the oldest waiting job, then adds every job already waiting, up to `max_batch`
items (a job is never split, so one job larger than max_batch runs alone): under load, jobs queue
up while the previous batch runs and the next batch takes them all. When the previous batch held
more than one job, or the first job arrived while it ran (callers are concurrent), the batch also
waits up to `max_wait_s` for more: callers just answered come back within a few ms, and without
the wait C callers settle into alternating half-size batches, each waiting for the other (at 2
clients, batches of one: each request waited for the other's). The wait ends as soon as every
caller it counts on is in (the previous batch's jobs, plus those that arrived while it ran). A
lone caller never waits.

Load is shed, rather than letting latency grow without bound, in two ways, both `Overloaded`
(HTTP 503, retry later). More than `max_pending` jobs waiting refuses a new one at once. And with
`max_queue_s` > 0, while the queue stands (no job has started within max_queue_s of its arrival
for `standing_s`), a job that has already waited longer than max_queue_s when its batch starts
is dropped, not run: its answer would come too late anyway, and running it would make the jobs
behind it late too. This is CoDel's controlled delay as servers use it (Facebook, "Fail at
scale", 2015): one slow batch that makes a few requests wait is a burst, not overload, and sheds
nothing (a plain deadline shed requests at 2 clients on a noisy machine).

An exception from the batch function fails exactly the jobs of that batch. max_batch=1 turns
batching off (one job per call, the same thread and queue: the baseline the benchmark compares
against).

Pipelined (`prepare` given): each batch runs as fn(prepare(items)), prepare on the batcher's
thread and fn on a runner thread, so batch k+1's prepare (the feature lookup) overlaps batch k's
fn (the beam search) instead of keeping the model idle. At most one batch is prepared ahead: the
next one starts collecting when the runner takes it, and collects until just before the runner is
expected to be free (its mean fn time, less the mean prepare time): a batch closed earlier would
only wait, and the callers arriving meanwhile would miss it.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from prometheus_client import Counter, Histogram

BATCH_ITEMS = Histogram("onerec_serving_batch_items", "requests per batched call",
                        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
SHED = Counter("onerec_serving_shed", "jobs dropped unrun: they waited longer than max_queue_s")
QUEUE_SECONDS = Histogram("onerec_serving_queue_seconds", "time a job waited for its batch to start",
                          buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))


class Overloaded(RuntimeError):
    """Too many jobs waiting: the caller should retry later (HTTP 503)."""


@dataclass
class _Job:
    items: Sequence
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.monotonic)


_STOP = object()


class MicroBatcher:
    def __init__(self, fn: Callable[[list], list], max_batch: int, max_wait_s: float, max_pending: int,
                 name: str = "batcher", max_queue_s: float = 0.0, standing_s: float = 0.1,
                 prepare: Callable[[list], object] | None = None):
        if max_batch < 1 or max_wait_s < 0 or max_pending < 1 or max_queue_s < 0 or standing_s < 0:
            raise ValueError("max_batch and max_pending must be >= 1; max_wait_s, max_queue_s, standing_s >= 0")
        self.fn, self.max_batch, self.max_wait_s, self.max_queue_s = fn, max_batch, max_wait_s, max_queue_s
        self.standing_s = standing_s
        self._prompt_at = time.monotonic()    # when a job last started within max_queue_s of its arrival
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._closed = False
        self._last_jobs, self._last_end = 1, 0.0   # jobs in the previous batch, when it ended
        self.prepare = prepare
        self._threads = [threading.Thread(target=self._run, name=name, daemon=True)]
        if prepare is not None:
            self._handoff: queue.Queue = queue.Queue(maxsize=1)    # prepared batches waiting for the runner
            self._busy_until = 0.0                  # when the runner should be free (monotonic)
            self._fn_s = self._prepare_s = 0.0      # running means of the two stages' times
            self._threads.append(threading.Thread(target=self._run_prepared, name=f"{name}-runner", daemon=True))
        for thread in self._threads:
            thread.start()

    def submit(self, items: Sequence) -> Future:
        """-> a Future of fn's results for these items, in their order."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        if not items:
            done: Future = Future()
            done.set_result([])
            return done
        job = _Job(list(items))
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Overloaded(f"{self._queue.maxsize} requests are already waiting; retry later") from None
        return job.future

    def __call__(self, items: Sequence) -> list:
        return self.submit(items).result()

    def close(self, timeout_s: float = 10.0) -> None:
        """Finish the jobs already queued, then stop the worker."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            for thread in self._threads:
                thread.join(timeout_s)

    def expected_jobs(self, arrived_at: float) -> int:
        """The callers a batch whose first job arrived at `arrived_at` can count on: the previous
        batch's (just answered, they come back), plus this one if it arrived while that batch ran
        (then it is not one of them)."""
        return self._last_jobs + (arrived_at < self._last_end)

    def wait_s(self, arrived_at: float) -> float:
        """How long that batch may wait for them: max_wait_s when callers are concurrent, else 0
        (a lone caller never waits). The wait ends early once they are all in."""
        return self.max_wait_s if self.expected_jobs(arrived_at) > 1 else 0.0

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                break
            jobs, n, stop = [first], len(first.items), False
            expected = self.expected_jobs(first.queued_at)
            deadline = time.monotonic() + self.wait_s(first.queued_at)
            while n < self.max_batch:
                # wait while callers may still come back; once they all have, take only what is
                # already waiting (a burst arrives spread over a few ms: closing the window early
                # gains the rest of it, and closing it late made the last caller miss the batch)
                now = time.monotonic()
                timeout = max(0.0, deadline - now) if len(jobs) < expected else 0.0
                if self.prepare is not None:          # the runner is busy: collect until it is nearly free
                    timeout = max(timeout, self._busy_until - self._prepare_s - now)
                try:
                    job = self._queue.get(timeout=timeout)
                except queue.Empty:
                    break
                if job is _STOP:
                    stop = True
                    break
                jobs.append(job)
                n += len(job.items)
                expected += job.queued_at < self._last_end    # a caller beyond the previous batch's
            if self.prepare is None:
                self._run_batch(jobs)
                self._last_jobs, self._last_end = len(jobs), time.monotonic()
            else:
                self._prepare_batch(jobs)
            if stop:
                break
        if self.prepare is not None:
            self._handoff.put(_STOP)                      # the runner finishes what it has, then stops

    def _prepare_batch(self, jobs: list[_Job]) -> None:
        jobs = self._admit(jobs)
        if not jobs:
            return
        started = time.monotonic()
        try:
            prepared = self.prepare([item for job in jobs for item in job.items])
        except BaseException as exc:  # noqa: BLE001
            self._fail(jobs, exc)
            return
        self._prepare_s = _mean(self._prepare_s, time.monotonic() - started)
        # hand it over, then wait until the runner takes it: a batch closed while this one still
        # waits would be closed a whole run early, small, and sit prepared for that run (at 64
        # callers: batches of 22 of them, each waiting 17 ms after its feature lookup)
        self._handoff.put((jobs, prepared))
        self._handoff.join()

    def _run_prepared(self) -> None:
        while (batch := self._handoff.get()) is not _STOP:
            jobs, prepared = batch
            started = time.monotonic()
            self._busy_until = started + self._fn_s
            self._handoff.task_done()                    # the batcher collects the next batch now
            self._deliver(jobs, lambda: self.fn(prepared))
            self._fn_s = _mean(self._fn_s, time.monotonic() - started)
            self._busy_until = 0.0
            self._last_jobs, self._last_end = len(jobs), time.monotonic()

    def _admit(self, jobs: list[_Job]) -> list[_Job]:
        """The jobs of a batch that is starting, less those shed (see the module docstring)."""
        started = time.monotonic()
        waits = [started - job.queued_at for job in jobs]
        for wait in waits:
            QUEUE_SECONDS.observe(wait)
        if self.max_queue_s:
            standing = started - self._prompt_at > self.standing_s
            if min(waits) <= self.max_queue_s:
                self._prompt_at = started
            if standing and max(waits) > self.max_queue_s:
                for job, wait in zip(jobs, waits):
                    if wait > self.max_queue_s:
                        job.future.set_exception(Overloaded(
                            f"waited {1000 * wait:.0f} ms for a batch, more than the "
                            f"{1000 * self.max_queue_s:.0f} ms allowed; retry later"))
                        SHED.inc()
                jobs = [job for job, wait in zip(jobs, waits) if wait <= self.max_queue_s]
        if jobs:
            BATCH_ITEMS.observe(sum(len(job.items) for job in jobs))
        return jobs

    def _run_batch(self, jobs: list[_Job]) -> None:
        jobs = self._admit(jobs)
        if jobs:
            self._deliver(jobs, lambda: self.fn([item for job in jobs for item in job.items]))

    @staticmethod
    def _fail(jobs: list[_Job], exc: BaseException) -> None:
        for job in jobs:
            job.future.set_exception(exc)

    def _deliver(self, jobs: list[_Job], call: Callable[[], list]) -> None:
        """Run the batch function; each job gets its slice of the results, or the error."""
        n = sum(len(job.items) for job in jobs)
        try:
            results = call()
            if len(results) != n:
                raise RuntimeError(f"the batch function returned {len(results)} results for {n} items")
        except BaseException as exc:  # noqa: BLE001 - the callers get the error, the worker lives on
            self._fail(jobs, exc)
            return
        start = 0
        for job in jobs:
            job.future.set_result(results[start:start + len(job.items)])
            start += len(job.items)


def _mean(mean: float, value: float, weight: float = 0.2) -> float:
    """Exponentially weighted running mean (the first value starts it)."""
    return value if mean == 0.0 else mean + weight * (value - mean)
