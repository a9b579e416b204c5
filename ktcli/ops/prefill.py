"""Prefill operators for CPU-resident experts: `stream` (weights to the GPU) and `auto` (streaming, the CPU or a
split of the layer's experts between them, per chunk, by the cost model in costs.py calibrated by what the run
measured). Shape legend: T tokens, K top-k, E experts, H hidden.
"""
from __future__ import annotations

import os
import time

import torch

from . import joined, kernels
from .base import DeviceOp
from .costs import explore, layer_costs, split_plan
from .cpu import CpuExperts, cpu_moe
from .grouped import grouped, grouped_ok
from .routed import assign, expert_work, routed_seconds, run_routed
from .split import pairs, run_split


class StreamedExperts(DeviceOp):
    """Experts of a CPU-resident layer computed on the GPU the hidden states live on, weights streamed in."""

    def streams(self, T: int) -> bool:
        return True

    def uses_slot(self, T: int) -> bool:
        return True

    def cpu_share(self, T: int) -> int:
        """Experts [0, n) of this layer that the CPU computes while the rest stream (0: all stream)."""
        return 0

    takes_side = True    # __call__'s `side`: GPU work run while the layer's upload crosses (model/overlap.py)

    def __call__(self, x, idx, w, side=None):
        t0 = time.perf_counter()
        y = self.run(x, idx, w, side=side)
        self.experts.streamer.stats["moe_s"] += time.perf_counter() - t0   # the CPU thread's time in MoE calls
        return y

    def run(self, x, idx, w, first: int = 0, side=None):
        """Experts [first, E) on the GPU; pairs routed below `first` contribute nothing here."""
        fn = self.experts.streamer.weights(self.experts, x.shape[0], side)
        if grouped_ok(x, fn):
            return grouped(x, idx, w, fn, self.experts.num_experts - first, self.experts.act_fn, first)
        tok, e, pw = pairs(idx, w, first, self.experts.num_experts)
        y = cpu_moe(x[tok], e[:, None] - first, pw[:, None], None, None, self.experts.act_fn,
                    torch.empty(tok.numel(), x.shape[1], dtype=x.dtype, device=x.device), weights=fn)
        return torch.zeros_like(x).index_add_(0, tok, y)


def prefill_ways() -> tuple:
    """The ways `auto` weighs besides streaming and the CPU: KTCLI_PREFILL_WAYS (comma-separated, A/B runs), else
    the routed split alone. Why not the range split: it gives the GPU experts by number, routed or not, and lost to
    streaming on every row but one where it ran (int4 pp512 1,241 t/s against 1,783, 2026-12-06); a routed layer
    is the same split made after the router."""
    return tuple(os.environ.get("KTCLI_PREFILL_WAYS", "routed").split(","))


