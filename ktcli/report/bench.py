"""Bench records → markdown (llama-bench's shape), csv, json, jsonl."""
from __future__ import annotations

import csv
import io
import json
import os

from ..engine.timing import mean_sd

COLUMNS = ("model", "profile", "size", "params", "backend", "placement", "graphs", "threads", "test", "t/s")


def finish(rec: dict) -> dict:
    rec["tps_mean"], rec["tps_sd"] = mean_sd(rec.get("samples") or [])
    roof = rec.get("roofline")
    if roof and rec["test"].startswith("tg") and roof.get("best_tps") and rec["tps_mean"]:
        rec["roofline_ratio"] = rec["tps_mean"] / roof["best_tps"]
    pre = rec.get("prefill_roofline")
    if pre and pre.get("best_tps") and rec["tps_mean"]:
        rec["roofline_ratio"] = rec["tps_mean"] / pre["best_tps"]
    return rec


def _kind(test: str) -> str:
    """Decode rates compare across lengths (slow baselines run shorter tg); prefill compares like for like."""
    return "tg" if test.startswith("tg") else test


def add_baseline_ratios(records: list) -> None:
    """Every baseline row is shown and gets its own label; a backend measured more than once on a model and test
    kind is labelled `backend#1`, `backend#2` in run order, and each ktcli row carries a ratio to each label."""
    seen = {}
    for r in records:
        if r["backend"] != "ktcli":
            key = (r["model"], _kind(r["test"]), r["backend"])
            seen.setdefault(key, []).append(r)
    base = {}
    for (m, t, b), rows in seen.items():
        for i, r in enumerate(rows, 1):
            r["label"] = b if len(rows) == 1 else f"{b}#{i}"
            if not r.get("error") and r.get("tps_mean"):
                base[(m, t, r["label"])] = r["tps_mean"]
    for r in records:
        if r["backend"] == "ktcli" and r.get("tps_mean"):
            r["vs_baseline"] = {b: r["tps_mean"] / v for (m, t, b), v in base.items()
                                if m == r["model"] and t == _kind(r["test"])}


def _gib(n):
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _params(n):
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def calibration_text(cpu_scale: dict) -> str:
    """A streamer's split calibration ({shortest length of a bucket: measured ÷ probed}) as 'T 512-1023: 1.29×'."""
    return ", ".join(f"T {k}-{2 * int(k) - 1}: {v:.2f}×" for k, v in cpu_scale.items())


