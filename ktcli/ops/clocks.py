"""Host-side clocks of the CPU-expert path, read by the engine per token. Updated from the CPU worker and the
main thread at once, so every update takes a lock (a bare `+=` on a shared float loses updates)."""
from __future__ import annotations

import threading


class Clock:
    def __init__(self, what: str):
        self.what, self._s, self._lock = what, 0.0, threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:
            self._s += seconds

    def take(self) -> float:
        """Seconds since the last take(), and start again from zero."""
        with self._lock:
            s, self._s = self._s, 0.0
        return s


HostClock = Clock("seconds spent computing CPU experts (host side, safe inside host callbacks)")
SyncClock = Clock("seconds the host waited for the GPU before CPU-expert layers (eager and piecewise decode)")


class BestRate:
    """The fastest any CPU-expert kernel call read its selected experts (bytes/s, Python call overhead included):
    the bandwidth ceiling is raised to it, since a reading below what the code reaches is no bound."""

    def __init__(self):
        self._best, self._lock = 0.0, threading.Lock()

    def offer(self, nbytes: float, seconds: float) -> None:
        if seconds > 0:
            with self._lock:
                self._best = max(self._best, nbytes / seconds)

    def take(self) -> float:
        with self._lock:
            b, self._best = self._best, 0.0
        return b


KernelRate = BestRate()