class AutoPrefill(DeviceOp):
    """Per chunk, streaming to the GPU, computing on the CPU, or both at once on a split of the layer's experts
    (the CPU takes experts [0, n) while the rest stream), whichever the measured rates predict fastest."""

    def __init__(self, experts, device, staging=None):
        super().__init__(experts, device, staging)
        self.cpu = CpuExperts(experts, torch.device("cpu"), staging)
        self.gpu = StreamedExperts(experts, device, staging)
        self._first = None       # whether this is the model's first `auto` layer (the one that explores)

    takes_side = True    # as StreamedExperts: `side` runs while a streamed or routed layer's upload crosses

    def __call__(self, x, idx, w, side=None):
        if x.device.type == "cpu" or getattr(self.experts, "streamer", None) is None:
            return self.cpu(x, idx, w)
        t0 = time.perf_counter()
        y = self._route(x, idx, w, side)
        self.experts.streamer.stats["moe_s"] += time.perf_counter() - t0   # the CPU thread's time in MoE calls
        return y

    def _route(self, x, idx, w, side=None):
        T = x.shape[0]
        p = self.choice(T)
        self.cpu.long_bf16 = p.get("kernel", False)
        if p["way"] == "cpu":
            st = self.experts.streamer
            st.stats["layers_cpu"] += 1
            t0 = time.perf_counter()
            if x.is_cuda:   # the inputs ready first, so that the clock times the CPU's work alone
                torch.cuda.current_stream(x.device).synchronize()
                st.observe_wait("cpu", T, time.perf_counter() - t0)
            t0 = time.perf_counter()
            y = self.cpu(x, idx, w)
            st.observe_cpu("cpu", T, time.perf_counter() - t0, p["cpu_s"])
            return y
        if p["way"] == "routed":
            y, took, probed = run_routed(self, x, idx, w, lambda counts: self.share(T, counts, p["kernel"]), side=side)
            self.experts.streamer.observe_cpu("routed", T, took, probed)
            return y
        if p["n_cpu"] == 0:
            return self.gpu.run(x, idx, w, side=side)
        return self._split(x, idx, w, p["n_cpu"], p.get("cpu_s"))

    def plan(self, T: int, calibrated: bool = True) -> dict:
        """calibrated: the CPU's cost of each way scaled by what earlier layers of that way and chunk length measured
        against the probes, its fitted fixed part added in series with the CPU's work, as the measured wait is.
        Apart, because a split's CPU share runs beside the copies, which slowed it 4× where the whole layer alone
        ran at its probe (Qwen3-30B pp512, H100 host, 2026-12-05). The routed way stays an alternative in the
        calibrated plan, taken by whole chunks only (Calibration.chunk_policy): predicted per layer, it was taken
        where it lost (uniform routing, int8 pp2048, 2026-12-06: 2,766 t/s against 3,831 streamed). Uncalibrated
        (the roofline's bound) it is the plan wherever it is predicted faster."""
        st, ways, ex = self.experts.streamer, prefill_ways(), self.experts
        routed = "routed" in ways and T > kernels.MAX_TOKENS     # a few tokens: the CPU way's, one call a layer
        kern = layer_costs(ex, T, st.top_k, st.rates)["kernel"] if routed else False
        if not calibrated:   # the routing's skew is not a calibration: the roofline plans with it too
            r = routed_seconds(ex, T, st.top_k, st.rates, st.profile(T), long_bf16=kern) if routed else None
            return split_plan(ex, T, st.top_k, st.rates, routed=r, split="split" in ways)
        r = routed_seconds(ex, T, st.top_k, st.rates, st.profile(T), st.scale("routed", T), st.fixed("routed", T),
                           st.wait("routed", T), kern) if routed else None
        return split_plan(ex, T, st.top_k, st.rates, st.scale("cpu", T), st.scale("split", T),
                          (st.wait("cpu", T) + st.fixed("cpu", T), st.wait("split", T) + st.fixed("split", T)),
                          r, split="split" in ways, pick_routed=False)

    def share(self, T: int, counts: list, long_bf16: bool = False) -> tuple:
        """A routed layer's (GPU experts, the CPU share's probed seconds) for this chunk's pairs per expert, balanced
        with the CPU share's measured speed."""
        st, ex = self.experts.streamer, self.experts
        copy_s = ex.stream_src.nbytes() / ex.num_experts / max(st.rates.pcie_bps, 1.0)
        gpu, _, probed = assign(expert_work(ex, T, st.top_k, st.rates, counts, long_bf16), copy_s,
                                st.scale("routed", T), st.fixed("routed", T))
        return gpu, probed

    def choice(self, T: int) -> dict:
        """The plan this layer runs: the calibrated plan, except that the first `auto` layer tries once per
        chunk-length bucket the CPU way the plan rejected and no layer has measured yet (costs.explore)."""
        p = self.plan(T)
        st = self.experts.streamer
        if "routed" in p.get("alts", {}) and st.chunk_policy(T) == "routed":
            return {**p, **p["alts"]["routed"]}
        if self._first is None:
            self._first = next(m for m in st.layers if isinstance(m.ops.get("prefill"), AutoPrefill)) is self.experts
        return explore(p, lambda way: st.observed(way, T)) if self._first else p

    def streams(self, T: int) -> bool:
        """True: some of this layer's experts stream for a chunk of T tokens (all, or the GPU's share), known
        before its router runs (so an earlier layer may start the upload)."""
        return self.choice(T)["way"] in ("stream", "split")

    def uses_slot(self, T: int) -> bool:
        """True: the layer puts experts in its GPU slot (streaming, split or routed)."""
        return self.choice(T)["way"] != "cpu"

    def cpu_share(self, T: int) -> int:
        return self.choice(T)["n_cpu"]

    def _split(self, x, idx, w, n, cpu_s=None):
        """Experts [0, n) on the CPU while the GPU computes the rest (ops/split.py); cpu_s: the plan's probed time of
        the whole layer on the CPU (computed here for a forced plan without one)."""
        st = self.experts.streamer
        if cpu_s is None:
            cpu_s = layer_costs(self.experts, x.shape[0], st.top_k, st.rates)["cpu"]
        probed = cpu_s * n / self.experts.num_experts
        if joined.enabled(x):       # the CPU share joins the GPU by a flag: the host goes on (ops/joined.py)
            return joined.run_joined(self, x, idx, w, n, probed)
        y, took = run_split(self, x, idx, w, n)
        st.observe_cpu("split", x.shape[0], took, probed)
        return y
