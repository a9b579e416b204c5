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
