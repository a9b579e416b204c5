"""Streaming prefill: CPU-resident expert weights cross to the GPU layer by layer, the next layer's on a copy
stream while this one computes (two preallocated slots sized for the largest layer).

Why it pays: a layer's copy costs the same whatever the chunk length (bytes ÷ pinned PCIe rate), so a long chunk
amortizes it, where the CPU's cost grows with every token. The host memory is registered (pinned in place,
no copy) once at load; int8/int4 layers cross packed and are dequantized expert by expert on the GPU.
Works with a CPU "device" too (plain copies, no streams): the tests run the same slot logic without a GPU.
"""
from __future__ import annotations

import time
import weakref

import torch

from .calibration import Calibration
from .costs import PrefillRates, probe_cpu, probe_gpu, probe_kernel
from .slots import BlockDequant, Resident
from .cudart import copy_h2d
from .routed import PHASES as ROUTED_PHASES
from .split import PHASES

PARTS = ("gu", "gu_s", "dn", "dn_s")       # an ExpertWeights' tensors, in copy order


def register_host(t: torch.Tensor) -> bool:
    """Pin a CPU tensor's pages where they are (cudaHostRegister): copies from it run at full PCIe rate."""
    if t.numel() == 0 or t.is_pinned():
        return True
    cudart = torch.cuda.cudart()
    ptr, n = t.data_ptr(), t.numel() * t.element_size()
    if int(cudart.cudaHostRegister(ptr, n, 0)) != 0:
        return False
    weakref.finalize(t.untyped_storage(), cudart.cudaHostUnregister, ptr)   # before the memory goes back
    return True


