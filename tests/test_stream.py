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
    from ktcli.ops.prefill import grouped
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


def split_model(tmp_path, ckpt, fmt, n):
    """Every layer `auto`, planned as a split giving the CPU experts [0, n)."""
    from ktcli.ops.prefill import AutoPrefill
    layers, st = streamed_model(tmp_path, ckpt, fmt)
    for m in layers:
        op = AutoPrefill(m, None, None)
        op.plan = lambda T, n=n: {"way": "split", "n_cpu": n, "seconds": 0.0}
        m.ops["prefill"] = op
    return layers, st


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_split_layers_match_the_eager_reference_and_copy_only_the_gpu_share(tmp_path, ckpt, fmt):
    """The CPU computes experts [0, n) from the host copy while experts [n, E) stream: every split point, every
    format, uneven loads (the last quarter of experts gets no token)."""
    gen = torch.Generator().manual_seed(5)
    E = None
    for n in (1, 3, 7):
        layers, st = split_model(tmp_path, ckpt, fmt, n)
        E = layers[0].num_experts
        assert n < E
        for T in (17, 64, 512, 2048):
            st.take_stats()
            for m in layers:
                x = torch.randn(T, m.hidden, generator=gen)
                idx, w = routed(T, m.num_experts, st.top_k, gen)
                got = m.ops["prefill"]._split(x, idx, w, n)
                deq = [m.stream_src.expert(e, torch.float32) for e in range(E)]
                want = eager_reference(x, idx, w, torch.stack([d[0] for d in deq]),
                                       torch.stack([d[1] for d in deq]), m.act_fn)
                assert ((got - want).norm() / want.norm()).item() <= 1e-5, (fmt, n, T, m.layer)
            s = st.take_stats()
            assert s["layers_split"] == len(layers)
            tail = sum(sum(t[n:].numel() * t.element_size() for t in (m.stream_src.gu, m.stream_src.gu_s,
                       m.stream_src.dn, m.stream_src.dn_s) if t is not None) for m in layers)
            assert s["upload_bytes"] <= tail and (T > 17 or s["upload_bytes"] == tail)


def test_split_choice_balances_the_cpu_and_the_copy():
    from ktcli.ops.costs import choose
    # equal costs: half the experts each, half the time
    assert choose(1.0, 1.0, 0.0, 64) == {"way": "split", "n_cpu": 32, "seconds": 0.5}
    # the CPU 3x slower: it takes a quarter
    c = choose(1.0, 3.0, 0.0, 64)
    assert c["way"] == "split" and c["n_cpu"] == 16 and c["seconds"] == pytest.approx(0.75)
    # DRAM bounds the split: never under the floor
    assert choose(1.0, 1.0, 0.7, 64)["seconds"] == 0.7
    # a split saving < 10% is not taken; one side missing: the other
    assert choose(1.0, 19.0, 0.0, 64) == {"way": "stream", "n_cpu": 0, "seconds": 1.0}
    assert choose(9.0, 1.0, 0.0, 64)["way"] == "cpu" and choose(math.inf, 1.0, 0.0, 64)["n_cpu"] == 64
    # a split's CPU share slower than the CPU alone (beside the copies): balanced on its own rate
    assert choose(1.0, 1.0, 0.0, 64, 3.0) == {"way": "split", "n_cpu": 16, "seconds": 0.75}
    assert choose(1.0, 0.5, 0.0, 64, 3.0)["way"] == "cpu"
    # a split layer's wait for its inputs runs before the CPU's share: the CPU takes fewer experts, and where the
    # wait eats the gain the layer streams (int8 pp2048, 2026-12-06: split 2,836 t/s against streaming's ~3,800)
    c = choose(1.0, 1.0, 0.0, 64, None, 0.2)
    assert c["way"] == "split" and c["n_cpu"] == round(64 * 0.8 / 2) and c["seconds"] == pytest.approx(0.6, abs=0.01)
    assert choose(1.0, 1.2, 0.0, 64, None, 0.8)["way"] == "stream"
    assert choose(1.0, 1.0, 0.0, 64, None, 1.0)["way"] == "stream"


