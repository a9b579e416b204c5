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
from .split import pairs, run_split


@dataclass
class PrefillRates:
    pcie_bps: float = 0.0        # pinned host → GPU copies
    cpu_bps: float = 0.0         # CPU read rate of expert memory (the kernel's streaming probe)
    cpu_flops: float = 0.0       # torch bf16 GEMM on the CPU threads, M = 256 rows (a long chunk's expert)
    cpu_flops_small: float = 0.0  # the same at M = 32 rows (pp512's share of an expert among 128): far slower
    kernel_flops: float = 0.0    # our C kernel's dot products on a long chunk (reads taken out), first layer's format
    gpu_flops: float = 0.0       # torch bf16 GEMM on the GPU

    def as_dict(self) -> dict:
        return {"pcie_GBps": self.pcie_bps / 1e9, "cpu_GBps": self.cpu_bps / 1e9, "cpu_TFLOPs": self.cpu_flops / 1e12,
                "cpu_TFLOPs_m32": self.cpu_flops_small / 1e12,
                "kernel_TFLOPs": self.kernel_flops / 1e12,
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
        rate = rates.kernel_flops or rates.cpu_flops
        compute = flops / rate if rate and T > kernels.MAX_TOKENS else 0.0
        return used * per_expert / rates.cpu_bps + compute
    rate = gemm_rate(rates, T * K / E)
    return used_experts(E, K, T) * per_expert / rates.cpu_bps + (flops / rate if rate else math.inf)


def gemm_rate(rates: PrefillRates, m: float) -> float:
    """torch's CPU GEMM rate for experts of m rows each: log-interpolated between the M=32 and M=256 probes."""
    lo, hi = rates.cpu_flops_small or rates.cpu_flops, rates.cpu_flops
    if not hi or m >= 256:
        return hi
    if m <= 32:
        return lo
    f = math.log(m / 32) / math.log(8)
    return lo * (hi / lo) ** f


def layer_costs(experts, T: int, K: int, rates: PrefillRates) -> dict:
    """{'stream': s, 'cpu': s, 'kernel': bool} for one HybridExperts module and a chunk of T tokens. A long bf16
    chunk takes our kernel's slices where the measured rates say they beat torch's GEMMs (few rows per expert:
    torch's small GEMMs ran at 0.5-0.8 TFLOP/s on 16 cores, 2026-12-02)."""
    src = experts.stream_src
    E, H, I = experts.num_experts, experts.hidden, experts.inter
    per = src.nbytes() / E
    cpu = cpu_seconds(E, K, H, I, per, T, kernel_path(experts, T), rates)
    kern = False
    if rates.kernel_flops and not kernel_path(experts, T) and kernel_path(experts, T, long_bf16=True):
        k = cpu_seconds(E, K, H, I, per, T, True, rates)
        kern, cpu = k < cpu, min(k, cpu)
    return {"stream": stream_seconds(src.nbytes(), rates), "cpu": cpu, "kernel": kern}


def probe_cpu(experts, threads: int) -> tuple:
    """(read bytes/s of the first layer's expert memory, torch bf16 GEMM FLOP/s at M=256 and at M=32): best of
    three each."""
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
        b = torch.randn(experts.hidden, 2 * experts.inter, dtype=torch.bfloat16)
        flops = {}
        for M in (256, 32):
            a = torch.randn(M, experts.hidden, dtype=torch.bfloat16)
            flops[M] = 0.0
            a @ b                 # untimed: the first call of a shape builds its oneDNN primitive
            for _ in range(3):
                t0 = time.perf_counter()
                a @ b
                flops[M] = max(flops[M], 2 * M * a.shape[1] * b.shape[1] / (time.perf_counter() - t0))
    finally:
        torch.set_num_threads(old)
    return bps, flops[256], flops[32]


def probe_kernel(experts, K: int, threads: int, rates: PrefillRates) -> float:
    """Our kernel's FLOP/s on one call of the first layer at about 32 tokens per expert (pp512 on 128 experts),
    the time its reads take at the measured read rate taken out; 0 where the kernel does not run."""
    E, H, I = experts.num_experts, experts.hidden, experts.inter
    lib = kernels.get() if kernel_path(experts, 1) else None
    if lib is None or not rates.cpu_bps:
        return 0.0
    T = max(kernels.MAX_TOKENS + 1, min(32 * E // K, kernels.MAX_PAIRS // K))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16)
    idx = torch.rand(T, E, generator=gen).argsort(1)[:, :K].contiguous()
    w = torch.full((T, K), 1.0 / K, dtype=torch.bfloat16)
    out, run = torch.empty_like(x), kernels.Runner()
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        run(lib, x, idx, w, experts.packed, out, threads or torch.get_num_threads())
        best = min(best, time.perf_counter() - t0)
    reads = used_experts(E, K, T) * experts.stream_src.nbytes() / E / rates.cpu_bps
    return 2 * 3 * T * K * H * I / max(best - reads, 0.25 * best)


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

    def cpu_share(self, T: int) -> int:
        """Experts [0, n) of this layer that the CPU computes while the rest stream (0: all stream)."""
        return 0

    def __call__(self, x, idx, w, first: int = 0):
        """Experts [first, E) on the GPU; pairs routed below `first` contribute nothing here."""
        fn = self.experts.streamer.weights(self.experts, x.shape[0])
        if grouped_ok(x, fn):
            return grouped(x, idx, w, fn, self.experts.num_experts - first, self.experts.act_fn, first)
        tok, e, pw = pairs(idx, w, first, self.experts.num_experts)
        y = cpu_moe(x[tok], e[:, None] - first, pw[:, None], None, None, self.experts.act_fn,
                    torch.empty(tok.numel(), x.shape[1], dtype=x.dtype, device=x.device), weights=fn)
        return torch.zeros_like(x).index_add_(0, tok, y)


def grouped_ok(x, fn) -> bool:
    """torch's grouped GEMM (one kernel per matrix for all experts, no host sync): bf16 on a Hopper-class GPU."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm") and hasattr(fn, "full")
            and torch.cuda.get_device_capability(x.device)[0] >= 9)


def grouped(x, idx, w, fn, E, act, first: int = 0):
    """x [T,H], idx/w [T,K] → [T,H]: pairs sorted by expert, two grouped GEMMs over the layer's weights for
    experts [first, first+E) (gate_up [E,2I,H], down [E,H,I]), weighted, summed back per token. Pairs routed
    below `first` (the CPU's share of a split layer) sort last, past every group, and are masked out."""
    gu, dn = fn.full()
    T, K = idx.shape
    key = (idx.reshape(-1) - first).masked_fill(idx.reshape(-1) < first, E)     # [P] CPU pairs → E
    order = torch.argsort(key, stable=True)                                     # [P] pairs grouped by expert
    counts = torch.zeros(E + 1, dtype=torch.int64, device=x.device).index_add_(0, key, torch.ones_like(key))
    offs = torch.cumsum(counts[:E], 0).to(torch.int32)                          # [E] group ends (bincount syncs)
    xs = x[order // K]                                                          # [P,H]
    gate, up = torch._grouped_mm(xs, gu.transpose(1, 2), offs=offs).chunk(2, dim=-1)
    y = torch._grouped_mm((act(gate) * up).contiguous(), dn.transpose(1, 2), offs=offs)   # [P,H]
    keep = (key[order] < E)[:, None]                                            # rows past the groups: garbage
    y = torch.where(keep, y * w.reshape(-1)[order, None].to(y.dtype), 0)
    return torch.zeros_like(x).index_add_(0, order // K, y)


class AutoPrefill(DeviceOp):
    """Per chunk, streaming to the GPU, computing on the CPU, or both at once on a split of the layer's experts
    (the CPU takes experts [0, n) while the rest stream), whichever the measured rates predict fastest."""

    def __init__(self, experts, device, staging=None):
        super().__init__(experts, device, staging)
        self.cpu = CpuExperts(experts, torch.device("cpu"), staging)
        self.gpu = StreamedExperts(experts, device, staging)

    def __call__(self, x, idx, w):
        if x.device.type == "cpu" or getattr(self.experts, "streamer", None) is None:
            return self.cpu(x, idx, w)
        t0 = time.perf_counter()
        y = self._route(x, idx, w)
        self.experts.streamer.stats["moe_s"] += time.perf_counter() - t0   # the CPU thread's time in MoE calls
        return y

    def _route(self, x, idx, w):
        T = x.shape[0]
        p = self.plan(T)
        self.cpu.long_bf16 = p.get("kernel", False)
        if p["way"] == "cpu":
            st = self.experts.streamer
            st.stats["layers_cpu"] += 1
            if x.is_cuda:   # the inputs ready first, so that the clock times the CPU's work alone
                torch.cuda.current_stream(x.device).synchronize()
            t0 = time.perf_counter()
            y = self.cpu(x, idx, w)
            st.observe_cpu("cpu", T, time.perf_counter() - t0, p["cpu_s"])
            return y
        return self.gpu(x, idx, w) if p["n_cpu"] == 0 else self._split(x, idx, w, p["n_cpu"])

    def plan(self, T: int, calibrated: bool = True) -> dict:
        """calibrated: the CPU's cost of each way scaled by what earlier layers of that way and chunk length measured
        against the probes. Apart, because a split's CPU share runs beside the copies, which slowed it 4× where the
        whole layer alone ran at its probe (Qwen3-30B pp512, H100 host, 2026-12-05)."""
        st = self.experts.streamer
        if not calibrated:
            return split_plan(self.experts, T, st.top_k, st.rates)
        return split_plan(self.experts, T, st.top_k, st.rates, st.scale("cpu", T), st.scale("split", T))

    def streams(self, T: int) -> bool:
        """True: some of this layer's experts stream for a chunk of T tokens (all, or the GPU's share)."""
        return self.plan(T)["way"] != "cpu"

    def cpu_share(self, T: int) -> int:
        return self.plan(T)["n_cpu"]

    def _split(self, x, idx, w, n):
        """Experts [0, n) on the CPU while the GPU computes the rest (ops/split.py)."""
        y, took = run_split(self, x, idx, w, n)
        st = self.experts.streamer
        probed = layer_costs(self.experts, x.shape[0], st.top_k, st.rates)["cpu"] * n / self.experts.num_experts
        st.observe_cpu("split", x.shape[0], took, probed)
        return y


def split_plan(experts, T: int, K: int, rates: PrefillRates, cpu_scale: float = 1.0,
               split_scale: float = 1.0) -> dict:
    """{'way': 'stream' | 'cpu' | 'split', 'n_cpu', 'seconds', 'kernel', 'cpu_s'} for one HybridExperts layer and
    T tokens ('kernel': the CPU's share of a long bf16 chunk runs in our kernel rather than torch's GEMMs;
    'cpu_s': the whole layer on the CPU by the probed rates, before the scales multiply it: `cpu_scale` for the
    whole layer on the CPU, `split_scale` for a split's CPU share)."""
    c = layer_costs(experts, T, K, rates)
    E = experts.num_experts
    floor = used_experts(E, K, T) * experts.stream_src.nbytes() / E / rates.cpu_bps if rates.cpu_bps else 0.0
    return {**choose(c["stream"], c["cpu"] * cpu_scale, floor, E, c["cpu"] * split_scale),
            "kernel": c["kernel"], "cpu_s": c["cpu"]}


def choose(s: float, cpu: float, floor: float, E: int, split_cpu: float | None = None) -> dict:
    """The fastest of streaming (s), the CPU (cpu) and a split: the CPU takes n of E experts, about
    split_cpu·n/E of CPU time (split_cpu: the whole layer's CPU time beside the copies, default `cpu`) against
    s·(E−n)/E of copying, balanced; both read DRAM, so never under `floor` (the touched bytes ÷ the CPU read
    rate). A split is taken only where it saves ≥ 10%: below that the activation copies and the host sync (about
    1 ms a layer against tens of ms of copying) eat the gain."""
    best = {"way": "stream", "n_cpu": 0, "seconds": s} if s <= cpu else {"way": "cpu", "n_cpu": E, "seconds": cpu}
    sc = cpu if split_cpu is None else split_cpu
    if not (math.isfinite(s) and math.isfinite(sc)) or E < 2:
        return best
    n = min(E - 1, max(1, round(E * s / (s + sc))))
    t = max(sc * n / E, s * (E - n) / E, floor)
    if t <= 0.9 * best["seconds"]:
        best = {"way": "split", "n_cpu": n, "seconds": t}
    return best
