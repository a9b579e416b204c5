"""Where a full-graph decode token goes (GPU machine): one replay timed alone, its CPU-expert steps (the kernel's
own clocks), and the GPU's kernels and copies inside it (torch.profiler / CUPTI), so "the rest" of a token is
named, not guessed.

    python benchmarks/decode_timeline.py PROFILE [--num-layers N] [--replays 20] --out timeline.json
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time

import torch

from ktcli.commands.options import machine_for, profile_from_flags
from ktcli.commands.run import load
from ktcli.engine import Engine, GenerationConfig
from ktcli.engine.provenance import machine_info
from ktcli.files import write_atomic
from ktcli.ops.clocks import take_all


def replay_ms(eng, n: int) -> tuple:
    """ms per replay (graph alone: no sampling, no Python loop) and the CPU-expert clocks of those replays."""
    g, tok, pos = eng.graph, torch.zeros(1, dtype=torch.long, device=eng.device), len(eng.ids)
    g.run(tok, pos)
    torch.cuda.synchronize()
    take_all()
    t0 = time.perf_counter()
    for _ in range(n):
        g.run(tok, pos)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / n, take_all()


def gpu_events(eng, n: int) -> dict:
    """GPU activity of n replays: busy time (union of kernel and copy intervals), by kind and top kernels."""
    from torch.profiler import ProfilerActivity, profile
    tok, pos = torch.zeros(1, dtype=torch.long, device=eng.device), len(eng.ids)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            eng.graph.run(tok, pos)
        torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type.name == "CUDA"]
    spans = sorted((e.time_range.start, e.time_range.end) for e in evs)
    busy, end = 0, None
    for a, b in spans:                      # union of intervals, µs
        if end is None or a > end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for e in evs:
        by_name[e.name][0] += 1
        by_name[e.name][1] += e.time_range.elapsed_us()
    kinds = collections.Counter()
    for name, (c, us) in by_name.items():
        kinds["memcpy" if "emcpy" in name or "Memcpy" in name else "kernel"] += us
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:15]
    return {"events_per_replay": len(evs) / n, "busy_ms_per_replay": busy / n / 1e3,
            "window_ms_per_replay": (spans[-1][1] - spans[0][0]) / n / 1e3 if spans else 0,
            "by_kind_ms_per_replay": {k: v / n / 1e3 for k, v in kinds.items()},
            "top": [{"name": k[:90], "count_per_replay": c / n, "us_per_replay": us / n} for k, (c, us) in top]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("profiles", nargs="+")
    ap.add_argument("--num-layers", type=int, default=None)
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = {"command": " ".join(["python", *sys.argv]), "machine": machine_info(), "runs": []}
    for path in a.profiles:
        prof = profile_from_flags(path, num_layers=a.num_layers, max_seq_len=256)
        v, built = load(prof, machine_for(None))
        eng = Engine(built, graph_mode="full")
        eng.prepare()
        new, st = eng.generate([1, 2, 3], GenerationConfig(max_new_tokens=16, ignore_eos=True))
        ms, clk = replay_ms(eng, a.replays)
        calls = clk["cpu_layer_calls"] / a.replays
        run = {"profile": path, "layers": built.model.config.num_hidden_layers, "generate_ms_per_token":
               1e3 * st.decode_s / max(st.decode_tokens, 1), "replay_ms": ms, "cpu_layer_calls_per_replay": calls,
               "cpu_step_ms_per_replay": 1e3 * clk["cpu_step_s"] / a.replays,
               "kernel_ms_per_replay": 1e3 * clk["kernel_s"] / a.replays, "gpu": gpu_events(eng, 3)}
        run["unexplained_ms_per_replay"] = ms - run["cpu_step_ms_per_replay"] - run["gpu"]["busy_ms_per_replay"]
        out["runs"].append(run)
        g = run["gpu"]
        print(f"{path}: generate {run['generate_ms_per_token']:.2f} ms/token, replay {ms:.2f} ms = CPU steps "
              f"{run['cpu_step_ms_per_replay']:.2f} ({calls:.0f} calls, kernel {run['kernel_ms_per_replay']:.2f}) + GPU "
              f"busy {g['busy_ms_per_replay']:.2f} ({g['events_per_replay']:.0f} events; "
              + ", ".join(f"{k} {v:.2f}" for k, v in g["by_kind_ms_per_replay"].items())
              + f") + unexplained {run['unexplained_ms_per_replay']:.2f} ms", flush=True)
        for t in g["top"][:8]:
            print(f"   {t['us_per_replay']:8.1f} µs  {t['count_per_replay']:6.1f}×  {t['name']}")
        del eng, built
        torch.cuda.empty_cache()
    write_atomic(a.out, json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
