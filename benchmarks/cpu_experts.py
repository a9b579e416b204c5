"""CPU expert kernel benchmark: one MoE layer's routed experts, per format and batch size.

Prints ms/layer, GB/s read and the ratio to the DRAM read bandwidth measured in the same run, with the
stock-torch path beside it (bf16: F.linear per expert; int8: torch._weight_int8pack_mm; int4: dequantize +
F.linear). Layers are rotated so that every call reads cold weights (working set ≫ L3).

    python benchmarks/cpu_experts.py --hidden 3584 --inter 2560 --experts 64 --topk 8 --layers 6 --out r.json

Kernel knobs can be swept (each a comma list): --chunk (rows handed to threads in chunks of this many KiB, 0 = one range per thread), --prefetch
(software prefetch distance in bytes, 0 = off), --int8-act (int8/int4 weights: 1 = int8 activations with
integer dot products, 0 = fp32 activations), --pipeline, --amx, --amx-pf (see kernels.tune); --phases adds where each call's
time goes (kernels.profile). The read bandwidth is probed at the start, before each format and batch, and at the
end; each row also times the kernel --rounds times, each between two readings of the start probe's best reader.
The reference (`% ceil`) is the run's ceiling: the largest of every reading of every reader (probes and paired
readings) and of every rate the kernel itself reached, so no row reads above 100%. `% pair` (the median ratio to
the readings just before and after) is kept in the JSON as a drift indicator, not as a bound.

--resident measures the compute ceiling instead: one expert of about --resident-mb MiB (the intermediate size is
scaled per format), every token routed to it, rows split statically (--chunk 0) so that each thread re-reads its
own share from its L2. Its GB/s is how fast the kernel can consume weights when memory is not the limit.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time

import ktcli  # noqa: F401  (before torch: the engine's OpenMP wait policy, ktcli/__init__.py)
import torch

from ktcli.engine.bandwidth import PROBES, cpu_readings, probe_buffer, stream_reader
from ktcli.engine.provenance import machine_info
from ktcli.ops import kernels
from ktcli.ops.base import eager_reference
from ktcli.ops.cpu import cpu_moe
from ktcli.ops.quant import hugepages, pack
from ktcli.files import write_atomic


_signed = {}


def signed_int8(ew):
    """ktcli stores int8 weights offset by 128 (uint8); torch's int8 matmul wants them signed: converted once."""
    if id(ew) not in _signed:
        _signed[id(ew)] = ((ew.gu.short() - 128).to(torch.int8), (ew.dn.short() - 128).to(torch.int8))
    return _signed[id(ew)]


def stock(fmt, ew, x, idx, w, out):
    """What torch offers without our kernel."""
    if fmt == "int8":
        gu_q, dn_q = signed_int8(ew)
        y = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32)
        xb = x.to(torch.bfloat16)
        for t in range(idx.shape[0]):
            for k in range(idx.shape[1]):
                e = int(idx[t, k])
                gu = torch._weight_int8pack_mm(xb[t:t + 1], gu_q[e], ew.gu_s[e].to(torch.bfloat16))
                g, u = gu.float().chunk(2, -1)
                h = (torch.nn.functional.silu(g) * u).to(torch.bfloat16)
                y[t] += w[t, k] * torch._weight_int8pack_mm(h, dn_q[e], ew.dn_s[e].to(torch.bfloat16))[0].float()
        out.copy_(y)
        return
    cpu_moe(x, idx, w, None, None, torch.nn.SiLU(), out, weights=lambda e: ew.expert(e, x.dtype))


