"""One persistent thread computes every CPU-expert layer that takes the Python path (torch's fallback, dtypes the
C step does not take directly), whoever asks (main thread, graph segment loop, or a CUDA host callback). Why:
torch's CPU ops then always run on one OpenMP thread team; teams of several threads (main, host-callback)
spinning on the same cores slowed full-graph decode (benchmarks/HISTORY.md). The C kernel has its own team.

Each request is a Job with its own completion event and error, so a caller whose wait was interrupted (Ctrl-C)
never lets the next caller read its result; no lock is held while waiting.
"""
from __future__ import annotations

import queue
import threading


class Job:
    __slots__ = ("fn", "done", "error")

    def __init__(self, fn):
        self.fn, self.done, self.error = fn, threading.Event(), None


class CpuWorker:
    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._loop, name="ktcli-cpu-experts", daemon=True).start()

    def _loop(self):
        while True:
            job = self._jobs.get()
            try:
                job.fn()
            except BaseException as e:   # noqa: BLE001 — re-raised in the caller's thread
                job.error = e
            job.done.set()

    def submit(self, fn) -> Job:
        job = Job(fn)
        self._jobs.put(job)
        return job

    def run(self, fn) -> None:
        """Run `fn` on the worker and wait for it (the waiting thread releases the GIL). Jobs run in the order
        submitted, one at a time."""
        job = self.submit(fn)
        job.done.wait()
        if job.error is not None:
            raise job.error


_worker = None
_wlock = threading.Lock()


def worker() -> CpuWorker:
    global _worker
    if _worker is None:
        with _wlock:
            if _worker is None:
                _worker = CpuWorker()
    return _worker
