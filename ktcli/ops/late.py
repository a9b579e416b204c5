"""Late experts of a split layer: once the layer's routing is on the host, the few experts of the CPU's share that
this chunk routes most cross to the GPU then (a slot of LATE_SHARE of a layer) and run there beside the streamed
share, so the CPU keeps the cold ones.

Why: the plan fixes the split before the routing is known (the GPU's share streams during the previous layer),
and routing is uneven and moves with the prompt. The synthetic Qwen3-30B checkpoint touches 36-58 of 128 experts
a layer at pp512, 8 of them take 67-75% of the pairs, and two prompts share 0-3 of a layer's top 8 (2026-12-06).
A share holding a hot expert ran several times its estimate, and earlier prompts' routing could not say which
experts would be hot. An int4 Qwen3 expert is 2.4 MB: ~45 µs of copying. Shape legend: T tokens, K top-k,
E experts, n the CPU's share [0, n).
"""
from __future__ import annotations

import torch

from .cpu import kernel_path
from .slots import BlockDequant, Resident

LATE_SHARE = 8          # the late slot holds up to E // LATE_SHARE experts of the largest layer
PARTS = ("gu", "gu_s", "dn", "dn_s")


def pick(experts, counts: list, n: int, rates) -> tuple:
    """Experts of the CPU's share [0, n) to move to the GPU, ascending: the most routed first, while moving one
    lowers the layer's slower side (the CPU's probed time of its pairs and touched bytes against the copies of
    the streamed share and the moved experts). counts: pairs per expert of the share, this chunk."""
    E = experts.num_experts
    if not (rates.pcie_bps and rates.cpu_bps and n):
        return ()
    per = experts.stream_src.nbytes() / E
    rate = (rates.kernel_flops or rates.cpu_flops) if kernel_path(experts, 2 ** 20) else rates.cpu_flops
    if not rate:
        return ()
    fpp = 2 * 3 * experts.hidden * experts.inter   # FLOPs a (token, expert) pair
    cost = [(c > 0) * per / rates.cpu_bps + c * fpp / rate for c in counts]
    cpu, gpu, copy = sum(cost), per * (E - n) / rates.pcie_bps, per / rates.pcie_bps
    moved = []
    for e in sorted(range(n), key=lambda e: -counts[e])[: max(E // LATE_SHARE, 1)]:
        if max(cpu - cost[e], gpu + copy) >= max(cpu, gpu):
            break
        moved.append(e)
        cpu, gpu = cpu - cost[e], gpu + copy
    return tuple(sorted(moved))


class LateSlot:
    """One GPU buffer per part for E // LATE_SHARE experts of the largest streamed layer, allocated at the first
    late move and kept (validate-config's memory table counts it)."""

    def __init__(self, st):
        self.bufs = {}
        for p in PARTS:
            sizes = [t[0].numel() * t.element_size() * max(m.num_experts // LATE_SHARE, 1)
                     for m in st.layers if (t := getattr(m.stream_src, p)) is not None]
            if sizes:
                self.bufs[p] = torch.empty(max(sizes), dtype=torch.uint8, device=st.device)

    def load(self, experts, moved: tuple):
        """The moved experts' weights copied in (on the current stream: in order with the compute that reads
        them, after the previous layer's), seen as e → (gate_up, down) with index j = moved[j]."""
        pk, v = experts.stream_src, {}
        for p, buf in self.bufs.items():
            t = getattr(pk, p)
            one = t[0].numel() * t.element_size()
            for j, e in enumerate(moved):
                buf[j * one:(j + 1) * one].copy_(t[e].reshape(-1).view(torch.uint8), non_blocking=True)
            v[p] = buf[: len(moved) * one].view(t.dtype).view(len(moved), *t.shape[1:])
        if pk.fmt == "bf16":
            return Resident(v["gu"], v["dn"])
        return BlockDequant(pk, v, experts.gate_up_proj.dtype)


def slot(st) -> LateSlot:
    if getattr(st, "late_slot", None) is None:
        st.late_slot = LateSlot(st)
    return st.late_slot


def lut(E: int, moved: tuple, device) -> torch.Tensor:
    """[E] int64: moved[j] → j, every other expert → -1."""
    t = torch.full((E,), -1, dtype=torch.int64)
    t[list(moved)] = torch.arange(len(moved))
    return t.to(device, non_blocking=True)
