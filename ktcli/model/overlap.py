"""GPU work of a MoE block that does not need the routed experts' output runs while the CPU computes them.

Qwen2-MoE's block computes its shared expert before routing; the forward below routes first, starts the CPU
experts (`HybridExperts.submit`: under a full graph with flag steps the stream goes on), runs the shared expert,
then collects. A streamed or routed prefill layer runs the shared expert itself, after queuing its uploads and
before its GEMMs wait for them. Same operations on the same tensors as transformers' forward, in another order,
so logits are identical. Only for block classes whose forward this reproduces (checked by tests/test_overlap.py).
"""
from __future__ import annotations

import os
import types

import torch.nn.functional as F
from torch import nn

from ..ops.base import HybridExperts


# KTCLI_PREFILL_SIDE=0: prefill's shared expert after the layer, as before (A/B runs: measured across processes,
# Qwen2-57B pp512 ran 4-9% slower with it and pp2048/pp8192 2-9% faster, 2026-12-06; not yet A/B'd in one process)
_SIDE = os.environ.get("KTCLI_PREFILL_SIDE", "1") != "0"


def _qwen2_moe_forward(self, hidden_states):
    batch_size, sequence_length, hidden_dim = hidden_states.shape          # [B, S, H]
    x = hidden_states.view(-1, hidden_dim)                                  # [T, H]
    _, routing_weights, selected_experts = self.gate(x)                     # [T, K] each
    shared = []

    def side():     # while the CPU works (decode), or while a streamed prefill layer's experts cross
        shared.append(F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x))
    job = self.experts.submit(x, selected_experts, routing_weights, side=side if _SIDE else None)
    if not shared:
        side()
    return (self.experts.collect(job) + shared[0]).reshape(batch_size, sequence_length, hidden_dim)


FORWARDS = {"Qwen2MoeSparseMoeBlock": _qwen2_moe_forward}


def overlap_shared_experts(model: nn.Module) -> int:
    """Give every known MoE block whose experts are a HybridExperts the overlapping forward; returns how many."""
    n = 0
    for m in model.modules():
        fwd = FORWARDS.get(type(m).__name__)
        if fwd is not None and isinstance(getattr(m, "experts", None), HybridExperts):
            m.forward = types.MethodType(fwd, m)
            n += 1
    return n
