"""`auto` prefill's routed way (ops/routed.py): the split decided after the router, the most routed experts to the
GPU, only they copied, the CPU computing the other touched ones meanwhile; and the plan that predicts it."""
import pytest
import torch

from ktcli.ops.base import eager_reference
from ktcli.ops.costs import PrefillRates, split_plan
from ktcli.ops.routed import assign, expected_counts, routed_seconds
from test_stream import ckpt, routed, streamed_model  # noqa: F401  (ckpt: the checkpoint fixture)


def routed_model(tmp_path, ckpt, fmt, pick):
    """Every layer `auto`, planned routed; pick(counts) → the GPU's experts (the share the test wants)."""
    from ktcli.ops.prefill import AutoPrefill
    layers, st = streamed_model(tmp_path, ckpt, fmt)
    for m in layers:
        op = AutoPrefill(m, None, None)
        op.plan = lambda T, calibrated=True: {"way": "routed", "n_cpu": 0, "seconds": 0.0, "kernel": False}
        op.share = lambda T, counts, long_bf16=False: (pick(counts), 0.0)
        m.ops["prefill"] = op
    return layers, st


def top(n):
    return lambda counts: tuple(sorted(sorted(range(len(counts)), key=lambda e: -counts[e])[:n]))


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_routed_layers_match_the_eager_reference_and_copy_only_the_gpu_experts(tmp_path, ckpt, fmt):
    """Every share (none, the 1 or 3 most routed, every touched expert), every format, uneven loads (the last
    quarter of experts gets no token): the output is the eager reference's, and only the GPU's experts cross."""
    gen = torch.Generator().manual_seed(6)
    for n in (0, 1, 3, 99):
        layers, st = routed_model(tmp_path, ckpt, fmt, top(n))
        E = layers[0].num_experts
        for T in (17, 64, 512, 2048):
            st.take_stats()
            want_bytes = 0
            for m in layers:
                x = torch.randn(T, m.hidden, generator=gen)
                idx, w = routed(T, E, st.top_k, gen)
                got = m.ops["prefill"]._route(x, idx, w)
                deq = [m.stream_src.expert(e, torch.float32) for e in range(E)]
                want = eager_reference(x, idx, w, torch.stack([d[0] for d in deq]),
                                       torch.stack([d[1] for d in deq]), m.act_fn)
                assert ((got - want).norm() / want.norm()).item() <= 1e-5, (fmt, n, T, m.layer)
                counts = torch.bincount(idx.reshape(-1), minlength=E).tolist()
                gpu = [e for e in top(n)(counts) if counts[e] > 0] if n < 99 else top(n)(counts)
                src = m.stream_src
                want_bytes += sum(t[e].numel() * t.element_size() for e in gpu
                                  for t in (src.gu, src.gu_s, src.dn, src.dn_s) if t is not None)
            s = st.take_stats()
            assert s["layers_routed"] == len(layers) and s["layers_streamed"] == 0
            assert s["upload_bytes"] == want_bytes, (n, T)
            assert s["routed_touched"] == len(layers) * (3 * E) // 4      # routed(): the last quarter untouched


def test_assign_gives_the_gpu_the_experts_the_cpu_would_spend_longest_on():
    work = [0.0, 5.0, 1.0, 1.0, 0.0, 3.0]
    assert assign(work, 1.0) == ((1, 5), 2.0, pytest.approx(2.0))             # 2 copies against 2 of CPU work
    assert assign(work, 1.0, scale=2.0) == ((1, 2, 5), 3.0, pytest.approx(1.0))   # a slower CPU: one more
    assert assign(work, 100.0) == ((), 10.0, 10.0)                            # copies dear: the CPU takes all
    assert assign(work, 0.01) == ((1, 2, 3, 5), pytest.approx(0.04), 0.0)     # copies cheap: the GPU all touched
    gpu, t, _ = assign(work, 1.0, fixed=2.5)                                  # a fixed CPU part: fewer CPU experts
    assert gpu == (1, 2, 5) and t == pytest.approx(3.5)
    assert assign([0.0] * 4, 1.0) == ((), 0.0, 0.0)                            # nothing routed: nothing to do


