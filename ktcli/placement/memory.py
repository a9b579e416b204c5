"""Bytes per device from config + dtype + plan: weights, KV cache, staging, workspace. No weights loaded."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from ..ops.registry import resolve_op

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def expert_bytes_per_param(fmt: str, dtype_bytes: int, group_size: int) -> float:
    """Stored bytes per weight element: int8 adds a per-row fp32 scale (negligible), int4 one per group."""
    if fmt == "int8":
        return 1.0
    if fmt == "int4":
        return 0.5 + 4.0 / max(group_size, 1)
    return float(dtype_bytes)


@dataclass
class MemoryReport:
    rows: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))  # device → item → bytes

    def total(self, device: str) -> int:
        return sum(self.rows[device].values())

    def add(self, device, item, nbytes):
        self.rows[device][item] += int(nbytes)


def kv_cache_bytes(config, max_len: int, dtype_bytes: int) -> int:
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if getattr(config, "kv_lora_rank", None):   # MLA: transformers caches full per-head K and V
        k_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        v_dim = config.v_head_dim
        heads = config.num_attention_heads
    else:
        k_dim = v_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * max_len * heads * (k_dim + v_dim) * dtype_bytes


def estimate(model, plan, profile) -> MemoryReport:
    cfg, rt = model.config, profile.runtime
    db = DTYPE_BYTES[profile.dtype]
    rep = MemoryReport()
    by_module = {e.module: e for e in plan.experts}
    for name, mod in model.named_modules():
        own = list(mod.named_parameters(recurse=False))
        if not own:
            continue
        if name in by_module:
            e = by_module[name]
            per = expert_bytes_per_param(e.weight_format, db, e.group_size)
            n = sum(p.numel() for _, p in own)
            rep.add(e.home, "experts", n * per)
            op = resolve_op(e.prefill.op)
            if op is not None and op.streams_from:   # two slots of the stored format, on the layer's GPU
                gpu = e.prefill.device if e.prefill.device.startswith("cuda") else plan.layer_device(e.layer)
                item = "prefill stream buffers (2 layers)"
                rep.rows[gpu][item] = max(rep.rows[gpu][item], int(2 * n * per))
                if e.weight_format != "bf16":      # dequantized for the grouped GEMMs, one layer at a time
                    item = "prefill dequantized layer"
                    rep.rows[gpu][item] = max(rep.rows[gpu][item], int(n * db))
            elif e.prefill.device != e.home:
                stage = e.prefill.device
                rep.rows[stage]["prefill staging (1 layer)"] = max(rep.rows[stage]["prefill staging (1 layer)"],
                                                                  int(n * db))
            continue
        dev = plan.module_devices.get(name, plan.main_device)
        rep.add(dev, "other weights", sum(p.numel() for _, p in own) * db)
    kv_layer = kv_cache_bytes(cfg, rt.max_seq_len, db) / cfg.num_hidden_layers   # each layer's cache on its device
    for i in range(cfg.num_hidden_layers):
        rep.add(plan.layer_device(i), "KV cache", kv_layer)
    chunk = min(rt.prefill_chunk, rt.max_seq_len)
    inter = max(getattr(cfg, "intermediate_size", 0) or 0, getattr(cfg, "moe_intermediate_size", 0) or 0)
    work = chunk * (cfg.hidden_size * 8 + inter * 3) * 4
    logits = chunk * cfg.vocab_size * 4
    head = plan.lm_head_device if plan.lm_head_device.startswith("cuda") else plan.main_device
    for dev in dict.fromkeys([plan.main_device, *plan.gpus, head]):
        extra = 512 * 2**20 if dev.startswith("cuda") else 0   # CUDA context, cuBLAS workspace, graph pool
        rep.add(dev, "activations/workspace", work + extra + (logits if dev == head else 0))
    if any(e.decode.device == "cpu" or e.prefill.device in ("cpu", "auto") for e in plan.experts) \
            and plan.main_device != "cpu":
        k = getattr(cfg, "num_experts_per_tok", 8)
        rep.add("cpu", "pinned staging", chunk * (cfg.hidden_size * 2 * 4 + k * 16))
    return rep
