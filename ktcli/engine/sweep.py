"""Run every combination of a bench sweep; a failing combination becomes an error row, the rest still run.

Decode rows are judged against the roofline of this run's bandwidth ceilings (engine/bandwidth.py): the bytes
each device reads per token are kept with the row, and the roofline is computed from the ceilings as they stand
when the results are written, after every rate the run reached has been offered to them.
"""
from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, replace

import torch

from ..errors import KtcliError
from ..ops import kernels
from ..ops.clocks import KernelRate
from ..placement.checks import check_graphs
from .bandwidth import Bandwidths, bandwidths
from .roofline import cpu_expert_bytes, decode_bytes, roofline


@dataclass
class Sweep:
    profiles: list           # Profile objects (flags already applied)
    tests: list              # [("pp", 512), ("tg", 128)]
    graph_modes: list        # per profile: None = the profile's own
    reps: int
    warmup: int
    baselines: list
    baseline_tests: list
    machine: object
    cached_bw: bool = False  # use an earlier run's bandwidth readings (labelled as such)
    bw: Bandwidths | None = None
    routing: str = "model"   # model/routing.py: 'uniform' draws prefill tokens' experts at random


def placement_summary(plan) -> str:
    from ..placement.checks import ranges
    by = {}
    for e in plan.experts:
        by.setdefault(f"{'gpu' if e.decode.device.startswith('cuda') else 'cpu'}/{e.decode.op}", []).append(e.layer)
    return " ".join(f"{k}:{ranges(v)}" for k, v in by.items())


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def count_steps(sw: Sweep) -> int:
    per = (sw.warmup + sw.reps)
    models = len({(p.model, p.num_layers) for p in sw.profiles})
    return per * (len(sw.profiles) * len(sw.tests) * max(len(sw.graph_modes), 1)
                  + models * len(sw.baselines) * len(sw.baseline_tests))


def offer_rates(bw: Bandwidths, rec: dict) -> None:
    """Each decode repetition's own rates become candidates for the ceilings: the CPU experts' bytes over their
    time, the rest of the bytes over the rest of the time. With both offered, the roofline time of a token is at
    most any repetition's time, so no row can read above 100%."""
    experts, n = rec.get("cpu_expert_bytes_per_token") or 0, rec["n"]
    rest = {d: b - (experts if d == "cpu" else 0) for d, b in (rec.get("bytes_per_token") or {}).items()}
    rest = {d: b for d, b in rest.items() if b > 0}
    ceiling = {"cpu": bw.cpu, "cuda": bw.cuda}
    for i, r in enumerate(rec.get("reps") or []):
        cpu_s, rest_s = r["cpu_experts_s"] / n, (r["s"] - r["cpu_experts_s"]) / n
        what = f"{rec['profile']} {rec['graphs']} {rec['test']} rep {i}"
        if experts and cpu_s > 0:
            bw.cpu.offer(f"{what}: CPU experts", experts / cpu_s)
        if len(rest) == 1 and rest_s > 0:          # the rest of the token reads one device
            (dev, b), = rest.items()
            if ceiling.get(dev) is not None:
                ceiling[dev].offer(f"{what}: rest of the token", b / rest_s)


def rooflines(sw: Sweep, records: list) -> None:
    """Fill every decode row's roofline from the current ceilings (call before writing results)."""
    if sw.bw is None:
        return
    sw.bw.cpu.offer("fastest CPU-expert kernel call", KernelRate.take())
    for rec in records:
        if rec.get("bytes_per_token"):
            rec["roofline"] = roofline(rec["bytes_per_token"], sw.bw.rates())


