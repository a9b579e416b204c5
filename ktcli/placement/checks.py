"""Every pre-launch check: pure functions over (profile, plan, machine) returning findings."""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from ..ops.registry import OPERATORS, op_names, resolve_op
from .memory import estimate

ERROR, WARNING, NOTE = "error", "warning", "note"


@dataclass
class Finding:
    severity: str
    check: str
    message: str
    where: str | None = None      # file:line
    fix: str | None = None

    def line(self) -> str:
        loc = f"{self.where}: " if self.where else ""
        return f"{loc}{self.message}"


def ranges(nums) -> str:
    """[0,1,2,5] → '0-2,5'."""
    nums, out = sorted(set(nums)), []
    for n in nums:
        if out and n == out[-1][1] + 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out)


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def check_rules(profile, plan, model) -> list:
    """Rules that match nothing (warning), or that aim at layers the model does not have (error)."""
    from ..profile.ktransformers import classify, misspelled, nearest_class
    out = []
    for r in profile.rules:
        unknown = classify(r.replace_class) == "unknown"
        near = nearest_class(r.replace_class) if unknown else misspelled(r.replace_class, r.kwargs)
        if unknown or near:
            out.append(Finding(ERROR, "rule", f"{r.label}: unknown replace class '{r.replace_class}'"
                               + (f" (did you mean {near}?)" if near else ""), r.where,
                               "use Experts, default, or a KTransformers class (see docs/reference.md)"))
    layer_names = [n for n, _ in model.named_modules() if re.search(r"layers\.0(\.|$)", n)]
    n_layers = plan.num_layers
    for rule in profile.rules:
        if plan.rule_hits.get(rule.index):
            continue
        beyond = sorted({i for i in range(n_layers, n_layers + 256) for n in layer_names
                         if rule.name and re.search(rule.name, n.replace("layers.0", f"layers.{i}", 1))})
        full = getattr(model.config, "_ktcli_full_layers", n_layers)
        if beyond and min(beyond) < full:
            out.append(Finding(NOTE, "coverage", f"{rule.label} targets layer {ranges(beyond[:8])}, cut by "
                               f"--num-layers {n_layers}", rule.where))
        elif beyond:
            out.append(Finding(ERROR, "coverage", f"{rule.label} targets layer {ranges(beyond[:8])}"
                               f"{'…' if len(beyond) > 8 else ''}, but the model has {n_layers} layers "
                               f"(0-{n_layers - 1})", rule.where, "fix the layer indices in match.name"))
        else:
            out.append(Finding(WARNING, "coverage", f"{rule.label} matches no module of this {plan.model_type} model",
                               rule.where, "check match.name / match.class, or remove the rule"))
    unruled = [e.layer for e in plan.experts if e.rule is None]
    if profile.rules and unruled:
        out.append(Finding(WARNING, "coverage", f"experts of layer(s) {ranges(unruled)} are matched by no rule: "
                           f"they follow the default ({next(e.decode.device for e in plan.experts if e.rule is None)})",
                           profile.path, "add a rule for '^model\\.layers\\..*\\.mlp\\.experts$'"))
    return out


def _where(e, profile):
    return e.rule.where if e.rule else profile.where("rules")


def _group(plan, key):
    """Group expert placements by (rule, stage value) so one finding covers many layers."""
    groups = {}
    for e in plan.experts:
        groups.setdefault((id(e.rule), key(e)), []).append(e)
    return groups.values()


def check_operators(profile, plan) -> list:
    out = []
    for stage in ("prefill", "decode"):
        for es in _group(plan, lambda e: (getattr(e, stage).op, getattr(e, stage).device)):
            e, sp = es[0], getattr(es[0], stage)
            layers = ranges(x.layer for x in es)
            op = resolve_op(sp.op)
            label = e.rule.label if e.rule else "default placement"
            if op is None:
                names = [a for o in OPERATORS.values() for a in (o.name, *o.aliases)]
                near = difflib.get_close_matches(str(sp.op), names, n=1, cutoff=0.6)
                out.append(Finding(ERROR, "operator", f"{label}: unknown {stage} operator '{sp.op}' (layers {layers})"
                                   + (f" (did you mean {near[0]}?)" if near else ""),
                                   _where(e, profile), f"valid operators: {op_names()}"))
                continue
            if stage not in op.stages:
                good = [o.name for o in OPERATORS.values() if stage in o.stages]
                out.append(Finding(ERROR, "operator", f"{label}: operator '{op.name}' runs only in "
                                   f"{'/'.join(op.stages)}, but it is named for {stage} (layers {layers})",
                                   _where(e, profile), f"{stage} operators: {', '.join(good)}"))
                continue
            if sp.device.split(":")[0] not in op.devices:
                good = [o.name for o in OPERATORS.values()
                        if sp.device.split(":")[0] in o.devices and stage in o.stages]
                out.append(Finding(ERROR, "operator", f"{label}: operator '{op.name}' runs on "
                                   f"{'/'.join(op.devices)}, but {stage} of layers {layers} is placed on {sp.device}",
                                   _where(e, profile), f"use an operator for {sp.device}: {', '.join(good)}"))
            if stage == "decode" and e.weight_format not in op.weight_formats:
                out.append(Finding(ERROR, "operator", f"{label}: operator '{op.name}' has no weight_format "
                                   f"'{e.weight_format}' (layers {layers})", _where(e, profile),
                                   f"formats it supports: {', '.join(op.weight_formats)}"))
            if op.streams_from and e.home.split(":")[0] not in op.streams_from:
                out.append(Finding(ERROR, "operator", f"{label}: operator '{op.name}' copies experts from "
                                   f"{'/'.join(op.streams_from)}, but layers {layers} keep their weights on {e.home}",
                                   _where(e, profile), "use prefill_op torch or gpu_static for GPU-resident experts"))
            if stage == "prefill" and sp.device != e.home and not op.streams_from:
                out.append(Finding(NOTE, "operator", f"layers {layers}: prefill runs on {sp.device} while the weights "
                                   f"live on {e.home}; each layer's experts are copied over during prefill",
                                   _where(e, profile)))
    return out