def _bytes_view(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


class Streamer(Calibration):
    """One per model: the streamed layers in forward order, two GPU slots, the copy stream and its statistics (and
    what the run measured of each `auto` way: calibration.py)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.layers: list = []          # HybridExperts whose prefill may stream, in layer order
        self.pinned = True              # every layer's host memory registered
        self.slots: list = []           # [{part: uint8 buffer}, …] × 2
        self.holds = [None, None]       # which layer position each slot holds (or is being filled with)
        self.ready = [None, None]       # copy-done events
        self.free = [None, None]        # compute-done events (the slot may be overwritten after)
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.rates = PrefillRates()     # measured at setup; pcie raised by every upload timed
        self.top_k = 1
        self.split_joiner = None        # the flag of split layers' CPU shares (joined.py), made on first use
        self.init_calibration()
        self.reset_stats()

    # -- setup -----------------------------------------------------------------------------------------------
    def add(self, experts) -> None:
        """A layer whose prefill may stream (after its weights are packed)."""
        experts.stream_pos = len(self.layers)
        experts.streamer = self
        self.layers.append(experts)

    def setup(self, top_k: int, threads: int = 0) -> dict:
        """After the weights are packed: pin host memory, allocate both slots, measure the rates the choice
        uses. Returns load timings (seconds) for the report."""
        self.top_k = top_k
        t0 = time.perf_counter()
        if self.cuda:
            for m in self.layers:
                for part in PARTS:
                    t = getattr(m.stream_src, part)
                    if t is not None and not register_host(t):
                        self.pinned = False
        t1 = time.perf_counter()
        size = {p: max((_nbytes(getattr(m.stream_src, p)) for m in self.layers), default=0) for p in PARTS}
        self.slots = [{p: torch.empty(n, dtype=torch.uint8, device=self.device) for p, n in size.items()}
                      for _ in range(2)]
        t2 = time.perf_counter()
        if self.cuda:
            self.rates.pcie_bps, self.rates.gpu_flops = self._probe(), probe_gpu(self.device)
        r = self.rates
        r.cpu_bps, r.cpu_flops, r.cpu_flops_small = probe_cpu(self.layers[0], threads)
        r.kernel_flops = probe_kernel(self.layers[0], top_k, threads, r)
        return {"pin": t1 - t0, "stream buffers": t2 - t1, "prefill rates": time.perf_counter() - t2}

    def _probe(self) -> float:
        """Pinned host → GPU copy rate, best of three, on 128 MiB (a small model's layer would measure latency)."""
        src = torch.empty(128 * 2**20, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty_like(src, device=self.device)
        best = 0.0
        for _ in range(3):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src, non_blocking=True)
            b.record()
            b.synchronize()
            best = max(best, src.numel() / (a.elapsed_time(b) / 1e3))
        return best

    # -- per layer -------------------------------------------------------------------------------------------
    def weights(self, experts, T: int, side=None):
        """This layer's weights on the GPU as a function e → (gate_up[e], down[e]) in the compute dtype. Waits
        for its upload (started earlier when possible) and starts the next streamed layer's; `side()` (GPU work
        that needs no expert output: a shared expert) is queued first, so that it runs while the upload crosses."""
        pos = experts.stream_pos
        s = pos % 2
        first = experts.ops["prefill"].cpu_share(T)     # a split layer streams experts [first, E) only
        cur = torch.cuda.current_stream(self.device) if self.cuda else None
        prev = (pos - 1) % 2
        if self.cuda:   # everything queued so far includes the previous layer's compute on the other slot
            self.free[prev] = cur.record_event()
        if self.holds[s] != (pos, first):
            self._upload(pos, first)
        nxt = next((m for m in self.layers[pos + 1:] if m.ops["prefill"].uses_slot(T)), None)
        if nxt is not None and nxt.stream_pos % 2 != s and nxt.ops["prefill"].streams(T):
            nfirst = nxt.ops["prefill"].cpu_share(T)
            if self.holds[1 - s] != (nxt.stream_pos, nfirst):
                self._upload(nxt.stream_pos, nfirst)
        if side is not None:
            side()
        if self.cuda:
            t0 = cur.record_event(torch.cuda.Event(enable_timing=True))
            cur.wait_event(self.ready[s])
            self._stalls.append((t0, cur.record_event(torch.cuda.Event(enable_timing=True))))
        self.stats["layers_streamed"] += 1
        return self._views(experts, s, first)

    def weights_of(self, experts, gpu: tuple, side=None):
        """A routed layer's experts `gpu` (ascending) on the GPU, slot index j holding gpu[j]: uploaded now, after
        everything queued (the router this layer's plan read), the compute stream waiting for them after `side()`
        (as in `weights`)."""
        pos = experts.stream_pos
        s = pos % 2
        if self.cuda:
            self.free[s] = torch.cuda.current_stream(self.device).record_event()
        self._upload(pos, runs(gpu))
        self.holds[s] = None                 # a subset: no later layer may take it for a whole layer's upload
        if side is not None:
            side()
        if self.cuda:
            cur = torch.cuda.current_stream(self.device)
            t0 = cur.record_event(torch.cuda.Event(enable_timing=True))
            cur.wait_event(self.ready[s])
            self._stalls.append((t0, cur.record_event(torch.cuda.Event(enable_timing=True))))
        return self._views(experts, s, 0, len(gpu))

    def _upload(self, pos: int, first=0) -> None:
        """Layer `pos`'s experts [first, E) into its slot (every part is [E, …]: a contiguous tail); `first` a list of
        ranges [(a, b), …] instead: those experts, one after another, one copy per part and range."""
        m, s = self.layers[pos], pos % 2
        src = m.stream_src
        self.holds[s] = (pos, first)
        spans = [(first, None)] if isinstance(first, int) else first
        copies = []                          # (part, slot offset, source tensor, first expert, past the last)
        for p in PARTS:
            if (t := getattr(src, p)) is not None:
                at, per = 0, _nbytes(t) // max(t.shape[0], 1)
                for a, b in spans:
                    n = per * ((t.shape[0] if b is None else b) - a)
                    copies.append((p, at, t, a, n))
                    at += n
        nbytes = sum(c[4] for c in copies)
        if not self.cuda:
            for p, at, t, a, n in copies:
                self.slots[s][p][at: at + n].copy_(_bytes_view(t[a:])[:n])
            self.stats["upload_bytes"] += nbytes
            return
        cs = self.copy_stream
        if self.free[s] is not None:
            cs.wait_event(self.free[s])      # the layer that used this slot is done with it
        a0 = cs.record_event(torch.cuda.Event(enable_timing=True))
        raw = [(self.slots[s][p].data_ptr() + at, t.data_ptr() + a * (_nbytes(t) // t.shape[0]), n)
               for p, at, t, a, n in copies if n]
        if not (all(c[2].is_contiguous() for c in copies) and copy_h2d(raw, cs)):   # else torch's copies
            with torch.cuda.stream(cs):
                for p, at, t, a, n in copies:
                    self.slots[s][p][at: at + n].copy_(_bytes_view(t[a:])[:n], non_blocking=True)
        b0 = cs.record_event(torch.cuda.Event(enable_timing=True))
        self.ready[s] = b0
        self._uploads.append((a0, b0, nbytes))

    def _views(self, experts, s, first: int = 0, n: int | None = None):
        """The slot as experts [first, E) of each part (index 0 = expert `first`), or as n experts from its start."""
        pk, slot = experts.stream_src, self.slots[s]
        sl = slice(first, None) if n is None else slice(0, n)
        v = {p: slot[p][: _nbytes(t[sl])].view(t.dtype).view(t[sl].shape) for p in PARTS
             if (t := getattr(pk, p)) is not None}
        dtype = experts.gate_up_proj.dtype
        if pk.fmt == "bf16":
            return Resident(v["gu"], v["dn"])
        return BlockDequant(pk, v, dtype)

    # -- statistics ------------------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.stats = {"layers_streamed": 0, "layers_cpu": 0, "layers_split": 0, "split_cpu_s": 0.0,
                      **dict.fromkeys(PHASES, 0.0), "moe_s": 0.0, "layers_routed": 0, "routed_gpu_experts": 0,
                      "routed_touched": 0, **dict.fromkeys(ROUTED_PHASES, 0.0),
                      "upload_bytes": 0, "upload_s": 0.0, "stall_s": 0.0}
        self._uploads, self._stalls = [], []

    def collect(self) -> None:
        """Fold the timed events of finished uploads and stalls into the statistics and the split's CPU
        calibration (synchronizes: the engine calls it after each prefill, so the event lists never grow)."""
        if self.split_joiner is not None:
            self.split_joiner.collect()      # flag-joined CPU shares (joined.py): done, their times recorded
        self._calibrate()
        if self.cuda and (self._uploads or self._stalls):
            torch.cuda.synchronize(self.device)
            for a, b, n in self._uploads:
                s = a.elapsed_time(b) / 1e3
                self.stats["upload_bytes"] += n
                self.stats["upload_s"] += s
                if s > 0:
                    self.rates.pcie_bps = max(self.rates.pcie_bps, n / s)
            self.stats["stall_s"] += sum(a.elapsed_time(b) / 1e3 for a, b in self._stalls)
        self._uploads, self._stalls = [], []

    def take_stats(self) -> dict:
        """Uploads and compute-stream stalls since the last take."""
        self.collect()
        out = dict(self.stats)
        self.reset_stats()
        return out


def runs(ids) -> list:
    """[(a, b), …]: ascending expert ids as ranges of consecutive experts."""
    out = []
    for e in ids:
        if out and out[-1][1] == e:
            out[-1] = (out[-1][0], e + 1)
        else:
            out.append((e, e + 1))
    return out


def _nbytes(t) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class Streamers:
    """Layers on several GPUs: one Streamer per GPU (each its own slots and copy stream), seen as one."""

    def __init__(self, streamers: list):
        self.all = streamers
        self.rates = streamers[0].rates     # the GPUs of one machine: the first's measured rates stand for all
        for st in streamers[1:]:            # one chunk policy for the model: its trials in one place
            st.trials = streamers[0].trials

    def chunk_policy(self, T: int) -> str:
        """The policy of the GPUs whose `auto` layers take one (trials are shared: all such GPUs agree)."""
        return next((s.chunk_policy(T) for s in self.all if s._routes(T)), "plan")

    def trialing(self, T: int) -> bool:
        return any(s.trialing(T) for s in self.all)

    def observe_chunk(self, T: int, policy: str, seconds: float) -> None:
        self.all[0].observe_chunk(T, policy, seconds)

    def trial_report(self) -> dict:
        return self.all[0].trial_report(self.chunk_policy)       # the trials are shared

    @property
    def pinned(self) -> bool:
        return all(s.pinned for s in self.all)

    def collect(self) -> None:
        for s in self.all:
            s.collect()

    def take_stats(self) -> dict:
        out = {}
        for s in self.all:
            for k, v in s.take_stats().items():
                out[k] = out.get(k, 0) + v
        return out
