"""Graph replay vs eager decode, token for token, on full-size architectures with synthetic weights.

Builds the model once per profile, decodes N greedy tokens with graphs off, piecewise and full, checks that
the token sequences are identical, and records decode tok/s of each mode (speed against the roofline is
`ktcli bench`'s job: it measures the ceilings in the same run).

    python benchmarks/graph_parity.py PROFILE [PROFILE ...] --tokens 256 [--num-layers 8] --out results.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from ktcli.commands.options import machine_for, profile_from_flags
from ktcli.commands.run import load
from ktcli.engine import Engine, GenerationConfig
from ktcli.engine.provenance import machine_info
from ktcli.engine.sweep import placement_summary
from ktcli.files import write_atomic


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("profiles", nargs="+")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--num-layers", type=int, default=None)
    ap.add_argument("--modes", default="off,piecewise,full")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = {"command": " ".join(["python", *sys.argv]), "machine": machine_info(), "runs": []}
    for path in a.profiles:
        prof = profile_from_flags(path, num_layers=a.num_layers, max_seq_len=a.tokens + 64)
        t0 = time.perf_counter()
        v, built = load(prof, machine_for(None))
        run = {"profile": path, "model": v.source.name, "layers": built.model.config.num_hidden_layers,
               "placement": placement_summary(built.plan), "load_s": time.perf_counter() - t0, "modes": {}}
        prompt = torch.randint(0, built.model.config.vocab_size, (32,), generator=torch.Generator().manual_seed(0)).tolist()
        ref = None
        for mode in a.modes.split(","):
            eng = Engine(built, graph_mode=mode)
            eng.prepare()
            new, st = eng.generate(prompt, GenerationConfig(max_new_tokens=a.tokens, ignore_eos=True))
            same = None if ref is None else new == ref
            first_diff = None if not same is False else next(i for i, (x, y) in enumerate(zip(new, ref)) if x != y)
            ref = ref or new
            run["modes"][mode] = {"tokens": len(new), "equal_to_off": same, "first_diff": first_diff,
                                  "decode_tps": st.decode_tps, "p50_ms": st.latency_ms(.5), "p90_ms": st.latency_ms(.9),
                                  "cpu_experts_ms_per_token": 1e3 * st.cpu_experts_s / max(st.decode_tokens, 1),
                                  "capture_s": eng.capture_s,
                                  "segments": eng.graph.segments if eng.graph else 0}
            print(f"{v.source.name} L={run['layers']} {mode:9s} tps={st.decode_tps:7.3f} "
                  f"equal={same} p50={st.latency_ms(.5):.1f}ms "
                  f"cpu={run['modes'][mode]['cpu_experts_ms_per_token']:.1f}ms capture={eng.capture_s:.2f}s", flush=True)
            del eng
            torch.cuda.empty_cache()
        m = run["modes"]
        if "off" in m and "full" in m:
            run["full_over_off"] = m["full"]["decode_tps"] / m["off"]["decode_tps"]
        out["runs"].append(run)
        del built
        torch.cuda.empty_cache()
        write_atomic(a.out, json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
