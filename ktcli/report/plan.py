"""`ktcli plan`'s output: a table, and the profile as commented YAML that validate-config accepts unchanged."""
from __future__ import annotations

import datetime

import yaml

from ..placement.checks import fmt_bytes, ranges


def rule_dict(r) -> dict:
    match = {k: v for k, v in (("name", r.name), ("class", r.match_class)) if v is not None}
    out = {"match": match, "replace": {"class": r.replace_class, **({"kwargs": dict(r.kwargs)} if r.kwargs else {})}}
    if not r.recursive:
        out["recursive"] = False
    return out


def summary_rows(fit, machine) -> list:
    rows = [("experts on the GPU", f"layers {ranges(fit.gpu_layers)}" if fit.gpu_layers else "none"),
            ("experts on the CPU", (f"layers {ranges(fit.cpu_layers)} ({fit.fmt})" if fit.cpu_layers else "none")),
            ("kept as your rules say", f"layers {ranges(fit.pinned)}" if fit.pinned else "none")]
    if fit.segments:       # several GPUs
        rows.insert(0, ("decoder layers", ", ".join(
            f"{d}: {ranges(ls)}" + (f" (experts of {ranges(ex)})" if ex else "") for d, ls, ex in fit.segments if ls)
            + f"; {fit.rates.boundary_s * 1e6:.0f} µs assumed per GPU boundary"))
    for dev in sorted(fit.memory.rows):
        use, have = fit.memory.total(dev), machine.devices.get(dev)
        rows.append((f"memory {dev}", f"{fmt_bytes(use)} of {fmt_bytes(fit.budget[dev])} usable"
                                      + (f" ({fmt_bytes(have)} free)" if have else "")))
    r = fit.rates
    rows += [("predicted decode", f"{fit.decode_tps:.2f} t/s (roofline {fit.roofline_tps:.2f}: "
              + ", ".join(f"{d} {b / 1e9:.2f} GB/token" for d, b in fit.bytes_per_token.items())
              + f" at CPU {r.cpu_bw / 1e9:.0f} GB/s, GPU {r.gpu_bw / 1e9:.0f} GB/s; CPU experts at "
              f"{100 * r.cpu_kernel_eff:.0f}% of that and {r.cpu_expert_s * 1e6:.0f} µs an expert, "
              f"{r.layer_s * 1e3:.2f} ms a layer besides)"),
             ("predicted prefill", f"pp{r.prefill_tokens} {fit.prefill_tps:.1f} t/s (CPU-resident experts uploaded at "
              f"{r.pcie_bw / 1e9:.0f} GB/s, run on the CPU at {r.cpu_prefill_flops / 1e12:.2f} TFLOP/s, or split "
              f"between the two, whichever is fastest; GPU at {r.gpu_flops / 1e12:.0f} TFLOP/s)"),
             ("rates from", r.source)]
    return rows + [("note", n) for n in fit.notes]


def render(fit, machine, console) -> None:
    from rich.table import Table
    t = Table(title=f"Plan — {fit.profile.model}", show_header=False, title_justify="left")
    for k, v in summary_rows(fit, machine):
        t.add_row(k, v)
    console.print(t)


def to_yaml(fit, machine, command: str) -> str:
    p = fit.profile
    head = [f"# Made by `{command}` on {datetime.date.today().isoformat()}.", "#"]
    head += [f"# {k}: {v}" for k, v in summary_rows(fit, machine)]
    data = {"model": p.model, "weights": p.weights, "dtype": p.dtype, "device": p.device,
            **({"num_layers": p.num_layers} if p.num_layers else {}),
            "runtime": {k: v for k, v in (("use_cuda_graph", p.runtime.use_cuda_graph),
                                          ("graph_mode", p.runtime.graph_mode),
                                          ("max_seq_len", p.runtime.max_seq_len),
                                          ("cpu_threads", p.runtime.cpu_threads),
                                          ("prefill_chunk", p.runtime.prefill_chunk)) if v is not None},
            "rules": [rule_dict(r) for r in p.rules]}
    return "\n".join(head) + "\n" + yaml.safe_dump(data, sort_keys=False, width=120)
