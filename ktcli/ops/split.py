"""A split prefill layer (`auto`): the CPU computes experts [0, n) while experts [n, E) stream to the GPU.

Per layer: the hidden states and routing cross to pinned host buffers (on the compute stream), the GPU's share is
queued, the CPU waits for its inputs, gathers its (token, expert) pairs as rows of top-1, runs the kernel into a
pinned output, and the rows cross back to be added on the GPU. The buffers are one set per model, allocated once
and grown on demand: split layers run one after another and each waits for its inputs, which stream order puts
after the previous layer's copies, so no layer overwrites what another still reads. Why: with a pinned allocation
and a CPU scatter per layer, the share's time outside the kernel measured 17-20 ms a layer beside 12-15 ms of
kernel (Qwen3-30B pp512, H100 host, 2026-12-05); the phases (PHASES) are timed so that any rest shows.
Shape legend: T tokens, K top-k, H hidden, P the CPU's (token, expert) pairs.
"""
from __future__ import annotations

import time

import torch

PHASES = ("split_wait_s", "split_gather_s", "split_kernel_s", "split_post_s")


class SplitBuffers:
    """Pinned host buffers of the split's crossings, grown to the largest chunk and share seen."""

    def __init__(self, pin: bool):
        self.pin = pin
        self.t = {}

    def get(self, name: str, rows: int, shape: tuple, dtype: torch.dtype, pinned: bool = True) -> torch.Tensor:
        """The first `rows` rows of buffer `name` ([≥rows, *shape]); regrown (×1.5, so a growing share does not
        reallocate every layer) when too small or of another dtype."""
        b = self.t.get(name)
        if b is None or b.shape[0] < rows or b.dtype != dtype or b.shape[1:] != shape:
            b = self.t[name] = torch.empty(max(rows + rows // 2, 1), *shape, dtype=dtype,
                                           pin_memory=self.pin and pinned)
        return b[:rows]


def pairs(idx, w, lo: int, hi: int, mask=None):
    """The (token, expert, weight) pairs routed to experts [lo, hi) (mask [E] bool: to the experts it marks
    instead), flattened: [P] each (syncs on a GPU)."""
    K = idx.shape[1]
    keep = mask[idx] if mask is not None else (idx >= lo) & (idx < hi)
    sel = keep.reshape(-1).nonzero().squeeze(1)
    return sel // K, idx.reshape(-1)[sel], w.reshape(-1)[sel]


def buffers(st) -> SplitBuffers:
    if getattr(st, "split_buffers", None) is None:
        st.split_buffers = SplitBuffers(st.cuda)
    return st.split_buffers


def cpu_rows(op, b, xh, ih, wh, n: int, ready, out: str, pinned: bool) -> tuple:
    """The CPU share of a split layer from its host copies xh [T,H], ih/wh [T,K], once `ready` (their copies' event;
    None on the CPU) has passed: its pairs (experts [0, n)) as rows of top-1 through the CPU operator → (tok [P],
    y [P,H] into buffer `out`, the clocks (start, inputs ready, gathered, computed))."""
    t0 = time.perf_counter()
    if ready is not None:
        ready.synchronize()
    t1 = time.perf_counter()
    tok, e, pw = pairs(ih, wh, 0, n)                    # [P] each
    P, H = tok.numel(), xh.shape[1]
    xs = torch.index_select(xh, 0, tok, out=b.get("rows", P, (H,), xh.dtype, pinned=False))    # [P,H]
    t2 = time.perf_counter()
    yc = op.cpu._moe(xs, e[:, None].to(torch.int64), pw[:, None].to(xh.dtype), b.get(out, P, (H,), xh.dtype, pinned))
    return tok, yc, (t0, t1, t2, time.perf_counter())


def run_split(op, x, idx, w, n: int):
    """AutoPrefill `op`'s layer with experts [0, n) on the CPU: x [T,H], idx/w [T,K] on the GPU → (y [T,H], the
    CPU share's seconds from the host sync to the copy back, for the caller's calibration)."""
    st = op.experts.streamer
    (T, K), H, b = idx.shape, x.shape[1], buffers(st)
    xh, ih, wh = b.get("x", T, (H,), x.dtype), b.get("idx", T, (K,), idx.dtype), b.get("w", T, (K,), w.dtype)
    for h, t in ((xh, x), (ih, idx), (wh, w)):
        h.copy_(t, non_blocking=True)
    ready = torch.cuda.current_stream(x.device).record_event() if x.is_cuda else None
    y = op.gpu.run(x, idx, w, first=n)                  # queued: runs while the CPU computes below
    tok, yc, (t0, t1, t2, t3) = cpu_rows(op, b, xh, ih, wh, n, ready, "y", True)
    th = b.get("tok", tok.numel(), (), torch.int64).copy_(tok)
    y.index_add_(0, th.to(y.device, non_blocking=True), yc.to(y.device, non_blocking=True))
    t4 = time.perf_counter()
    for k, v in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
        st.stats[k] = st.stats.get(k, 0.0) + v
    st.stats["layers_split"] += 1
    if ready is not None:
        st.observe_wait("split", T, t1 - t0)
    return y, t4 - t1
