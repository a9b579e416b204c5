"""Why a split prefill's CPU share runs slower than the same kernel alone: one layer's CPU experts, timed alone and
under each load the engine puts beside them, one factor at a time, in one process.

The call is the split's own (ops/split.py run_split): the (token, expert) pairs routed to experts
[0, n) gathered into P rows of top-1, one kernel call. Factors (each a comma list, every combination timed):
  --share     fraction of the layer's experts on the CPU (0.26: what `auto` gave Qwen3 bf16 pp512)
  --threads   the kernel team's size (16 = every core, the engine's default)
  --prefetch  the kernel's software prefetch distance in bytes (-1: its default; kernels.tune)
  --register  1: the weights cudaHostRegister'ed, as streaming pins them (ops/stream.register_host)
  --load      none | copy (host→GPU copies from pinned memory on a side stream, as the streamed experts'
              uploads) | spin (a competing busy process on one core) | torch (the split's gather in torch,
              untimed, just before each call: its OpenMP team may still spin when the kernel's team starts),
              or several joined by + (copy+spin)
  --routing   uniform, or skewed:H:F (experts [E−H, E) take a fraction F of each token's picks, the rest share
              the others: the synthetic checkpoints route so, 2026-12-06); the CPU's experts [0, n) are then the
              cold ones, as the routing-aware split gives them; a share of 1 is the whole layer as one top-K call
--phases adds where the median call's time goes (per-member timestamps, cpu_experts.phase_times).
Each row: the kernel's median ms and GB/s over the touched experts' bytes, and for copy loads the copies' own rate
while the kernel ran, and whether they outlasted it (a row whose copies ended early says so).

    python benchmarks/contention.py --share 1,0.26 --threads 16,15 --register 0,1 --load none,copy --out c.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import time

import ktcli  # noqa: F401  (before torch: the engine's OpenMP wait policy, ktcli/__init__.py)
import torch

from ktcli.engine.provenance import machine_info
from ktcli.files import write_atomic
from ktcli.ops import kernels
from ktcli.ops.split import pairs
from ktcli.ops.quant import hugepages, pack
from ktcli.ops.stream import register_host
from cpu_experts import phase_times


def layer(fmt, E, H, I, g):
    """One layer's experts, allocated as ktcli allocates CPU experts (huge pages advised before the fill)."""
    ts = [torch.empty(E, 2 * I, H, dtype=torch.bfloat16), torch.empty(E, H, I, dtype=torch.bfloat16)]
    for t in ts:
        hugepages(t)
        t.uniform_(-0.03, 0.03, generator=g)
    return pack(fmt, *ts)


class CopyLoad:
    """Host→GPU copies of a pinned buffer on a side stream, queued ahead so that they outlast the timed calls."""

    def __init__(self, gib: float):
        n = int(gib * 2**30)
        self.src = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        self.dst = torch.empty(n, dtype=torch.uint8, device="cuda")
        self.stream = torch.cuda.Stream()

    def start(self, seconds: float, rate: float = 55e9):
        self.n = max(2, int(seconds * rate * 1.5 / self.src.numel()) + 1)
        self.t0, self.t1 = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        with torch.cuda.stream(self.stream):
            self.t0.record()
            for _ in range(self.n):
                self.dst.copy_(self.src, non_blocking=True)
            self.t1.record()
        time.sleep(0.02)   # the copies under way before the clock starts

    def stop(self) -> dict:
        outlasted = not self.t1.query()
        self.t1.synchronize()
        s = self.t0.elapsed_time(self.t1) / 1e3
        return {"copy_GBps": self.n * self.src.numel() / s / 1e9, "copies_outlasted_kernel": outlasted}


def routing(spec: str):
    """--routing's value: None (uniform) or (H, F) from skewed:H:F."""
    if spec == "uniform":
        return None
    try:
        kind, hot, frac = spec.split(":")
        if kind == "skewed" and int(hot) > 0 and 0 <= float(frac) <= 1:
            return int(hot), float(frac)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"uniform or skewed:H:F (H hot experts, F their share), got {spec!r}")


def route(skew, T: int, E: int, K: int, g) -> torch.Tensor:
    """idx [T,K]: K distinct experts a token, uniform (skew None) or skewed (H, F) (see the module's help)."""
    if skew is None:
        return torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    hot, frac = skew
    p = torch.full((E,), (1 - frac) / (E - hot))
    p[E - hot:] = frac / hot
    return torch.multinomial(p.expand(T, E), K, generator=g)


