"""ktcli serve's decode speed against ktcli bench's tg on the same profile, in the same run.

Starts `ktcli serve` on a free loopback port, asks for one long completion (ignore_eos, fixed length) several
times and reads the server's own `timings.predicted_per_second`; runs `ktcli bench -p 0 -n N` on the same
profile before and after the server (each a fresh process: drift between processes shows on both sides). Writes both and their ratio as JSON.

    python benchmarks/serve_vs_bench.py PROFILE --tokens 128 --reps 3 --out r.json

--interleaved R: one process instead, one engine: the server runs in a thread on that engine, and R rounds each
time one served completion and one bench tg repetition on the same engine, their order alternating (ABBA), so the
drift between processes and over time falls on both sides alike. The ratio is of the medians.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def start_server(profile, extra):
    cmd = [sys.executable, "-m", "ktcli", "serve", *([profile] if profile else []), "--port", "0", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    seen, deadline = "", time.monotonic() + 1800
    while time.monotonic() < deadline:
        seen += proc.stderr.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/v1", seen.replace("\n", ""))
        if m:      # the port is bound before the model loads; requests are taken once /health answers
            url = f"http://127.0.0.1:{m.group(1)}"
            import threading      # keep reading its stderr (load progress), or a full pipe would stall the server
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if httpx.get(url + "/health", timeout=5).status_code == 200:
                        return proc, url
                except httpx.HTTPError:
                    pass
                time.sleep(1)
            raise SystemExit("ktcli serve exited or never became ready")
        if proc.poll() is not None:
            raise SystemExit(f"ktcli serve exited: {seen[-2000:]}")
    raise SystemExit("ktcli serve did not start")


def with_demo_tokenizer(profile, folder):
    """A copy of `profile` whose model is a folder holding the architecture's config.json and the demo's tokenizer
    (weights stay synthetic): timings do not depend on the tokenizer, the server only needs one to encode chat."""
    import shutil
    import yaml
    from ktcli.model import demo
    with open(profile, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    ck = os.path.join(folder, f".ckpt-{data['model']}")
    os.makedirs(ck, exist_ok=True)
    shutil.copy(os.path.join(ROOT, "ktcli", "model", "configs", f"{data['model']}.json"), os.path.join(ck, "config.json"))
    src = demo.ensure_demo()
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(os.path.join(src, f), os.path.join(ck, f))
    data.update(model=ck, weights="synthetic")
    out = os.path.join(folder, ".serve-" + os.path.basename(profile))
    with open(out, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f)
    return out


def run_bench(a, extra) -> dict:
    bench_json = os.path.join(os.path.dirname(os.path.abspath(a.out)), ".serve_vs_bench_bench.json")
    subprocess.run([sys.executable, "-m", "ktcli", "bench", *([a.profile] if a.profile else []), "-p", "0", "-n",
                    str(a.tokens), "-r", str(a.reps), "-o", "json", "--output-file", bench_json, *extra],
                   cwd=ROOT, check=True)
    with open(bench_json, encoding="utf-8") as f:
        bench = json.load(f)
    os.remove(bench_json)
    return bench


def interleaved(a) -> dict:
    """--interleaved: (serve t/s per round, bench t/s per round) from one engine in this process."""
    import socket
    import threading

    import uvicorn

    from ktcli.commands.options import machine_for, profile_from_flags
    from ktcli.commands.run import load
    from ktcli.engine import Engine
    from ktcli.engine.bench import run_test
    from ktcli.server.app import Server
    prof = profile_from_flags(a.profile, num_layers=a.num_layers)
    v, built = load(prof, machine_for(None), need_tokenizer=True)
    engine = Engine(built)
    engine.prepare()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(Server(engine, built.tokenizer, v.source.name).app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    while not server.started:
        time.sleep(0.05)
    body = {"model": v.source.name, "prompt": "Once upon a time", "max_tokens": a.tokens + 1, "ignore_eos": True,
            "temperature": 0}

    def serve_once() -> float:
        return httpx.post(url + "/v1/completions", json=body, timeout=3600).json()["timings"]["predicted_per_second"]

    def bench_once() -> float:
        return run_test(engine, "tg", a.tokens, reps=1, warmup=0)["samples"][0]

    serve_once(), bench_once()                                  # warm-up: both paths once
    serve_tps, bench_tps = [], []
    for i in range(a.interleaved):
        for what in (("serve", "bench") if i % 2 == 0 else ("bench", "serve")):
            (serve_tps if what == "serve" else bench_tps).append(serve_once() if what == "serve" else bench_once())
    server.should_exit = True
    return {"serve_tps": serve_tps, "bench_tps": bench_tps, "engine": {"graphs": engine.mode},
            "serve_median": statistics.median(serve_tps), "bench_median": statistics.median(bench_tps)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("profile", nargs="?")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--extra", default="", help="more flags for both commands, e.g. '--num-layers 16'")
    ap.add_argument("--out", required=True)
    ap.add_argument("--interleaved", type=int, default=0, metavar="ROUNDS",
                    help="one process, one engine: ROUNDS of (served completion, bench tg) alternating")
    ap.add_argument("--num-layers", type=int, default=None, help="with --interleaved: only the first N layers")
    ap.add_argument("--demo-tokenizer", action="store_true",
                    help="the profile names a shipped architecture (synthetic weights, no tokenizer): serve it from a "
                         "checkpoint folder of that config and the demo's tokenizer, so chat requests can be encoded")
    a = ap.parse_args()
    if a.demo_tokenizer:
        a.profile = with_demo_tokenizer(a.profile, os.path.dirname(os.path.abspath(a.out)))
    from ktcli.engine.provenance import machine_info
    from ktcli.files import write_atomic
    extra = a.extra.split()
    if a.interleaved:
        res = {"command": " ".join(["python", *sys.argv]), "machine": machine_info(), "profile": a.profile,
               "tokens": a.tokens, **interleaved(a)}
        res["serve_over_bench"] = res["serve_median"] / res["bench_median"]
        write_atomic(a.out, json.dumps(res, indent=2))
        print(f"serve {res['serve_median']:.2f} t/s, bench {res['bench_median']:.2f} t/s (medians of "
              f"{a.interleaved} interleaved rounds): {100 * res['serve_over_bench']:.1f}%")
        return
    before = run_bench(a, extra)            # bench before and after the server: fresh-process drift shows in both
    proc, url = start_server(a.profile, extra)
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        body = {"model": model, "messages": [{"role": "user", "content": "Write a long story."}],
                "max_tokens": a.tokens + 1, "ignore_eos": True, "temperature": 0}
        runs = []
        for i in range(a.reps + 1):                      # the first is a warm-up
            t = httpx.post(url + "/v1/chat/completions", json=body, timeout=3600).json()["timings"]
            if i:
                runs.append(t)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    after = run_bench(a, extra)
    serve_tps = [r["predicted_per_second"] for r in runs]
    bench_tps = before["results"][0]["samples"] + after["results"][0]["samples"]
    bench = {"before": before, "after": after}
    res = {"command": " ".join(["python", *sys.argv]), "machine": machine_info(), "profile": a.profile,
           "note": "served from the architecture's config + the demo tokenizer (--demo-tokenizer)" if a.demo_tokenizer
           else "",
           "tokens": a.tokens, "serve_tps": serve_tps, "bench_tps": bench_tps, "bench": bench,
           "serve_mean": statistics.fmean(serve_tps), "bench_mean": statistics.fmean(bench_tps)}
    res["serve_over_bench"] = res["serve_mean"] / res["bench_mean"]
    write_atomic(a.out, json.dumps(res, indent=2))
    print(f"serve {res['serve_mean']:.2f} t/s, bench {res['bench_mean']:.2f} t/s: "
          f"{100 * res['serve_over_bench']:.1f}%")


if __name__ == "__main__":
    main()
