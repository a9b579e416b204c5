"""`cpu`: routed experts computed on the CPU from CPU-resident weights.

Activations cross through preallocated pinned staging buffers shared by all CPU-expert layers (layers run
one after another on one stream, so one set suffices). Shape legend: T tokens, H hidden, K top-k, E experts.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from . import bridge as bridge_mod
from .clocks import HostClock, StepClock, SyncClock
from . import kernels
from .base import DeviceOp
from .worker import worker


class Staging:
    """Pinned host buffers for T ≤ capacity tokens, allocated once before any graph capture."""

    def __init__(self, capacity: int, hidden: int, top_k: int, dtype: torch.dtype, pin: bool, threads: int = 0):
        self.capacity, self.pin, self.threads = capacity, pin, threads
        mk = lambda *shape, dt=dtype: torch.empty(*shape, dtype=dt, pin_memory=pin)  # noqa: E731
        self.x, self.y = mk(capacity, hidden), mk(capacity, hidden)                   # [T,H]
        self.idx, self.w = mk(capacity, top_k, dt=torch.int64), mk(capacity, top_k)   # [T,K]


def expert_threads(staging) -> int:
    """Threads of the CPU-expert kernel's team: the profile's cpu_threads, else torch's count."""
    return (staging.threads if staging else 0) or torch.get_num_threads()


def cpu_moe(x, idx, w, gate_up, down, act, out, weights=None):
    """out[T,H] = Σ_k w[t,k] · expert_{idx[t,k]}(x[t]); tokens grouped per expert (host-side, no GPU).

    `weights(e)` → (gate_up[e], down[e]) replaces the tensors for quantized formats (dequantized per expert)."""
    T, K = idx.shape
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat).tolist()
    out.zero_()
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        sel = order[start:start + n]
        start += n
        tok = sel // K
        gu, dn = weights(e) if weights else (gate_up[e], down[e])
        gate, up = F.linear(x[tok], gu).chunk(2, dim=-1)
        h = F.linear(act(gate) * up, dn) * w.reshape(-1)[sel, None].to(x.dtype)
        out.index_add_(0, tok, h)
    return out


def kernel_path(ex, T: int, long_bf16: bool = False) -> bool:
    """Whether T tokens of this layer go through the C kernel (else torch's path); the prefill cost model reads it.
    Long bf16 chunks where the kernel has AMX tiles, else only when asked (`long_bf16`: the cost model found the
    kernel's row dots faster than torch's GEMMs)."""
    return getattr(ex, "packed", None) is not None and ex.silu_act and kernels.enabled() and kernels.get() is not None \
        and (T <= kernels.MAX_TOKENS or ex.quantized is not None or long_bf16 or kernels.caps()["amx_on"])


