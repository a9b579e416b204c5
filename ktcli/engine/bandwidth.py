"""Measured memory bandwidths (CPU DRAM read, GPU HBM read), cached per machine; the roofline's denominators."""
from __future__ import annotations

import json
import os
import platform
import time

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_key() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "nogpu"
    return f"{platform.node()}|{cpu_model()}|{os.cpu_count()}|{gpu}"


def _median_time(fn, reps=5):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


PROBES = [(chunk, pf) for chunk in (0, 256) for pf in (0, 1024, 4096)]   # (chunk KiB, prefetch bytes)


def stream_reader(x: torch.Tensor, chunk: int, pf: int, reps: int = 5):
    """A callable giving the bytes/s of one reading of `x` by the CPU kernel's own streaming loop (its thread
    team, `chunk` KiB dynamic chunks or 0 = static, software prefetch `pf` bytes ahead); median of `reps`."""
    import ctypes
    from ..ops import kernels
    lib, threads, nbytes = kernels.get(), torch.get_num_threads(), x.numel() * x.element_size()
    run = lambda: lib.stream_read(ctypes.c_void_p(x.data_ptr()), ctypes.c_size_t(x.numel()), threads)  # noqa: E731

    def read() -> float:
        was = kernels.tune(chunk, pf)
        try:
            return nbytes / _median_time(run, reps)
        finally:
            kernels.tune(*was)
    return read


def probe_buffer(nbytes: int) -> torch.Tensor:
    """A buffer larger than any cache, in huge pages, touched."""
    from ..ops.quant import hugepages
    x = torch.empty(nbytes // 8, dtype=torch.int64)
    hugepages(x)
    return x.fill_(1)


def measure_cpu_read(nbytes: int = 2 * 2**30, detail: dict | None = None) -> float:
    """Bytes/s reading a buffer larger than any cache with all threads: the roofline needs a ceiling, so the
    largest of several readers is kept — torch's sum and, with the CPU kernel built, its own streaming loop
    (same thread team) with static or dynamic chunks and with or without software prefetch. `detail`, if given,
    receives every reading."""
    from ..ops import kernels
    x = probe_buffer(nbytes)
    readings = {"torch-sum": nbytes / _median_time(lambda: x.sum())}
    if kernels.get() is not None:
        for chunk, pf in PROBES:
            readings[f"stream-chunk{chunk}-pf{pf}"] = stream_reader(x, chunk, pf)()
    if detail is not None:
        detail.update(readings)
    return max(readings.values())


def measure_gpu_read(nbytes: int = 4 * 2**30) -> float:
    x = torch.ones(nbytes // 2, dtype=torch.bfloat16, device="cuda")

    def run():
        x.sum()
        torch.cuda.synchronize()
    t = _median_time(run, reps=10)
    return nbytes / t


def bandwidths(remeasure: bool = False, cache_dir: str | None = None) -> dict:
    """{'cpu': B/s, 'cuda': B/s or None, 'measured': bool} — cached in ~/.cache/ktcli/bandwidth.json."""
    from ..model.demo import cache_dir as demo_cache
    path = os.path.join(cache_dir or os.path.dirname(demo_cache()), "bandwidth.json")
    key = machine_key()
    cache = {}
    if os.path.isfile(path):
        try:
            with open(path) as f:
                cache = json.load(f)
        except (OSError, ValueError):
            cache = {}
    if not remeasure and key in cache:
        return {**cache[key], "measured": False}
    bw = {"cpu": measure_cpu_read(), "cuda": measure_gpu_read() if torch.cuda.is_available() else None}
    cache[key] = bw
    os.makedirs(os.path.dirname(path), exist_ok=True)
    from ..files import write_atomic
    write_atomic(path, json.dumps(cache, indent=2))
    return {**bw, "measured": True}
