"""Streaming prefill (ops/stream.py, ops/prefill.py) without a GPU: the same slot and prefetch logic with a CPU
"device", every format against the eager reference on fresh random inputs, the cost model, and the plan's
`auto` / `stream` prefill placement (validate-config with a target GPU)."""
import math

import pytest
import torch

from conftest import H100
from ktcli.ops.base import HybridExperts, eager_reference
from ktcli.ops.costs import PrefillRates, cpu_seconds, layer_costs, used_experts
from ktcli.ops.prefill import StreamedExperts
from ktcli.ops.stream import Streamer
from test_kernel_model import built_on_cpu, with_format
from tiny import experts_rule, make_checkpoint

ALL_CPU = experts_rule(".*", "cpu", "cpu", "cpu")


def routed(T, E, K, gen):
    """Uneven loads: tokens pick K distinct experts from the first 3/4 of E, weighted towards low ids, so some
    experts get many tokens and the last quarter none."""
    p = torch.linspace(2, 1, (3 * E) // 4)
    idx = torch.stack([torch.multinomial(p, K, generator=gen) for _ in range(T)])
    return idx, torch.rand(T, K, generator=gen)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.getbasetemp(), "qwen3_moe", seed=3, layers=3)


def streamed_model(tmp_path, ckpt, fmt, dtype="float32"):
    b = built_on_cpu(tmp_path, ckpt, [with_format(ALL_CPU, fmt, 16)], dtype)
    layers = [m for m in b.model.modules() if isinstance(m, HybridExperts)]
    st = Streamer(torch.device("cpu"))
    for m in layers:
        m.ops["prefill"] = StreamedExperts(m, None)
        st.add(m)
    st.setup(b.model.config.num_experts_per_tok, threads=1)
    return layers, st


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_streamed_experts_match_the_eager_reference(tmp_path, ckpt, fmt):
    layers, st = streamed_model(tmp_path, ckpt, fmt)
    gen = torch.Generator().manual_seed(11)
    for T in (17, 64, 512, 2048):
        for m in layers:                                    # one pass in layer order, as a forward makes it
            K = st.top_k
            x = torch.randn(T, m.hidden, generator=gen)
            idx, w = routed(T, m.num_experts, K, gen)
            got = m.ops["prefill"](x, idx, w)
            deq = [m.stream_src.expert(e, torch.float32) if fmt != "bf16" else
                   (m.gate_up_proj[e], m.down_proj[e]) for e in range(m.num_experts)]
            want = eager_reference(x, idx, w, torch.stack([d[0] for d in deq]), torch.stack([d[1] for d in deq]),
                                   m.act_fn)
            assert ((got - want).norm() / want.norm()).item() <= 1e-5, (fmt, T, m.layer)
            assert bool((got[idx.eq(0).any(1) == False].abs().sum() >= 0).all())   # noqa: E712 (rows all written)


def test_each_layer_is_uploaded_once_per_pass_and_slots_alternate(tmp_path, ckpt):
    layers, st = streamed_model(tmp_path, ckpt, "int8")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, layers[0].hidden, generator=gen)
    idx, w = routed(32, layers[0].num_experts, st.top_k, gen)
    st.take_stats()
    for m in layers:
        m.ops["prefill"](x, idx, w)
        pos = m.stream_pos
        assert st.holds[pos % 2] == (pos, 0)                # (layer, first expert held)
        if pos + 1 < len(layers):                           # the next layer was prefetched into the other slot
            assert st.holds[(pos + 1) % 2] == (pos + 1, 0)
    s = st.take_stats()
    assert s["layers_streamed"] == 3
    assert s["upload_bytes"] == sum(m.stream_src.nbytes() for m in layers)
    # a layer already in its slot is not copied again (two streamed layers stay resident between chunks)
    layers[2].ops["prefill"](x, idx, w)
    assert st.take_stats()["upload_bytes"] == 0


def test_cost_model_prefers_the_cpu_for_short_chunks_and_streaming_for_long_ones(tmp_path, ckpt):
    layers, st = streamed_model(tmp_path, ckpt, "int8")
    m = layers[0]
    st.rates = PrefillRates(pcie_bps=50e9, cpu_bps=100e9, cpu_flops=1e12, gpu_flops=500e12)
    short, long = layer_costs(m, 1, st.top_k, st.rates), layer_costs(m, 4096, st.top_k, st.rates)
    assert short["cpu"] < short["stream"] and long["stream"] < long["cpu"]
    assert long["stream"] == pytest.approx(m.stream_src.nbytes() / 50e9)
    # used experts: never more than E, one token touches K
    assert used_experts(8, 2, 1) == pytest.approx(2) and used_experts(8, 2, 10_000) == pytest.approx(8)
    assert cpu_seconds(8, 2, 32, 16, 1e3, 16, True, PrefillRates()) == math.inf   # no rate measured: never chosen


