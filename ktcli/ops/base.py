"""HybridExperts: the module swapped in for every `...mlp.experts`; it picks an operator per stage.

Shape legend: T tokens, H hidden, I expert intermediate, E experts, K top-k.
"""
from __future__ import annotations

import torch
from torch import nn

SUPPORTED_LAYOUT = dict(has_gate=True, has_bias=False, is_transposed=False, is_concatenated=True)


def layout_problem(orig: nn.Module) -> str | None:
    """ktcli's operators read the common experts layout; other layouts are named, not guessed."""
    bad = [f"{k}={getattr(orig, k)}" for k, v in SUPPORTED_LAYOUT.items() if getattr(orig, k, v) != v]
    if getattr(orig, "has_post_expert_norm", False):
        bad.append("has_post_expert_norm=True")
    return ", ".join(bad) or None


def eager_reference(x, idx, w, gate_up, down, act):
    """transformers' eager loop (the reference): x [T,H], idx/w [T,K], gate_up [E,2I,H], down [E,H,I]."""
    out = torch.zeros_like(x)
    E = gate_up.shape[0]
    mask = torch.nn.functional.one_hot(idx, num_classes=E).permute(2, 1, 0)        # [E,K,T]
    for e in (mask.sum(dim=(1, 2)) > 0).nonzero().flatten().tolist():
        pos, tok = torch.where(mask[e])
        gate, up = torch.nn.functional.linear(x[tok], gate_up[e]).chunk(2, dim=-1)
        h = torch.nn.functional.linear(act(gate) * up, down[e]) * w[tok, pos, None]
        out.index_add_(0, tok, h.to(out.dtype))
    return out


class HybridExperts(nn.Module):
    """Holds one layer's expert weights on their home device and one operator per stage."""

    def __init__(self, orig: nn.Module, placement, dtype: torch.dtype, staging=None):
        super().__init__()
        from .registry import OPERATORS
        self.layer, self.placement = placement.layer, placement
        E, I2, H = orig.gate_up_proj.shape
        self.num_experts, self.hidden, self.inter = E, H, I2 // 2
        self.act_fn = orig.act_fn
        self.silu_act = isinstance(orig.act_fn, torch.nn.SiLU) or type(orig.act_fn).__name__ == "SiLUActivation"
        self.streamer = None     # set by the model build when this layer's prefill may stream to the GPU
        home = torch.device(placement.home)
        # Filled by the weight loader; meta until then.
        self.gate_up_proj = nn.Parameter(torch.empty(E, I2, H, dtype=dtype, device="meta"), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(E, H, I2 // 2, dtype=dtype, device="meta"), requires_grad=False)
        self.home = home
        self.stage = "prefill"
        self.ops = {}
        for stage in ("prefill", "decode"):
            sp = getattr(placement, stage)
            dev = None if sp.device == "auto" else torch.device(sp.device)   # auto: decided per call
            self.ops[stage] = OPERATORS[sp.op].load()(self, dev, staging)

    def finalize(self) -> None:
        """After loading: CPU-resident weights are packed into their format (int8/int4 quantized here)."""
        from .quant import pack
        self.packed = None
        fmt = self.placement.weight_format
        if self.home.type != "cpu" or (fmt == "bf16" and self.gate_up_proj.dtype != torch.bfloat16):
            return
        self.packed = pack(fmt, self.gate_up_proj.data, self.down_proj.data, self.placement.group_size)
        if fmt != "bf16":   # the bf16 copy is dropped: only the quantized weights stay resident
            self.gate_up_proj = nn.Parameter(torch.empty(0, dtype=self.gate_up_proj.dtype), requires_grad=False)
            self.down_proj = nn.Parameter(torch.empty(0, dtype=self.down_proj.dtype), requires_grad=False)

    @property
    def quantized(self):
        """The packed int8/int4 weights when this layer's experts are stored quantized (after finalize), else None."""
        packed = getattr(self, "packed", None)
        return packed if packed is not None and packed.fmt != "bf16" else None

    @property
    def stream_src(self):
        """The host tensors a streamed prefill copies: the packed weights (bf16 or quantized), or the raw ones."""
        if getattr(self, "packed", None) is not None:
            return self.packed
        from .quant import ExpertWeights
        return ExpertWeights("bf16", self.inter, 0, self.gate_up_proj.data, None, self.down_proj.data, None)

    def expert_weights(self, e: int, dtype):
        """(gate_up[e], down[e]) for the torch path, dequantized when the stored format is int8/int4."""
        if self.quantized:
            return self.packed.expert(e, dtype)
        return self.gate_up_proj[e], self.down_proj[e]

    def weights_on(self, device: torch.device):
        """The weights on `device`: the resident ones, or a per-call copy (prefill away from home)."""
        if self.quantized:   # prefill on another device
            dq = [self.packed.expert(e, self.gate_up_proj.dtype) for e in range(self.num_experts)]
            return (torch.stack([d[0] for d in dq]).to(device), torch.stack([d[1] for d in dq]).to(device))
        if device == self.gate_up_proj.device:
            return self.gate_up_proj, self.down_proj
        return (self.gate_up_proj.to(device, non_blocking=True), self.down_proj.to(device, non_blocking=True))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return self.ops[self.stage](hidden_states, top_k_index, top_k_weights)

    def submit(self, hidden_states, top_k_index, top_k_weights, side=None):
        """forward in two halves (model/overlap.py): start, and `collect` the result after other GPU work; an
        operator that `takes_side` runs side() itself where it overlaps best (streamed prefill: beside the upload).
        The caller runs side() if it did not."""
        op = self.ops[self.stage]
        if hasattr(op, "submit"):
            return op, op.submit(hidden_states, top_k_index, top_k_weights)
        if getattr(op, "takes_side", False):
            return None, ("done", op(hidden_states, top_k_index, top_k_weights, side=side))
        return None, ("done", op(hidden_states, top_k_index, top_k_weights))

    def collect(self, job):
        op, handle = job
        return op.collect(handle) if op is not None else handle[1]

    def extra_repr(self):
        return (f"layer={self.layer}, E={self.num_experts}, H={self.hidden}, I={self.inter}, "
                f"prefill={self.placement.prefill.op}@{self.placement.prefill.device}, "
                f"decode={self.placement.decode.op}@{self.placement.decode.device}")


def set_stage(model: nn.Module, stage: str) -> None:
    for m in model.modules():
        if isinstance(m, HybridExperts):
            m.stage = stage


class DeviceOp:
    """Base for operators that compute on one device: moves inputs there and the result back."""

    def __init__(self, experts: HybridExperts, device: torch.device, staging=None):
        self.experts, self.device = experts, device

    def __call__(self, x, idx, w):
        dev = x.device
        y = self.compute(x.to(self.device), idx.to(self.device), w.to(self.device))
        return y.to(dev)