def check_formats(profile, plan, model) -> list:
    """int4 groups must be even and divide both matrices' input sizes (hidden for gate/up, intermediate for down)."""
    from math import gcd
    out = []
    for es in _group(plan, lambda e: (e.weight_format, e.group_size)):
        e = es[0]
        if e.weight_format != "int4":
            continue
        _, I2, H = model.get_submodule(e.module).gate_up_proj.shape
        G, I = e.group_size, I2 // 2
        if G % 2 == 0 and H % G == 0 and I % G == 0:
            continue
        common = gcd(H, I)
        fits = [g for g in (128, 64, 32, 16) if common % g == 0]
        label = e.rule.label if e.rule else "default placement"
        out.append(Finding(ERROR, "format", f"{label}: int4 group_size {G} does not divide the experts' input sizes "
                           f"(hidden {H}, intermediate {I}) of layers {ranges(x.layer for x in es)}", _where(e, profile),
                           f"use group_size {fits[0]}" if fits else "use weight_format int8 (no groups)"))
    return out


def check_devices(profile, plan, machine) -> list:
    out = []
    for rule, key, value in plan.bad_devices:
        out.append(Finding(ERROR, "device", f"{rule.label}: {key} '{value}' is not a device ktcli runs on",
                           rule.where, "devices are cpu, cuda or cuda:N"))
    used = {}
    for e in plan.experts:
        for sp in (e.prefill, e.decode):
            if sp.device != "auto":      # auto runs on the main device and the CPU, both checked
                used.setdefault(sp.device, e.rule.where if e.rule else profile.where("rules"))
    for dev in set(plan.module_devices.values()) | {plan.main_device}:
        used.setdefault(dev, profile.where("device"))
    for dev, where in sorted(used.items()):
        if not machine.has(dev):
            have = ", ".join(sorted(machine.devices))
            out.append(Finding(ERROR, "device", f"device {dev} is not on this machine (it has {have})", where,
                               "place it on a device the machine has, or validate for another machine with "
                               "--target-devices cuda:0=80GiB,cpu=125GiB"))
    if plan.split_layers:
        devs = sorted({d for ds in plan.split_layers.values() for d in ds})
        out.append(Finding(ERROR, "device", f"layers {ranges(plan.split_layers)} split their own modules over "
                           f"{', '.join(devs)}; ktcli runs a layer's attention, norms, router and shared experts on "
                           "one device (layers may sit on different GPUs)", profile.where("rules"),
                           "place each '^model\\.layers\\.N\\.' as a whole; only its '.mlp.experts' may go elsewhere"))
    return out


def _other_gpu(plan, device: str, layer: int) -> bool:
    """A CUDA device that is not the one the layer's attention runs on ('cuda' is 'cuda:0')."""
    norm = lambda d: "cuda:0" if d == "cuda" else d   # noqa: E731
    return device.startswith("cuda") and norm(device) != norm(plan.layer_device(layer))


