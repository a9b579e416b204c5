"""`ktcli plan`'s predictions against measurement, and against the shipped hand-written profiles.

For each model and GPU budget: `ktcli plan` writes a profile for that budget; `ktcli bench` measures its tg; every
shipped profile of the same model that validate-config accepts for the same budget is measured too. Writes each
plan's predicted and measured t/s, their ratio, and the best shipped profile's t/s.

    python benchmarks/plan_check.py --models qwen3-30b-a3b,qwen2-57b-a14b --budgets 24,48,80 \\
        --targets 'cuda:0={gib}GiB,cpu=125GiB,cores=16' -n 128 --out r.json
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def ktcli(*args, check=True):
    return subprocess.run([sys.executable, "-m", "ktcli", *args], cwd=ROOT, capture_output=True, text=True,
                          check=check)


def bench(profile, n, reps, extra, tmp):
    out = os.path.join(tmp, "bench.json")
    ktcli("bench", profile, "-p", "0", "-n", str(n), "-r", str(reps), "-o", "json", "--output-file", out, *extra)
    with open(out, encoding="utf-8") as f:
        rec = json.load(f)["results"][0]
    return {"tps_mean": rec["tps_mean"], "tps_sd": rec["tps_sd"], "roofline_ratio": rec.get("roofline_ratio"),
            "breakdown": rec.get("breakdown")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="qwen3-30b-a3b,qwen2-57b-a14b")
    ap.add_argument("--budgets", default="24,48,80", help="GiB, substituted for {gib} in --targets")
    ap.add_argument("--targets", default="cuda:0={gib}GiB,cpu=125GiB,cores=16")
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--extra", default="", help="flags for plan and bench, e.g. '--num-layers 16'")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from ktcli.engine.provenance import machine_info
    from ktcli.files import write_atomic
    extra = a.extra.split()
    res = {"command": " ".join(["python", *sys.argv]), "machine": machine_info(), "rows": []}
    shipped = sorted(glob.glob(os.path.join(ROOT, "profiles", "*.yaml")))
    with tempfile.TemporaryDirectory() as tmp:
        for model in a.models.split(","):
            for gib in a.budgets.split(","):
                targets = "--target-devices=" + a.targets.format(gib=gib)
                plan = os.path.join(tmp, f"plan-{model}-{gib}.yaml")
                ktcli("plan", "-m", model, targets, "--context", str(a.n * 2), "-o", plan, *extra)
                text = open(plan, encoding="utf-8").read()
                predicted = float(text.split("# predicted decode: ")[1].split(" t/s")[0])
                row = {"model": model, "budget_gib": float(gib), "predicted_tps": predicted,
                       "plan": yaml.safe_load(text)["rules"], "measured": bench(plan, a.n, a.reps, extra, tmp)}
                row["measured_over_predicted"] = row["measured"]["tps_mean"] / predicted
                row["shipped"] = {}
                for p in shipped:
                    with open(p, encoding="utf-8") as f:
                        if (yaml.safe_load(f) or {}).get("model") != model:
                            continue
                    if ktcli("validate-config", p, targets, *extra, check=False).returncode == 0:
                        row["shipped"][os.path.basename(p)] = bench(p, a.n, a.reps, extra, tmp)
                best = max((s["tps_mean"] for s in row["shipped"].values()), default=None)
                row["plan_over_best_shipped"] = row["measured"]["tps_mean"] / best if best else None
                res["rows"].append(row)
                write_atomic(a.out, json.dumps(res, indent=2))
                print(f"{model} {gib} GiB: predicted {predicted:.2f}, measured {row['measured']['tps_mean']:.2f} t/s "
                      f"({100 * row['measured_over_predicted']:.0f}%), best shipped {best}", flush=True)


if __name__ == "__main__":
    main()
