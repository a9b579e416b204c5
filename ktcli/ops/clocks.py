"""Host-side clocks of the CPU-expert path, read by the engine per token. Updated from the CPU worker and the
main thread at once, so every update takes a lock (a bare `+=` on a shared float loses updates)."""
from __future__ import annotations

import threading


class Clock:
    def __init__(self, what: str):
        self.what, self._s, self._n, self._lock = what, 0.0, 0, threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:
            self._s += seconds
            self._n += 1

    def take_count(self) -> tuple:
        """(seconds, number of add() calls) since the last take, and start again from zero."""
        with self._lock:
            out, self._s, self._n = (self._s, self._n), 0.0, 0
        return out

    def take(self) -> float:
        return self.take_count()[0]


HostClock = Clock("seconds computing CPU-expert layers on the CPU worker (one add per layer call)")
KernelClock = Clock("seconds inside the C kernel's calls (the rest of HostClock is Python, ctypes, scratch)")
StepClock = Clock("seconds from handing a CPU-expert layer to the worker to its return (host callback, segment "
                  "loop or eager step): HostClock plus the hand-off")
SyncClock = Clock("seconds the host waited for the GPU before CPU-expert layers (eager and piecewise decode)")


def take_all() -> dict:
    """Every clock since the last take_all(), reset: what a generation or a bench repetition records."""
    host, calls = HostClock.take_count()
    return {"cpu_experts_s": host, "kernel_s": KernelClock.take(), "cpu_step_s": StepClock.take(),
            "cpu_layer_calls": calls, "gpu_wait_s": SyncClock.take()}


def fixed_cost_us(c: dict) -> float | None:
    """µs per CPU-expert layer call spent outside the kernel (hand-off, Python, ctypes), when the kernel ran."""
    if not c.get("cpu_layer_calls") or not c.get("kernel_s"):
        return None
    around = c["cpu_step_s"] or c["cpu_experts_s"]      # no hand-off when the model lives on the CPU
    return max(around - c["kernel_s"], 0.0) / c["cpu_layer_calls"] * 1e6


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