def check_graphs(profile, plan) -> list:
    mode = profile.runtime.mode
    out = []
    for es in _group(plan, lambda e: (e.decode.device, e.prefill.device, plan.layer_device(e.layer))):
        e = es[0]       # experts on another GPU than their layer's attention
        dev = next((d for d in (e.decode.device, e.prefill.device) if _other_gpu(plan, d, e.layer)), None)
        if dev is None:
            continue
        home = plan.layer_device(e.layer)
        what = (f"{e.rule.label if e.rule else 'default placement'}: layers {ranges(x.layer for x in es)} run their "
                f"experts on {dev} while their attention runs on {home}")
        if mode == "off":   # eager: the operator moves the hidden state to their GPU and back, layer by layer
            out.append(Finding(WARNING, "multi-gpu", what + ": the hidden state crosses GPUs at each such layer "
                               "(not measured on several GPUs)", _where(e, profile), ""))
        else:
            out.append(Finding(ERROR, "cuda-graph", f"CUDA graphs are on (graph_mode {mode}), but {what}: a graph "
                               "records one GPU's stream (ktcli runs one GPU with CUDA graphs)", _where(e, profile),
                               f"place these experts on {home} or the CPU, or turn CUDA graphs off "
                               "(--use_cuda_graph false)"))
    segs = plan.segments
    if len({d for d, _, _ in segs}) > 1:
        text = ", ".join(f"{a}-{b} on {d}" if a != b else f"{a} on {d}" for d, a, b in segs)
        how = ("eager: the hidden state is copied to the next GPU at each boundary" if mode == "off" else
               f"one {mode} graph per GPU segment, replayed in turn; the hidden state is copied between them")
        out.append(Finding(NOTE, "multi-gpu", f"decoder layers {text}: {how}", profile.where("rules")))
    if mode == "off":
        return out
    cpu_layers = [i for i, d in plan.layer_devices.items() if not d.startswith("cuda")]
    if not plan.main_device.startswith("cuda"):
        out.append(Finding(ERROR, "cuda-graph", f"graph_mode {mode} needs the model on a GPU, but its main device is "
                           f"{plan.main_device}", profile.where("runtime"), "set use_cuda_graph: false"))
    # a rule put the lm_head on the CPU (not a machine without a GPU, whose device errors say so already)
    if plan.main_device.startswith("cuda") and plan.lm_head_device == "cpu" and plan.default_device != "cpu":
        out.append(Finding(ERROR, "cuda-graph", f"graph_mode {mode}: the lm_head runs on {plan.lm_head_device}, which a "
                           "CUDA graph cannot record (the step would copy to the host while capturing)",
                           profile.where("rules"), "place the lm_head on a GPU (a rule for '^lm_head' with "
                           "generate_device: cuda:0), or set use_cuda_graph: false"))
    if cpu_layers and plan.main_device.startswith("cuda"):
        out.append(Finding(ERROR, "cuda-graph", f"graph_mode {mode} needs every decoder layer on a GPU, but layers "
                           f"{ranges(cpu_layers)} run their attention on the CPU", profile.where("rules"),
                           "place those layers on a GPU (only their '.mlp.experts' on the CPU), or set "
                           "use_cuda_graph: false"))
    for es in _group(plan, lambda e: e.decode.op):
        e = es[0]
        op = resolve_op(e.decode.op)
        if op is None or mode in op.graph_modes:
            continue
        safe = [o.name for o in OPERATORS.values() if mode in o.graph_modes and "decode" in o.stages
                and e.decode.device.split(":")[0] in o.devices]
        label = e.rule.label if e.rule else "default placement"
        fix = (f"use a graph-safe decode operator on {e.decode.device} (generate_op: {safe[0]}"
               + (f" — KTransformers name {OPERATORS[safe[0]].aliases[0]}" if safe and OPERATORS[safe[0]].aliases else "")
               + "), or turn CUDA graphs off (--use_cuda_graph false)") if safe else "turn CUDA graphs off (--use_cuda_graph false)"
        out.append(Finding(ERROR, "cuda-graph", f"{label}: CUDA graphs are on (graph_mode {mode}), but layers "
                           f"{ranges(x.layer for x in es)} decode with operator '{op.name}' on {e.decode.device}, "
                           f"which is not graph safe: {op.why_not_graph}", _where(e, profile), fix))
    return out


MEMORY_FIX = {   # what frees memory on the device that is short
    "gpu": "move more layers' experts to the CPU (generate_device: cpu), or lower runtime.max_seq_len",
    "cpu": "store the CPU experts as int8 or int4 (weight_format: int8 / int4), or move some layers' experts to "
           "the GPU (generate_device: cuda)",
}


def check_memory(profile, plan, machine, model):
    rep = estimate(model, plan, profile)
    out = []
    for dev in sorted(rep.rows):
        need, have = rep.total(dev), machine.devices.get(dev)
        if have is not None and need > have:
            out.append(Finding(ERROR, "memory", f"{dev} needs {fmt_bytes(need)} but has {fmt_bytes(have)} "
                               f"({', '.join(f'{k} {fmt_bytes(v)}' for k, v in rep.rows[dev].items())})",
                               profile.where("rules"), MEMORY_FIX["cpu" if dev == "cpu" else "gpu"]))
    return out, rep


def check_threads(profile, machine) -> list:
    t = profile.runtime.cpu_threads
    if t is not None and t > machine.cpu_cores:
        return [Finding(WARNING, "threads", f"cpu_threads {t} is above the {machine.cpu_cores} physical cores here; "
                        "oversubscription slows CPU experts", profile.where("runtime"),
                        f"set runtime.cpu_threads to {machine.cpu_cores} or fewer")]
    return []
