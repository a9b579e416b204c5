"""What prefilling a layer of CPU-resident experts costs each way, from rates measured at load (PrefillRates).

Streaming costs the layer's stored bytes ÷ the pinned copy rate, whatever the chunk length; the CPU costs its reads
(the kernel's 16-token slices each read the experts they touch) or its FLOPs (torch's GEMMs for long bf16 chunks);
a split gives the CPU experts [0, n) while the rest stream, both reading the same DRAM. The probes that measure the
rates live here too. Shape legend: T tokens, K top-k, E experts, H hidden, I intermediate.
"""
from __future__ import annotations

import ctypes
import math
import time
from dataclasses import dataclass

import torch

from . import kernels
from .cpu import kernel_path


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


def split_plan(experts, T: int, K: int, rates: PrefillRates, cpu_scale: float = 1.0,
               split_scale: float = 1.0, waits: tuple = (0.0, 0.0), routed: float | None = None,
               split: bool = True, pick_routed: bool = True) -> dict:
    """{'way': 'stream' | 'cpu' | 'split' | 'routed', 'n_cpu', 'seconds', 'kernel', 'cpu_s', 'alts'} for one
    HybridExperts layer and T tokens ('kernel': the CPU's share of a long bf16 chunk runs in our kernel rather than
    torch's GEMMs; 'cpu_s': the whole layer on the CPU by the probed rates, before the scales multiply it:
    `cpu_scale` for the whole layer on the CPU, `split_scale` for a split's CPU share; waits: the seconds a layer
    of the CPU way and a split layer measured waiting for its inputs, in series with the CPU's work; routed: the routed
    way's predicted seconds (routed.routed_seconds), None: not considered; 'alts': the CPU ways' own plans; split
    False: the range split is not considered; pick_routed False: routed stays an alternative, never the plan)."""
    c = layer_costs(experts, T, K, rates)
    E = experts.num_experts
    floor = used_experts(E, K, T) * experts.stream_src.nbytes() / E / rates.cpu_bps if rates.cpu_bps else 0.0
    cpu, sc = c["cpu"] * cpu_scale + waits[0], c["cpu"] * split_scale
    alts = {"cpu": {"way": "cpu", "n_cpu": E, "seconds": cpu}}
    if split and (at := split_at(c["stream"], sc, floor, E, waits[1])) is not None:
        alts["split"] = {"way": "split", "n_cpu": at[0], "seconds": at[1]}
    best = choose(c["stream"], cpu, floor, E, sc if split else math.inf, waits[1])
    if routed is not None:
        alts["routed"] = {"way": "routed", "n_cpu": 0, "seconds": routed}
        if pick_routed and routed <= ROUTED_GAIN * best["seconds"]:
            best = alts["routed"]
    return {**best, "kernel": c["kernel"], "cpu_s": c["cpu"], "alts": alts}


ROUTED_GAIN = 0.9   # a routed layer syncs on its router and cannot start its copies early: taken for ≥ 10% less


def split_at(s: float, sc: float, floor: float, E: int, wait: float = 0.0) -> tuple | None:
    """(n, seconds) of the balanced split: the CPU takes n of E experts, about sc·n/E of CPU time after `wait`
    (its inputs: the GPU's work before the layer, which a split cannot overlap), against s·(E−n)/E of copying;
    both read DRAM, so never under `floor`. None where either side is missing or the wait alone outlasts the
    copies."""
    if not (math.isfinite(s) and math.isfinite(sc)) or E < 2 or wait >= s:
        return None
    n = min(E - 1, max(1, round(E * (s - wait) / (s + sc))))
    return n, max(sc * n / E + wait, s * (E - n) / E, floor)


def choose(s: float, cpu: float, floor: float, E: int, split_cpu: float | None = None, wait: float = 0.0) -> dict:
    """The fastest of streaming (s), the CPU (cpu) and a split (split_at; split_cpu: the whole layer's CPU time
    beside the copies, default `cpu`; wait: a split layer's measured wait for its inputs; floor: the touched
    bytes ÷ the CPU read rate). A split is taken only where it saves ≥ 10%: below that the activation copies and
    the host sync (about 1 ms a layer against tens of ms of copying) eat the gain."""
    best = {"way": "stream", "n_cpu": 0, "seconds": s} if s <= cpu else {"way": "cpu", "n_cpu": E, "seconds": cpu}
    at = split_at(s, cpu if split_cpu is None else split_cpu, floor, E, wait)
    if at is not None and at[1] <= 0.9 * best["seconds"]:
        best = {"way": "split", "n_cpu": at[0], "seconds": at[1]}
    return best


def explore(p: dict, observed) -> dict:
    """Plan p, or the CPU way it rejected where that way has no measurement yet (`observed(way)` False) and its
    predicted time is within EXPLORE× of p's: the probes misjudge the CPU, and a way never run is never corrected
    (pp512, 2026-12-05: a whole layer on the CPU ran in 0.6× its probed time, so `auto` kept splitting at 860 t/s
    beside the CPU alone's 990)."""
    other = {"split": "cpu", "cpu": "split"}.get(p["way"])
    alt = p.get("alts", {}).get(other)
    if alt is None or observed(other) or alt["seconds"] > EXPLORE * p["seconds"]:
        return p
    return {**p, **alt, "explore": True}


EXPLORE = 2.0
