"""Kernels a one-token decode step launches, eager against runtime.compile, counted on the CPU backend.

Why: on the GPU each kernel of a small-expert layer's attention, norms and router is a graph node of a few µs, so
their count sets that side's time (#15). Counted here on the CPU (no GPU needed): eager, the aten compute ops the
profiler records in one decode step; compiled, those outside the compiled regions plus, per compiled graph, the
fused kernels and extern calls (GEMMs, attention) in inductor's output code, times how often the step calls it.

  python benchmarks/compile_kernels.py --profile profiles/qwen3-30b-a3b-cpu-experts.yaml --layers 2 --out FILE
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import re
import subprocess
import sys
import time

COMPUTE = re.compile(r"aten::(copy_|mul|add_?|mm|addmm|bmm|pow|mean|rsqrt|sum|div_?|cat|neg|index_copy_|where|fill_|"
                     r"arange|_scaled_dot_product_\w+|_?softmax|topk|sigmoid|silu|index_put_|embedding|index_select|"
                     r"argmax|sub|exp|cos|sin|gather|scatter_?)$")


def count(profile: str, layers: int, compiled: bool) -> dict:
    """One process per mode (compiled code is process state): its counts as JSON on stdout."""
    from dataclasses import replace

    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from ktcli.commands.options import machine_for, profile_from_flags
    from ktcli.engine import Engine
    from ktcli.model.build import build
    from ktcli.placement.validate import validate
    logs = []
    if compiled:               # inductor's output code, to count the kernels inside each compiled graph
        torch._logging.set_logs(output_code=True)
        h = logging.Handler()

        def keep(rec):             # the compile id ("0/0") names the region the profiler shows it as
            tid = torch._guards.CompileContext.current_trace_id()
            if "def call(" in rec.getMessage() and tid is not None:
                logs.append((str(tid.compile_id), rec.getMessage()))
        h.emit = keep
        logging.getLogger("torch._inductor").addHandler(h)
    prof = profile_from_flags(profile, num_layers=layers, max_seq_len=256, use_cuda_graph=False, cpu_threads=2)
    prof = replace(prof, runtime=replace(prof.runtime, compile=compiled))
    e = Engine(build(validate(prof, machine_for(None))), graph_mode="off")
    e.prefill(list(range(5, 20)))
    tok = torch.tensor(7)
    for _ in range(3):             # compiled on the first one-token forward
        e.decode(tok)
        e.ids.append(7)
    with torch_profile(activities=[ProfilerActivity.CPU]) as p:
        e.decode(tok)
    names = collections.Counter(ev.name for ev in p.events())
    outside = sum(c for n, c in names.items() if COMPUTE.match(n))
    graphs = {}
    for cid, text in logs:         # per compiled graph: fused kernels and extern calls in its output code
        graphs[cid] = {"fused": len(re.findall(r"^\s+cpp_fused_\w+\(", text, re.M)),
                       "extern": len(re.findall(r"extern_kernels\.\w+\(", text))}
    regions = {n.rsplit(": ", 1)[1]: c for n, c in names.items() if n.startswith("Torch-Compiled Region: ")}
    for cid, g in graphs.items():
        g["calls"] = regions.get(cid, 0)
    inside = sum((g["fused"] + g["extern"]) * g["calls"] for g in graphs.values())
    return {"compiled": compiled, "kernels_outside_compiled": outside, "kernels_inside_compiled": inside,
            "compiled_graph_calls": sum(regions.values()), "compiled_graphs": graphs,
            "kernels_per_step": outside + inside}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="profiles/qwen3-30b-a3b-cpu-experts.yaml")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--out")
    ap.add_argument("--one", choices=["eager", "compiled"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(count(a.profile, a.layers, a.one == "compiled")))
        return 0
    rows = []
    for mode in ("eager", "compiled"):
        r = subprocess.run([sys.executable, __file__, "--profile", a.profile, "--layers", str(a.layers), "--one", mode],
                           capture_output=True, text=True, check=True)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    for r in rows:
        r["kernels_per_layer"] = round(r["kernels_per_step"] / a.layers, 1)   # model-level work shared out
        print(f"{'compiled' if r['compiled'] else 'eager':9s} {r['kernels_per_step']:4d} kernels a step "
              f"({r['kernels_outside_compiled']} outside compiled code, {r['kernels_inside_compiled']} inside)")
    if a.out:
        from ktcli.engine.provenance import machine_info
        from ktcli.files import write_atomic
        doc = {"command": "python benchmarks/compile_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "made": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine_info(), "profile": a.profile,
               "layers": a.layers, "rows": rows}
        write_atomic(a.out, json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
