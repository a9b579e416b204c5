"""Per-generation timings as data; commands render them."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field


def percentile(xs, q):
    if not xs:
        return 0.0
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0           # tokens actually prefilled (a reused prefix is not counted)
    prefill_s: float = 0.0           # time to first token
    decode_tokens: int = 0
    decode_s: float = 0.0
    latencies: list = field(default_factory=list)   # seconds per decoded token
    cpu_experts_s: float = 0.0       # host time inside CPU expert operators during decode
    kernel_s: float = 0.0            # of which inside the C kernel
    cpu_step_s: float = 0.0          # from handing each CPU-expert layer to the worker to its return
    cpu_layer_calls: int = 0
    gpu_wait_s: float = 0.0          # host waiting for the GPU before CPU-expert layers (not seen under full graphs)
    load_s: float = 0.0
    capture_s: float = 0.0
    graph_mode: str = "off"
    stop_reason: str = ""
    peak_gpu_bytes: int = 0
    peak_host_bytes: int = 0

    @property
    def prompt_tps(self):
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self):
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    def latency_ms(self, q):
        return percentile(self.latencies, q) * 1e3


def mean_sd(xs):
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0) if xs else (0.0, 0.0)


def peak_host_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            return int(f.read().split("VmHWM:")[1].split()[0]) * 1024
    except (OSError, IndexError):
        return 0
