"""The roofline's denominators: how fast each device can read memory, measured in the run that uses them.

A ceiling is the largest rate seen in the run: every reading of every reader (torch's sum and the CPU kernel's
own streaming loop with each chunk/prefetch setting), raised to the best rate the CPU experts themselves reached
(`Ceiling.offer`). A reading below what the code achieves is not a bound, so any rate the run shows is taken in.
Cached values are used only when asked, and then say when and where they were measured.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import time
from dataclasses import dataclass, field

import torch

from ..files import cache_root, write_atomic


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


def _rates(fn, nbytes: int, reps: int = 5) -> list:
    """bytes/s of each of `reps` calls after one warm-up call."""
    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(nbytes / (time.perf_counter() - t0))
    return out


PROBES = [(chunk, pf) for chunk in (0, 256) for pf in (0, 1024, 4096)]   # (chunk KiB, prefetch bytes)


def stream_reader(x: torch.Tensor, chunk: int, pf: int, reps: int = 5):
    """A callable giving the bytes/s of `reps` readings of `x` by the CPU kernel's own streaming loop (its thread
    team, `chunk` KiB dynamic chunks or 0 = static, software prefetch `pf` bytes ahead)."""
    import ctypes

    from ..ops import kernels
    lib, threads, nbytes = kernels.get(), torch.get_num_threads(), x.numel() * x.element_size()
    run = lambda: lib.stream_read(ctypes.c_void_p(x.data_ptr()), ctypes.c_size_t(x.numel()), threads)  # noqa: E731

    def read() -> list:
        was = kernels.tune(chunk, pf)
        try:
            return _rates(run, nbytes, reps)
        finally:
            kernels.tune(*was)
    return read


def probe_buffer(nbytes: int) -> torch.Tensor:
    """A buffer larger than any cache, in huge pages, touched."""
    from ..ops.quant import hugepages
    x = torch.empty(nbytes // 8, dtype=torch.int64)
    hugepages(x)
    return x.fill_(1)


def probe_bytes() -> int:
    """The probe buffer: 2 GiB (far beyond any L3), or $KTCLI_BW_PROBE_MIB (the test suite uses a smaller one)."""
    return int(os.environ.get("KTCLI_BW_PROBE_MIB", 2048)) * 2**20


def cpu_readings(nbytes: int | None = None) -> dict:
    """{reader: [bytes/s, …]} reading a buffer larger than any cache with all threads: torch's sum and, with the
    CPU kernel built, its own streaming loop with static or dynamic chunks, with or without software prefetch."""
    from ..ops import kernels
    nbytes = nbytes or probe_bytes()
    x = probe_buffer(nbytes)
    out = {"torch-sum": _rates(lambda: x.sum(), nbytes)}
    if kernels.get() is not None:
        for chunk, pf in PROBES:
            out[f"stream-chunk{chunk}-pf{pf}"] = stream_reader(x, chunk, pf)()
    return out


def gpu_readings(nbytes: int = 4 * 2**30) -> dict:
    x = torch.ones(nbytes // 2, dtype=torch.bfloat16, device="cuda")

    def run():
        x.sum()
        torch.cuda.synchronize()
    return {"torch-sum": _rates(run, nbytes, reps=10)}


@dataclass
class Ceiling:
    """One device's read-bandwidth ceiling: the largest reading, raised by any faster rate the run reached."""
    readings: dict = field(default_factory=dict)      # reader → [bytes/s]
    raised_by: list = field(default_factory=list)     # [{"source": …, "bytes_per_s": …}] that beat the readings

    @property
    def value(self) -> float:
        vals = [v for vs in self.readings.values() for v in vs] + [r["bytes_per_s"] for r in self.raised_by]
        return max(vals, default=0.0)

    def offer(self, source: str, rate: float) -> None:
        """A rate the code reached (CPU-expert call, a decode row): above the ceiling, it becomes the ceiling."""
        if rate > self.value:
            self.raised_by.append({"source": source, "bytes_per_s": rate})

    def as_dict(self) -> dict:
        return {"value": self.value, "readings": self.readings, "raised_by": self.raised_by}


@dataclass
class Bandwidths:
    cpu: Ceiling
    cuda: Ceiling | None
    measured_at: str             # ISO time of the readings
    where: str                   # machine key of the readings
    cached: bool = False         # True: read from an earlier run's cache (`--cached-bw`)

    def as_dict(self) -> dict:
        return {"cpu": self.cpu.as_dict(), "cuda": self.cuda.as_dict() if self.cuda else None,
                "measured_at": self.measured_at, "where": self.where,
                "source": "cache of an earlier run" if self.cached else "measured in this run"}

    def rates(self) -> dict:
        return {"cpu": self.cpu.value, "cuda": self.cuda.value if self.cuda else None}


def measure() -> Bandwidths:
    cuda = Ceiling(gpu_readings()) if torch.cuda.is_available() else None
    return Bandwidths(Ceiling(cpu_readings()), cuda, datetime.datetime.now().isoformat(timespec="seconds"),
                      machine_key())


def _cache_file(cache_dir: str | None = None) -> str:
    return os.path.join(cache_dir or cache_root(), "bandwidth.json")


def _read_cache(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            cache = json.load(f)
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def cached(cache_dir: str | None = None) -> Bandwidths | None:
    """This machine's last saved readings (labelled with when), or None."""
    c = _read_cache(_cache_file(cache_dir)).get(machine_key())
    if not isinstance(c, dict) or "cpu_readings" not in c:
        return None
    cuda = Ceiling(c["cuda_readings"]) if c.get("cuda_readings") else None
    return Bandwidths(Ceiling(c["cpu_readings"]), cuda, c["measured_at"], machine_key(), cached=True)


def bandwidths(cached_ok: bool = False, cache_dir: str | None = None) -> Bandwidths:
    """Measured now (and saved); with `cached_ok`, the last saved readings of this machine when there are any."""
    if cached_ok:
        old = cached(cache_dir)
        if old is not None:
            return old
    path = _cache_file(cache_dir)
    cache = _read_cache(path)
    bw = measure()
    cache[machine_key()] = {"cpu_readings": bw.cpu.readings, "measured_at": bw.measured_at,
                            "cuda_readings": bw.cuda.readings if bw.cuda else None}
    write_atomic(path, json.dumps(cache, indent=2), make_dirs=True)
    return bw
