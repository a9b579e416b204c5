"""benchmarks/README.md's tables, rendered from the raw JSON they cite, so a table cannot disagree with its file.

Each table sits between `<!-- table KIND FILE -->` and `<!-- end -->`; this script rewrites what is between them.

    python benchmarks/tables.py            # rewrite the tables in place
    python benchmarks/tables.py --check    # exit 1 if any table differs from its file (tests/test_docs.py)

KIND: `decode` / `prefill` (ktcli bench rows), `kernel` (cpu_experts.py rows), `parity` (graph_parity.py runs),
`baselines` (ktcli bench rows with --baseline).
"""
from __future__ import annotations

import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
README = os.path.join(HERE, "README.md")
BLOCK = re.compile(r"(<!-- table (\w+) (\S+) -->\n)(.*?)(<!-- end -->)", re.S)


def _load(path):
    with open(os.path.join(HERE, path), encoding="utf-8") as f:
        return json.load(f)


def provenance(d) -> str:
    m = d.get("machine") or {}
    where = " + ".join(x for x in (m.get("gpu"), m.get("cpu")) if x)
    commit = str(m.get("git_commit") or "unknown")[:12]
    env = " ".join(f"{k}={v}" for k, v in (m.get("ktcli_env") or {}).items())     # A/B switches set for the run
    return f"`{d.get('command')}` — {where}, torch {m.get('torch')}, commit {commit}" + (f", with `{env}`" if env else "")


def _table(head, rows):
    numeric = lambda h: any(k in h for k in ("t/s", "%", "ms", "µs", "GB/s", "×", "tokens")) or h == "T"  # noqa: E731
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "|".join("---:" if numeric(h) else "---" for h in head) + "|"]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def _bench_records(d):
    from ktcli.report.bench import add_baseline_ratios, finish
    recs = [finish(dict(r)) for r in d["results"]]
    add_baseline_ratios(recs)
    return recs


def _model(r):
    n, full = r.get("num_layers"), r.get("num_layers_full")
    return r["model"] + (f" ({n}/{full} layers)" if n != full else "")


def _tps(r):
    return f"error: {r['error']}" if r.get("error") else f"{r['tps_mean']:.2f} ± {r['tps_sd']:.2f}"


def _us(v) -> str:
    return f"{v:.0f}" if v is not None else ""


def decode(d, kind="tg") -> str:
    rows = []
    pre = any(r.get("prefill_roofline") for r in d["results"])      # streamed prefill rows carry their roofline
    split = any((r.get("prefill_phases") or {}).get("layers_split") for r in d["results"])
    scale = any((r.get("prefill_phases") or {}).get("cpu_scale") for r in d["results"])
    routed = any((r.get("prefill_phases") or {}).get("layers_routed") for r in d["results"])
    comp = any(r.get("compile") for r in d["results"])
    for r in _bench_records(d):
        if r["backend"] != "ktcli" or not r["test"].startswith(kind):
            continue
        b = r.get("breakdown") or {}
        row = [_model(r), os.path.basename(r["profile"]), r.get("graphs", ""), r["test"], _tps(r)]
        if comp:
            row.insert(3, "on" if r.get("compile") else "off")
        if kind == "tg":
            row += [f"{100 * r['roofline_ratio']:.1f}%" if r.get("roofline_ratio") else "",
                    f"{r['roofline']['best_tps']:.2f}" if r.get("roofline") else "",
                    f"{b.get('cpu_experts_ms', 0):.2f}", f"{b.get('ms_per_token', 0):.2f}",
                    _us(b.get("kernel_us_per_layer")), _us(b.get("fixed_us_per_layer"))]
        elif pre:
            roof, ph = r.get("prefill_roofline"), r.get("prefill_phases") or {}   # none: a CPU-only row
            row += [f"{100 * r['roofline_ratio']:.1f}%" if r.get("roofline_ratio") else "",
                    f"{roof['best_tps']:.0f}" if roof else "", f"{ph.get('upload_s', 0):.3f}" if roof else "",
                    f"{ph.get('stall_s', 0):.3f}" if roof else ""]
            if split:
                row += [f"{ph.get('layers_split', 0):.0f} / {ph.get('split_cpu_s', 0):.3f}"]
            if scale:
                from ktcli.report.bench import calibration_text
                row += [calibration_text(ph.get("cpu_scale") or {})]
            if routed:   # per routed layer: the experts the GPU took of those the chunk touched
                n = ph.get("layers_routed", 0)
                per = f"{ph['routed_gpu_experts'] / n:.1f} / {ph['routed_touched'] / n:.1f}" if n else ""
                row += [f"{n:.3g}", per]      # a mean over repetitions: 0.333 is one layer in one of three
        rows.append(row)
    head = ["model", "profile", "graphs", "test", "t/s"]
    if comp:
        head.insert(3, "compile")
    if kind == "tg":
        head += ["% roofline", "roofline t/s", "CPU experts ms", "token ms", "kernel µs / CPU layer",
                 "fixed µs / CPU layer"]
    elif pre:
        head += ["% roofline", "roofline t/s", "uploads s", "GPU stalled on uploads s"]
        head += ["split layers / their CPU s"] if split else []
        head += ["split CPU time ÷ probed"] if scale else []
        head += ["routed layers", "GPU / touched experts a layer"] if routed else []
    out = _table(head, rows)
    if kind == "tg" and d.get("bandwidth"):
        from ktcli.report.bench import ceiling_line
        out += "\n\n" + ceiling_line(d["bandwidth"])
    return out