class CpuExperts(DeviceOp):
    def __init__(self, experts, device, staging=None):
        super().__init__(experts, device, staging)
        self.staging = staging
        self.runner = kernels.Runner()
        self.long_bf16 = False      # set per chunk by `auto` prefill: long bf16 chunks through the kernel

    def _moe(self, x, idx, w, out):
        """All on the CPU: our kernel for few tokens (bf16/int8/int4), and for int8/int4 at any length in slices of
        kernels.slice_tokens (torch would dequantize every expert it touches, every call; a slice reads each expert
        it touches once); torch's GEMMs for longer bf16."""
        ex = self.experts
        packed = getattr(ex, "packed", None)
        T, K = idx.shape
        lib = kernels.get() if kernel_path(ex, T, self.long_bf16) else None
        if lib is None:
            cpu_moe(x, idx, w, None, None, ex.act_fn, out, weights=lambda e: ex.expert_weights(e, x.dtype))
            return out
        S = T if T <= kernels.MAX_TOKENS else kernels.slice_tokens(T, K, x.shape[1], packed.inter)
        for a in range(0, T, max(S, 1)):            # T = 0: a split whose CPU experts got no tokens                    # [T,H] in row slices: each stays contiguous
            self.runner(lib, x[a:a + S], idx[a:a + S], w[a:a + S], packed, out[a:a + S], self._threads())
        return out                                  # the kernel times its own calls (clocks.pull_kernel)

    def _threads(self) -> int:
        return expert_threads(self.staging)

    def host_block(self, T: int):
        """The C kernel's argument block for T staged tokens (decode-sized), or None where the layer takes the
        Python path (no kernel, a format or dtype it does not take directly)."""
        ex, st = self.experts, self.staging
        if T > kernels.MAX_TOKENS or not kernel_path(ex, T):
            return None
        return self.runner.prepare(kernels.get(), st.x[:T], st.idx[:T], st.w[:T], ex.packed, st.y[:T],
                                   self._threads())

    def compute(self, x, idx, w):
        return self._moe(x, idx, w, torch.empty_like(x))

    def _staged(self, T):
        t0 = time.perf_counter()
        st = self.staging
        if st.threads and torch.get_num_threads() != st.threads:   # host-callback threads start with defaults
            torch.set_num_threads(st.threads)
        self._moe(st.x[:T], st.idx[:T], st.w[:T], st.y[:T])
        HostClock.add(time.perf_counter() - t0)

    def _step(self, T):
        """Hand the layer to the CPU worker and wait (in a host callback, the segment loop or eagerly)."""
        t0 = time.perf_counter()
        worker().run(lambda: self._staged(T))
        StepClock.add(time.perf_counter() - t0)

    def submit(self, x, idx, w):
        """Start the layer and return a handle for `collect`: under a full graph with flag steps the stream goes
        on (GPU work that does not need this output overlaps the CPU's); otherwise the result, computed now."""
        bridge, T = bridge_mod.active(), x.shape[0]
        block = None
        if getattr(bridge, "flags", None) is not None and x.device.type != "cpu" and T <= self.staging.capacity:
            block = self.host_block(T)
        if block is None:
            return ("done", self(x, idx, w))
        self._stage_in(x, idx, w)
        return ("posted", bridge.post(block), T, x.device)

    def collect(self, handle):
        if handle[0] == "done":
            return handle[1]
        _, i, T, dev = handle
        bridge_mod.active().wait(i)
        return self.staging.y[:T].to(dev, non_blocking=True)

    def _stage_in(self, x, idx, w) -> None:
        """GPU → the pinned staging buffers (stream order: before the step that reads them)."""
        st, T = self.staging, x.shape[0]
        st.x[:T].copy_(x, non_blocking=True)
        st.idx[:T].copy_(idx, non_blocking=True)
        st.w[:T].copy_(w, non_blocking=True)

    def __call__(self, x, idx, w):
        if x.device.type == "cpu":
            t0 = time.perf_counter()
            y = self.compute(x, idx.to(torch.int64), w.to(x.dtype))
            HostClock.add(time.perf_counter() - t0)
            return y
        st, T = self.staging, x.shape[0]
        if T > st.capacity:   # eager only (graphs capture decode, T=1): split into staging-sized chunks
            return torch.cat([self(x[i:i + st.capacity], idx[i:i + st.capacity], w[i:i + st.capacity])
                              for i in range(0, T, st.capacity)])
        self._stage_in(x, idx, w)
        bridge = bridge_mod.active()
        block = self.host_block(T)
        # the C step (no Python inside a CUDA graph), else the Python step on the CPU worker
        step = (lambda: block.run_host(kernels.get())) if block is not None else (lambda: self._step(T))
        if bridge is None:
            t0 = time.perf_counter()
            torch.cuda.current_stream(x.device).synchronize()
            SyncClock.add(time.perf_counter() - t0)
            step()
        elif block is not None:
            bridge.host_call(block, step)
        else:
            bridge.cpu_step(step)
        return st.y[:T].to(x.device, non_blocking=True)
