"""One persistent thread computes every CPU-expert layer, whoever asks (main thread, graph segment loop, or a
CUDA host callback). Why: CPU experts then always run on one OpenMP thread team; teams of several threads
(main, host-callback) spinning on the same cores slowed full-graph decode (H100 runs, benchmarks/README.md).
"""
from __future__ import annotations

import threading


class CpuWorker:
    def __init__(self):
        self._job = None
        self._err = None
        self._go, self._done = threading.Event(), threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._loop, name="ktcli-cpu-experts", daemon=True).start()

    def _loop(self):
        while True:
            self._go.wait()
            self._go.clear()
            try:
                self._job()
            except BaseException as e:   # noqa: BLE001 — re-raised in the caller's thread
                self._err = e
            self._done.set()

    def run(self, job) -> None:
        """Run `job` on the worker and wait for it (the waiting thread releases the GIL)."""
        with self._lock:
            self._job, self._err = job, None
            self._done.clear()
            self._go.set()
            self._done.wait()
            if self._err is not None:
                raise self._err


_worker = None
_wlock = threading.Lock()


def worker() -> CpuWorker:
    global _worker
    if _worker is None:
        with _wlock:
            if _worker is None:
                _worker = CpuWorker()
    return _worker
