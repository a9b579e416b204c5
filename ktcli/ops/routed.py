"""A routed prefill layer (`auto`): the split decided after the router, per expert, from this chunk's routing.

The host reads the layer's routing (one sync), the GPU takes the experts the CPU would spend longest on (the most
routed: a touched expert costs the copies its bytes whatever its pairs, the CPU its bytes plus its pairs' FLOPs),
only those cross, and the CPU computes the other touched experts meanwhile; untouched experts cost nothing. Why:
streaming copies every expert of a layer, and the range split of split.py gives the GPU experts by number, while
routing is uneven and changes with the prompt (the synthetic Qwen3-30B at pp512: 36-58 of 128 experts touched, 8
of them with 67-75% of the pairs; two prompts share 0-3 of a layer's top 8, 2026-12-06). The cost: the layer's
copies start after its router instead of during the previous layer.
Shape legend: T tokens, K top-k, E experts, H hidden, P the CPU's (token, expert) pairs.
"""
from __future__ import annotations

import math
import time

import torch

from .grouped import grouped, grouped_ok
from .split import buffers, pairs
from .worker import worker

PHASES = ("routed_wait_s", "routed_plan_s", "routed_cpu_s", "routed_gpu_issue_s", "routed_join_s")


def expert_work(experts, T: int, K: int, rates, counts: list, long_bf16: bool = False, expected: bool = False) -> list:
    """Each expert's probed CPU seconds for `counts[e]` (token, expert) pairs of a chunk of T tokens (expected: a
    mean, touched with probability 1 − e^−count): its bytes once if touched, its pairs' FLOPs at the kernel's rate
    (torch's GEMM rate where the chunk takes torch's path)."""
    from .costs import gemm_rate
    from .cpu import kernel_path
    rate = (rates.kernel_flops or rates.cpu_flops) if kernel_path(experts, T, long_bf16=long_bf16) \
        else gemm_rate(rates, T * K / experts.num_experts)
    return work_of(counts, experts.stream_src.nbytes() / experts.num_experts, 2 * 3 * experts.hidden * experts.inter,
                   rates.cpu_bps, rate, expected)


def work_of(counts: list, per: float, fpp: float, bps: float, flops: float, expected: bool = False) -> list:
    """Seconds per expert: `per` bytes at `bps` if touched, `fpp` FLOPs a pair at `flops`."""
    touched = [1 - math.exp(-c) if expected else float(c > 0) for c in counts]
    return [u * per / max(bps, 1.0) + c * fpp / max(flops, 1.0) for u, c in zip(touched, counts)]


def assign(work: list, copy_s: float, scale: float = 1.0, fixed: float = 0.0) -> tuple:
    """(gpu experts ascending, predicted seconds, the CPU share's probed seconds): the GPU takes the j experts of
    most CPU work (j·copy_s of copies), the CPU the rest (fixed + scale·their work), j the fastest, ties to the
    fewest copies. work [E]: each expert's probed CPU seconds (0: untouched)."""
    order = sorted((e for e, v in enumerate(work) if v > 0), key=lambda e: -work[e])
    left = sum(work[e] for e in order)
    best = (max(fixed + scale * left, 0.0) if order else 0.0, 0, left)
    for j, e in enumerate(order, 1):
        left -= work[e]
        cpu = fixed + scale * left if j < len(order) else 0.0
        t = max(j * copy_s, cpu)
        if t < best[0]:
            best = (t, j, max(left, 0.0))
    return tuple(sorted(order[:best[1]])), best[0], best[2]


def expected_counts(E: int, K: int, T: int, profile: list | None = None) -> list:
    """Pairs per expert to plan with before the router runs: `profile` (a routed layer's pairs per expert as
    fractions, most routed first: the routing's skew, not which experts) scaled to T·K, or uniform."""
    if profile is None:
        return [T * K / E] * E
    return [f * T * K for f in profile]


def routed_seconds(experts, T: int, K: int, rates, profile=None, cpu_scale=1.0, cpu_fixed=0.0, wait=0.0,
                   long_bf16: bool = False) -> float:
    """The predicted seconds of a routed layer: its wait for the router, then the balanced assignment with the CPU
    share's measured speed (fixed + scale × probed). Why not the whole layer's measured time: fitted on it, the
    plan left the routed way for streaming at 7,085 t/s where routed layers had run 9,145 (int4 pp2048, 2026-12-06)."""
    if not (rates.pcie_bps and rates.cpu_bps):
        return math.inf
    counts = expected_counts(experts.num_experts, K, T, profile)
    copy_s = experts.stream_src.nbytes() / experts.num_experts / rates.pcie_bps
    return wait + assign(expert_work(experts, T, K, rates, counts, long_bf16, expected=True), copy_s, cpu_scale,
                         cpu_fixed)[1]


