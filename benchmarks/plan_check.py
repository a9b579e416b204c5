"""`ktcli plan`'s predictions against measurement, and against the shipped hand-written profiles.

For each model and GPU budget: `ktcli plan` writes a profile for that budget; `ktcli bench` measures its tg; every
shipped profile of the same model that validate-config accepts for the same budget is measured too (once per
profile). The plan competes with the shipped profiles whose CPU experts have its format: a faster int4 profile is
not a better bf16 placement. Writes each plan's predicted and measured t/s, their ratio, and the best shipped t/s.

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
    r = subprocess.run([sys.executable, "-m", "ktcli", *args], cwd=ROOT, capture_output=True, text=True)
    if check and r.returncode:
        sys.exit(f"ktcli {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r


def bench(profile, n, reps, extra, tmp):
    out = os.path.join(tmp, "bench.json")
    ktcli("bench", profile, "-p", "0", "-n", str(n), "-r", str(reps), "-o", "json", "--output-file", out, *extra)
    with open(out, encoding="utf-8") as f:
        rec = json.load(f)["results"][0]
    return {"tps_mean": rec["tps_mean"], "tps_sd": rec["tps_sd"], "roofline_ratio": rec.get("roofline_ratio"),
            "breakdown": rec.get("breakdown")}


def run_plan(model, targets, context, fmt, rates, path, extra=()):
    """`ktcli plan` into path → (its predicted decode t/s, its rules)."""
    ktcli("plan", "-m", model, targets, "--context", str(context), "--format", fmt, *rates, "-o", path, *extra)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return float(text.split("# predicted decode: ")[1].split(" t/s")[0]), yaml.safe_load(text)["rules"]


def cpu_format(profile_path) -> str:
    """The storage format of a profile's CPU experts (bf16 unless a rule quantizes them)."""
    with open(profile_path, encoding="utf-8") as f:
        rules = (yaml.safe_load(f) or {}).get("rules") or []
    fmts = {(r.get("replace") or {}).get("kwargs", {}).get("weight_format") for r in rules if isinstance(r, dict)}
    return next((f for f in fmts if f), "bf16")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="qwen3-30b-a3b,qwen2-57b-a14b")
    ap.add_argument("--budgets", default="24,48,80", help="GiB, substituted for {gib} in --targets")
    ap.add_argument("--targets", default="cuda:0={gib}GiB,cpu=125GiB,cores=16")
    ap.add_argument("--format", default="bf16", help="the plan's CPU-expert format; shipped profiles of the same "
                                                     "format are its competition (others are named, not measured)")
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--extra", default="", help="flags for plan and bench, e.g. '--num-layers 16'")
    ap.add_argument("--out", required=True)
    ap.add_argument("--repredict", metavar="JSON", help="no measuring: predict a recorded run's rows again with "
                    "this code and its recorded rates (refused where the plan would now place experts otherwise)")
    a = ap.parse_args()
    if a.repredict:
        return repredict(a.repredict, a.targets, a.out)
    from ktcli.engine.bandwidth import bandwidths
    from ktcli.engine.provenance import machine_info
    from ktcli.files import write_atomic
    extra = a.extra.split()
    # --target-devices describes another machine, so plan would use default rates: give it this machine's readings
    bw = bandwidths().rates()
    rates = ["--cpu-bw", f"{bw['cpu'] / 1e9:.1f}"] + (["--gpu-bw", f"{bw['cuda'] / 1e9:.1f}"] if bw["cuda"] else [])
    res = {"command": " ".join(["python", *sys.argv]), "machine": machine_info(), "rates": rates, "rows": []}
    shipped = sorted(glob.glob(os.path.join(ROOT, "profiles", "*.yaml")))
    measured = {}                                      # a shipped profile is measured once, whatever the budget
    with tempfile.TemporaryDirectory() as tmp:
        for model in a.models.split(","):
            for gib in a.budgets.split(","):
                targets = "--target-devices=" + a.targets.format(gib=gib)
                plan = os.path.join(tmp, f"plan-{model}-{gib}.yaml")
                predicted, rules = run_plan(model, targets, a.n * 2, a.format, rates, plan, extra)
                row = {"model": model, "budget_gib": float(gib), "format": a.format, "context": a.n * 2,
                       "predicted_tps": predicted, "plan": rules, "measured": bench(plan, a.n, a.reps, extra, tmp)}
                row["measured_over_predicted"] = row["measured"]["tps_mean"] / predicted
                row["shipped"] = {}
                for p in shipped:
                    with open(p, encoding="utf-8") as f:
                        if (yaml.safe_load(f) or {}).get("model") != model:
                            continue
                    if ktcli("validate-config", p, targets, *extra, check=False).returncode == 0:
                        fmt = cpu_format(p)
                        if fmt != a.format:                       # named, not measured: another model numerically
                            row["shipped"][os.path.basename(p)] = {"format": fmt, "tps_mean": None}
                            continue
                        if p not in measured:
                            measured[p] = bench(p, a.n, a.reps, extra, tmp) | {"format": a.format}
                        row["shipped"][os.path.basename(p)] = measured[p]
                best = max((s["tps_mean"] for s in row["shipped"].values() if s["tps_mean"]), default=None)
                row["best_shipped_same_format_tps"] = best
                row["plan_over_best_shipped"] = row["measured"]["tps_mean"] / best if best else None
                res["rows"].append(row)
                write_atomic(a.out, json.dumps(res, indent=2))
                print(f"{model} {gib} GiB {a.format}: predicted {predicted:.2f}, measured "
                      f"{row['measured']['tps_mean']:.2f} t/s ({100 * row['measured_over_predicted']:.0f}%), "
                      f"best shipped {a.format} {best}", flush=True)


def repredict(path, targets, out):
    """A prediction is a pure function of the placement and the rates: a recorded run's rows are predicted again by
    today's model, kept beside the prediction made at the time, where today's plan places the same experts."""
    from ktcli.files import write_atomic
    with open(path, encoding="utf-8") as f:
        res = json.load(f)
    with tempfile.TemporaryDirectory() as tmp:
        for row in res["rows"]:
            target = "--target-devices=" + targets.format(gib=f"{row['budget_gib']:g}")
            predicted, rules = run_plan(row["model"], target, row.get("context", 256), row.get("format", "bf16"),
                                        res["rates"], os.path.join(tmp, "plan.yaml"))
            if rules != row["plan"]:
                sys.exit(f"{row['model']} {row['budget_gib']:g} GiB: today's plan places experts otherwise")
            row["predicted_tps_now"] = predicted
            row["measured_over_predicted_now"] = row["measured"]["tps_mean"] / row["predicted_tps_now"]
            print(f"{row['model']} {row['budget_gib']:g} GiB: predicted then {row['predicted_tps']:.2f}, now "
                  f"{row['predicted_tps_now']:.2f}, measured {row['measured']['tps_mean']:.2f} t/s "
                  f"({100 * row['measured_over_predicted_now']:.0f}%)")
    res["repredicted"] = "python " + " ".join(sys.argv)
    write_atomic(out, json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