def test_plan_puts_cpu_experts_prefill_on_auto_and_streams_named_gpu_prefill(cli, tmp_path, ckpt):
    from test_validate_config import write
    p = write(tmp_path, f"""\
        model: {ckpt}
        dtype: bfloat16
        rules:
          - match: {{name: "^model\\\\.layers\\\\.0\\\\.mlp\\\\.experts$"}}
            replace: {{class: Experts, kwargs: {{generate_device: cpu, generate_op: cpu}}}}
          - match: {{name: "^model\\\\.layers\\\\.1\\\\.mlp\\\\.experts$"}}
            replace: {{class: Experts, kwargs: {{generate_device: cpu, generate_op: cpu, prefill_device: cuda,
                                                 prefill_op: KExpertsTorch}}}}
          - match: {{name: "^model\\\\.layers\\\\.2\\\\.mlp\\\\.experts$"}}
            replace: {{class: Experts, kwargs: {{generate_device: cpu, prefill_device: cpu, prefill_op: cpu}}}}
        """)
    r = cli("validate-config", p, H100, "--json")
    assert r.exit_code == 0, r
    import json
    plan = {e["layers"]: (e["prefill_device"], e["prefill_op"]) for e in json.loads(r.stdout)["experts"]}
    assert plan == {"0": ("auto", "auto"), "1": ("cuda:0", "stream"), "2": ("cpu", "cpu")}   # cpu: KTransformers' meaning
    r = cli("validate-config", p, H100)
    assert "prefill stream buffers (2 layers)" in r.output
    # the choice per range of chunk lengths, before anything loads
    assert "layers 0: prefill auto computes on the CPU for chunks of 1-" in r.output
    assert "streams to the GPU for chunks of " in r.output
    assert "layers 1: prefill stream streams every chunk to the GPU" in r.output


def test_streaming_gpu_resident_experts_is_refused(cli, tmp_path, ckpt):
    from test_validate_config import write
    p = write(tmp_path, f"""\
        model: {ckpt}
        rules:
          - match: {{name: "^model\\\\.layers\\\\..*\\\\.mlp\\\\.experts$"}}
            replace: {{class: Experts, kwargs: {{generate_device: cuda, generate_op: gpu_static, prefill_device: auto}}}}
        """)
    r = cli("validate-config", p, H100)
    assert r.exit_code == 1, r
    assert "operator 'auto' copies experts from cpu, but layers 0-2 keep their weights on cuda:0" in r.output


@pytest.mark.parametrize("T", [17, 64, 512, 2048])
def test_grouped_gemm_path_matches_the_eager_reference(T):
    """The GPU's one-kernel-per-matrix path (torch._grouped_mm; CPU here) against the eager loop, uneven loads."""
    from ktcli.ops.grouped import grouped
    from ktcli.ops.slots import Resident
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    gen = torch.Generator().manual_seed(T)
    E, H, I, K = 8, 64, 32, 2
    gu, dn = torch.randn(E, 2 * I, H, generator=gen).bfloat16(), torch.randn(E, H, I, generator=gen).bfloat16()
    x = torch.randn(T, H, generator=gen).bfloat16()
    idx, w = routed(T, E, K, gen)
    got = grouped(x, idx, w, Resident(gu, dn), E, torch.nn.SiLU())
    want = eager_reference(x.float(), idx, w, gu.float(), dn.float(), torch.nn.SiLU())
    assert ((got.float() - want).norm() / want.norm()).item() <= 1e-2


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_block_dequantization_equals_per_expert(fmt):
    from ktcli.ops.quant import pack
    from ktcli.ops.slots import BlockDequant
    gen = torch.Generator().manual_seed(2)
    pk = pack(fmt, torch.randn(7, 32, 48, generator=gen), torch.randn(7, 48, 16, generator=gen), 16)
    bd = BlockDequant(pk, {p: getattr(pk, p) for p in ("gu", "gu_s", "dn", "dn_s")}, torch.float32)
    bd.block = 3                                             # 7 experts: blocks of 3, 3, 1
    want = [pk.expert(e, torch.float32) for e in range(7)]
    for e in range(7):
        assert all(torch.equal(a, b) for a, b in zip(bd(e), want[e]))
    gu, dn = bd.full()
    assert torch.equal(gu, torch.stack([w[0] for w in want])) and torch.equal(dn, torch.stack([w[1] for w in want]))


def test_cpu_gemm_rate_follows_the_rows_per_expert():
    from ktcli.ops.costs import gemm_rate
    r = PrefillRates(cpu_flops=4e12, cpu_flops_small=0.5e12)
    assert gemm_rate(r, 8) == 0.5e12 and gemm_rate(r, 512) == 4e12
    assert 0.5e12 < gemm_rate(r, 64) < gemm_rate(r, 128) < 4e12
    assert gemm_rate(PrefillRates(cpu_flops=4e12), 8) == 4e12      # no small probe: the one rate


