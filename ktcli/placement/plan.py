"""Walk the model's module tree top-down; the first matching rule wins; non-recursive rules stop the walk."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..model.config import find_experts, layer_index
from ..ops.registry import default_op, resolve_op
from ..profile.ktransformers import class_op, classify, is_kt_class

_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def normalize_device(dev: str) -> str | None:
    """'cuda' → 'cuda:0'; None when it is not a device ktcli runs on."""
    dev = str(dev).strip().lower()
    if not _DEVICE.match(dev):
        return None
    return "cuda:0" if dev == "cuda" else dev


@dataclass
class StagePlacement:
    device: str
    op: str           # registry name, or the unknown name as written (a check reports it)


@dataclass
class ExpertsPlacement:
    layer: int
    module: str
    prefill: StagePlacement
    decode: StagePlacement
    weight_format: str = "bf16"
    group_size: int = 128
    rule: object = None        # the Rule that placed it, None when inherited from the default

    @property
    def home(self) -> str:
        """Weights live where decode computes; a prefill elsewhere streams them layer by layer."""
        return self.decode.device


@dataclass
class Plan:
    model_type: str
    num_layers: int
    main_device: str
    embed_device: str
    lm_head_device: str
    experts: list = field(default_factory=list)
    module_devices: dict = field(default_factory=dict)   # non-expert module name → device
    rule_hits: dict = field(default_factory=dict)        # rule index → modules it matched
    bad_devices: list = field(default_factory=list)      # (rule, key, value)
    notes: list = field(default_factory=list)
    default_device: str = ""                             # where modules no rule places run
    layer_devices: dict = field(default_factory=dict)    # decoder layer → the device of its attention, router…
    split_layers: dict = field(default_factory=dict)     # decoder layer → its devices, where they are several

    def layer_device(self, layer: int) -> str:
        return self.layer_devices.get(layer, self.main_device)

    @property
    def segments(self) -> list:
        """[(device, first layer, last layer)]: runs of consecutive decoder layers on one device."""
        out = []
        for i in sorted(self.layer_devices):
            d = self.layer_devices[i]
            if out and out[-1][0] == d and out[-1][2] == i - 1:
                out[-1][2] = i
            else:
                out.append([d, i, i])
        return [tuple(s) for s in out]

    @property
    def gpus(self) -> list:
        """The GPUs the decoder layers run on, in layer order."""
        return list(dict.fromkeys(d for d, _, _ in self.segments if d.startswith("cuda")))


def _ctx_from_rule(parent: dict, rule) -> dict:
    ctx = dict(parent)
    ctx.update({k: v for k, v in rule.kwargs.items()})
    if "prefill_device" in rule.kwargs or "prefill_op" in rule.kwargs:
        ctx["prefill_named"] = True
    ctx["rule"] = rule
    ctx["kind"] = classify(rule.replace_class)
    op = class_op(rule.replace_class)
    if op:
        ctx.setdefault("generate_op", op)
        ctx.setdefault("prefill_op", op)
    return ctx


def _prefill(ctx, d, op, opname, home, main_device):
    """Prefill of experts whose weights live on the CPU while the model runs on a GPU: `auto` (stream or CPU per
    chunk) unless a rule names prefill_device/prefill_op; a GPU operator named for them streams the weights."""
    gpu_main = main_device.startswith("cuda")
    if str(ctx.get("prefill_device", "")).strip().lower() == "auto" or \
            (home == "cpu" and gpu_main and not ctx.get("prefill_named") and ctx.get("kind") != "default"):
        return "auto", resolve_op("auto") if op is None or op.name in ("cpu", "torch") else op, opname
    if home == "cpu" and d.startswith("cuda") and op is not None and op.name in ("torch", "gpu_static"):
        return d, resolve_op("stream"), "stream"
    return d, op, opname


def make_plan(model, rules: list, main_device: str) -> Plan:
    """`model` is the meta-device transformers model; `main_device` is normalized ('cuda:0' / 'cpu')."""
    experts = {name for name, _ in find_experts(model)}
    ctx_of = {"": {"generate_device": main_device, "prefill_device": main_device, "rule": None, "kind": "default"}}
    frozen = set()      # modules below a non-recursive match
    hits = {r.index: [] for r in rules}
    for name, mod in model.named_modules():
        if not name:
            continue
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        ctx = dict(ctx_of[parent])
        ctx.pop("kind", None)
        if parent in frozen:
            frozen.add(name)
        else:
            for rule in rules:
                if rule.matches(name, type(mod).__name__):
                    ctx = _ctx_from_rule(ctx, rule)
                    hits[rule.index].append(name)
                    if not rule.recursive:
                        frozen.add(name)
                    break
        ctx_of[name] = ctx

    plan = Plan(model_type=model.config.model_type, num_layers=model.config.num_hidden_layers,
                main_device=main_device, embed_device=main_device, lm_head_device=main_device,
                default_device=main_device,
                rule_hits=hits)
    for rule in rules:
        for key in ("generate_device", "prefill_device", "out_device"):
            if key == "prefill_device" and str(rule.kwargs.get(key)).strip().lower() == "auto":
                continue
            if key in rule.kwargs and normalize_device(rule.kwargs[key]) is None:
                plan.bad_devices.append((rule, key, rule.kwargs[key]))
        if rule.ignored or (is_kt_class(rule.replace_class) and classify(rule.replace_class) == "default"
                            and rule.replace_class != "default"):
            what = ", ".join(rule.ignored) or "its optimisation"
            plan.notes.append((rule.where, f"{rule.label}: {rule.replace_class.rsplit('.', 1)[-1]} — ktcli keeps transformers' "
                              f"module and uses only the devices; ignored: {what}"))

    def dev(ctx, key):
        return normalize_device(ctx.get(key, main_device)) or main_device

    for name in sorted(experts, key=layer_index):
        ctx = ctx_of[name]
        stages = {}
        for stage, dkey, okey in (("decode", "generate_device", "generate_op"), ("prefill", "prefill_device", "prefill_op")):
            d = dev(ctx, dkey)
            opname = ctx.get(okey)
            if opname is None or ctx.get("kind") == "default":
                opname = "torch" if ctx.get("kind") == "default" and ctx.get("rule") else default_op(d.split(":")[0]).name
            op = resolve_op(opname)
            if stage == "prefill":
                d, op, opname = _prefill(ctx, d, op, opname, stages["decode"].device, main_device)
            stages[stage] = StagePlacement(d, op.name if op else str(opname))
        plan.experts.append(ExpertsPlacement(
            layer=layer_index(name), module=name, prefill=stages["prefill"], decode=stages["decode"],
            weight_format=str(ctx.get("weight_format", "bf16")), group_size=int(ctx.get("group_size", 128)),
            rule=ctx.get("rule")))

    # Non-expert modules: the device decode runs them on (ktcli runs them on one device for both stages).
    for name, _ in model.named_modules():
        if name and not any(name == e or name.startswith(e + ".") for e in experts):
            plan.module_devices[name] = dev(ctx_of[name], "generate_device")
    embed = model.get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    plan.embed_device = plan.module_devices.get(names.get(id(embed)), main_device)
    plan.lm_head_device = plan.module_devices.get(names.get(id(model.get_output_embeddings())), main_device)
    # Each decoder layer's own modules (experts aside) run on one device; layers may sit on different ones.
    per_layer, attn = {}, {}
    for n, d in plan.module_devices.items():
        m = re.search(r"layers\.(\d+)\.", n)      # modules inside a layer, not the layer container itself
        if m:
            per_layer.setdefault(int(m.group(1)), set()).add(d)
            if n.endswith(".self_attn"):
                attn[int(m.group(1))] = d
    for i, devs in sorted(per_layer.items()):
        plan.layer_devices[i] = attn.get(i, min(devs))
        if len(devs) > 1:
            plan.split_layers[i] = sorted(devs)
    plan.main_device = plan.layer_devices.get(0, main_device)
    return plan