def prefill(d) -> str:
    return decode(d, kind="pp")


def kernel(d) -> str:
    c = d.get("ceiling")
    if c is None:   # a run cut short before its first write with a ceiling: what the file holds
        rates = [d["read_bw"]] + [r[f"{w}_GBps"] * 1e9 for r in d["rows"] for w in ("kernel", "torch")
                                  if r[f"{w}_GBps"] == r[f"{w}_GBps"]]
        c = {"value": max(rates), "source": "start probe and rows only: the run was cut short, its paired "
                                            "readings were not saved"}
    rows, amx = [], any("amx" in r for r in d["rows"])   # runs since the AMX path: its knob and TFLOP/s shown
    swept = [k for k in ("chunk", "prefetch", "amx_pf") if len({r.get(k) for r in d["rows"]}) > 1]   # a sweep's knobs
    for r in d["rows"]:
        pct = lambda gbps: 100 * gbps * 1e9 / c["value"]   # noqa: E731
        torch_txt = "" if r["torch_ms"] != r["torch_ms"] else f"{r['torch_GBps']:.1f} ({pct(r['torch_GBps']):.1f}%)"
        extra = [{1: "on", 0: "off"}.get(r.get("amx"), "-"), f"{r.get('kernel_TFLOPs', 0):.2f}"] if amx else []
        rows.append([r["format"], str(r["T"]), *extra, *(str(r.get(k)) for k in swept), f"{r['kernel_ms']:.3f}", f"{r['kernel_GBps']:.1f}",
                     f"{pct(r['kernel_GBps']):.1f}%", torch_txt, f"{r['rel_err_vs_dequant_fp32']:.1e}"])
    return (_table(["format", "T", *(["AMX", "TFLOP/s"] if amx else []), *swept, "kernel ms", "GB/s", "% of ceiling",
                    "stock torch GB/s (% of ceiling)", "error vs fp32 ref"], rows)
            + f"\n\nceiling {c['value'] / 1e9:.1f} GB/s ({c['source']})")


def parity(d) -> str:
    rows = []
    for run in d["runs"]:
        m = run["modes"]
        eq = lambda k: "" if k not in m else ("yes" if m[k]["equal_to_off"] else f"no (from token {m[k]['first_diff']})")  # noqa: E731
        rows.append([f"{run['model']} / {run['layers']}", run["placement"], str(m["off"]["tokens"]), eq("piecewise"),
                     eq("full"), " / ".join(f"{m[k]['decode_tps']:.2f}" for k in ("off", "piecewise", "full") if k in m)])
    return _table(["model / layers", "placement", "tokens", "piecewise = off", "full = off",
                   "t/s off / piecewise / full"], rows)


