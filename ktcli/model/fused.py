"""runtime.compile's other half: one GEMM for an attention's q, k and v projections, and the router's top-k unsorted.

Why: in a full-graph decode token of Qwen3-30B-A3B the GPU side of a layer is ~28 kernels, and the k and v
projections (1 MiB of weights each) took 8.8 and 8.2 µs where q's 8 MiB took 5.4 (cuBLAS picks small-N kernels
for them, one with a split-K reduce); the sorted top-k adds a bitonic sort (4 µs) that a sum over experts does not
need (benchmarks/results/2026-12-06-h100-decode-timeline-compiled.json). Inductor does not merge GEMMs, so the
weights are concatenated once here (q_proj, k_proj and v_proj keep views into the one tensor: no second copy).

Only for the classes whose forward this reproduces (transformers 5.x, `cache` argument), checked against the
unfused model by tests/test_fused.py; others keep their own forward.
"""
from __future__ import annotations

import inspect
import os
import sys
import types

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION = {"Qwen3MoeAttention": True, "Qwen2MoeAttention": False}   # class → whose forward passes sliding_window
ROUTERS = ("Qwen3MoeTopKRouter",)


def _attention_forward(mod, sliding: bool):
    """The fused forward of an attention class of model file `mod` (its rotary and attention functions, bound here
    rather than looked up per call inside compiled code); sliding: whether that class passes sliding_window."""
    rotary, attention, fallback = mod.apply_rotary_pos_emb, mod.ALL_ATTENTION_FUNCTIONS, mod.eager_attention_forward

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        input_shape = hidden_states.shape[:-1]            # [B, S]
        hidden_shape = (*input_shape, -1, self.head_dim)  # [B, S, heads, D]
        q, k, v = F.linear(hidden_states, self.qkv_weight, self.qkv_bias).split(self.qkv_sizes, dim=-1)
        q, k, v = q.view(hidden_shape), k.view(hidden_shape), v.view(hidden_shape)
        if hasattr(self, "q_norm"):                       # Qwen3: per-head RMSNorm of q and k
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # [B, heads, S, D]
        cos, sin = position_embeddings
        q, k = rotary(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        attend = attention.get_interface(self.config._attn_implementation, fallback)
        extra = {"sliding_window": self.sliding_window} if sliding else {}
        out, weights = attend(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **extra, **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights
    return forward


def _router_forward(self, hidden_states):
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)                     # [T, H]
    logits = F.linear(hidden_states, self.weight)                                  # [T, E]
    probs = F.softmax(logits, dtype=torch.float, dim=-1)
    top, idx = torch.topk(probs, self.top_k, dim=-1, sorted=False)                 # [T, K]: order is not used
    if self.norm_topk_prob:
        top = top / top.sum(dim=-1, keepdim=True)
    return logits, top.to(logits.dtype), idx


def _takes_cache(cls) -> bool:
    return "cache" in inspect.signature(cls.forward).parameters


def _fuse_qkv(att: nn.Module) -> None:
    projs = (att.q_proj, att.k_proj, att.v_proj)
    w = torch.cat([p.weight.detach() for p in projs])                               # [Nq + Nk + Nv, H]
    b = torch.cat([p.bias.detach() for p in projs]) if all(p.bias is not None for p in projs) else None
    sizes, at = [p.weight.shape[0] for p in projs], 0
    for p, n in zip(projs, sizes):                  # the projections see views of the fused tensor (one copy)
        p.weight = nn.Parameter(w[at:at + n], requires_grad=False)
        if b is not None:
            p.bias = nn.Parameter(b[at:at + n], requires_grad=False)
        at += n
    att.qkv_weight, att.qkv_bias, att.qkv_sizes = w, b, sizes
    fwd = _attention_forward(sys.modules[type(att).__module__], ATTENTION[type(att).__name__])
    att.forward = types.MethodType(fwd, att)


def fuse_decode(model: nn.Module, device_types=("cuda",)) -> list:
    """Fuse the known attention and router modules whose weights sit on one of `device_types`; returns their names
    (the CPU keeps the unfused modules by default: its GEMMs gain nothing and tests compare it bit for bit)."""
    done = []
    if os.environ.get("KTCLI_FUSED") == "0":         # A/B runs (benchmarks/run_gpu.sh fused): the unfused modules
        return done
    for name, m in model.named_modules():
        kind = type(m).__name__
        first = next(m.parameters(), None)
        if first is None or first.device.type not in device_types:
            continue
        if kind in ATTENTION and _takes_cache(type(m)) and all(
                isinstance(getattr(m, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj")):
            _fuse_qkv(m)
            done.append(name)
        elif kind in ROUTERS and all(hasattr(m, a) for a in ("hidden_dim", "weight", "top_k", "norm_topk_prob")):
            m.forward = types.MethodType(_router_forward, m)
            done.append(name)
    return done
