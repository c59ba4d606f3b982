"""Beam search in a child process, so that it never waits for the server's GIL.

    worker = ModelProcess(device="cpu", threads=1)
    worker.load("/tmp/x/champion-v3")                 # the child loads the model and warms it up
    items, scores = worker.top_items("/tmp/x/champion-v3", histories, k=10, beam_size=20)  # (B, k) each
    worker.unload("/tmp/x/champion-v3")
    worker.close()

Why: under load, KServe's event loop (HTTP, JSON, the Feast lookup) holds the GIL much of the
time, and each of the ~1,600 Python-level torch calls of a batched beam search has to take it
back. Inside the server the same batch ran 2-3x slower than alone (benchmarks/RESULTS.md). A
child process has a GIL of its own.

The child is `python -m onerec.model_process` (a fresh interpreter: no forked torch or thread
state, and unlike multiprocessing's spawn it never re-imports the server's main module). It gets
two socket pairs:
- `run` carries the batcher's `top_items` calls;
- `control` carries load and unload. A thread in the child serves it, so a hot reload
  loading a new version never stalls the batches in flight.
Models are keyed by their directory. Messages are pickled: both ends are this module, over a
socket pair the server made for its own child, never a file or a network socket. A call that
fails in the child raises ModelProcessError with the child's message. When the child dies, the
call in flight raises too, and the next call starts a new child that reloads every model the old
one held.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from multiprocessing.connection import Connection

import numpy as np


class ModelProcessError(RuntimeError):
    """The model process failed a call, died or did not answer in time."""


def model_cpus(threads: int) -> set[int]:
    """The CPUs to pin a model process with `threads` torch threads to: the last `threads` of those
    this process may run on, so the server keeps the others. Empty (no pinning) when there are
    not more than that, or threads is 0 (torch's default: every CPU)."""
    allowed = sorted(os.sched_getaffinity(0))
    return set(allowed[-threads:]) if 0 < threads < len(allowed) else set()


def pin_threads(cpus: set[int]) -> None:
    """Pin every thread of this process (sched_setaffinity alone pins only the calling thread;
    threads started later inherit the caller's set)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:                # the thread ended meanwhile
            pass


def _child(run, control, device: str, threads: int) -> None:
    import torch

    from onerec.serve import ServedModel, settle_heap

    if threads:
        torch.set_num_threads(threads)
    models: dict[str, ServedModel] = {}
    lock = threading.Lock()

    def serve_control() -> None:
        while True:
            try:
                op, directory = control.recv()
            except EOFError:                       # the server is gone
                return
            try:
                if op == "load":
                    served = ServedModel.from_dir(directory, "", "", device)   # loads and warms up
                    with lock:
                        models[directory] = served
                    settle_heap(collect=False)     # no full-GC pauses over the model (batches may run now)
                else:
                    with lock:
                        models.pop(directory, None)
                control.send(("ok", None))
            except Exception as exc:  # noqa: BLE001 - reported to the caller, the child lives on
                control.send(("error", f"{type(exc).__name__}: {exc}"))

    threading.Thread(target=serve_control, name="model-control", daemon=True).start()
    while True:
        try:
            directory, histories, k, beam_size, head_k = run.recv()
        except EOFError:
            return
        try:
            with lock:
                served = models[directory]
            run.send(("ok", served.top_items(histories, k, beam_size, head_k)))
        except Exception as exc:  # noqa: BLE001
            run.send(("error", f"{type(exc).__name__}: {exc}"))


class _Hung(ModelProcessError):
    pass


class _Channel:
    """Our end of one socket pair, one call at a time."""

    def __init__(self, conn, timeout_s: float):
        self.conn, self.timeout_s, self.lock = conn, timeout_s, threading.Lock()

    def call(self, message: tuple, alive) -> object:
        with self.lock:
            try:
                self.conn.send(message)
                if not self.conn.poll(self.timeout_s):
                    raise _Hung(f"the model process did not answer in {self.timeout_s:.0f} s")
                status, value = self.conn.recv()
            except (EOFError, OSError) as exc:
                raise ModelProcessError(f"the model process died ({alive()}): {exc}") from None
        if status != "ok":
            raise ModelProcessError(value)
        return value


class ModelProcess:
    """run_timeout_s bounds one beam search, load_timeout_s one model load (then the child is
    considered hung: killed, and restarted by the next call)."""

    def __init__(self, device: str = "cpu", threads: int = 0, run_timeout_s: float = 60.0,
                 load_timeout_s: float = 300.0, cpus: set[int] = frozenset()):
        self.device, self.threads, self.cpus = device, threads, set(cpus)   # cpus: pin the child there
        self.run_timeout_s, self.load_timeout_s = run_timeout_s, load_timeout_s
        self.restarts = 0
        self._loaded: list[str] = []              # what a restarted child must load again
        self._lock = threading.Lock()             # guards starting and restarting the child
        self._proc = None
        self._start()

    def _start(self) -> None:
        run, child_run = socket.socketpair()
        control, child_control = socket.socketpair()
        fds = (child_run.fileno(), child_control.fileno())
        self._proc = subprocess.Popen([sys.executable, "-m", "onerec.model_process", *map(str, fds), self.device,
                                       str(self.threads), ",".join(map(str, sorted(self.cpus)))], pass_fds=fds)
        child_run.close()
        child_control.close()
        self._run = _Channel(Connection(run.detach()), self.run_timeout_s)
        self._control = _Channel(Connection(control.detach()), self.load_timeout_s)

    def _status(self) -> str:
        code = self._proc.poll()
        return "still running" if code is None else f"exit code {code}"

    def _ensure_running(self) -> None:
        with self._lock:
            if self._proc.poll() is None:
                return
            self._start()
            self.restarts += 1
            for directory in self._loaded:
                self._control.call(("load", directory), self._status)

    def _call(self, channel: str, message: tuple) -> object:
        self._ensure_running()
        try:                                      # by name: a restart replaced the channels
            return getattr(self, channel).call(message, self._status)
        except _Hung:
            self._proc.kill()                     # the next call starts a new child
            self._proc.wait()
            raise

    def load(self, directory: str) -> None:
        """Load (and warm up) the saved model in `directory`; raises ModelProcessError when the
        child cannot (the message says why)."""
        directory = str(directory)
        self._call("_control", ("load", directory))
        if directory not in self._loaded:
            self._loaded.append(directory)

    def unload(self, directory: str) -> None:
        directory = str(directory)
        if directory in self._loaded:
            self._loaded.remove(directory)
            self._call("_control", ("unload", directory))

    def top_items(self, directory: str, histories: Sequence[np.ndarray], k: int, beam_size: int,
                  head_k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """ServedModel.top_items of the model loaded from `directory`: raw ids (B, k), scores (B, k)."""
        return self._call("_run", (str(directory), list(histories), k, beam_size, head_k))

    def close(self, timeout_s: float = 5.0) -> None:
        for channel in (self._run, self._control):
            channel.conn.close()                  # the child's recv sees EOF and it returns
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


if __name__ == "__main__":
    run_fd, control_fd, device, threads, cpus = sys.argv[1:]
    if cpus:                                      # before torch starts its threads: they inherit it
        pin_threads({int(c) for c in cpus.split(",")})    # and numpy's, started at import
    _child(Connection(int(run_fd)), Connection(int(control_fd)), device, int(threads))
    os._exit(0)   # now, not after finalizing torch under the control thread still blocked in recv
