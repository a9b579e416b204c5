"""`ktcli plan` / `--fit`: which layers' experts live on the GPU, chosen for the machine's memory.

Every layer's experts cost the same memory and the GPU reads them ~40× faster than the CPU, so decode is fastest
with as many layers' experts on the GPU as fit beside the KV cache at the requested context, the activations and
a margin: the plan fills GPU layers in order (0, 1, …) up to that count and puts the rest on the CPU, in the
smallest storage format that fits the CPU when `--format auto`. Layers the user's own rules name stay where the
rules put them. Decode is predicted from bytes as measured decode spends them: the CPU experts' bytes at the
kernel's measured share of the CPU bandwidth (per format), the rest at the GPU's, plus a measured cost per decoder
layer that is not bytes (small GPU kernels, the C step, the per-token loop); the plain roofline is shown beside
it. Prefill from an effective CPU prefill rate (FLOPs ÷ rate). The rates they assume are printed with them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from ..model.config import find_experts, meta_model, resolve_model
from ..profile.schema import Rule
from .memory import DTYPE_BYTES, MemoryReport, estimate, expert_bytes_per_param, kv_cache_bytes
from .plan import make_plan

FORMATS = ("bf16", "int8", "int4")
GPU_MARGIN, CPU_MARGIN = 0.08, 0.10      # left free: allocator fragmentation, CUDA graphs' pool, the OS and others


@dataclass
class Rates:
    """What the predictions assume (bytes/s and FLOP/s), and where each number came from."""
    cpu_bw: float = 80e9
    gpu_bw: float = 2.0e12
    cpu_prefill_flops: float = 0.4e12   # ktcli's CPU-expert prefill (torch GEMMs), effective: H200 pp512 2026-12-02
    gpu_flops: float = 300e12
    pcie_bw: float = 25e9               # pinned host → GPU (PCIe 4.0 x16 in practice; 5.0 about twice that)
    prefill_tokens: int = 512           # the prompt length prefill_tps is predicted for (bench's pp512)
    # Decode as measured on the H200 host (benchmarks/results/2026-12-04-h200-decode-*-flags.json): the CPU kernel
    # reads its experts at this share of the bandwidth probe, plus a fixed cost per expert it runs. Fitted on the
    # Qwen3-30B (9 MB experts) and Qwen2-57B (55 MB) rows together: bf16 0.971 / 12 µs, int8 0.973 / 9 µs, int4
    # (Qwen3 only) 10 µs at 0.97 — one share for every format and shape, where a share per format missed by 13%.
    cpu_kernel_eff: float = 0.97
    cpu_expert_s: float = 10e-6
    # A decoder layer costs this much besides its bytes: transformers' ~70 small kernels a layer in one graph, the
    # step, the token loop. 0.21 ms is the all-GPU Qwen3-30B plan's 11.8 ms a token less its bytes, over 48 layers
    # (2026-12-04 plan check); the machine of the earlier decode runs spent up to 0.28 ms.
    layer_s: float = 0.21e-3
    # Several GPUs: each boundary adds a graph replay and a peer copy of the hidden state. Assumed, not measured.
    boundary_s: float = 30e-6
    source: str = "defaults"


@dataclass
class Fit:
    profile: object                     # the profile with the chosen rules
    gpu_layers: list
    cpu_layers: list
    pinned: list
    fmt: str
    memory: MemoryReport
    budget: dict                        # device → bytes the plan may use
    bytes_per_token: dict
    decode_tps: float                   # predicted: bytes at the measured rates + the per-layer cost
    prefill_tps: float
    rates: Rates
    notes: list = field(default_factory=list)
    roofline_tps: float = 0.0           # bytes at the bandwidths alone (the bound decode_tps stays under)
    segments: list = field(default_factory=list)   # several GPUs: (gpu, its decoder layers, its expert layers)


def _layers_regex(template: str, layers: list) -> str:
    return template.replace("IDX", "|".join(str(i) for i in layers))


def _rules(template, gpu_dev, gpu_layers, cpu_layers, fmt, group, stream=True) -> list:
    out = []
    if gpu_layers:
        out.append(Rule(0, "<plan>", 0, name=_layers_regex(template, gpu_layers), replace_class="Experts",
                        kwargs={"prefill_device": gpu_dev, "prefill_op": "torch", "generate_device": gpu_dev,
                                "generate_op": "gpu_static"}))
    if cpu_layers:
        # prefill auto: each chunk streams the layer to the GPU, runs on the CPU or splits its experts between the
        # two, whichever the measured rates favour; cpu where the GPU cannot hold auto's two upload slots
        kw = {"prefill_device": "auto" if stream else "cpu", "generate_device": "cpu", "generate_op": "cpu"}
        if fmt != "bf16":
            kw.update(weight_format=fmt, **({"group_size": group} if fmt == "int4" else {}))
        out.append(Rule(0, "<plan>", 0, name=_layers_regex(template, cpu_layers), replace_class="Experts", kwargs=kw))
    return out


def _device_rules(layer_template, tail, segments) -> list:
    """Several GPUs: each GPU's decoder layers as a whole (experts rules come first and win), and the final norm
    and lm_head on the last one."""
    out = [Rule(0, "<plan>", 0, name=_layers_regex(layer_template, layers), replace_class="default",
                kwargs={"generate_device": dev, "prefill_device": dev}) for dev, layers in segments if layers]
    if tail:
        out.append(Rule(0, "<plan>", 0, name=tail, replace_class="default",
                        kwargs={"generate_device": segments[-1][0], "prefill_device": segments[-1][0]}))
    return out


def split_layers(n_layers: int, budgets: dict) -> list:
    """[(gpu, [layers])]: consecutive decoder layers per GPU, in proportion to the memory each may use."""
    total, acc, a, out = sum(budgets.values()), 0, 0, []
    for dev, b in budgets.items():
        acc += b
        end = round(n_layers * acc / total)
        out.append((dev, list(range(a, end))))
        a = end
    return out


def gpus_of(machine) -> list:
    return sorted((d for d in machine.devices if d.startswith("cuda")), key=lambda d: int(d.split(":")[1]))


def _with_rules(profile, extra):
    rules = [replace(r, index=i) for i, r in enumerate([*profile.rules, *extra])]
    return replace(profile, rules=rules)


def fit(profile, machine, context: int | None = None, fmt: str = "bf16", rates: Rates | None = None) -> Fit:
    rates = rates or Rates()
    src = resolve_model(profile.model, profile.num_layers)
    model = meta_model(src.config)
    names = [n for n, _ in find_experts(model)]
    template = "^" + re.sub(r"layers\\\.\d+\\\.", r"layers\\.(IDX)\\.", re.escape(names[0])) + "$"
    gpus = gpus_of(machine)
    gpu = gpus[0] if gpus else None
    main = gpu or "cpu"
    rt = replace(profile.runtime, max_seq_len=context or profile.runtime.max_seq_len,
                 use_cuda_graph=gpu is not None, graph_mode="full" if gpu else "off",
                 cpu_threads=profile.runtime.cpu_threads or machine.cpu_cores)
    profile = replace(profile, runtime=rt, device=main if profile.device == "auto" else profile.device)
    pinned_plan = make_plan(model, profile.rules, main)
    pinned = sorted(e.layer for e in pinned_plan.experts if e.rule is not None)
    free = sorted(e.layer for e in pinned_plan.experts if e.rule is None)
    budget = {d: int(b * (1 - (CPU_MARGIN if d == "cpu" else GPU_MARGIN))) for d, b in machine.devices.items()}
    # Several GPUs: decoder layers split in proportion to their memory; each GPU holds the experts of the first
    # layers of its share that fit. One GPU: the whole model there, as before.
    if len(gpus) > 1:
        segments = split_layers(model.config.num_hidden_layers, {d: budget[d] for d in gpus})
        base = names[0].split(".layers.")[0]
        layer_template = "^" + re.escape(base) + r"\.layers\.(IDX)\."
        mods = dict(model.named_modules())
        head = [n for n, m in mods.items() if m is model.get_output_embeddings()]
        tail = "|".join(f"^{re.escape(n)}$" for n in (f"{base}.norm", *head) if n in mods)
        device_rules = _device_rules(layer_template, tail, segments)
    else:
        segments, device_rules = [(gpu, list(range(model.config.num_hidden_layers)))] if gpu else [], []
    mine = {dev: sorted(set(free) & set(layers)) for dev, layers in segments}   # free layers per GPU

    _, I2, H = dict(find_experts(model))[names[0]].gate_up_proj.shape
    group = next((g for g in (128, 64, 32, 16) if H % g == 0 and (I2 // 2) % g == 0), 128)   # int4: divides both

    def evaluate(counts, f, stream=True):
        """counts: GPU → how many of its free layers keep their experts there."""
        on_gpu = {d: mine[d][:counts.get(d, 0)] for d in mine}
        cpu = [i for i in free if not any(i in v for v in on_gpu.values())]
        rules = [r for d in mine for r in _rules(template, d, on_gpu[d], [], f, group)]
        rules += _rules(template, None, [], cpu, f, group, stream=stream and gpu is not None)
        prof = _with_rules(profile, rules + device_rules)
        plan = make_plan(model, prof.rules, main)
        return prof, plan, estimate(model, plan, prof)

    def fits(rep, dev):
        return dev not in budget or rep.total(dev) <= budget[dev]

    formats = FORMATS if fmt == "auto" else (fmt,)
    for f in formats:
        none = evaluate({}, f)[2]
        stream = gpu is not None and all(fits(none, d) for d in mine)   # uploads need GPUs with room for two slots
        counts = {}
        for d in mine:                 # each GPU's count apart: its memory depends on its own layers only
            lo, hi = 0, len(mine[d])   # the most of its layers that fit (monotone)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if fits(evaluate({**counts, d: mid}, f, stream)[2], d):
                    lo = mid
                else:
                    hi = mid - 1
            counts[d] = lo
        prof, plan, rep = evaluate(counts, f, stream)
        if fits(rep, "cpu") or f == formats[-1]:
            break
    gpu_layers = sorted(i for d in mine for i in mine[d][:counts.get(d, 0)])
    out = Fit(prof, gpu_layers, [i for i in free if i not in gpu_layers], pinned, f, rep, budget, {}, 0.0, 0.0, rates)
    if len(gpus) > 1:
        out.segments = [(d, layers, mine[d][:counts.get(d, 0)]) for d, layers in segments]
    for dev in budget:
        if not fits(rep, dev):
            out.notes.append(f"{dev} needs {rep.total(dev) / 2**30:.1f} GiB of the {budget[dev] / 2**30:.1f} GiB "
                             f"the plan may use: no placement fits" + ("" if fmt == "auto" else "; try --format auto"))
    predict(out, model, plan, prof)
    return out


def predict(out: Fit, model, plan, prof) -> None:
    """Decode: bytes per token at each device's rate (CPU experts at the kernel's measured share of it and its cost
    per expert) plus the measured per-layer cost; the roofline without either. Prefill (a prompt of
    rates.prefill_tokens): a CPU-resident layer costs its CPU time, its upload, or with `auto` the least of the
    two and a split of its experts between them (ops/costs' model); a GPU-resident one its FLOPs."""
    from ..ops.costs import PrefillRates, choose, cpu_seconds, stream_seconds, used_experts
    cfg, db = model.config, DTYPE_BYTES[prof.dtype]
    k, r = cfg.num_experts_per_tok, out.rates
    T = r.prefill_tokens
    pr = PrefillRates(pcie_bps=r.pcie_bw, cpu_bps=r.cpu_bw, cpu_flops=r.cpu_prefill_flops, gpu_flops=r.gpu_flops)
    bw = {"cpu": r.cpu_bw, "cuda": r.gpu_bw}
    by_dev, seconds, prefill_s, gpu_flops = {}, 0.0, 0.0, 0.0
    for e in plan.experts:
        m = model.get_submodule(e.module)
        E, I2, H = m.gate_up_proj.shape
        per = sum(p.numel() for p in m.parameters(recurse=False)) // E          # params per expert
        per_b = per * expert_bytes_per_param(e.weight_format, db, e.group_size)
        dev = "cpu" if e.decode.device == "cpu" else "cuda"
        by_dev[dev] = by_dev.get(dev, 0) + k * per_b
        if dev == "cuda":
            seconds += k * per_b / bw[dev]
        else:
            seconds += k * (per_b / (bw[dev] * r.cpu_kernel_eff) + r.cpu_expert_s)
        gpu_s = 2 * T * k * per / r.gpu_flops
        cpu_s = cpu_seconds(E, k, H, I2 // 2, per_b, T, e.weight_format != "bf16", pr)
        stream_s = max(stream_seconds(E * per_b, pr), gpu_s)         # the upload overlaps the previous layer
        floor = used_experts(E, k, T) * per_b / r.cpu_bw        # a split's CPU and copies share DRAM
        ways = {"cpu": (cpu_s,), "auto": (choose(stream_s, cpu_s, floor, E)["seconds"],)}.get(e.prefill.device,
                                                                                          (stream_s,))
        prefill_s += min(ways) if dev == "cpu" else gpu_s
    experts = {e.module for e in plan.experts}
    other = sum(p.numel() for n, p in model.named_parameters() if n.rsplit(".", 1)[0] not in experts)
    main = "cuda" if plan.main_device.startswith("cuda") else "cpu"
    rest = other * db + kv_cache_bytes(cfg, prof.runtime.max_seq_len // 2, db)
    by_dev[main] = by_dev.get(main, 0) + rest
    seconds += rest / bw[main] + (cfg.num_hidden_layers * r.layer_s if main == "cuda" else 0.0)
    seconds += max(len(out.segments) - 1, 0) * r.boundary_s
    gpu_flops += 2 * other * T
    out.bytes_per_token = by_dev
    out.roofline_tps = 1 / sum(b / bw[d] for d, b in by_dev.items())
    out.decode_tps = 1 / seconds
    out.prefill_tps = T / (prefill_s + gpu_flops / (r.gpu_flops if main == "cuda" else r.cpu_prefill_flops))