def test_the_plan_takes_the_routed_way_where_routing_is_skewed_and_streams_long_chunks(tmp_path, ckpt):
    """Skewed routing (a profile measured by an earlier routed layer) makes the routed way cheaper than the range
    split and streaming in the roofline's plan; the run's plan routes only where timed chunks chose it; uniform
    routing of a long chunk leaves streaming ahead; the routed layer records the profile the next plans use, and a
    routed layer is not prefetched by the layer before it."""
    from ktcli.ops.prefill import AutoPrefill
    layers, st = streamed_model(tmp_path, ckpt, "bf16")
    ops = [AutoPrefill(m, None, None) for m in layers]
    for m, op in zip(layers, ops):
        m.ops["prefill"], op._first = op, False
    m, E, K = layers[0], layers[0].num_experts, st.top_k
    T = 64
    st.rates = PrefillRates(pcie_bps=1e9, cpu_bps=1e9, cpu_flops=1e9, kernel_flops=1e9)   # FLOPs dominate
    cpu = split_plan(m, T, K, st.rates)["cpu_s"]
    st.rates.pcie_bps = m.stream_src.nbytes() / cpu              # streaming the layer costs what the CPU does
    uniform = ops[0].plan(T)
    assert uniform["alts"]["routed"]["seconds"] == pytest.approx(
        routed_seconds(m, T, K, st.rates), rel=1e-6)
    skew = [0.9] + [0.1 / (E - 1)] * (E - 1)                      # one expert takes 90% of the pairs
    st.profiles[T.bit_length()] = skew
    p = ops[0].plan(T, calibrated=False)                         # the roofline's bound takes it
    assert p["way"] == "routed" and p["seconds"] < 0.5 * uniform["seconds"]
    q = ops[0].plan(T)                                           # the run's plan keeps it as the alternative …
    assert q["way"] != "routed" and q["alts"]["routed"]["seconds"] == pytest.approx(p["seconds"])
    assert ops[0].choice(T)["way"] != "routed"
    st.trials[T.bit_length()] = {"plan": [2.0], "routed": [1.0]}  # … which whole chunks timed faster take
    assert ops[0].choice(T)["way"] == "routed"
    assert not ops[0].streams(T) and ops[0].uses_slot(T) and ops[0].cpu_share(T) == 0
    assert expected_counts(E, K, T, skew)[0] == pytest.approx(0.9 * T * K)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(T, m.hidden, generator=gen)
    idx, w = routed(T, E, K, gen)
    st.take_stats()
    ops[0]._route(x, idx, w)
    s = st.take_stats()
    per = m.stream_src.nbytes() // E
    assert s["layers_routed"] == 1 and s["upload_bytes"] == s["routed_gpu_experts"] * per > 0   # the hot ones crossed
    counts = sorted(torch.bincount(idx.reshape(-1), minlength=E).tolist(), reverse=True)
    assert st.profile(T) == pytest.approx([c / (T * K) for c in counts])
    assert st.calibration("routed")                              # the CPU share was timed …
    want = routed_seconds(m, T, K, st.rates, st.profile(T), st.scale("routed", T), st.fixed("routed", T))
    assert ops[0].plan(T)["alts"]["routed"]["seconds"] == pytest.approx(want)   # … and the plan predicts with it
    assert "routed" not in ops[0].plan(16)["alts"]                # a few tokens: one CPU call, never routed
    st.profiles.clear()
    st.trials.clear()
    st.rates.pcie_bps = 100 * m.stream_src.nbytes() / cpu         # copies cheap, routing uniform: streaming wins
    assert ops[0].plan(T)["way"] == "stream" and ops[0].streams(T)