def run(sw: Sweep, tick=None, saved=None, preparing=None) -> list:
    """`saved(records)` is called after every row, so a long sweep cut short keeps what it measured;
    `preparing(engine)`: a context around each engine's graph capture (the command's notice)."""
    from ..model.build import build
    from ..model.routing import set_routing
    from ..placement.validate import validate
    from .generate import Engine
    records = []
    threads0 = torch.get_num_threads()      # restored after each profile: results must not depend on order
    baselined = set()       # a baseline runs once per model, however many profiles share it
    for prof in sw.profiles:
        need = max(n for _, n in sw.tests) + 16
        if prof.runtime.max_seq_len < need:
            prof = replace(prof, runtime=replace(prof.runtime, max_seq_len=need))
        modes = sw.graph_modes or [prof.runtime.mode]
        built, base_err, v = None, None, None
        try:
            v = validate(replace(prof, runtime=replace(prof.runtime, graph_mode="off")), sw.machine)
            v.refuse_if_failing()
            torch.set_num_threads(prof.runtime.cpu_threads or threads0)
            kernels.get()                    # compiled (first use) before any timing, not inside the first rep
            built = build(v)
            set_routing(built.model, sw.routing)
        except KtcliError as e:
            base_err = e.message
        common = {"profile": prof.path, "model": v.source.name if v and v.source else prof.model,
                  "backend": "ktcli", "threads": prof.runtime.cpu_threads or torch.get_num_threads(),
                  "compile": prof.runtime.compile, "routing": sw.routing}
        if built is not None:
            if sw.bw is None:
                sw.bw = bandwidths(cached_ok=sw.cached_bw)
            cfg = built.model.config
            full = getattr(v.source.config, "_ktcli_full_layers", None)
            common.update(placement=placement_summary(built.plan), num_layers=cfg.num_hidden_layers,
                          num_layers_full=full or cfg.num_hidden_layers,
                          size_bytes=sum(built.weight_bytes.values()),
                          params=sum(p.numel() for p in built.model.parameters()), dtype=prof.dtype,
                          weights="synthetic" if prof.weights == "synthetic" or v.source.checkpoint_dir is None else "checkpoint",
                          load_s=built.timings["load"])
        for mode in modes:
            err, engine = base_err, None
            if err is None:
                try:
                    # the plan does not change with the graph mode; only the graph check does
                    prof_mode = replace(prof, runtime=replace(prof.runtime, graph_mode=mode))
                    replace(v, findings=check_graphs(prof_mode, v.plan)).refuse_if_failing()
                    engine = Engine(built, graph_mode=mode)
                    with preparing(engine) if preparing else contextlib.nullcontext():
                        engine.prepare()
                except (KtcliError, RuntimeError) as e:
                    err = getattr(e, "message", None) or str(e).splitlines()[0]
            for kind, n in sw.tests:
                rec = {**common, "graphs": mode, "test": f"{kind}{n}", "n": n, "samples": [], "error": err}
                if err is None:
                    try:
                        rec.update(run_one(engine, kind, n, sw, tick))
                        if kind == "tg":
                            rec["bytes_per_token"] = decode_bytes(built, context=n // 2)
                            rec["cpu_expert_bytes_per_token"] = cpu_expert_bytes(built)
                            offer_rates(sw.bw, rec)
                        rec["capture_s"] = engine.capture_s
                    except (KtcliError, RuntimeError) as e:
                        rec["error"] = getattr(e, "message", None) or str(e).splitlines()[0]
                elif tick:
                    for _ in range(sw.warmup + sw.reps):
                        tick()
                records.append(rec)
                if saved:
                    saved(records)
            del engine
            _free()
        if built is not None:
            src = v.source
            del built
            _free()
            for b in sw.baselines:
                if (b, src.name, src.config.num_hidden_layers) in baselined:
                    continue
                baselined.add((b, src.name, src.config.num_hidden_layers))
                records += run_baseline(b, src, prof, sw, tick)
                if saved:
                    saved(records)
        torch.set_num_threads(threads0)
    return records


def run_one(engine, kind, n, sw, tick):
    from .bench import run_test
    return run_test(engine, kind, n, sw.reps, sw.warmup, tick=tick)


def run_baseline(kind, source, prof, sw, tick):
    from ..model.routing import set_routing
    from .baselines import build_baseline, run_baseline_test
    common = {"profile": prof.path, "model": source.name, "backend": kind, "routing": sw.routing, "placement":
              "experts offloaded" if kind == "hf-accelerate" else "all gpu", "graphs": "off",
              "threads": torch.get_num_threads(), "num_layers": source.config.num_hidden_layers,
              "num_layers_full": getattr(source.config, "_ktcli_full_layers", source.config.num_hidden_layers)}
    out, model, err = [], None, None
    try:
        model = build_baseline(kind, source, prof.dtype, synthetic=prof.weights == "synthetic")
        set_routing(model, sw.routing)       # the same routing as ktcli's rows
    except (KtcliError, RuntimeError) as e:   # e.g. CUDA out of memory: reported in its rows
        err = getattr(e, "message", None) or str(e).splitlines()[0]
    for t, n in sw.baseline_tests:
        rec = {**common, "test": f"{t}{n}", "n": n, "samples": [], "error": err}
        if err is None:
            try:
                rec.update(run_baseline_test(model, t, n, sw.reps, sw.warmup, tick=tick))
            except RuntimeError as e:
                rec["error"] = str(e).splitlines()[0]
        out.append(rec)
    del model
    _free()
    return out
