"""Run every combination of a bench sweep; a failing combination becomes an error row, the rest still run."""
from __future__ import annotations

import gc
import os
import platform
import subprocess
from dataclasses import dataclass, replace

import torch

from ..errors import KtcliError
from ..placement.checks import check_graphs
from .bandwidth import bandwidths, cpu_model
from .roofline import decode_bytes, roofline


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
    measure_bw: bool = False


def placement_summary(plan) -> str:
    from ..placement.checks import ranges
    by = {}
    for e in plan.experts:
        by.setdefault(f"{'gpu' if e.decode.device.startswith('cuda') else 'cpu'}/{e.decode.op}", []).append(e.layer)
    return " ".join(f"{k}:{ranges(v)}" for k, v in by.items())


def machine_info() -> dict:
    import transformers
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "host": platform.node(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        sha = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5).stdout.strip()
        info["git_commit"] = sha if len(sha) == 40 else None   # a copy without history prints "HEAD"
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def count_steps(sw: Sweep) -> int:
    per = (sw.warmup + sw.reps)
    models = len({(p.model, p.num_layers) for p in sw.profiles})
    return per * (len(sw.profiles) * len(sw.tests) * max(len(sw.graph_modes), 1)
                  + models * len(sw.baselines) * len(sw.baseline_tests))


def run(sw: Sweep, tick=None, saved=None) -> list:
    """`saved(records)` is called after every row, so a long sweep cut short keeps what it measured."""
    from ..model.build import build
    from ..placement.validate import validate
    from .generate import Engine
    records = []
    bw = None
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
            if prof.runtime.cpu_threads:
                torch.set_num_threads(prof.runtime.cpu_threads)
            built = build(v)
        except KtcliError as e:
            base_err = e.message
        common = {"profile": prof.path, "model": v.source.name if v and v.source else prof.model,
                  "backend": "ktcli", "threads": prof.runtime.cpu_threads or torch.get_num_threads()}
        if built is not None:
            if bw is None:
                bw = bandwidths(remeasure=sw.measure_bw)
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
                    engine.prepare()
                except (KtcliError, RuntimeError) as e:
                    err = getattr(e, "message", None) or str(e).splitlines()[0]
            for kind, n in sw.tests:
                rec = {**common, "graphs": mode, "test": f"{kind}{n}", "n": n, "samples": [], "error": err}
                if err is None:
                    try:
                        rec.update(run_one(engine, kind, n, sw, tick))
                        if kind == "tg":
                            rec["roofline"] = roofline(decode_bytes(built, context=n // 2), bw)
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
    return records


def run_one(engine, kind, n, sw, tick):
    from .bench import run_test
    return run_test(engine, kind, n, sw.reps, sw.warmup, tick=tick)


def run_baseline(kind, source, prof, sw, tick):
    from .baselines import build_baseline, run_baseline_test
    common = {"profile": prof.path, "model": source.name, "backend": kind, "placement":
              "experts offloaded" if kind == "hf-accelerate" else "all gpu", "graphs": "off",
              "threads": torch.get_num_threads(), "num_layers": source.config.num_hidden_layers,
              "num_layers_full": getattr(source.config, "_ktcli_full_layers", source.config.num_hidden_layers)}
    out, model, err = [], None, None
    try:
        model = build_baseline(kind, source, prof.dtype, synthetic=prof.weights == "synthetic")
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
