"""runtime.compile off against on, interleaved on one engine in one process.

Why: fresh processes on the GPU host differ by more than compile's gain (2026-12-05: the CPU kernel ran 906 and
1,186 µs a layer in two processes of the same run). Here one engine is built with runtime.compile, and one decode
graph is captured with the compiled code and one with the wrapped modules eager (model/compile.ENABLED); rounds of
one tg repetition each alternate between them (ABBA), so drift falls on both sides alike. Medians compared.

  python benchmarks/compile_ab.py PROFILE --tokens 128 --rounds 6 --out r.json   [--graph-mode off on a CPU]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run(a) -> dict:
    from dataclasses import replace

    from ktcli.commands.options import machine_for, profile_from_flags
    from ktcli.engine import Engine
    from ktcli.engine.bench import run_test
    from ktcli.model import compile as comp
    from ktcli.model.build import build
    from ktcli.placement.validate import validate
    prof = profile_from_flags(a.profile, num_layers=a.num_layers, graph_mode=a.graph_mode)
    prof = replace(prof, runtime=replace(prof.runtime, compile=True))
    engine = Engine(build(validate(prof, machine_for(None))))
    graphs = {}
    for on in (True, False):                  # the graph records whichever code the switch selects
        comp.ENABLED = on
        engine.graph = None
        engine.prepare()
        graphs[on] = engine.graph

    def once(on: bool) -> dict:
        comp.ENABLED, engine.graph = on, graphs[on]
        r = run_test(engine, "tg", a.tokens, reps=1, warmup=0)
        return {"tps": r["samples"][0], **r["breakdown"]}

    once(True), once(False)                   # warm-up, untimed: the first replay of each graph
    rounds = {"on": [], "off": []}
    for i in range(a.rounds):
        for on in ((True, False) if i % 2 == 0 else (False, True)):
            rounds["on" if on else "off"].append(once(on))
    comp.ENABLED = True
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("tps", "ms_per_token", "cpu_experts_ms")}
           for k, v in rounds.items()}
    for m in med.values():
        m["rest_ms"] = m["ms_per_token"] - m["cpu_experts_ms"]     # GPU side, steps, everything not CPU experts
    return {"graphs": engine.mode, "rounds": rounds, "median": med,
            "compiled_over_eager": med["on"]["tps"] / med["off"]["tps"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("profile", nargs="?")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--num-layers", type=int, default=None)
    ap.add_argument("--graph-mode", default=None, help="off / piecewise / full (default: the profile's)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from ktcli.engine.provenance import machine_info
    from ktcli.files import write_atomic
    res = {"command": " ".join(["python", *sys.argv]), "machine": machine_info(), "profile": a.profile,
           "tokens": a.tokens, **run(a)}
    write_atomic(a.out, json.dumps(res, indent=2))
    on, off = res["median"]["on"], res["median"]["off"]
    print(f"compile on {on['tps']:.2f} t/s (rest {on['rest_ms']:.2f} ms/token), off {off['tps']:.2f} t/s "
          f"(rest {off['rest_ms']:.2f}): {100 * res['compiled_over_eager']:.1f}% (medians of {a.rounds} rounds each)")


if __name__ == "__main__":
    main()
