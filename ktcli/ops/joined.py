"""A split prefill layer whose CPU share joins the GPU through a flag, as decode's C steps do: the host never waits
for it. The main thread queues the copies of the layer's inputs to the host, the GPU's share, a wait for the CPU
share's flag (cuStreamWaitValue32 on a pinned word) and the add of its result, then goes on to launch the next
layer. The CPU worker waits for the inputs, computes, sums its pairs per token into a pinned [T,H] buffer, and
raises the flag. Why: in the host-joined split (split.py) the main thread ran the CPU share and launched the next
layer only after it: 8.2 ms a layer where the share took 4.3 (Qwen3-30B int4 pp512, uniform routing, H100 host,
2026-12-06). One set of buffers serves every layer: stream order puts a layer's input copies behind the previous
layer's flag, and the worker raises a flag only after its last read. On the CPU (tests) the same worker path runs
and the caller waits for it. Shape legend: T tokens, K top-k, H hidden, P the CPU's (token, expert) pairs.
"""
from __future__ import annotations

import ctypes
import os
import time

import torch

from .split import PHASES, buffers, cpu_rows
from .worker import worker


def enabled(x) -> bool:
    """The flag join for a layer on x's device: a GPU whose driver runs the flag handshake (decode's probe), unless
    KTCLI_SPLIT_JOIN=host (A/B runs) asks for the host-joined split; always on the CPU (the same worker path)."""
    if os.environ.get("KTCLI_SPLIT_JOIN", "flag") == "host":
        return False
    if not x.is_cuda:
        return True
    from .steps import step_kind
    return step_kind() == "flags"


class Joiner:
    """A streamer's flag: a pinned word the worker raises to each finished CPU share's number, and the jobs not yet
    collected (their errors are raised at collect: a raised flag must not hide a failed share)."""

    def __init__(self, cuda: bool):
        self.word = torch.zeros(16, dtype=torch.int32, pin_memory=cuda)      # one cache line
        self.dword = None
        if cuda:
            from .steps import Driver
            self.dword = Driver.device_ptr(self.word.data_ptr())
        self.seq, self.jobs = 0, []

    def raise_to(self, seq: int) -> None:
        ctypes.c_int32.from_address(self.word.data_ptr()).value = seq     # an aligned store: the GPU sees it whole

    def wait(self, stream, seq: int) -> None:
        from .steps import WAIT_GEQ, Driver
        Driver.wait_value(stream.cuda_stream, self.dword, seq, WAIT_GEQ)

    def collect(self) -> None:
        """Wait for every submitted share (the GPU needs none of the host: each ends by itself) and raise the first
        error."""
        jobs, self.jobs = self.jobs, []
        for j in jobs:
            j.done.wait()
        err = next((j.error for j in jobs if j.error is not None), None)
        if err is not None:
            raise err


def joiner(st) -> Joiner:
    if st.split_joiner is None:
        st.split_joiner = Joiner(st.cuda)
    return st.split_joiner


def run_joined(op, x, idx, w, n: int, probed: float):
    """AutoPrefill `op`'s layer with experts [0, n) on the CPU: x [T,H], idx/w [T,K] → y [T,H], its CPU part still
    being computed on a GPU (the stream waits for it); the worker calibrates the split with its time (`probed`:
    the share's probed seconds)."""
    st = op.experts.streamer
    (T, K), H, b = idx.shape, x.shape[1], buffers(st)
    jn = joiner(st)
    xh, ih, wh = b.get("x", T, (H,), x.dtype), b.get("idx", T, (K,), idx.dtype), b.get("w", T, (K,), w.dtype)
    yd = b.get("y_dense", T, (H,), x.dtype)
    for h, t in ((xh, x), (ih, idx), (wh, w)):
        h.copy_(t, non_blocking=True)
    cur = torch.cuda.current_stream(x.device) if x.is_cuda else None
    inputs = cur.record_event() if cur is not None else None
    y = op.gpu.run(x, idx, w, first=n)                  # queued: runs while the CPU computes
    jn.seq += 1
    seq = jn.seq

    def cpu_share():
        try:
            tok, yc, (t0, t1, t2, t3) = cpu_rows(op, b, xh, ih, wh, n, inputs, "y_rows", False)
            yd.zero_().index_add_(0, tok, yc)           # [T,H]: a static shape for the add queued on the GPU
            t4 = time.perf_counter()
            for k, v in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                st.stats[k] = st.stats.get(k, 0.0) + v
            if inputs is not None:
                st.observe_wait("split", T, t1 - t0)
            st.observe_cpu("split", T, t4 - t1, probed)
        finally:
            jn.raise_to(seq)                            # after the share's last read of the buffers, error or not
    jn.jobs.append(worker().submit(cpu_share))
    if cur is None:
        jn.collect()
    else:
        jn.wait(cur, seq)
    y.add_(yd.to(y.device, non_blocking=True))
    st.stats["layers_split"] += 1
    return y
