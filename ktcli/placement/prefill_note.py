"""The pre-launch note on `auto` prefill: per range of chunk lengths, what a layer of CPU-resident experts does
(the CPU, streaming, or the routed split where a timed chunk confirms it), at assumed rates and uniform routing."""
from __future__ import annotations

import math

from .checks import NOTE, Finding, _group, _where, fmt_bytes, ranges
from .memory import expert_bytes_per_param


def _span(Ts: list) -> str:
    """Chunk lengths (powers of two up to 2**16) as '32', '64-512' or '1024+'."""
    return f"{Ts[0]}" + ("+" if Ts[-1] >= 2 ** 16 else f"-{Ts[-1]}" if len(Ts) > 1 else "")


def check_prefill(profile, plan, model, rates=None) -> list:
    """What `auto` prefill will do: per range of chunk lengths, the CPU, a routed split or streaming, and a layer's
    copy time, at assumed rates and uniform routing (the run measures its own rates at load and the routing of
    each chunk, and decides from those)."""
    from ..ops.costs import ROUTED_GAIN, PrefillRates, choose, cpu_seconds, stream_seconds, used_experts
    from ..ops.routed import assign, expected_counts, work_of
    from .fit import Rates
    r = rates or Rates()
    pr = PrefillRates(pcie_bps=r.pcie_bw, cpu_bps=r.cpu_bw, cpu_flops=r.cpu_prefill_flops, gpu_flops=r.gpu_flops)
    k = getattr(model.config, "num_experts_per_tok", 1)
    out = []
    for es in _group(plan, lambda e: (e.prefill.op, e.weight_format)):
        e = es[0]
        if e.prefill.op not in ("auto", "stream"):
            continue
        m = model.get_submodule(e.module)
        E, I2, H = m.gate_up_proj.shape
        per = 3 * (I2 // 2) * H * expert_bytes_per_param(e.weight_format, 2, e.group_size)
        copy = stream_seconds(E * per, pr)
        ways = {}                          # chunk length → auto's way (cpu / routed / stream), by powers of two
        for T in (2 ** i for i in range(17)):
            cpu = cpu_seconds(E, k, H, I2 // 2, per, T, e.weight_format != "bf16" or T <= 16, pr)
            best = choose(copy, cpu, used_experts(E, k, T) * per / pr.cpu_bps, E, math.inf)
            work = work_of(expected_counts(E, k, T), per, 6 * H * (I2 // 2), pr.cpu_bps, pr.cpu_flops, True)
            gpu, _, left = assign(work, copy / E)
            way = best["way"]
            if T > 16 and max(len(gpu) * copy / E, left) <= ROUTED_GAIN * best["seconds"]:   # uniform routing
                way = f"routed|{way}"        # routed if a timed chunk confirms it (Calibration.chunk_policy)
            ways.setdefault(way, []).append(T)
        said = {"cpu": "computes on the CPU", "stream": "streams to the GPU"}
        other = {"cpu": "on the CPU", "stream": "streamed"}
        what = ("streams every chunk to the GPU" if e.prefill.op != "auto" else ", ".join(
            (f"splits each chunk's routed experts between the CPU and the copy where a timed chunk beats the "
             f"plan ({other[way.split('|')[1]]} otherwise)" if "|" in way else said[way])
            + f" for chunks of {_span(Ts)} tokens" for way, Ts in ways.items()))
        out.append(Finding(NOTE, "prefill", f"layers {ranges(x.layer for x in es)}: prefill {e.prefill.op} {what} "
                           f"(a layer's {e.weight_format} experts, {fmt_bytes(E * per)}, copy in {1e3 * copy:.0f} ms "
                           f"at {r.pcie_bw / 1e9:.0f} GB/s, rates: {r.source}; a run decides from the rates it "
                           f"measures at load)", _where(e, profile)))
    return out