def slot_lut(E: int, gpu: tuple, device) -> torch.Tensor:
    """[E] int64: expert gpu[j] → j (its place in the slot), every other expert → -1."""
    lut = torch.full((E,), -1, dtype=torch.int64)
    if gpu:
        lut[list(gpu)] = torch.arange(len(gpu))
    return lut.to(device, non_blocking=True)


def run_routed(op, x, idx, w, plan_share, long_bf16: bool = False, side=None):
    """AutoPrefill `op`'s layer, split after its router: x [T,H], idx/w [T,K] (on the GPU, or the CPU in tests)
    → (y [T,H], the CPU share's measured and probed seconds). plan_share(counts) → (gpu experts, the CPU share's
    probed seconds); side: GPU work queued while the GPU share's experts cross (Streamer.weights_of)."""
    ex = op.experts
    st, E = ex.streamer, ex.num_experts
    (T, K), H, b = idx.shape, x.shape[1], buffers(st)
    t0 = time.perf_counter()
    counts_d = torch.bincount(idx.reshape(-1), minlength=E)                          # [E]
    xh, ih, wh = b.get("x", T, (H,), x.dtype), b.get("idx", T, (K,), idx.dtype), b.get("w", T, (K,), w.dtype)
    ch = b.get("counts", E, (), counts_d.dtype)
    for h, t in ((ih, idx), (wh, w), (ch, counts_d)):
        h.copy_(t, non_blocking=True)
    cur = torch.cuda.current_stream(x.device) if x.is_cuda else None
    routing = cur.record_event() if cur else None
    # the hidden states cross behind the routing, while the host plans: only the CPU share waits for them (at
    # pp2048 their 8 MB took 165 µs a layer of the GPU's path, int4, H100 host, 2026-12-06)
    xh.copy_(x, non_blocking=True)
    x_in = cur.record_event() if cur else None
    if routing is not None:
        routing.synchronize()
    t1 = time.perf_counter()
    gpu, probed = plan_share(ch.tolist())
    ta = time.perf_counter()
    # the GPU share's copies first: its path (copies, GEMMs, the next layer's attention) is the layer's longest
    # where the CPU share is shorter (int4 pp2048, 2026-12-06: join 0.06 ms), so the gather below overlaps them
    fn = st.weights_of(ex, gpu, side) if gpu else None
    tb = time.perf_counter()
    on_cpu = torch.ones(E, dtype=torch.bool)
    on_cpu[list(gpu)] = False
    tok, e, pw = pairs(ih, wh, 0, 0, on_cpu)                                           # [P] each
    P = tok.numel()
    rows = b.get("rows", P, (H,), x.dtype, pinned=False)
    th = b.get("tok", P, (), torch.int64).copy_(tok)
    yc = b.get("y", P, (H,), x.dtype)
    took = [0.0]

    def cpu_share():
        if x_in is not None:
            x_in.synchronize()
        if P:
            xs = torch.index_select(xh, 0, tok, out=rows)                                 # [P,H]
            s = time.perf_counter()
            op.cpu._moe(xs, e[:, None].to(torch.int64), pw[:, None].to(x.dtype), yc)
            took[0] = time.perf_counter() - s
    job = worker().submit(cpu_share)                  # the kernel releases the GIL: the GEMMs are issued meanwhile
    t2 = time.perf_counter()
    if gpu:
        lut = slot_lut(E, gpu, x.device)
        if grouped_ok(x, fn):
            y = grouped(x, idx, w, fn, len(gpu), ex.act_fn, lut)
        else:
            from .cpu import cpu_moe
            gtok, ge, gw = pairs(lut[idx], w, 0, len(gpu))
            yg = cpu_moe(x[gtok], ge[:, None], gw[:, None], None, None, ex.act_fn,
                         torch.empty(gtok.numel(), H, dtype=x.dtype, device=x.device), weights=fn)
            y = torch.zeros_like(x).index_add_(0, gtok, yg)
    else:
        if side is not None:
            side()
        y = torch.zeros_like(x)
    t3 = time.perf_counter()
    job.done.wait()
    if job.error is not None:
        raise job.error
    if P:
        y.index_add_(0, th.to(y.device, non_blocking=True), yc.to(y.device, non_blocking=True))
    t4 = time.perf_counter()
    plan, issue = (ta - t1) + (t2 - tb), (tb - ta) + (t3 - t2)     # the copies' issue counts as issue
    for k, v in zip(PHASES, (t1 - t0, plan, took[0], issue, t4 - t3)):
        st.stats[k] = st.stats.get(k, 0.0) + v
    st.stats["layers_routed"] = st.stats.get("layers_routed", 0) + 1
    st.stats["routed_gpu_experts"] = st.stats.get("routed_gpu_experts", 0) + len(gpu)
    st.stats["routed_touched"] = st.stats.get("routed_touched", 0) + sum(c > 0 for c in ch.tolist())
    if x.is_cuda:
        st.observe_wait("routed", T, t1 - t0)
    st.observe_routing(T, ch.tolist())
    return y, took[0], probed
