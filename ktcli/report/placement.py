"""Render a Validation: placement table, memory table, findings."""
from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..placement.checks import fmt_bytes, ranges

_STYLE = {"error": "bold red", "warning": "yellow", "note": "dim"}


def placement_rows(plan) -> list:
    """Consecutive layers with the same placement collapse into one row."""
    rows = []
    for e in plan.experts:
        key = (e.prefill.device, e.prefill.op, e.decode.device, e.decode.op, e.weight_format,
               e.rule.label if e.rule else "default")
        if rows and rows[-1]["key"] == key and rows[-1]["layers"][-1] == e.layer - 1:
            rows[-1]["layers"].append(e.layer)
        else:
            rows.append({"key": key, "layers": [e.layer]})
    return [dict(zip(("prefill_device", "prefill_op", "decode_device", "decode_op", "weight_format", "rule"), r["key"]),
                 layers=ranges(r["layers"])) for r in rows]


def as_dict(v) -> dict:
    out = {"ok": v.ok, "profile": v.profile.path,
           "findings": [{"severity": f.severity, "check": f.check, "message": f.message, "where": f.where,
                         "fix": f.fix} for f in v.findings]}
    if v.plan is not None:
        p = v.plan
        out.update(model=v.source.spec, model_type=p.model_type, num_layers=p.num_layers,
                   graph_mode=v.profile.runtime.mode, dtype=v.profile.dtype,
                   devices={"main": p.main_device, "attention": p.main_device, "shared_experts": p.main_device,
                            "embedding": p.embed_device, "lm_head": p.lm_head_device,
                            "layers": [{"device": d, "layers": f"{a}-{b}" if a != b else f"{a}"}
                                       for d, a, b in p.segments]},
                   experts=placement_rows(p))
    if v.memory is not None:
        out["memory"] = {d: {**{k: int(b) for k, b in items.items()}, "total": v.memory.total(d),
                             "capacity": v.machine.devices.get(d)} for d, items in v.memory.rows.items()}
    return out


def render(v, console: Console) -> None:
    d = as_dict(v)
    if v.plan is not None:
        t = Table(title=f"Placement — {d['model']} ({d['model_type']}, {d['num_layers']} layers, {d['dtype']}, "
                        f"graphs {d['graph_mode']})", title_justify="left")
        for col in ("layers", "prefill experts", "decode experts", "format", "rule"):
            t.add_column(col)
        for r in d["experts"]:
            t.add_row(r["layers"], f"{r['prefill_device']} / {r['prefill_op']}", f"{r['decode_device']} / {r['decode_op']}",
                      r["weight_format"], escape(r["rule"]))
        console.print(t)
        dv = d["devices"]
        segs = dv["layers"]
        where = (f"[bold]{dv['main']}[/]" if len(segs) <= 1 else
                 ", ".join(f"[bold]{s['device']}[/] (layers {s['layers']})" for s in segs))
        console.print(f"attention, router, shared experts: {where}   embedding: {dv['embedding']}   "
                      f"lm_head: {dv['lm_head']}")
    if v.memory is not None:
        t = Table(title="Memory (estimated)", title_justify="left")
        for col in ("device", "breakdown", "total", "capacity"):
            t.add_column(col)
        for dev, row in d["memory"].items():
            items = ", ".join(f"{k} {fmt_bytes(b)}" for k, b in row.items() if k not in ("total", "capacity"))
            cap = "?" if row["capacity"] is None else fmt_bytes(row["capacity"])
            t.add_row(dev, items, fmt_bytes(row["total"]), cap)
        console.print(t)
    for f in v.findings:
        console.print(f"[{_STYLE[f.severity]}]{f.severity}[/]: {escape(f.line())}", soft_wrap=True)
        if f.fix:
            console.print(f"  [dim]fix:[/] {escape(f.fix)}", soft_wrap=True)
    n_err = len(v.errors())
    console.print("[bold green]OK[/]: this run would work." if v.ok else
                  f"[bold red]FAIL[/]: {n_err} error{'s' if n_err > 1 else ''}; this run would fail.")
