"""Decoder layers on several GPUs: the hidden state follows the layers (KTransformers' transfer_map, read from the plan).

A forward pre-hook on every module off the main GPU (decoder layers, the final norm, the lm_head) moves each tensor
argument there that is elsewhere — the hidden state at a boundary, the rotary cos/sin and mask once per forward —
and makes that GPU the current one, so operators that ask for torch.cuda.current_stream() get its stream. Under
CUDA-graph capture the move goes through the active bridge instead, which ends one GPU's graph and begins the next
(ops/bridge.py, SegmentedCapture).
"""
from __future__ import annotations

import re

import torch

from ..ops.bridge import active, map_tensors

_memo: dict = {}     # (id(src), device) → (src, copy): tensors of this forward already moved (rotary cos/sin, mask)


def move(device: torch.device, args, kwargs):
    """(args, kwargs) on `device`, through the active bridge when one is capturing graphs per GPU. A tensor the
    model hands every layer (cos/sin, mask) crosses once per forward, not once per layer."""
    bridge = active()
    if bridge is not None and hasattr(bridge, "cross"):
        return bridge.cross(device, args, kwargs)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    def to(t):
        if t.device == device:
            return t
        hit = _memo.get((id(t), device))
        if hit is None or hit[0] is not t:
            hit = _memo[(id(t), device)] = (t, t.to(device, non_blocking=True))   # torch orders both GPUs' streams
        return hit[1]
    return map_tensors(args, to), map_tensors(kwargs, to)


def _pre_hook(device):
    def hook(_mod, args, kwargs):
        return move(device, args, kwargs)
    return hook


def _logits_hook(device):
    def hook(_mod, _args, out):
        if hasattr(active(), "cross"):      # graphs per GPU: DecodeGraph copies the logits after the last replay
            return out
        return out.to(device, non_blocking=True)
    return hook


def _forget(_mod, _args):
    _memo.clear()


def modules_off_main(model, plan) -> list:
    """[(module name, device)]: the decoder layers, final norm and lm_head that take a hook."""
    names = dict(model.named_modules())
    layers = sorted((int(m.group(1)), n) for n in names if (m := re.search(r"(?:^|\.)layers\.(\d+)$", n)))
    head = next((n for n, m in names.items() if m is model.get_output_embeddings()), None)
    base = layers[0][1].rsplit(".layers.", 1)[0] if layers else ""
    order = [(n, plan.layer_device(i)) for i, n in layers]
    if f"{base}.norm" in names:
        order.append((f"{base}.norm", plan.module_devices.get(f"{base}.norm", plan.main_device)))
    if head is not None:
        order.append((head, plan.lm_head_device))
    # every module off the main device, and the first one back on it; a CPU lm_head keeps the build's own hooks
    # (KTransformers places it so); CPU layers (graphs off) take these
    out, prev = [], plan.main_device
    for n, d in order:
        if (d != plan.main_device or d != prev) and (d.startswith("cuda") or n != head):
            out.append((n, d))
        prev = d
    return out


def install(model, plan) -> list:
    """Hooks on every module off the main GPU, the logits back to it, the per-forward memo cleared at each call.
    CPU modules (an embedding KTransformers keeps on the CPU) keep the build's own hooks. Returns the modules."""
    if not plan.main_device.startswith("cuda"):
        return []
    off = modules_off_main(model, plan)
    if not off:
        return []
    names = dict(model.named_modules())
    for n, d in off:
        names[n].register_forward_pre_hook(_pre_hook(torch.device(d)), with_kwargs=True)
    model.register_forward_pre_hook(_forget)
    head = model.get_output_embeddings()
    if plan.lm_head_device != plan.main_device and plan.lm_head_device.startswith("cuda"):
        head.register_forward_hook(_logits_hook(torch.device(plan.main_device)))
    return off


def gpus(plan) -> list:
    """Every GPU the model's modules run on, the main one first."""
    devs = [plan.main_device, *plan.gpus, plan.lm_head_device, plan.embed_device]
    return [torch.device(d) for d in dict.fromkeys(devs) if d.startswith("cuda")]


def synchronize(devices) -> None:
    for d in devices:
        torch.cuda.synchronize(d)
