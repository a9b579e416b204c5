"""Decode roofline: bytes each device must read per token ÷ that device's measured bandwidth."""
from __future__ import annotations

from ..placement.memory import DTYPE_BYTES, expert_bytes_per_param, kv_cache_bytes


def decode_bytes(built, context: int) -> dict:
    """{'cuda': bytes, 'cpu': bytes} read per decoded token at `context` tokens of history.

    Non-expert weights are read whole (the embedding only one row); routed experts only the top-k selected.
    """
    return _bytes(built, context)[0]


def cpu_expert_bytes(built) -> float:
    """Of decode_bytes' 'cpu', the part the CPU-expert operators read (their own time is clocked apart)."""
    return _bytes(built, 0)[1]


def _bytes(built, context: int) -> tuple:
    model, plan, prof = built.model, built.plan, built.profile
    cfg = model.config
    db = DTYPE_BYTES[prof.dtype]
    k = cfg.num_experts_per_tok
    out, cpu_experts = {}, 0
    emb = model.get_input_embeddings().weight
    experts = {e.module: e for e in plan.experts}
    for mod, e in experts.items():
        m = model.get_submodule(mod)
        if m.quantized:   # quantized at load: the stored bytes, scales included
            per_expert = m.quantized.nbytes() / m.quantized.gu.shape[0]
        else:
            per_expert = sum(p.numel() // p.shape[0] for p in m.parameters(recurse=False)) \
                * expert_bytes_per_param(e.weight_format, db, e.group_size)
        dev = "cpu" if e.decode.device == "cpu" else "cuda"
        out[dev] = out.get(dev, 0) + k * per_expert
        cpu_experts += k * per_expert if dev == "cpu" else 0
    for name, p in model.named_parameters():
        mod = name.rsplit(".", 1)[0]
        if mod in experts:
            continue
        if p is emb:
            nbytes, dev = p.shape[-1] * db, str(p.device)
        else:
            nbytes, dev = p.numel() * p.element_size(), str(p.device)
        dev = "cpu" if dev == "cpu" else "cuda"
        out[dev] = out.get(dev, 0) + nbytes
    kv_dev = "cpu" if plan.main_device == "cpu" else "cuda"
    out[kv_dev] = out.get(kv_dev, 0) + kv_cache_bytes(cfg, context, db)
    return out, cpu_experts


def roofline(bytes_per_token: dict, bw: dict) -> dict:
    t = sum(b / bw[d] for d, b in bytes_per_token.items() if bw.get(d))
    return {"bytes_per_token": bytes_per_token, "bandwidth": {d: bw.get(d) for d in bytes_per_token},
            "best_s_per_token": t, "best_tps": 1.0 / t if t else 0.0}


def prefill_rates(built, experts: list):
    """The streamer's rates (measured at load, raised by the run's uploads), or where no layer streams, rates probed
    once on first use: the CPU's read and GEMM rates and the kernel's on the first CPU-resident layer, the GPU's
    GEMM rate where the model's main device is a GPU."""
    if built.streamer is not None:
        return built.streamer.rates
    if built.prefill_rates is None:
        from ..ops.costs import PrefillRates, probe_cpu, probe_gpu, probe_kernel
        r, cpu = PrefillRates(), [m for m in experts if m.home.type == "cpu"]
        threads = built.profile.runtime.cpu_threads or 0
        if cpu:
            r.cpu_bps, r.cpu_flops, r.cpu_flops_small = probe_cpu(cpu[0], threads)
            r.kernel_flops = probe_kernel(cpu[0], built.model.config.num_experts_per_tok, threads, r)
        if built.main_device.type == "cuda":
            r.gpu_flops = probe_gpu(built.main_device)
        built.prefill_rates = r
    return built.prefill_rates


def prefill_roofline(built, n: int, chunk: int) -> dict | None:
    """The best per-layer plan for prefilling n tokens in chunks of `chunk`, from the measured rates
    (prefill_rates): each streamed or split layer costs max(copy or split time, its GPU work) — the copy overlaps
    the previous layer — each CPU or routed layer its time plus its attention's work (on the CPU's GEMM rate where the
    model runs on the CPU). None where no rate for the attention's device was measured."""
    from ..ops.base import HybridExperts
    from ..ops.costs import layer_costs
    experts = [m for m in built.model.modules() if isinstance(m, HybridExperts)]
    r, cfg = prefill_rates(built, experts), built.model.config
    flops = r.gpu_flops if built.main_device.type == "cuda" else r.cpu_flops
    if not flops:
        return None
    K, L = cfg.num_experts_per_tok, cfg.num_hidden_layers
    ids = {id(p) for m in experts for p in m.parameters(recurse=False)}
    other = sum(p.numel() for p in built.model.parameters() if id(p) not in ids and p.ndim > 1) / L
    heads = cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    sizes = [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])
    total, parts = 0.0, {"stream": 0, "cpu": 0, "split": 0, "routed": 0, "gpu": 0}
    done = 0
    for T in sizes:
        attn = 4 * T * (done + T / 2) * heads * hd          # QK^T and PV over the context so far
        done += T
        for m in experts:
            gpu = (2 * T * other + attn) / flops
            if m.streamer is not None:       # the operator's own choice (auto: the fastest; stream: always)
                op = m.ops["prefill"]
                p = (op.plan(T, calibrated=False) if hasattr(op, "plan")     # the probes' bound, not the run's
                     else {"way": "stream", "seconds": layer_costs(m, T, K, r)["stream"]})
                way = p["way"]
                # the CPU way and a routed layer wait for the router; streaming and a split overlap it
                total += p["seconds"] + gpu if way in ("cpu", "routed") else max(p["seconds"], gpu)
            elif m.home.type == "cpu":
                way = "cpu"
                total += layer_costs(m, T, K, r)["cpu"] + gpu
            else:
                way = "gpu"
                total += gpu + 2 * 3 * T * K * m.hidden * m.inter / flops
            parts[way] += 1
    return {"best_s": total, "best_tps": n / total if total else 0.0, "chunk": chunk, "layer_chunks": parts,
            "rates": r.as_dict()}