def md(records: list, meta: dict) -> str:
    baselines = sorted({b for r in records for b in (r.get("vs_baseline") or {})})
    cols = list(COLUMNS) + ["% roofline"] + [f"× {b}" for b in baselines]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" if c in ("t/s", "% roofline") or c.startswith("×")
                                                             else "---" for c in cols) + "|"]
    for r in records:
        tps = f"error: {r['error']}" if r.get("error") else f"{r['tps_mean']:.2f} ± {r['tps_sd']:.2f}"
        row = [r["model"] + (f" ({r['num_layers']}/{r['num_layers_full']} layers)"
                             if r.get("num_layers") != r.get("num_layers_full") else ""),
               os.path.basename(r.get("profile") or ""),
               _gib(r.get("size_bytes", 0)), _params(r.get("params", 0)), r.get("label", r["backend"]),
               r.get("placement", ""),
               r.get("graphs", ""), str(r.get("threads", "")), r["test"], tps,
               f"{100 * r['roofline_ratio']:.1f}%" if r.get("roofline_ratio") else ""]
        row += [f"{r['vs_baseline'][b]:.2f}" if b in (r.get("vs_baseline") or {}) else "" for b in baselines]
        lines.append("| " + " | ".join(row) + " |")
    out = "\n".join(lines)
    stages = [r for r in records if r.get("breakdown")]
    if stages:
        out += ("\n\n| backend | graphs | test | ms/token | CPU experts ms | of which kernel ms | kernel µs / CPU layer "
                "| fixed µs / CPU layer | of which graph step µs | waiting for GPU ms | transfers + launch + other ms |"
                "\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
        out += "\n".join(f"| {r['backend']} | {r.get('graphs', '')} | {r['test']} | {b['ms_per_token']:.3f} "
                         f"| {b['cpu_experts_ms']:.3f} | {_num(b.get('kernel_ms'), 3)} "
                         f"| {_num(b.get('kernel_us_per_layer'), 1)} | {_num(b.get('fixed_us_per_layer'), 1)} "
                         f"| {_num(b.get('step_us'), 1)}{' (' + b['cpu_step_kind'] + ')' if b.get('cpu_step_kind') else ''} "
                         f"| {_opt(b, 'gpu_wait_ms', r)} | {_opt(b, 'other_ms', r)} |"
                         for r in stages for b in [r["breakdown"]])
    roofs = {r["model"] + " / " + r.get("placement", ""): r["roofline"] for r in records if r.get("roofline")}
    for name, roof in roofs.items():
        parts = [f"{d} reads {b / 1e9:.2f} GB/token at {roof['bandwidth'][d] / 1e9:.1f} GB/s"
                 for d, b in roof["bytes_per_token"].items() if roof["bandwidth"].get(d)]
        out += f"\n\nroofline ({name}): " + "; ".join(parts) + f" → best {roof['best_tps']:.2f} t/s"
    for r in records:
        pre, ph = r.get("prefill_roofline"), r.get("prefill_phases")
        if pre and ph:
            rt = pre["rates"]
            out += (f"\n\nprefill roofline ({r['test']}, chunks of {pre['chunk']}): layer-chunks "
                    + ", ".join(f"{k} {v}" for k, v in pre["layer_chunks"].items() if v)
                    + f" at PCIe {rt['pcie_GBps']:.1f} GB/s, CPU {rt['cpu_GBps']:.1f} GB/s / {rt['cpu_TFLOPs']:.2f} "
                    f"TFLOP/s, GPU {rt['gpu_TFLOPs']:.0f} TFLOP/s → best {pre['best_tps']:.0f} t/s; per run: uploads "
                    f"{ph['upload_bytes'] / 1e9:.1f} GB in {ph['upload_s']:.3f} s, GPU stalled on uploads "
                    f"{ph['stall_s']:.3f} s, layer-chunks streamed {ph['layers_streamed']:.0f} / CPU {ph['layers_cpu']:.0f}"
                    + (f" / split {ph['layers_split']:.0f} ({split_text(ph)})" if ph.get("layers_split") else "")
                    + (f" / routed {ph['layers_routed']:.0f} ({routed_text(ph)})" if ph.get("layers_routed") else "")
                    + ("; split CPU time ÷ probed: " + calibration_text(ph["cpu_scale"])
                       if ph.get("cpu_scale") else "")
                    + ("; CPU layers' time ÷ probed: " + calibration_text(ph["cpu_alone_scale"])
                       if ph.get("cpu_alone_scale") else "")
                    + ("; routed CPU share's time ÷ probed: " + calibration_text(ph["routed_scale"])
                       if ph.get("routed_scale") else "")
                    + (f"; the CPU thread spent {ph['moe_s']:.3f} s of {ph['run_s']:.3f} s in MoE layers"
                       if ph.get("moe_s") and ph.get("run_s") else ""))
        elif pre:   # no layer streams: the CPU's rates (and the GPU's, for attention on one)
            rt = pre["rates"]
            out += (f"\n\nprefill roofline ({r['test']}, chunks of {pre['chunk']}): layer-chunks "
                    + ", ".join(f"{k} {v}" for k, v in pre["layer_chunks"].items() if v)
                    + f" at CPU {rt['cpu_GBps']:.1f} GB/s / {rt['cpu_TFLOPs']:.2f} TFLOP/s"
                    + (f", GPU {rt['gpu_TFLOPs']:.0f} TFLOP/s" if rt.get("gpu_TFLOPs") else "")
                    + f" → best {pre['best_tps']:.0f} t/s")
    if meta.get("bandwidth"):
        out += "\n\n" + ceiling_line(meta["bandwidth"])
    if meta.get("notes"):
        out += "\n\n" + "\n".join(f"note: {n}" for n in meta["notes"])
    return out + "\n"


def ceiling_line(bw: dict) -> str:
    """Where the roofline's bandwidths come from: this run's readings, raised by faster rates the run reached."""
    parts = []
    for dev in ("cpu", "cuda"):
        c = bw.get(dev)
        if not c:
            continue
        n, k = sum(len(v) for v in c["readings"].values()), len(c["readings"])
        txt = f"{dev} {c['value'] / 1e9:.1f} GB/s = max of {n} readings ({k} reader{'s' if k > 1 else ''})"
        if c["raised_by"]:
            txt += f", raised by {c['raised_by'][-1]['source']}"
        parts.append(txt)
    return f"bandwidth ceilings ({bw['source']}, {bw['measured_at']}): " + "; ".join(parts)


def _num(v, digits):
    return "" if not v else f"{v:.{digits}f}"


def _opt(b, key, r):
    """Under a full graph the host never waits mid-step, so GPU time is not separable there."""
    if key not in b:
        return ""
    return "n/a (one graph)" if r.get("graphs") == "full" else f"{b[key]:.3f}"


FLAT = ("model", "profile", "backend", "label", "placement", "graphs", "threads", "test", "n", "tps_mean", "tps_sd",
        "roofline_ratio", "num_layers", "num_layers_full", "size_bytes", "params", "error")
# llama-bench's own field names, so scripts written for its -o json / csv read ktcli's results too
LLAMA = ("build_commit", "cpu_info", "gpu_info", "backends", "model_filename", "model_type", "model_size",
         "model_n_params", "n_threads", "n_prompt", "n_gen", "test_time", "avg_ns", "stddev_ns", "avg_ts",
         "stddev_ts", "samples_ns", "samples_ts")


def llama_fields(rec: dict, machine: dict, when: str) -> dict:
    """The llama-bench fields of one record (ns per test run: n tokens ÷ t/s)."""
    ts = rec.get("samples") or []
    ns = [1e9 * rec["n"] / t for t in ts if t]
    kind = rec["test"][:2]
    return {"build_commit": (machine.get("git_commit") or "")[:7], "cpu_info": machine.get("cpu", ""),
            "gpu_info": machine.get("gpu", ""), "backends": rec["backend"], "model_filename": rec.get("profile") or "",
            "model_type": rec["model"], "model_size": rec.get("size_bytes", 0), "model_n_params": rec.get("params", 0),
            "n_threads": rec.get("threads", 0), "n_prompt": rec["n"] if kind == "pp" else 0,
            "n_gen": rec["n"] if kind == "tg" else 0, "test_time": when,
            "avg_ns": int(mean_sd(ns)[0]), "stddev_ns": int(mean_sd(ns)[1]), "avg_ts": rec["tps_mean"],
            "stddev_ts": rec["tps_sd"], "samples_ns": [int(x) for x in ns], "samples_ts": list(ts)}


def render(records: list, meta: dict, fmt: str) -> str:
    if fmt == "md":
        return md(records, meta)
    if fmt == "json":
        return json.dumps({**meta, "results": records}, indent=2) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps({**r, "machine": meta.get("machine")}) + "\n" for r in records)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=FLAT + ("samples",) + LLAMA, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({**r, "samples": ";".join(f"{s:.4f}" for s in r.get("samples") or []),
                        "samples_ns": ";".join(str(x) for x in r.get("samples_ns") or []),
                        "samples_ts": ";".join(f"{x:.4f}" for x in r.get("samples_ts") or [])})
        return buf.getvalue()
    raise ValueError(fmt)


def routed_text(ph: dict) -> str:
    """The routed layers: experts the GPU took of those touched, the wait for the router, the CPU share's time."""
    n = ph["layers_routed"]
    return (f"GPU took {ph['routed_gpu_experts'] / n:.1f} of {ph['routed_touched'] / n:.1f} touched experts a layer; "
            f"waited for routers {ph['routed_wait_s']:.3f} s, CPU share {ph['routed_cpu_s']:.3f} s, "
            f"then waited for it {ph['routed_join_s']:.3f} s")


def split_text(ph: dict) -> str:
    """The split layers' CPU side: its share's time, and of it the phases recorded (older records: fewer)."""
    names = {"split_gather_s": "gather", "split_kernel_s": "the experts", "split_post_s": "copy back"}
    out = f"CPU share {ph['split_cpu_s']:.3f} s"
    parts = [f"{v} {ph[k]:.3f} s" for k, v in names.items() if k in ph]
    if parts:
        out += ", of it " + ", ".join(parts)
    if "split_wait_s" in ph:
        out += f"; CPU waited for its inputs {ph['split_wait_s']:.3f} s"
    return out
