"""Prefill operators for CPU-resident experts: `stream` (weights to the GPU) and `auto` (stream or CPU, per chunk).

The choice is a cost model over rates measured at load (PrefillRates): streaming costs the layer's stored bytes
÷ the pinned copy rate, whatever the chunk length; the CPU costs its reads (the kernel's 16-token slices each
read the experts they touch) or its FLOPs (torch's GEMMs for long bf16 chunks). Shape legend: T tokens, K top-k,
E experts, H hidden, I intermediate.
"""
from __future__ import annotations

import ctypes
import math
import time
from dataclasses import dataclass

import torch

from . import kernels
from .base import DeviceOp
from .cpu import CpuExperts, cpu_moe, kernel_path


@dataclass
class PrefillRates:
    pcie_bps: float = 0.0        # pinned host → GPU copies
    cpu_bps: float = 0.0         # CPU read rate of expert memory (the kernel's streaming probe)
    cpu_flops: float = 0.0       # torch bf16 GEMM on the CPU threads, at a prefill-like shape
    gpu_flops: float = 0.0       # torch bf16 GEMM on the GPU

    def as_dict(self) -> dict:
        return {"pcie_GBps": self.pcie_bps / 1e9, "cpu_GBps": self.cpu_bps / 1e9, "cpu_TFLOPs": self.cpu_flops / 1e12,
                "gpu_TFLOPs": self.gpu_flops / 1e12}


def used_experts(E: int, K: int, T: int) -> float:
    """Expected experts a chunk of T tokens touches, each token picking K of E (uniform routing)."""
    return E * (1 - (1 - K / E) ** T)


def stream_seconds(nbytes: float, rates: PrefillRates) -> float:
    return nbytes / rates.pcie_bps if rates.pcie_bps else math.inf


def cpu_seconds(E: int, K: int, H: int, I: int, per_expert: float, T: int, kernel_path: bool,
                rates: PrefillRates) -> float:
    """Predicted CPU time of one layer's experts for T tokens."""
    if not rates.cpu_bps:
        return math.inf
    flops = 2 * 3 * T * K * H * I
    if kernel_path:   # slices of S tokens, each streaming the experts it touches; then the dot products
        S = T if T <= kernels.MAX_TOKENS else kernels.slice_tokens(T, K, H, I)
        full, rest = divmod(T, S)
        used = full * used_experts(E, K, S) + (used_experts(E, K, rest) if rest else 0)
        compute = flops / rates.cpu_flops if rates.cpu_flops and T > kernels.MAX_TOKENS else 0.0
        return used * per_expert / rates.cpu_bps + compute
    return used_experts(E, K, T) * per_expert / rates.cpu_bps + (flops / rates.cpu_flops if rates.cpu_flops else math.inf)


def layer_costs(experts, T: int, K: int, rates: PrefillRates) -> dict:
    """{'stream': s, 'cpu': s} for one HybridExperts module and a chunk of T tokens."""
    src = experts.stream_src
    E, H, I = experts.num_experts, experts.hidden, experts.inter
    per = src.nbytes() / E
    return {"stream": stream_seconds(src.nbytes(), rates),
            "cpu": cpu_seconds(E, K, H, I, per, T, kernel_path(experts, T), rates)}


def probe_cpu(experts, threads: int) -> tuple:
    """(read bytes/s of the first layer's expert memory, torch bf16 GEMM FLOP/s at M=256): best of three."""
    src = experts.stream_src
    lib = kernels.get() if kernels.enabled() else None
    buf = src.gu.reshape(-1).view(torch.uint8)[: 512 * 2**20]
    n8 = buf.numel() // 8
    bps = 0.0
    old = torch.get_num_threads()
    torch.set_num_threads(threads or old)
    try:
        for _ in range(3):
            t0 = time.perf_counter()
            if lib is not None:
                lib.stream_read(ctypes.c_void_p(buf.data_ptr()), ctypes.c_size_t(n8), ctypes.c_int(threads or old))
            else:
                buf[: n8 * 8].view(torch.int64).sum()
            bps = max(bps, n8 * 8 / (time.perf_counter() - t0))
        a = torch.randn(256, experts.hidden, dtype=torch.bfloat16)
        b = torch.randn(experts.hidden, 2 * experts.inter, dtype=torch.bfloat16)
        flops = 0.0
        for _ in range(3):
            t0 = time.perf_counter()
            a @ b
            flops = max(flops, 2 * a.shape[0] * a.shape[1] * b.shape[1] / (time.perf_counter() - t0))
    finally:
        torch.set_num_threads(old)
    return bps, flops


def probe_gpu(device) -> float:
    """bf16 GEMM FLOP/s on the GPU (4096³, best of three after a warm-up)."""
    a = torch.randn(4096, 4096, dtype=torch.bfloat16, device=device)
    best = 0.0
    for i in range(4):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ a
        e.record()
        e.synchronize()
        if i:
            best = max(best, 2 * 4096 ** 3 / (s.elapsed_time(e) / 1e3))
    return best


class StreamedExperts(DeviceOp):
    """Experts of a CPU-resident layer computed on the GPU the hidden states live on, weights streamed in."""

    def streams(self, T: int) -> bool:
        return True

    def __call__(self, x, idx, w):
        fn = self.experts.streamer.weights(self.experts, x.shape[0])
        if grouped_ok(x, fn):
            return grouped(x, idx, w, fn, self.experts.num_experts, self.experts.act_fn)
        return cpu_moe(x, idx, w, None, None, self.experts.act_fn, torch.empty_like(x), weights=fn)


def grouped_ok(x, fn) -> bool:
    """torch's grouped GEMM (one kernel per matrix for all experts, no host sync): bf16 on a Hopper-class GPU."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm") and hasattr(fn, "full")
            and torch.cuda.get_device_capability(x.device)[0] >= 9)


def grouped(x, idx, w, fn, E, act):
    """x [T,H], idx/w [T,K] → [T,H]: pairs sorted by expert, two grouped GEMMs over the whole layer's weights
    (gate_up [E,2I,H], down [E,H,I], dequantized once per layer), weighted, summed back per token."""
    gu, dn = fn.full()
    T, K = idx.shape
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)                                  # [P] pairs grouped by expert
    offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)  # [E] group ends
    xs = x[order // K]                                                         # [P,H]
    gate, up = torch._grouped_mm(xs, gu.transpose(1, 2), offs=offs).chunk(2, dim=-1)
    y = torch._grouped_mm((act(gate) * up).contiguous(), dn.transpose(1, 2), offs=offs)   # [P,H]
    y = y * w.reshape(-1)[order, None].to(y.dtype)
    return torch.zeros_like(x).index_add_(0, order // K, y)


class AutoPrefill(DeviceOp):
    """Per chunk, the cheaper of streaming to the GPU and computing on the CPU, from the measured rates."""

    def __init__(self, experts, device, staging=None):
        super().__init__(experts, device, staging)
        self.cpu = CpuExperts(experts, torch.device("cpu"), staging)
        self.gpu = StreamedExperts(experts, device, staging)

    def __call__(self, x, idx, w):
        if x.device.type == "cpu" or getattr(self.experts, "streamer", None) is None:
            return self.cpu(x, idx, w)
        if self.streams(x.shape[0]):
            return self.gpu(x, idx, w)
        self.experts.streamer.stats["layers_cpu"] += 1
        return self.cpu(x, idx, w)

    def streams(self, T: int) -> bool:
        """True: stream this layer for a chunk of T tokens (predicted faster than the CPU)."""
        st = self.experts.streamer
        c = layer_costs(self.experts, T, st.top_k, st.rates)
        return c["stream"] < c["cpu"]