def huge_pages_kb() -> int:
    """This process's memory in transparent huge pages (kB), to check that madvise took effect."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("AnonHugePages"))
    except (OSError, StopIteration):
        return -1


def references(L, bf16, x, idx, w):
    """fp32 reference on the stored (dequantized) weights and on the original bf16 ones, selected experts only."""
    sel, local = torch.unique(idx, return_inverse=True)
    deq = [L.expert(int(e), torch.float32) for e in sel]
    want = eager_reference(x.float(), local, w, torch.stack([d[0] for d in deq]), torch.stack([d[1] for d in deq]),
                           torch.nn.SiLU())
    bf = eager_reference(x.float(), local, w, bf16[0][sel].float(), bf16[1][sel].float(), torch.nn.SiLU())
    return want, bf


def timeit(fn, n):
    ts = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts[1:] if len(ts) > 2 else ts)


def phase_times(call, n, threads):
    """Where one call's time goes (µs since the kernel's entry, median over n calls): the thread team forked, all
    threads in, the input ready, the first and the last thread done with gate/up rows and with down rows, the
    output written, the kernel returned; "call" is the whole call as Python times it, from before the kernel's
    entry (the rest is the Runner, ctypes and this profile's own bookkeeping); "joined" how many members took part."""
    rows = []
    for i in range(n):
        t0 = time.perf_counter()
        p = kernels.profile(lambda: call(i), threads)
        total = (time.perf_counter() - t0) * 1e6
        v = {k: [t for t in p[k] if t is not None] or [float("nan")] for k in kernels.STAMPS}   # members that joined
        rows.append({"fork": p["fork"], "team": max(v["start"]), "joined": len(v["start"]), "prep": max(v["prep"]),
                     "gate_up_first": min(v["gate_up"]), "gate_up_last": max(v["gate_up"]),
                     "down_first": min(v["down"]), "down_last": max(v["down"]), "end": max(v["end"]),
                     "exit": p["exit"], "call": total})
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=3584)
    ap.add_argument("--inter", type=int, default=2560)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--layers", type=int, default=6, help="rotated per call so weights come from DRAM")
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--formats", default="bf16,int8,int4")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=5, help="kernel timings, each between two bandwidth readings")
    ap.add_argument("--no-hugepages", action="store_true")
    ap.add_argument("--chunk", default="-1", help="comma list of KiB; -1 = the kernel's default")
    ap.add_argument("--prefetch", default="-1", help="comma list of bytes; -1 = the kernel's default")
    ap.add_argument("--int8-act", default="-1", help="comma list of 0/1; -1 = the kernel's default")
    ap.add_argument("--pipeline", default="-1", help="comma list of 0/1 (two phases / one task list); -1 = default")
    ap.add_argument("--amx", default="-1", help="comma list of 0/1 (experts with ≥ 8 tokens in AMX tiles); -1 = default")
    ap.add_argument("--amx-pf", default="-1", help="comma list of 0/1/2 (the tiles' row prefetch: 0 each row "
                    "ahead, 1 the next block in address order, 2 as 0 into L2); -1 = default")
    ap.add_argument("--phases", action="store_true", help="per-thread timestamps of --reps calls per row")
    ap.add_argument("--resident", action="store_true", help="compute ceiling: weights L2-resident (see above)")
    ap.add_argument("--resident-mb", type=float, default=13.0)
    ap.add_argument("--stock-max-t", type=int, default=16, help="time stock torch only up to this batch")
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lib = kernels.get()
    ints = lambda v: [int(t) for t in v.split(",")]  # noqa: E731
    probes, paired_readings = {}, []

    def probe(tag):   # DRAM read bandwidth, several readers, every reading kept (ktcli/engine/bandwidth.py)
        probes.update({f"{tag}:{k}": v for k, v in cpu_readings().items()})
        return max(x for v in probes.values() for x in v)
    bw = probe("start")
    if lib:   # the paired reference: the start probe's best streaming reader, on a 1 GiB buffer
        chunk, pf = max(PROBES, key=lambda c: max(probes[f"start:stream-chunk{c[0]}-pf{c[1]}"]))
        stream = stream_reader(probe_buffer(2**30), chunk, pf, reps=3)

        def reader():
            vals = stream()
            paired_readings.extend(vals)
            return statistics.median(vals)

    def paired(fn, nbytes):
        """(median time, median of time's ratio to the mean of the readings just before and after, their median)."""
        ts, refs = [], []
        for _ in range(a.rounds):
            b0 = reader()
            ts.append(timeit(fn, a.reps))
            refs.append((b0 + reader()) / 2)
        return (statistics.median(ts), statistics.median(nbytes / t / r for t, r in zip(ts, refs)),
                statistics.median(refs))
    E, H, I, K = a.experts, a.hidden, a.inter, a.topk
    if a.resident:
        E = K = a.layers = 1
        a.chunk = "0" if a.chunk == "-1" else a.chunk
    res = {"command": " ".join(["python", *sys.argv]), "machine": machine_info(), "read_bw": bw,
           "kernel": lib is not None, "kernel_error": kernels.error(), "caps": kernels.caps(), "rows": []}
    print(f"DRAM read {bw / 1e9:.1f} GB/s; kernel {'built' if lib else 'MISSING: ' + str(kernels.error())}")
    print(f"{'fmt':5} {'T':>3} {'knobs':>14} {'kernel ms':>9} {'GB/s':>7} {'% max':>6} {'% pair':>6} | {'torch ms':>8} {'GB/s':>7} {'% max':>6} | err vs fp32 ref, vs bf16")
    g = torch.Generator().manual_seed(0)
    def weights(*shape):   # allocated as ktcli allocates CPU experts: huge pages advised before the fill
        t = torch.empty(*shape, dtype=torch.bfloat16)
        if not a.no_hugepages:
            hugepages(t)
        return t.uniform_(-0.03, 0.03)
    base = [(weights(E, 2 * I, H), weights(E, H, I)) for _ in range(a.layers)]
    res["anon_huge_pages_kB"] = huge_pages_kb()
    print(f"weights in transparent huge pages: {res['anon_huge_pages_kB'] / 2**20:.1f} GiB")
    for fmt in a.formats.split(","):
        if a.resident:   # one expert of ~resident_mb MiB in this format
            I = max(128, int(a.resident_mb * 2**20 / (3 * H * {"bf16": 2, "int8": 1, "int4": 0.5}[fmt])) // 128 * 128)
            base = [(weights(1, 2 * I, H), weights(1, H, I))]
        layers = [pack(fmt, gu, dn, a.group) for gu, dn in base]
        per_expert = layers[0].nbytes() / E
        acts = [-1] if fmt == "bf16" else ints(a.int8_act)
        for T in ints(a.batches):
            xs = [torch.randn(T, H, generator=g).to(torch.bfloat16) for _ in range(a.layers)]
            # fresh experts every call, so that nothing is still in L3 from an earlier call (300 MiB on the H100 host)
            idxs = [torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) for _ in range(a.layers * a.reps)]
            if a.resident:
                idxs = idxs[:1]
            ws = [torch.rand(T, K, generator=g).softmax(-1).to(torch.bfloat16) for _ in range(a.layers)]
            nbytes = sum(len(torch.unique(i)) for i in idxs) / len(idxs) * per_expert   # mean over calls
            want, bf = references(layers[0], base[0], xs[0], idxs[0], ws[0].float())
            ref_out = torch.empty(T, H, dtype=torch.bfloat16)
            if fmt == "int8" and T <= a.stock_max_t:
                [signed_int8(L) for L in layers]   # converted before the clock starts
            st = timeit(lambda i: stock(fmt, layers[i % a.layers], xs[i % a.layers], idxs[i % len(idxs)],
                                        ws[i % a.layers], ref_out), max(a.reps // 4, 3)) \
                if T <= a.stock_max_t else float("nan")
            bw = probe(f"{fmt}-T{T}")
            for knob in itertools.product(ints(a.chunk), ints(a.prefetch), acts, ints(a.pipeline),
                                          ints(a.amx),
                                          ints(a.amx_pf)):
                out = torch.empty(T, H, dtype=torch.bfloat16)
                run = kernels.Runner()
                was = kernels.tune(*knob[:4], amx=knob[4], amx_pf=knob[5]) if lib else None
                call = lambda i: run(lib, xs[i % a.layers], idxs[i % len(idxs)], ws[i % a.layers],  # noqa: E731
                                     layers[i % a.layers], out, a.threads)
                kt, pr, pref = paired(call, nbytes) if lib else (float("nan"),) * 3
                knobs = dict(zip(kernels.KNOBS, kernels.tune()) if lib else ())
                phases = phase_times(call, a.reps, a.threads) if lib and a.phases else None
                if lib:
                    run(lib, xs[0], idxs[0], ws[0], layers[0], out, a.threads)
                    kernels.tune(*was)
                err = ((out.float() - want).norm() / want.norm()).item()
                qerr = ((out.float() - bf).norm() / bf.norm()).item()
                row = {"format": fmt, "T": T, "inter": I, "resident": a.resident, **knobs, "bytes": nbytes, "kernel_ms": kt * 1e3,
                       "kernel_GBps": nbytes / kt / 1e9, "kernel_ratio": nbytes / kt / bw, "kernel_ratio_paired": pr,
                       "paired_ref_GBps": pref / 1e9, "torch_ms": st * 1e3,
                       "torch_GBps": nbytes / st / 1e9, "torch_ratio": nbytes / st / bw,
                       "kernel_TFLOPs": 6 * T * K * H * I / kt / 1e12,
                       "rel_err_vs_dequant_fp32": err, "rel_err_vs_bf16": qerr,
                       **({"phases_us": phases} if phases else {})}
                res["rows"].append(row)
                tag = "/".join(str(knobs.get(k, "-")) for k in kernels.KNOBS)
                print(f"{fmt:5} {T:3d} {tag:>18} {kt * 1e3:9.3f} {row['kernel_GBps']:7.1f} {100 * row['kernel_ratio']:5.1f}% "
                      f"{100 * pr:5.1f}% | "
                      f"{st * 1e3:8.3f} {row['torch_GBps']:7.1f} {100 * row['torch_ratio']:5.1f}% | {err:.1e} {qerr:.1e}"
                      + (f" | {row['kernel_TFLOPs']:.2f} TFLOP/s" if T > kernels.MAX_TOKENS else ""),
                      flush=True)
                if phases:
                    print("      µs: " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()))
            if a.out:
                ceiling(res, probes, paired_readings)
                write_atomic(a.out, json.dumps(res, indent=2))
    probe("end")
    ceiling(res, probes, paired_readings)
    bw = res["read_bw"]
    print("read bandwidth (GB/s), best reading per probe: " + ", ".join(f"{k} {max(v) / 1e9:.1f}" for k, v in probes.items())
          + f"; ceiling {bw / 1e9:.1f} ({res['ceiling']['source']})")
    for row in res["rows"]:
        print(f"{row['format']:5} {row['T']:3d} kernel {100 * row['kernel_ratio']:5.1f}% of the ceiling")
    if a.out:
        write_atomic(a.out, json.dumps(res, indent=2))


def ceiling(res, probes, paired_readings):
    """The run's ceiling so far: every reading of every reader (probes, paired readings) and every rate a kernel or
    torch row reached; each row's ratios against it (≤ 100% by construction). Called on every write, so a run cut
    short still records its readings and honest ratios."""
    cands = {f"probe {k}": max(v) for k, v in probes.items()}
    cands["paired readings"] = max(paired_readings, default=0.0)
    cands.update({f"row {r['format']} T={r['T']} {w}": r[f"{w}_GBps"] * 1e9 for r in res["rows"]
                  for w in ("kernel", "torch") if r[f"{w}_GBps"] == r[f"{w}_GBps"]})   # NaN: not timed
    top = max(cands, key=cands.get)
    res["ceiling"] = {"value": cands[top], "source": top, "candidates": cands}
    res["read_bw"] = bw = cands[top]
    res["probes"], res["paired_readings"] = probes, paired_readings
    for row in res["rows"]:
        row["kernel_ratio"], row["torch_ratio"] = row["kernel_GBps"] * 1e9 / bw, row["torch_GBps"] * 1e9 / bw


if __name__ == "__main__":
    main()