def test_auto_times_a_chunk_of_its_plan_and_one_routed_then_keeps_the_faster(tmp_path, ckpt, monkeypatch):
    """Per chunk-length bucket: one chunk of each policy cold (not kept: the plan's, then every layer routed), then
    one of each timed; then the faster policy is kept, routed only for ≥ 5% less. A few tokens are never routed."""
    from ktcli.ops.prefill import AutoPrefill
    layers, st = streamed_model(tmp_path, ckpt, "bf16")
    ops = [AutoPrefill(m, None, None) for m in layers]
    for m, op in zip(layers, ops):
        m.ops["prefill"], op._first = op, False
    T = 64
    st.rates = PrefillRates(pcie_bps=1e12, cpu_bps=1e9, cpu_flops=1e9, kernel_flops=1e9)   # copies cheap: it streams
    assert ops[0].plan(T)["way"] == "stream"
    seq = []
    for secs in (9.0, 8.0, 2.0, 1.0):                            # both cold, the plan's chunk, the routed chunk
        assert st.trialing(T)
        seq.append(pol := st.chunk_policy(T))
        assert [op.choice(T)["way"] for op in ops] == ["routed" if pol == "routed" else "stream"] * len(ops)
        st.observe_chunk(T, pol, secs)
    assert seq == ["plan", "routed", "plan", "routed"] and not st.trialing(T)
    assert st.chunk_policy(T) == "routed" and all(op.choice(T)["way"] == "routed" for op in ops)
    assert st.trial_report() == {"64": {"plan": [1e3 * 2.0 / T], "routed": [1e3 * 1.0 / T], "policy": "routed"}}
    st.trials[T.bit_length()]["routed"] = [0.96 * 2.0 / T]      # under 5% less: the plan stays
    assert st.chunk_policy(T) == "plan" and ops[0].choice(T)["way"] == "stream"
    assert st.chunk_policy(16) == "plan" and not st.trialing(16)   # a few tokens: one CPU call, never routed
    assert st.trialing(256) and st.chunk_policy(256) == "plan"      # another bucket starts its own trials
    monkeypatch.setenv("KTCLI_PREFILL_WAYS", "none")
    assert not st.trialing(256) and st.chunk_policy(T) == "plan"


def test_layers_on_several_gpus_share_one_chunk_policy(tmp_path, ckpt):
    """Streamers: the trials are one record for the model, the policy that of the GPU whose layers are `auto`."""
    from ktcli.ops.prefill import AutoPrefill
    from ktcli.ops.stream import Streamer, Streamers
    layers, st = streamed_model(tmp_path, ckpt, "bf16")
    for m in layers:
        m.ops["prefill"] = AutoPrefill(m, None, None)
    both = Streamers([Streamer(torch.device("cpu")), st])           # the first GPU holds no `auto` layer
    T = 64
    for pol in ("plan", "routed", "plan", "routed"):
        assert both.trialing(T) and both.chunk_policy(T) == pol
        both.observe_chunk(T, pol, {"plan": 2.0, "routed": 1.0}[pol])
    assert not both.trialing(T) and both.chunk_policy(T) == st.chunk_policy(T) == "routed"
    assert both.all[0].trials is st.trials
    assert both.trial_report()["64"]["policy"] == "routed"            # the first GPU alone would say 'plan'


def test_side_work_runs_once_after_the_layers_upload_is_queued(tmp_path, ckpt):
    """`side` (a shared expert, model/overlap.py) runs exactly once per layer, after the layer's uploads are queued
    and before its GEMMs (so on a GPU it overlaps the copies): streamed, routed with GPU experts, routed with none."""
    layers, st = streamed_model(tmp_path, ckpt, "bf16")
    log, upload = [], st._upload
    st._upload = lambda *a, **k: (log.append("upload"), upload(*a, **k))[1]
    gen = torch.Generator().manual_seed(9)
    m, T = layers[0], 64
    x = torch.randn(T, m.hidden, generator=gen)
    idx, w = routed(T, m.num_experts, st.top_k, gen)
    got = m.ops["prefill"](x, idx, w, side=lambda: log.append("side"))
    assert log.count("side") == 1 and "upload" in log[:log.index("side")]
    want = m.ops["prefill"](x, idx, w)
    assert torch.equal(got, want)
    for n in (3, 0):
        layers, st = routed_model(tmp_path, ckpt, "bf16", top(n))
        log, upload = [], st._upload
        st._upload = lambda *a, **k: (log.append("upload"), upload(*a, **k))[1]
        got = layers[0].ops["prefill"]._route(x, idx, w, side=lambda: log.append("side"))
        assert ((got - want).norm() / want.norm()).item() <= 1e-5
        assert log.count("side") == 1 and (n == 0 or log.index("upload") < log.index("side")), (n, log)
