"""Weight-only quantization of expert weights at load time, and the torch reference (dequantize) path.

int8: per output row, scale = absmax / 127, values stored + 128 as uint8.  int4: per group of G inputs, scale =
absmax / 7, values + 8 packed two per byte (low nibble = even input). Both offsets make the weights the unsigned
operand of the CPU kernel's integer dot products without a conversion per load.
Shapes: W [E, R, C] → q [E, R, C] or [E, R, C/2], uint8.
"""
from __future__ import annotations

import ctypes
import mmap
from dataclasses import dataclass

import torch


def hugepages(t: torch.Tensor) -> None:
    """Ask for transparent huge pages on a large CPU tensor before it is filled: streaming expert weights
    through 4 KiB pages costs a TLB miss per page. Best effort (Linux madvise; no-op elsewhere)."""
    nbytes = t.numel() * t.element_size()
    if nbytes < 2**22 or not hasattr(mmap, "MADV_HUGEPAGE"):
        return
    start = (t.data_ptr() + 2**21 - 1) & ~(2**21 - 1)
    end = (t.data_ptr() + nbytes) & ~(2**21 - 1)
    if end > start:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_HUGEPAGE)



@dataclass
class ExpertWeights:
    fmt: str
    inter: int
    group: int
    gu: torch.Tensor
    gu_s: torch.Tensor | None
    dn: torch.Tensor
    dn_s: torch.Tensor | None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gu, self.gu_s, self.dn, self.dn_s) if t is not None)

    def expert(self, e: int, dtype) -> tuple:
        """(gate_up[e], down[e]) dequantized to `dtype`: the pure-torch path."""
        return (dequantize(self.fmt, self.gu[e], None if self.gu_s is None else self.gu_s[e], self.group, dtype),
                dequantize(self.fmt, self.dn[e], None if self.dn_s is None else self.dn_s[e], self.group, dtype))


def quantize(fmt: str, w: torch.Tensor, group: int = 128):
    """w [..., R, C] (float) → (q, scale)."""
    w = w.float()
    if fmt == "int8":
        s = (w.abs().amax(-1) / 127).clamp_min(1e-12)
        return (torch.round(w / s[..., None]).clamp(-127, 127) + 128).to(torch.uint8), s
    if fmt == "int4":
        C = w.shape[-1]
        if C % group or group % 2:
            raise ValueError(f"int4 needs an even group size dividing {C}, got {group}")
        g = w.reshape(*w.shape[:-1], C // group, group)
        s = (g.abs().amax(-1) / 7).clamp_min(1e-12)
        q = (torch.round(g / s[..., None]).clamp(-8, 7) + 8).to(torch.uint8).reshape(*w.shape[:-1], C)
        return (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous(), s
    raise ValueError(fmt)


def dequantize(fmt: str, q: torch.Tensor, s, group: int, dtype=torch.float32) -> torch.Tensor:
    if fmt == "bf16":
        return q.to(dtype)
    if fmt == "int8":
        return ((q.float() - 128) * s[..., None]).to(dtype)
    lo, hi = (q & 15).to(torch.int8) - 8, (q >> 4).to(torch.int8) - 8
    v = torch.stack([lo, hi], -1).reshape(*q.shape[:-1], q.shape[-1] * 2).float()
    v = v.reshape(*v.shape[:-1], -1, group) * s[..., None]
    return v.reshape(*q.shape[:-1], q.shape[-1] * 2).to(dtype)


def pack(fmt: str, gate_up: torch.Tensor, down: torch.Tensor, group: int = 128) -> ExpertWeights:
    """bf16 expert weights → the stored format (bf16 keeps the tensors as they are)."""
    inter = down.shape[-1]
    if fmt == "bf16":
        return ExpertWeights("bf16", inter, group, gate_up.to(torch.bfloat16).contiguous(), None,
                             down.to(torch.bfloat16).contiguous(), None)
    gq, gs = _quantize_experts(fmt, gate_up, group)
    dq, ds = _quantize_experts(fmt, down, group)
    return ExpertWeights(fmt, inter, group, gq, gs, dq, ds)


def _quantize_experts(fmt, w, group):
    """Expert by expert into preallocated (huge-page advised) storage: transient memory is one expert in fp32."""
    q0, s0 = quantize(fmt, w[:1], group)
    q = torch.empty((w.shape[0], *q0.shape[1:]), dtype=q0.dtype)
    hugepages(q)
    s = torch.empty((w.shape[0], *s0.shape[1:]), dtype=torch.float32)
    hugepages(s)
    for e in range(w.shape[0]):
        qe, se = quantize(fmt, w[e:e + 1], group)
        q[e:e + 1].copy_(qe)
        s[e:e + 1].copy_(se)
    return q, s