def test_a_layer_keeps_its_shortest_wait_per_chunk_bucket():
    from ktcli.ops.stream import Streamer
    st = Streamer.__new__(Streamer)
    st.waits = {}
    assert st.wait("split", 512) == 0.0
    for s in (0.004, 0.002, 0.003):
        st.observe_wait("split", 600, s)
    st.observe_wait("cpu", 600, 0.01)
    assert st.wait("split", 512) == 0.002 and st.wait("split", 1024) == 0.0 and st.wait("cpu", 1000) == 0.01


def test_split_share_follows_the_cpu_time_the_run_measured(tmp_path, ckpt):
    """The split's CPU share is planned with the probed rates until a prefill's splits measure the CPU: then with
    what they measured (per chunk-length bucket), and the roofline stays on the probes."""
    from ktcli.ops.costs import split_plan
    from ktcli.ops.prefill import AutoPrefill
    layers, st = streamed_model(tmp_path, ckpt, "bf16")
    m = layers[0]
    op = m.ops["prefill"] = AutoPrefill(m, None, None)
    op._first = False                                     # not the exploring layer (next test)
    E, T = m.num_experts, 512
    st.rates = PrefillRates(pcie_bps=1e9, cpu_bps=1e9, cpu_flops=1e9)
    s = split_plan(m, T, st.top_k, st.rates)
    cpu = s["cpu_s"]
    st.rates.pcie_bps = m.stream_src.nbytes() / cpu      # copying the layer costs what the CPU does: half each
    assert op.plan(T)["n_cpu"] == E // 2
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(T, m.hidden, generator=gen)
    idx, w = routed(T, E, st.top_k, gen)
    op._split(x, idx, w, E // 2)                          # a real split records its measured CPU time …
    (way, _, measured, probed), = st._splits
    assert way == "split" and measured > 0 and probed == pytest.approx(cpu / 2)
    st._splits = [("split", T, 3 * probed, probed)]      # … here replaced: the CPU ran 3x slower than probed
    st.collect()
    assert st.cpu_scale == {("split", T.bit_length()): pytest.approx(3.0)}
    assert st.calibration() == {512: pytest.approx(3.0)} and st.calibration("cpu") == {}
    assert op.plan(T)["n_cpu"] == E // 4                  # balanced against the measured rate: a quarter
    assert op.plan(T, calibrated=False)["n_cpu"] == E // 2
    assert op.plan(T // 4)["n_cpu"] == op.plan(T // 4, calibrated=False)["n_cpu"]     # another bucket: unchanged
    st._splits = [("cpu", T, cpu / 2, cpu)]              # a whole layer on the CPU measured half its probe: the
    st.collect()                                          # split's slowdown does not stand for it
    assert st.calibration("cpu") == {512: pytest.approx(0.5)} and st.calibration() == {512: pytest.approx(3.0)}
    assert op.plan(T)["way"] == "cpu"


def test_the_first_auto_layer_tries_the_cpu_way_the_plan_rejected_until_it_is_measured(tmp_path, ckpt):
    """A CPU way no layer has measured is run once per chunk-length bucket, by the first `auto` layer only, where
    its predicted time is within EXPLORE× of the plan's; the pipeline asks the same choice (its upload of the
    GPU's share follows it), and once measured the plan stands. A plan far worse, or forced, is not explored."""
    from ktcli.ops.costs import EXPLORE, explore
    from ktcli.ops.prefill import AutoPrefill
    layers, st = streamed_model(tmp_path, ckpt, "bf16")
    ops = [AutoPrefill(m, None, None) for m in layers]
    for m, op in zip(layers, ops):
        m.ops["prefill"] = op
    E, T = layers[0].num_experts, 512
    st.rates = PrefillRates(pcie_bps=1e9, cpu_bps=1e9, cpu_flops=1e9)
    cpu = ops[0].plan(T)["cpu_s"]
    st.rates.pcie_bps = layers[0].stream_src.nbytes() / cpu          # a split at half the experts is best …
    p = ops[0].plan(T)
    assert p["way"] == "split" and p["alts"]["cpu"]["seconds"] <= EXPLORE * p["seconds"]   # … the CPU close behind
    assert p["alts"]["split"] == {k: p[k] for k in ("way", "n_cpu", "seconds")}       # the plan is its own alt
    first, rest = ops[0].choice(T), ops[1].choice(T)
    assert first["way"] == "cpu" and first["explore"] and ops[0].cpu_share(T) == E and not ops[0].streams(T)
    assert rest == p and ops[1].cpu_share(T) == p["n_cpu"]
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(T, layers[0].hidden, generator=gen)
    idx, w = routed(T, E, st.top_k, gen)
    st.take_stats()
    ops[0]._route(x, idx, w)                                          # runs the whole layer on the CPU, timed
    assert st.take_stats()["layers_cpu"] == 1 and st.calibration("cpu")
    if ops[0].choice(T).get("explore"):                               # the CPU measured faster: now cpu is the plan
        assert ops[0].choice(T)["way"] == "split" == ops[0].plan(T)["alts"]["split"]["way"]   # and the split untried
        ops[0]._route(x, idx, w)
        assert st.take_stats()["layers_split"] == 1
    assert ops[0].choice(T) == ops[0].plan(T)                          # both measured: the plan stands
    split = {"way": "cpu", "n_cpu": E, "seconds": 1.0, "alts": {"split": {"way": "split", "n_cpu": 3, "seconds": 0.9}}}
    assert explore(split, lambda way: False)["way"] == "split"        # and the other way round
    far = {**split, "alts": {"split": {"way": "split", "n_cpu": 3, "seconds": EXPLORE + 0.1}}}
    assert explore(far, lambda way: False) == far and explore(split, lambda way: True) == split
    assert explore({"way": "split", "n_cpu": 3, "seconds": 0.0}, lambda way: False)["way"] == "split"   # forced


def test_cpu_gemm_rate_follows_the_rows_per_expert():
    from ktcli.ops.costs import gemm_rate
    r = PrefillRates(cpu_flops=4e12, cpu_flops_small=0.5e12)
    assert gemm_rate(r, 8) == 0.5e12 and gemm_rate(r, 512) == 4e12
    assert 0.5e12 < gemm_rate(r, 64) < gemm_rate(r, 128) < 4e12
    assert gemm_rate(PrefillRates(cpu_flops=4e12), 8) == 4e12      # no small probe: the one rate


@pytest.mark.parametrize("first", [0, 3, 5])
def test_grouped_gemm_skips_the_cpu_share(first):
    """Experts [first, E) only, the weights given from `first` on (a split layer's slot)."""
    from ktcli.ops.prefill import grouped
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


def test_the_split_calibration_fits_a_fixed_part_once_two_shares_were_measured(tmp_path, ckpt):
    """measured = fixed + scale × probed: one share size gives a scale alone; a second prefill at another share
    separates the fixed part, which the plan then adds in series with the CPU's work (a smaller split, or none)."""
    from ktcli.ops.prefill import AutoPrefill
    from ktcli.ops.stream import fit_fixed
    assert fit_fixed([(1.0, 2.0), (1.2, 2.2)]) is None                          # < 1.5× apart: no fit
    assert fit_fixed([(1.0, 3.0), (2.0, 4.0), (4.0, 6.0)]) == pytest.approx((2.0, 1.0))
    assert fit_fixed([(1.0, 0.1), (4.0, 0.1)]) == pytest.approx((0.0, 0.25))    # clamped: scale ≥ 0.25, fixed ≥ 0
    layers, st = streamed_model(tmp_path, ckpt, "bf16")
    m = layers[0]
    op = m.ops["prefill"] = AutoPrefill(m, None, None)
    op._first = False
    E, T = m.num_experts, 512
    st.rates = PrefillRates(pcie_bps=1e9, cpu_bps=1e9, cpu_flops=1e9)
    cpu = op.plan(T)["cpu_s"]
    st.rates.pcie_bps = m.stream_src.nbytes() / cpu                # half each by the probes
    first = op.plan(T)
    assert first["n_cpu"] == E // 2
    fixed = 0.3 * cpu
    st._splits = [("split", T, fixed + p, p) for p in (cpu / 2,) * 3]            # one share: a scale only
    st.collect()
    assert st.fixed("split", T) == 0.0 and st.scale("split", T) == pytest.approx(1.6)
    st._splits = [("split", T, fixed + p, p) for p in (cpu / 8,) * 3]            # another share: the fit
    st.collect()
    assert st.fixed("split", T) == pytest.approx(fixed) and st.scale("split", T) == pytest.approx(1.0)
    p = op.plan(T)
    assert p["way"] == "stream" or p["n_cpu"] < first["n_cpu"]
    assert p["seconds"] >= min(first["seconds"] + fixed / 2, cpu)              # the fixed part is charged