def spinner():
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--layers", type=int, default=3, help="rotated per call so weights come from DRAM")
    ap.add_argument("--format", default="bf16")
    ap.add_argument("--share", default="1,0.26")
    ap.add_argument("--threads", default=str(torch.get_num_threads()))
    ap.add_argument("--register", default="0,1")
    ap.add_argument("--prefetch", default="-1")
    ap.add_argument("--load", default="none,copy,spin")
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--copy-gib", type=float, default=1.0)
    ap.add_argument("--routing", type=routing, default="uniform")
    ap.add_argument("--phases", action="store_true")
    ap.add_argument("--out")
    a = ap.parse_args()
    lib = kernels.get()
    if lib is None:
        sys.exit(f"Error: the CPU kernel did not build: {kernels.error()}")
    E, H, I, K, T = a.experts, a.hidden, a.inter, a.topk, a.tokens
    g = torch.Generator().manual_seed(0)
    layers = [layer(a.format, E, H, I, g) for _ in range(a.layers)]
    per_expert = layers[0].nbytes() / E
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    w = torch.rand(T, K, generator=g).softmax(-1).to(torch.bfloat16)
    idxs = [route(a.routing, T, E, K, g) for _ in range(a.layers * a.reps)]
    cuda = torch.cuda.is_available()
    copy = CopyLoad(a.copy_gib) if cuda else None
    res = {"command": " ".join(["python", *sys.argv]), "machine": machine_info(), "caps": kernels.caps(), "rows": []}
    print(f"{'share':>5} {'thr':>3} {'pf':>5} {'reg':>3} {'load':>10} | {'kernel ms':>9} {'GB/s':>6} | copies GB/s")
    registered = False
    ints = lambda v: [int(t) for t in v.split(",")]  # noqa: E731
    for share, threads, pf, reg, load in itertools.product([float(s) for s in a.share.split(",")], ints(a.threads),
                                                          ints(a.prefetch), ints(a.register), a.load.split(",")):
        if ("copy" in load or reg) and not cuda:
            continue
        if reg and not registered:   # pinned once; rows with register 0 come first in each share/threads group
            registered = all(register_host(t) for L in layers for t in (L.gu, L.dn))
        if not reg and registered:
            for L in layers:
                for t in (L.gu, L.dn):
                    torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
            registered = False
        n = max(1, round(E * share))
        calls = []
        toks = []
        for i, idx in enumerate(idxs):   # the split's call: pairs of experts [0, n) as P rows of top-1
            tok, e, pw = pairs(idx, w, 0, n)
            toks.append(tok)
            if share >= 1:                # the whole layer: the CPU way's own call, top-K per token
                calls.append((x, idx.contiguous(), w, layers[i % a.layers]))
                continue
            calls.append((x[tok].contiguous(), e[:, None].to(torch.int64), pw[:, None].to(x.dtype), layers[i % a.layers]))
        outs = [torch.empty_like(c[0]) for c in calls]
        run = kernels.Runner()
        was = kernels.tune(prefetch=pf)
        call = lambda i: run(lib, calls[i][0], calls[i][1], calls[i][2], calls[i][3], outs[i], threads)  # noqa: E731
        call(0)
        spin = spinner() if "spin" in load else None
        if "copy" in load:
            t0 = time.perf_counter()
            call(1)
            copy.start(len(calls) * (time.perf_counter() - t0))
        ts = []
        for i in range(len(calls)):
            if "torch" in load:
                torch.index_select(x, 0, toks[i], out=calls[i][0])
            t0 = time.perf_counter()
            call(i)
            ts.append(time.perf_counter() - t0)
        extra = copy.stop() if "copy" in load else {}
        if a.phases:
            extra["phases_us"] = phase_times(call, len(calls), threads)
        pf = dict(zip(kernels.KNOBS, kernels.tune()))["prefetch"]
        kernels.tune(*was)
        if spin:
            spin.kill()
            spin.wait()
        nbytes = statistics.mean(len(torch.unique(c[1])) for c in calls) * per_expert
        kt = statistics.median(ts)
        c0 = torch.bincount(calls[0][1].reshape(-1), minlength=E)   # the first call's pairs per expert
        row = {"format": a.format, "T": T, "share": share, "n_cpu": n, "pairs": int(c0.sum()),
               "experts_touched": int((c0 > 0).sum()), "experts_under_8": int(((c0 > 0) & (c0 < 8)).sum()),
               "threads": threads, "prefetch": pf, "registered": bool(reg), "load": load, "kernel_ms": kt * 1e3,
               "kernel_ms_all": [t * 1e3 for t in ts], "bytes": nbytes, "kernel_GBps": nbytes / kt / 1e9, **extra}
        res["rows"].append(row)
        cp = "" if "copy_GBps" not in extra else \
            f"{extra['copy_GBps']:.1f}{'' if extra['copies_outlasted_kernel'] else ' (ended early)'}"
        print(f"{share:5.2f} {threads:3d} {pf:5d} {reg:3d} {load:>10} | {kt * 1e3:9.3f} {row['kernel_GBps']:6.1f} | {cp}"
              f"  pairs {row['pairs']} touched {row['experts_touched']} (<8: {row['experts_under_8']})", flush=True)
        if a.phases:
            print("      µs: " + ", ".join(f"{k} {v:.0f}" for k, v in extra["phases_us"].items()), flush=True)
        if a.out:
            write_atomic(a.out, json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
