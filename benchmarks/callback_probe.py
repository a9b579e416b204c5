"""Why is CPU-expert time higher inside the full graph? Time one layer's CPU experts called from the main
thread, from a Python worker thread, and from a CUDA host callback (cuLaunchHostFunc), with each thread's
CPU affinity.   python benchmarks/callback_probe.py --out probe.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

import torch

from ktcli.ops import kernels
from ktcli.ops.bridge import HostCallbackBridge
from ktcli.ops.cpu import cpu_moe
from ktcli.ops.quant import pack


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    E, H, I, K, L = 64, 3584, 2560, 8, 4
    layers = [pack("bf16", torch.empty(E, 2 * I, H, dtype=torch.bfloat16).uniform_(-.03, .03),
                   torch.empty(E, H, I, dtype=torch.bfloat16).uniform_(-.03, .03)) for _ in range(L)]
    x = torch.randn(1, H).bfloat16()
    idx = [torch.randperm(E)[:K][None] for _ in range(L)]
    w = torch.rand(1, K)
    out = torch.empty(1, H, dtype=torch.bfloat16)
    lib, run = kernels.get(), kernels.Runner()
    res = {"command": " ".join(["python", *sys.argv])}

    def work(kind, i, sink):
        if torch.get_num_threads() != a.threads:
            torch.set_num_threads(a.threads)
        t0 = time.perf_counter()
        if kind == "kernel":
            run(lib, x, idx[i % L], w, layers[i % L], out, a.threads)
        else:
            cpu_moe(x, idx[i % L], w, None, None, torch.nn.SiLU(), out,
                    weights=lambda e: (layers[i % L].gu[e], layers[i % L].dn[e]))
        sink.append((time.perf_counter() - t0, len(os.sched_getaffinity(0))))

    for kind in ("kernel", "torch"):
        for where in ("main", "thread", "callback"):
            sink = []
            for i in range(24):
                if where == "main":
                    work(kind, i, sink)
                elif where == "thread":
                    th = threading.Thread(target=work, args=(kind, i, sink))   # a fresh thread each call
                    th.start()
                    th.join()
                else:
                    br = HostCallbackBridge()
                    br.cpu_step(lambda i=i: work(kind, i, sink))
                    torch.cuda.synchronize()
                    br.check()
            ms = statistics.median(t for t, _ in sink[4:]) * 1e3
            res[f"{kind}/{where}"] = {"median_ms": ms, "affinity_cpus": sink[-1][1]}
            print(f"{kind:6} {where:8} {ms:8.3f} ms/layer  affinity={sink[-1][1]} cpus", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
