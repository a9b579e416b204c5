"""Host-side clocks of the CPU-expert path, read by the engine per token. Updated from the CPU worker and the
main thread at once, so every update takes a lock (a bare `+=` on a shared float loses updates). The C kernel
keeps its own counters (a CUDA host function runs no Python); `pull_kernel()` folds them in before any read."""
from __future__ import annotations

import threading


class Clock:
    def __init__(self, what: str):
        self.what, self._s, self._n, self._lock = what, 0.0, 0, threading.Lock()

    def add(self, seconds: float, n: int = 1) -> None:
        with self._lock:
            self._s += seconds
            self._n += n

    def take_count(self) -> tuple:
        """(seconds, number of add() calls) since the last take, and start again from zero."""
        with self._lock:
            out, self._s, self._n = (self._s, self._n), 0.0, 0
        return out

    def take(self) -> float:
        return self.take_count()[0]


HostClock = Clock("seconds computing CPU-expert layers (one add per layer call): the C step (moe_host), or the "
                  "Python call on the CPU worker")
KernelClock = Clock("seconds inside the C kernel's calls (the rest of HostClock is Python, ctypes, the team's "
                    "wake-up and join)")
StepClock = Clock("seconds from handing a CPU-expert layer over to its return (host function, segment loop or "
                  "eager step): HostClock plus any hand-off to the Python worker")
SyncClock = Clock("seconds the host waited for the GPU before CPU-expert layers (eager and piecewise decode)")


def pull_kernel() -> None:
    """Fold the C kernel's counters (since the last pull) into the clocks: its layer steps count as host and step
    time (no Python around them), every kernel call as kernel time, its fastest call as a rate offered."""
    from . import kernels
    s = kernels.take_stats()
    if not s:
        return
    if s["host_calls"]:
        HostClock.add(s["host_s"], int(s["host_calls"]))
        StepClock.add(s["host_s"], int(s["host_calls"]))
    if s["calls"]:
        KernelClock.add(s["kernel_s"], int(s["calls"]))
    KernelRate.offer(s["best_bps"], 1.0)


def take_all() -> dict:
    """Every clock since the last take_all(), reset: what a generation or a bench repetition records."""
    pull_kernel()
    host, calls = HostClock.take_count()
    return {"cpu_experts_s": host, "kernel_s": KernelClock.take(), "cpu_step_s": StepClock.take(),
            "cpu_layer_calls": calls, "gpu_wait_s": SyncClock.take()}


def fixed_cost_us(c: dict) -> float | None:
    """µs per CPU-expert layer call spent outside the kernel (hand-off, Python, ctypes), when the kernel ran; bench
    adds the graph step's own cost, which no host clock sees (engine/bench.py)."""
    if not c.get("cpu_layer_calls") or not c.get("kernel_s"):
        return None
    around = c["cpu_step_s"] or c["cpu_experts_s"]      # no hand-off when the model lives on the CPU
    return max(around - c["kernel_s"], 0.0) / c["cpu_layer_calls"] * 1e6


class BestRate:
    """The fastest any CPU-expert kernel call read its selected experts (bytes/s, timed inside the C kernel):
    the bandwidth ceiling is raised to it, since a reading below what the code reaches is no bound."""

    def __init__(self):
        self._best, self._lock = 0.0, threading.Lock()

    def offer(self, nbytes: float, seconds: float) -> None:
        if seconds > 0:
            with self._lock:
                self._best = max(self._best, nbytes / seconds)

    def take(self) -> float:
        pull_kernel()
        with self._lock:
            b, self._best = self._best, 0.0
        return b


KernelRate = BestRate()
