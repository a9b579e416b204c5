"""`bench --routing uniform`: each prefill token's K experts drawn at random (distinct; the router's weights kept).

Why: synthetic weights' routers collapse onto a few experts with depth (Qwen3-30B shapes, 512 random tokens: 126
of 128 experts touched in layer 0, 63 in layer 1, 28-30 a layer over all 48 on the GPU host, 2026-12-06), where a
trained, load-balanced router touches nearly all of them; prefill ways that skip untouched experts look faster on
synthetic weights than they would on a real model. Decode (one token a step) keeps the router's choice: it touches
K experts either way, and graph capture stays as it is.
Shape legend: T tokens, K top-k, E experts.
"""
from __future__ import annotations

import torch
from torch import nn

ROUTINGS = ("model", "uniform")


def _draw(gens: dict):
    def hook(mod, args, out):
        logits, scores, idx = out                   # transformers' TopKRouter: [T,E], [T,K], [T,K]
        T, K = idx.shape
        if T == 1:
            return out
        dev = idx.device
        if dev not in gens:
            gens[dev] = torch.Generator(device=dev).manual_seed(0)
        pick = torch.rand(T, logits.shape[-1], device=dev, generator=gens[dev]).topk(K, dim=-1).indices   # [T,K]
        return logits, scores, pick.to(idx.dtype)
    return hook


def set_routing(model: nn.Module, routing: str) -> int:
    """Route prefill tokens as `routing` says ('model': the router's own choice); returns the routers changed.
    Every MoE block (a `gate` beside `experts`): ktcli's and the plain transformers baselines' alike."""
    for h in getattr(model, "_ktcli_routing_hooks", []):
        h.remove()
    model._ktcli_routing_hooks = []
    if routing == "model":
        return 0
    hook = _draw({})
    for m in model.modules():
        gate = getattr(m, "gate", None)
        if isinstance(getattr(m, "experts", None), nn.Module) and isinstance(gate, nn.Module):
            model._ktcli_routing_hooks.append(gate.register_forward_hook(hook))
    return len(model._ktcli_routing_hooks)