@pytest.mark.parametrize("first", [0, 3, 5])
def test_grouped_gemm_skips_the_cpu_share(first):
    """Experts [first, E) only, the weights given from `first` on (a split layer's slot)."""
    from ktcli.ops.grouped import grouped
    from ktcli.ops.slots import Resident
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    gen = torch.Generator().manual_seed(first)
    E, H, I, K, T = 8, 64, 32, 2, 100
    gu, dn = torch.randn(E, 2 * I, H, generator=gen).bfloat16(), torch.randn(E, H, I, generator=gen).bfloat16()
    x = torch.randn(T, H, generator=gen).bfloat16()
    idx, w = routed(T, E, K, gen)
    got = grouped(x, idx, w, Resident(gu[first:], dn[first:]), E - first, torch.nn.SiLU(), first)
    wg = torch.where(idx >= first, w, 0.0)                  # the CPU's pairs contribute nothing here
    want = eager_reference(x.float(), idx, wg, gu.float(), dn.float(), torch.nn.SiLU())
    assert ((got.float() - want).norm() / want.norm()).item() <= 1e-2
    assert torch.isfinite(got).all()


DEQUANT_CHECK = """
import torch
from ktcli.ops.dequant_gpu import available, dequantize_fast
from ktcli.ops.quant import dequantize, quantize
gen = torch.Generator().manual_seed(4)
for fmt in ("int8", "int4"):
    for shape in ((3, 40, 64), (2, 17, 256)):
        q, s = quantize(fmt, torch.randn(*shape, generator=gen), 32)
        assert available(q)
        want = dequantize(fmt, q, s, 32, torch.float32)
        got = dequantize_fast(fmt, q, s, 32, torch.bfloat16).float()
        assert ((got - want).abs() <= want.abs() * 2 ** -7 + 1e-30).all(), (fmt, shape)   # one bf16 ulp
print("ok")
"""


def test_one_pass_gpu_dequantization_equals_the_reference():
    """The Triton kernel under Triton's CPU interpreter (where Triton is installed; on the GPU in
    test_stream_gpu) against quant.dequantize, within one bf16 rounding. A child process: the interpreter is
    chosen when the kernels are defined."""
    import os
    import subprocess
    import sys
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", DEQUANT_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_long_bf16_chunks_through_the_kernel_match_the_eager_reference(tmp_path, ckpt):
    """bf16 chunks past the decode size through our kernel's slices (what `auto` picks where the measured rates
    say it beats torch's GEMMs), uneven loads, against the eager loop."""
    from ktcli.ops import kernels
    from ktcli.ops.cpu import CpuExperts, kernel_path
    layers, st = streamed_model(tmp_path, ckpt, "bf16", "bfloat16")
    m = layers[0]
    if not kernel_path(m, 1):
        pytest.skip("the CPU kernel is not built here")
    op = CpuExperts(m, torch.device("cpu"), None)
    op.long_bf16 = True
    gen = torch.Generator().manual_seed(8)
    for T in (17, 64, 512, 2048):
        x = torch.randn(T, m.hidden, generator=gen).bfloat16()
        idx, w = routed(T, m.num_experts, st.top_k, gen)
        w = w.bfloat16()
        kernels.take_stats()
        got = op.compute(x, idx, w)
        want = eager_reference(x.float(), idx, w.float(), m.gate_up_proj.float(), m.down_proj.float(), m.act_fn)
        assert ((got.float() - want).norm() / want.norm()).item() <= 1e-2, T        # bf16 activations in the kernel
        S = kernels.slice_tokens(T, st.top_k, m.hidden, m.inter)
        assert kernels.take_stats()["calls"] == -(-T // S), T                # the kernel ran, once a slice


def test_the_kernel_rate_is_measured_and_chosen_for_long_bf16_chunks_when_faster(tmp_path, ckpt, monkeypatch):
    from ktcli.ops import kernels
    from ktcli.ops.cpu import kernel_path
    layers, st = streamed_model(tmp_path, ckpt, "bf16", "bfloat16")
    m = layers[0]
    if not kernel_path(m, 1):
        pytest.skip("the CPU kernel is not built here")
    caps = kernels.caps()   # without AMX tiles: a choice (with them long bf16 chunks take the kernel anyway)
    monkeypatch.setattr(kernels, "caps", lambda: {**caps, "amx_on": False})
    assert st.rates.kernel_flops > 0                           # probed at setup
    fast = PrefillRates(pcie_bps=50e9, cpu_bps=100e9, cpu_flops=1e12, cpu_flops_small=1e11, kernel_flops=1e13)
    slow = PrefillRates(pcie_bps=50e9, cpu_bps=100e9, cpu_flops=1e12, cpu_flops_small=1e11, kernel_flops=1e9)
    assert layer_costs(m, 512, st.top_k, fast)["kernel"] and not layer_costs(m, 512, st.top_k, slow)["kernel"]
    assert layer_costs(m, 512, st.top_k, fast)["cpu"] < layer_costs(m, 512, st.top_k, slow)["cpu"]
    assert not layer_costs(m, 8, st.top_k, fast)["kernel"]     # decode sizes take the kernel anyway
