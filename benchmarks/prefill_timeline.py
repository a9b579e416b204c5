"""Where a prefill chunk's GPU time goes (GPU machine): one prefill, after warm-ups that settle `auto`'s plan and
chunk trials, traced by torch.profiler (CUPTI). The compute stream's time is split three ways: busy (by kind of
kernel), idle while the copy stream uploads (waiting on copies), idle with both streams idle (waiting on the
host: its syncs, plans and launches). The host's own phases come from the streamer's statistics.

    python benchmarks/prefill_timeline.py PROFILE [--tokens 512] [--routing uniform] --out timeline.json
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time

import torch

from ktcli.commands.options import machine_for, profile_from_flags
from ktcli.commands.run import load
from ktcli.engine import Engine
from ktcli.engine.bench import random_ids
from ktcli.engine.provenance import machine_info
from ktcli.files import write_atomic
from ktcli.model.routing import set_routing

KINDS = (("memcpy", ("Memcpy", "memcpy")), ("gemm", ("gemm", "nvjet", "cutlass", "sm90", "grouped", "xmma", "cublas")),
         ("attention", ("flash", "fmha", "attention", "cudnn")), ("triton", ("triton",)))


def kind(name: str) -> str:
    return next((k for k, keys in KINDS if any(s in name for s in keys)), "other")


def union(spans: list) -> list:
    """Sorted, merged [(start, end)] µs."""
    out = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def overlap(a: tuple, spans: list) -> float:
    """µs of interval a covered by merged spans."""
    return sum(max(0.0, min(a[1], e) - max(a[0], s)) for s, e in spans if s < a[1] and e > a[0])


def summarize(events: list) -> dict:
    """events: chrome-trace GPU events {'tid' stream, 'ts', 'dur', 'name'} → the compute stream's time split."""
    by_stream = collections.defaultdict(list)
    for e in events:
        by_stream[e["tid"]].append(e)
    compute = max(by_stream, key=lambda s: sum(kind(e["name"]) != "memcpy" for e in by_stream[s]))
    copies = union([(e["ts"], e["ts"] + e["dur"]) for s, evs in by_stream.items() if s != compute for e in evs])
    busy = union([(e["ts"], e["ts"] + e["dur"]) for e in by_stream[compute]])
    gaps = [(busy[i][1], busy[i + 1][0]) for i in range(len(busy) - 1)]
    on_copies = sum(overlap(g, copies) for g in gaps)
    kinds = collections.Counter()
    for e in by_stream[compute]:
        kinds[kind(e["name"])] += e["dur"]
    top = collections.Counter()
    for e in by_stream[compute]:
        top[e["name"][:80]] += e["dur"]
    window = busy[-1][1] - busy[0][0] if busy else 0.0
    ms = 1e-3
    return {"window_ms": window * ms, "compute_busy_ms": sum(b - a for a, b in busy) * ms,
            "compute_idle_on_copies_ms": on_copies * ms,
            "compute_idle_on_host_ms": (sum(b - a for a, b in gaps) - on_copies) * ms,
            "copy_busy_ms": sum(b - a for a, b in copies) * ms, "compute_kernels": len(by_stream[compute]),
            "compute_by_kind_ms": {k: v * ms for k, v in kinds.most_common()},
            "top": [{"name": k, "ms": v * ms} for k, v in top.most_common(12)]}


def traced_prefill(eng, ids: list) -> tuple:
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    eng.built.streamer.take_stats()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        eng.reset()
        eng.prefill(ids)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    phases = eng.built.streamer.take_stats()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    evs = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and e.get("cat") in
           ("kernel", "gpu_memcpy", "gpu_memset")]
    return wall, phases, evs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("profile")
    ap.add_argument("--num-layers", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--routing", default="model")
    ap.add_argument("--warmup", type=int, default=6, help="untimed prefills first (auto's trials need 4)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    prof = profile_from_flags(a.profile, num_layers=a.num_layers)
    v, built = load(prof, machine_for(None))
    if built.streamer is None:
        sys.exit(f"{a.profile}: no layer of CPU-resident experts prefills on the GPU here: nothing to trace")
    set_routing(built.model, a.routing)
    eng = Engine(built, graph_mode="off")
    eng.prepare()
    gen = torch.Generator().manual_seed(0)
    for _ in range(a.warmup):
        eng.reset()
        eng.prefill(random_ids(built.model.config.vocab_size, a.tokens, gen))
    wall, phases, evs = traced_prefill(eng, random_ids(built.model.config.vocab_size, a.tokens, gen))
    L = built.model.config.num_hidden_layers
    run = {"profile": a.profile, "tokens": a.tokens, "routing": a.routing, "layers": L, "wall_ms": wall * 1e3,
           "tps": a.tokens / wall, "phases": phases, "gpu": summarize(evs),
           "trials": built.streamer.trial_report()}
    g = run["gpu"]
    print(f"{a.profile} pp{a.tokens} {a.routing}: {wall * 1e3:.1f} ms ({run['tps']:.0f} t/s, traced) = per layer "
          f"{wall * 1e3 / L:.2f} ms; compute stream busy {g['compute_busy_ms'] / L:.2f}, idle on copies "
          f"{g['compute_idle_on_copies_ms'] / L:.2f}, idle on host {g['compute_idle_on_host_ms'] / L:.2f}; copies "
          f"{g['copy_busy_ms'] / L:.2f}; kernels {g['compute_kernels'] / L:.0f}/layer; by kind (ms/layer) "
          + ", ".join(f"{k} {v / L:.2f}" for k, v in g["compute_by_kind_ms"].items()), flush=True)
    for t in g["top"][:8]:
        print(f"   {t['ms'] / L * 1e3:8.1f} µs/layer  {t['name']}")
    out = {"command": " ".join(["python", *sys.argv]), "machine": machine_info(), "runs": [run]}
    write_atomic(a.out, json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
