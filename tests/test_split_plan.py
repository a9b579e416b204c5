"""`auto` prefill's split: the CPU's share and the GPU's computed at once, and the plan that sizes it (balance,
waits, calibration with a fixed part, exploration of the CPU way)."""
import math

import pytest
import torch

from ktcli.ops.base import eager_reference
from ktcli.ops.costs import PrefillRates
from test_stream import ckpt, routed, streamed_model  # noqa: F401  (ckpt: the checkpoint fixture)


@pytest.fixture(autouse=True)
def no_routed(monkeypatch):
    """These tests are about the range split, which `auto` weighs only where KTCLI_PREFILL_WAYS names it (the
    routed way, tests/test_routed.py, is then out of the plans)."""
    monkeypatch.setenv("KTCLI_PREFILL_WAYS", "split")


def split_model(tmp_path, ckpt, fmt, n):
    """Every layer `auto`, planned as a split giving the CPU experts [0, n)."""
    from ktcli.ops.prefill import AutoPrefill
    layers, st = streamed_model(tmp_path, ckpt, fmt)
    for m in layers:
        op = AutoPrefill(m, None, None)
        op.plan = lambda T, n=n: {"way": "split", "n_cpu": n, "seconds": 0.0}
        m.ops["prefill"] = op
    return layers, st


@pytest.mark.parametrize("join", ["flag", "host"])
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_split_layers_match_the_eager_reference_and_copy_only_the_gpu_share(tmp_path, ckpt, fmt, join, monkeypatch):
    """The CPU computes experts [0, n) from the host copy while experts [n, E) stream: every split point, every
    format, uneven loads (the last quarter of experts gets no token); its share joined by the worker's flag
    (ops/joined.py: summed per token on the CPU) or by the host (KTCLI_SPLIT_JOIN=host)."""
    monkeypatch.setenv("KTCLI_SPLIT_JOIN", join)
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



def test_the_split_calibration_fits_a_fixed_part_once_two_shares_were_measured(tmp_path, ckpt):
    """measured = fixed + scale × probed: one share size gives a scale alone; a second prefill at another share
    separates the fixed part, which the plan then adds in series with the CPU's work (a smaller split, or none)."""
    from ktcli.ops.prefill import AutoPrefill
    from ktcli.ops.calibration import fit_fixed
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


def test_a_flag_joined_share_that_fails_raises_its_flag_and_then_its_error(tmp_path, ckpt):
    """The GPU waits for the flag whatever the share did (a hang otherwise); the error reaches the caller at the
    join (at once on the CPU, at the streamer's collect on a GPU), and the next share runs as usual."""
    from ktcli.ops.joined import joiner
    layers, st = split_model(tmp_path, ckpt, "bf16", 3)
    m = layers[0]
    op = m.ops["prefill"]
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(64, m.hidden, generator=gen)
    idx, w = routed(64, m.num_experts, st.top_k, gen)
    real = op.cpu._moe

    def failing(*args):
        raise RuntimeError("share failed")
    op.cpu._moe = failing
    with pytest.raises(RuntimeError, match="share failed"):
        op._split(x, idx, w, 3)
    jn = joiner(st)
    assert int(jn.word[0]) == jn.seq == 1 and jn.jobs == []
    op.cpu._moe = real
    got = op._split(x, idx, w, 3)
    assert int(jn.word[0]) == 2 and torch.isfinite(got).all()