def baselines(d) -> str:
    recs = _bench_records(d)
    labels = sorted({b for r in recs for b in (r.get("vs_baseline") or {})})
    rows = []
    for r in recs:
        vs = r.get("vs_baseline") or {}
        rows.append([r.get("label", r["backend"]), r.get("placement", ""), r.get("graphs", ""), r["test"], _tps(r)]
                    + [f"{vs[b]:.2f}" if b in vs else "" for b in labels])
    return _table(["backend", "placement", "graphs", "test", "t/s"] + [f"× {b}" for b in labels], rows)


def plan(d) -> str:
    """plan_check.py: each budget's plan, predicted vs measured tg, against the shipped profiles of its format."""
    rows = []
    for r in d["rows"]:
        pred = r.get("predicted_tps_now", r["predicted_tps"])
        best = r.get("best_shipped_same_format_tps")
        m = r["measured"]
        rows.append([r["model"], f"{r['budget_gib']:g} GiB", r.get("format", "bf16"), f"{pred:.2f}"
                     + (f" ({r['predicted_tps']:.2f} then)" if "predicted_tps_now" in r else ""),
                     f"{m['tps_mean']:.2f} ± {m['tps_sd']:.2f}", f"{100 * m['tps_mean'] / pred:.0f}%",
                     f"{best:.2f}" if best else "none fits",
                     f"{r['plan_over_best_shipped']:.2f}" if r.get("plan_over_best_shipped") else ""])
    return _table(["model", "GPU budget", "CPU format", "predicted t/s", "measured tg128 t/s",
                   "measured % of predicted", "best shipped t/s (same format)", "× best shipped"], rows)


def serve(d) -> str:
    """serve_vs_bench.py --interleaved: one long completion through the server vs bench's tg, same engine. The
    profile is the one on the command line (the file's `profile` may be a copy written for the demo tokenizer)."""
    profile = next((a for a in d["command"].split() if a.endswith(".yaml")), d["profile"])
    return _table(["profile", "graphs", "tokens", "rounds", "serve t/s (median)", "bench t/s (median)",
                   "serve % of bench"],
                  [[os.path.basename(profile), d.get("engine", {}).get("graphs", ""), str(d["tokens"]),
                    str(len(d["serve_tps"])), f"{d['serve_median']:.2f}", f"{d['bench_median']:.2f}",
                    f"{100 * d['serve_over_bench']:.1f}%"]])


def compile_ab(d) -> str:
    """compile_ab.py: one engine, a compiled and an eager decode graph, rounds alternated ABBA; medians."""
    rows = [[os.path.basename(d["profile"]), d["graphs"], which, str(len(d["rounds"][which])), f"{m['tps']:.2f}",
             f"{m['ms_per_token']:.2f}", f"{m['cpu_experts_ms']:.2f}", f"{m['rest_ms']:.2f}",
             f"{d['compiled_over_eager']:.3f}" if which == "on" else ""]
            for which, m in ((w, d["median"][w]) for w in ("off", "on"))]
    return _table(["profile", "graphs", "compile", "rounds", "tg t/s (median)", "token ms", "CPU experts ms",
                   "rest ms", "on ÷ off"], rows)


KINDS = {"decode": decode, "prefill": prefill, "kernel": kernel, "parity": parity, "baselines": baselines,
         "plan": plan, "serve": serve, "compile_ab": compile_ab}


def render(text: str) -> str:
    def block(m):
        d = _load(m.group(3))
        return f"{m.group(1)}{provenance(d)}\n\n{KINDS[m.group(2)](d)}\n{m.group(5)}"
    return BLOCK.sub(block, text)


def main(argv) -> int:
    with open(README, encoding="utf-8") as f:
        text = f.read()
    new = render(text)
    if "--check" in argv:
        if new != text:
            print("benchmarks/README.md tables differ from their JSON: run python benchmarks/tables.py")
            return 1
        return 0
    with open(README, "w", encoding="utf-8") as f:
        f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
