"""A streamed layer's GPU slot seen as its experts, e → (gate_up[e], down[e]) in the compute dtype, or the whole
layer at once (full(), for the grouped GEMMs): bf16 slots as they are, int8/int4 ones dequantized on the GPU.
"""
from __future__ import annotations

import torch

from . import dequant_gpu
from .dequant_gpu import dequantize_fast


class Resident:
    """e → (gate_up[e], down[e]) of weights already in the compute format; full() the whole layer."""

    def __init__(self, gu, dn):
        self.gu, self.dn = gu, dn

    def __call__(self, e):
        return self.gu[e], self.dn[e]

    def full(self):
        return self.gu, self.dn


class BlockDequant:
    """e → (gate_up[e], down[e]) dequantized on the GPU a block of experts at a time: one set of kernels per block
    instead of per expert (per-expert launches made int4 prefill launch-bound: 26% of its roofline, 2026-12-04).
    Blocks of ≤ BLOCK_BYTES of output; the group loop asks for experts in increasing order."""
    BLOCK_BYTES = 256 * 2**20

    def __init__(self, pk, views, dtype):
        self.pk, self.v, self.dtype = pk, views, dtype
        E, H = views["gu"].shape[0], pk.dn.shape[1]   # experts in the slot, hidden
        per = 3 * pk.inter * H * 4                     # one expert's gate/up and down, fp32 while dequantizing
        self.block = max(1, min(E, self.BLOCK_BYTES // max(per, 1)))
        self.start, self.cache = -1, None

    def __call__(self, e: int):
        if self.cache is None or not self.start <= e < self.start + self.block:
            a = e - e % self.block
            b = a + self.block
            pk, v = self.pk, self.v
            self.start = a
            self.cache = (dequantize_fast(pk.fmt, v["gu"][a:b], v["gu_s"][a:b], pk.group, self.dtype),
                          dequantize_fast(pk.fmt, v["dn"][a:b], v["dn_s"][a:b], pk.group, self.dtype))
        return self.cache[0][e - self.start], self.cache[1][e - self.start]

    def full(self):
        """The whole layer dequantized at once (the grouped GEMM path: one layer of bf16 in GPU memory)."""
        pk, v = self.pk, self.v
        E = v["gu"].shape[0]
        gu = torch.empty(E, 2 * pk.inter, pk.dn.shape[1], dtype=self.dtype, device=v["gu"].device)
        dn = torch.empty(E, pk.dn.shape[1], pk.inter, dtype=self.dtype, device=v["gu"].device)
        if dequant_gpu.available(v["gu"]):      # one kernel per matrix, no fp32 temporaries
            dequantize_fast(pk.fmt, v["gu"], v["gu_s"], pk.group, self.dtype, out=gu)
            dequantize_fast(pk.fmt, v["dn"], v["dn_s"], pk.group, self.dtype, out=dn)
            return gu, dn
        for a in range(0, E, self.block):        # block by block: fp32 temporaries of one block only
            self.cache = None
            g, d = self(a)
            gu[a:a + self.block], dn[a:a + self.block] = self.cache
        return gu, dn
