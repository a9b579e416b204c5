"""The GPU side of a streamed, split or routed prefill layer: all its experts' pairs through two grouped GEMMs.
Shape legend: T tokens, K top-k, E experts in the slot, H hidden, I intermediate, P pairs.
"""
from __future__ import annotations

import torch


def grouped_ok(x, fn) -> bool:
    """torch's grouped GEMM (one kernel per matrix for all experts, no host sync): bf16 on a Hopper-class GPU."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm") and hasattr(fn, "full")
            and torch.cuda.get_device_capability(x.device)[0] >= 9)


def grouped(x, idx, w, fn, E, act, first: int = 0):
    """x [T,H], idx/w [T,K] → [T,H]: pairs sorted by expert, two grouped GEMMs over the slot's E experts
    (gate_up [E,2I,H], down [E,H,I]): experts [first, first+E) of the layer, or `first` a lut [E_layer] giving each
    expert's place in the slot (-1: not there). Pairs of experts not in the slot (the CPU's share) sort last, past
    every group, and are masked out."""
    gu, dn = fn.full()
    T, K = idx.shape
    if isinstance(first, torch.Tensor):
        key = first[idx.reshape(-1)]
        key = key.masked_fill(key < 0, E)                                       # [P] CPU pairs → E
    else:
        key = (idx.reshape(-1) - first).masked_fill(idx.reshape(-1) < first, E)  # [P] CPU pairs → E
    order = torch.argsort(key, stable=True)                                     # [P] pairs grouped by expert
    counts = torch.zeros(E + 1, dtype=torch.int64, device=x.device).index_add_(0, key, torch.ones_like(key))
    offs = torch.cumsum(counts[:E], 0).to(torch.int32)                          # [E] group ends (bincount syncs)
    xs = x[order // K]                                                          # [P,H]
    gate, up = torch._grouped_mm(xs, gu.transpose(1, 2), offs=offs).chunk(2, dim=-1)
    y = torch._grouped_mm((act(gate) * up).contiguous(), dn.transpose(1, 2), offs=offs)   # [P,H]
    keep = (key[order] < E)[:, None]                                            # rows past the groups: garbage
    y = torch.where(keep, y * w.reshape(-1)[order, None].to(y.dtype), 0)
    # back in pair order, then each token's K rows summed: one write a row, where index_add_'s atomics on T·K rows
    # took 268 µs a layer (Qwen3-30B int4 pp2048, H100 host, 2026-12-06: benchmarks/prefill_timeline.py)
    return torch.empty_like(y).index_copy_(0, order, y).view(T, K, -1).sum(1)
