"""The CPU expert kernel (every path this machine can build) against the fp32 reference, fresh random inputs."""
import os
import subprocess
import sys

import pytest
import torch

from ktcli.ops import kernels
from ktcli.ops.base import eager_reference
from ktcli.ops.quant import dequantize, pack, quantize

lib = kernels.get()
needs_kernel = pytest.mark.skipif(lib is None, reason=f"kernel did not build: {kernels.error()}")


def case(E, H, I, K, T, seed):
    g = torch.Generator().manual_seed(seed)
    gu, dn = torch.randn(E, 2 * I, H, generator=g) * 0.05, torch.randn(E, H, I, generator=g) * 0.05
    x = torch.randn(T, H, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g).softmax(-1)
    return gu, dn, x, idx, w


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def reference(ew, x, idx, w, E):
    """fp32 reference on the same stored weights (dequantized), so only the kernel's arithmetic is tested."""
    deq = [ew.expert(e, torch.float32) for e in range(E)]
    return eager_reference(x, idx, w, torch.stack([d[0] for d in deq]), torch.stack([d[1] for d in deq]),
                           torch.nn.SiLU())


def _act_fixture(int8_act, doc):
    def fixture():
        was = kernels.tune(int8_act=int8_act)
        yield
        kernels.tune(*was)
    fixture.__doc__ = doc
    return pytest.fixture(fixture)


fp32_act = _act_fixture(0, "int8/int4 weights with fp32 activations (exact up to fp32 rounding), restored after.")
int8_act = _act_fixture(1, "The int8-activation path (AVX-512 VNNI where the CPU has it, its plain-C twin elsewhere).")


@needs_kernel
@pytest.mark.parametrize("fmt,H,I,G", [("bf16", 64, 32, 0), ("bf16", 37, 19, 0), ("int8", 64, 48, 0),
                                       ("int8", 45, 23, 0), ("int4", 64, 32, 32), ("int4", 96, 48, 48),
                                       ("int4", 64, 32, 16), ("int4", 40, 20, 10), ("int4", 256, 128, 128)])
@pytest.mark.parametrize("T", [1, 2, 5, 16])
def test_kernel_matches_fp32_reference(fp32_act, fmt, H, I, G, T):
    E, K = 8, 3
    seed = torch.randint(0, 2**30, ()).item()
    gu, dn, x, idx, w = case(E, H, I, K, T, seed)
    src = (gu.bfloat16(), dn.bfloat16()) if fmt == "bf16" else (gu, dn)
    ew = pack(fmt, *src, group=G or 128)
    out = torch.full((T, H), float("nan"))                   # poisoned: every element must be written
    kernels.Runner()(lib, x, idx, w, ew, out, 2)
    assert torch.isfinite(out).all()
    # with AVX-512 BF16 the bf16 path rounds x and the expert activations to bf16, as a bf16 model does
    tol = 1e-2 if fmt == "bf16" and kernels.bf16_activations() else 1e-5
    assert rel(out, reference(ew, x, idx, w, E)) <= tol, (fmt, H, I, G, T, seed)


@needs_kernel
def test_kernel_bf16_io_and_thread_counts():
    gu, dn, x, idx, w = case(8, 64, 32, 2, 3, 1)
    ew = pack("bf16", gu.bfloat16(), dn.bfloat16())
    outs = []
    for threads in (1, 2, 3):
        out = torch.empty(3, 64, dtype=torch.bfloat16)
        kernels.Runner()(lib, x.bfloat16(), idx, w.bfloat16(), ew, out, threads)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])


@pytest.mark.parametrize("fmt,err", [("int8", 0.0075), ("int4", 0.105)])   # measured 0.0064-0.0066, 0.096-0.098
def test_quantization_error_is_bounded(fmt, err):
    w = torch.randn(4, 64, 128)
    q, s = quantize(fmt, w, 32)
    assert rel(dequantize(fmt, q, s, 32), w) <= err


def test_int4_rejects_bad_groups():
    with pytest.raises(ValueError, match="int4 needs an even group size dividing 100"):
        quantize("int4", torch.randn(2, 100), 64)


def test_torch_fallback_equals_kernel(fp32_act, monkeypatch):
    """KTCLI_CPU_KERNEL=0 takes the pure-torch path: same answers."""
    from ktcli.ops.cpu import CpuExperts
    import types
    gu, dn, x, idx, w = case(8, 64, 32, 2, 3, 2)
    ew = pack("int8", gu, dn)
    ex = types.SimpleNamespace(act_fn=torch.nn.SiLU(), silu_act=True, packed=ew, expert_weights=lambda e, dt: ew.expert(e, dt))
    op = CpuExperts(ex, torch.device("cpu"))
    a = op(x, idx, w)
    monkeypatch.setenv("KTCLI_CPU_KERNEL", "0")
    b = op(x, idx, w)
    assert rel(a, b) <= 1e-5 and rel(b, reference(ew, x, idx, w, 8)) <= 1e-5


def test_quantized_experts_end_to_end_accuracy(tmp_path):
    """int8 stays close to bf16 on a tiny model; int4 costs more but stays sane (numbers: benchmarks/README.md)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from quant_accuracy import measure
    r = measure(str(tmp_path), tokens=16)
    # measured (CPU, 2026-12-02): int8 0.0089, int4 0.0237, top-1 16/16 both
    assert r["int8"]["logits_rel_err"] < 0.012 and r["int8"]["top1_agreement"] > 0.9
    assert r["int4"]["logits_rel_err"] < 0.035 and r["int4"]["top1_agreement"] > 0.9


@needs_kernel
def test_stream_read_probe_reads_every_word():
    import ctypes
    x = torch.arange(1, 100_001, dtype=torch.int64)
    for threads in (1, 2, 3):
        assert lib.stream_read(ctypes.c_void_p(x.data_ptr()), ctypes.c_size_t(x.numel()), threads) == x.sum().item()


@needs_kernel
@pytest.mark.parametrize("fmt,H,I,G", [("int8", 256, 128, 0), ("int8", 384, 640, 0), ("int4", 256, 128, 128),
                                       ("int4", 512, 256, 256), ("int4", 256, 384, 128), ("int4", 896, 640, 128)])
@pytest.mark.parametrize("T", [1, 3, 16])
def test_int8_activation_path_matches_reference(int8_act, fmt, H, I, G, T):
    """int8/int4 weights × int8 activations (one scale per 128 inputs): within activation-rounding error of the
    fp32 reference, and really a different path from the fp32-activation one."""
    E, K = 8, 3
    seed = torch.randint(0, 2**30, ()).item()
    gu, dn, x, idx, w = case(E, H, I, K, T, seed)
    x[0, 5] = 8.0                                             # an outlier: its block's scale grows, others don't
    ew = pack(fmt, gu, dn, group=G or 128)
    out = torch.full((T, H), float("nan"))
    kernels.Runner()(lib, x, idx, w, ew, out, 3)
    want = reference(ew, x, idx, w, E)
    assert rel(out, want) <= 3e-2, (fmt, H, I, G, T, seed)
    kernels.tune(int8_act=0)
    exact = torch.empty_like(out)
    kernels.Runner()(lib, x, idx, w, ew, exact, 3)
    assert rel(exact, want) <= 1e-5 and rel(out, exact) > 1e-5


@needs_kernel
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_schedule_and_prefetch_do_not_change_results(fmt):
    """Row chunks (static, dynamic, pipelined) and software prefetch move work between threads, never the
    arithmetic: bit-equal."""
    gu, dn, x, idx, w = case(16, 256, 128, 4, 5, 3)
    ew = pack(fmt, gu.bfloat16() if fmt == "bf16" else gu, dn.bfloat16() if fmt == "bf16" else dn)
    outs = []
    for chunk, prefetch, pipe in [(0, 0, 0), (1, 0, 0), (7, 512, 0), (64, 4096, 0), (1, 4096, 0), (1, 0, 1),
                                  (7, 512, 1), (64, 4096, 1)]:
        was = kernels.tune(chunk, prefetch, pipeline=pipe)
        out = torch.empty(5, 256)
        kernels.Runner()(lib, x, idx, w, ew, out, 3)
        kernels.tune(*was)
        outs.append(out)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@needs_kernel
@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_runner_dtypes_and_reuse(fmt):
    """fp32 and bf16 activations go to the kernel as they are, fp16 through fp32 buffers; one Runner reused
    across batch sizes (its cached arguments, its scratch growing) and new data in the same buffers."""
    E, H, I, K = 8, 256, 128, 2
    gu, dn, *_ = case(E, H, I, K, 1, 4)
    ew = pack(fmt, gu.bfloat16() if fmt == "bf16" else gu, dn.bfloat16() if fmt == "bf16" else dn)
    run = kernels.Runner()
    bufs = {dt: (torch.empty(16, H, dtype=dt), torch.empty(16, K, dtype=dt), torch.empty(16, H, dtype=dt))
            for dt in (torch.float32, torch.bfloat16, torch.float16)}
    for T, seed in [(1, 10), (16, 11), (1, 12), (3, 13)]:
        _, _, x, idx, w = case(E, H, I, K, T, seed)
        want = reference(ew, x, idx, w, E)
        for dt, (xb, wb, ob) in bufs.items():
            xb[:T].copy_(x), wb[:T].copy_(w)
            ob[:T].fill_(float("nan"))
            run(lib, xb[:T], idx, wb[:T], ew, ob[:T], 2)
            assert rel(ob[:T], want) <= 3e-2, (dt, T)   # bf16 rounding; int8 activations where VNNI


@needs_kernel
@pytest.mark.parametrize("pipeline", [0, 1])
def test_profile_stamps_each_thread_in_order(pipeline):
    """kernels.profile: the kernel's entry ≤ fork ≤ every member's start ≤ prep ≤ down ≤ end ≤ the kernel's exit,
    each member's gate/up rows done before its down rows; the caller (member 0) always takes part, a worker that
    woke after the work was done has no stamps; the kernel's result is the same with stamps on."""
    gu, dn, x, idx, w = case(16, 256, 128, 4, 5, 3)
    ew = pack("int4", gu, dn)
    out, plain = torch.empty(5, 256), torch.empty(5, 256)
    was = kernels.tune(chunk=1, pipeline=pipeline)   # 1 KiB tasks: every thread gets gate/up rows
    try:
        kernels.Runner()(lib, x, idx, w, ew, plain, 3)
        p = kernels.profile(lambda: kernels.Runner()(lib, x, idx, w, ew, out, 3), 3)
    finally:
        kernels.tune(*was)
    assert torch.equal(out, plain) and set(p) == {"fork", "exit", *kernels.STAMPS}
    assert p["start"][0] is not None
    for t in range(3):
        if p["start"][t] is None:
            assert all(p[k][t] is None for k in kernels.STAMPS), (t, p)
            continue
        assert 0 <= p["fork"] <= p["start"][t] <= p["prep"][t] <= p["down"][t] <= p["end"][t] <= p["exit"], (t, p)
        assert p["gate_up"][t] is None or p["gate_up"][t] <= p["down"][t]


@needs_kernel
def test_stream_read_with_prefetch_reads_every_word():
    import ctypes
    x = torch.arange(1, 100_003, dtype=torch.int64)
    was = kernels.tune(prefetch=1024)
    try:
        assert lib.stream_read(ctypes.c_void_p(x.data_ptr()), ctypes.c_size_t(x.numel()), 3) == x.sum().item()
    finally:
        kernels.tune(*was)


@needs_kernel
def test_silu_at_extreme_gate_values(fp32_act):
    """The kernel's vectorized exp: gates of ±hundreds (exp over/underflows) still give SiLU's limits."""
    gu, dn, x, idx, w = case(8, 64, 32, 2, 4, 5)
    ew = pack("int8", gu * 400, dn)
    out = torch.empty(4, 64)
    kernels.Runner()(lib, x, idx, w, ew, out, 2)
    assert torch.isfinite(out).all() and rel(out, reference(ew, x, idx, w, 8)) <= 1e-5


@needs_kernel
def test_int8_act_env_switch_turns_the_integer_path_off_and_on():
    code = "from ktcli.ops import kernels; kernels.get(); print(kernels.tune()[2])"
    out = lambda env: subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip()  # noqa: E731
    assert out({**os.environ, "KTCLI_CPU_INT8_ACT": "0"}) == "0"
    assert out({**os.environ, "KTCLI_CPU_INT8_ACT": "1"}) == "1"
    assert out({k: v for k, v in os.environ.items() if k != "KTCLI_CPU_INT8_ACT"}) == str(int(kernels.caps()["vnni"]))


@needs_kernel
def test_amx_env_switch():
    """KTCLI_CPU_AMX=0 turns the tiles off where the CPU has them; =2 runs them (the twin here) everywhere;
    KTCLI_CPU_AMX_PF picks their row prefetch."""
    code = "from ktcli.ops import kernels; kernels.get(); print(*kernels.tune()[6:], kernels.caps()['amx_on'])"
    out = lambda v, pf="0": subprocess.run([sys.executable, "-c", code],  # noqa: E731
                                           env={**os.environ, "KTCLI_CPU_AMX": v, "KTCLI_CPU_AMX_PF": pf},
                                           capture_output=True, text=True).stdout.strip()
    assert out("0") == "0 0 False" and out("2", "1") == "2 1 True"


@needs_kernel
def test_kernel_groups_pairs_by_expert_and_rejects_ids_it_cannot_index():
    """Pairs are grouped by expert in one pass over an id-indexed table: many tokens sharing few experts match
    the reference; an id at or past the layer's expert count (8 here) or negative is refused, not read out of
    bounds."""
    H, I, K, T = 128, 128, 2, 16
    gu, dn, x, _, w = case(8, H, I, K, T, 21)
    ew = pack("int8", gu, dn)
    idx = torch.tensor([[3, 5], [5, 3], [0, 7]] * 5 + [[7, 0]])
    out = torch.empty(T, H)
    kernels.Runner()(lib, x, idx, w, ew, out, 3)
    assert rel(out, reference(ew, x, idx, w, 8)) <= 3e-2
    for bad in (8, 9, 4096, -1):
        ids = idx.clone()
        ids[T - 1, 1] = bad
        with pytest.raises(RuntimeError, match=r"rejected its arguments \(T=16, K=2, E=8, .*\[0, E\)"):
            kernels.Runner()(lib, x, ids, w, ew, out, 3)


@needs_kernel
def test_cpu_cflags_make_a_separate_build(tmp_path, monkeypatch):
    """KTCLI_CPU_CFLAGS: the extra flags reach the compiler (a bad one fails the build, which get() turns into
    the torch fallback) and name their own cached library, which loads."""
    import ctypes
    plain = kernels.build(str(tmp_path))
    monkeypatch.setenv("KTCLI_CPU_CFLAGS", "-DNDEBUG")
    flagged = kernels.build(str(tmp_path))
    assert flagged != plain and os.path.isfile(flagged) and ctypes.CDLL(flagged).moe_caps() == lib.moe_caps()
    monkeypatch.setenv("KTCLI_CPU_CFLAGS", "-fno-such-option")
    with pytest.raises(subprocess.CalledProcessError):
        kernels.build(str(tmp_path))


@needs_kernel
@pytest.mark.parametrize("fmt,calls,scratch", [("int8", 1, 64 << 20), ("int4", 1, 64 << 20), ("bf16", 0, 64 << 20),
                                               ("int8", 3, 1)])
def test_long_prefill_runs_quantized_experts_through_the_kernel_in_slices(fp32_act, monkeypatch, fmt, calls, scratch):
    """T=40 > MAX_TOKENS: int8/int4 go through the kernel in one call (a slice as long as the scratch budget
    allows), or in slices of 16 (3 calls) when the budget is tiny, and equal torch's dequantize path; bf16 stays
    on torch's GEMMs (no kernel call) unless the kernel has AMX tiles."""
    import types

    from ktcli.ops.cpu import CpuExperts
    gu, dn, x, idx, w = case(8, 64, 32, 2, 40, torch.randint(0, 2**30, ()).item())
    ew = pack(fmt, gu.bfloat16() if fmt == "bf16" else gu, dn.bfloat16() if fmt == "bf16" else dn, group=32)
    ex = types.SimpleNamespace(act_fn=torch.nn.SiLU(), silu_act=True, packed=ew, quantized=ew if fmt != "bf16" else None,
                               expert_weights=lambda e, dt: ew.expert(e, dt))
    monkeypatch.setattr(kernels, "SLICE_SCRATCH", scratch)
    op, n = CpuExperts(ex, torch.device("cpu")), [0]
    real = kernels.Runner.__call__
    monkeypatch.setattr(kernels.Runner, "__call__", lambda self, *a: (n.__setitem__(0, n[0] + 1), real(self, *a))[1])
    got = op(x.to(ew.gu.dtype if fmt == "bf16" else x.dtype), idx, w)
    assert n[0] == (1 if fmt == "bf16" and kernels.caps()["amx_on"] else calls)   # AMX: bf16 through the kernel
    monkeypatch.setenv("KTCLI_CPU_KERNEL", "0")
    want = op(x.to(got.dtype), idx, w)
    assert rel(got, want) <= (2e-2 if fmt == "bf16" else 1e-5), fmt


def uneven(E, K, T, seed):
    """Routing with uneven loads: expert 0 in half the tokens, a few experts with fewer than AMX_MIN pairs (rows
    path inside an AMX call), the last expert never used."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for t in range(T):
        pick = torch.randperm(E - 1, generator=g)[:K]
        if t % 2 == 0 and 0 not in pick:
            pick[0] = 0
        rows.append(pick)
    return torch.stack(rows)


@needs_kernel
@pytest.mark.parametrize("fmt,E,H,I,K,T", [("bf16", 8, 64, 32, 3, 17), ("bf16", 16, 96, 64, 4, 64),
                                           ("bf16", 32, 128, 96, 8, 512), ("bf16", 8, 64, 40, 2, 64),
                                           ("bf16", 8, 80, 64, 2, 40), ("int8", 8, 128, 128, 3, 17),
                                           ("int8", 16, 256, 128, 4, 64), ("int8", 32, 128, 256, 8, 512),
                                           ("int8", 8, 128, 96, 2, 64), ("int4", 8, 128, 128, 3, 17),
                                           ("int4", 16, 256, 128, 4, 64), ("int4", 32, 128, 256, 8, 512),
                                           ("int4/256", 8, 256, 512, 2, 64)])
def test_amx_tiles_match_reference_and_row_dots(fmt, E, H, I, K, T):
    """Experts with ≥ 8 pairs through AMX tiles (the CPU's, or the plain-C twin where it has none: the panel
    layout, the 16-row blocks and tails, uneven loads): bf16 on the bf16 dot path (H or I not a multiple of 32
    keeps that matrix on row dots), int8 on the int8-activation path (the same integer sums per block as the row
    dots), int4 unpacked to nibble bytes on that path too (group scales per 128 inputs, or per 256: "int4/256").
    Every schedule and every prefetch pattern; the call is counted as an AMX call only where a matrix qualified."""
    fmt, group = (fmt.split("/") + ["128"])[:2]
    path = "dpbf16" if fmt == "bf16" else "vnni"
    if not kernels.caps()[path]:
        pytest.skip(f"AMX tiles take the {path} path's activations")
    seed = torch.randint(0, 2**30, ()).item()
    gu, dn, x, _, w = case(E, H, I, K, T, seed)
    idx = uneven(E, K, T, seed)
    ew = pack(fmt, gu.bfloat16() if fmt == "bf16" else gu, dn.bfloat16() if fmt == "bf16" else dn, int(group))
    step = 32 if fmt == "bf16" else 128
    for i, (chunk, pipe, pf) in enumerate([(256, 1, 0), (256, 0, 1), (0, 0, 2), (1, 1, 1)]):   # pf: AMX only
        # fresh inputs each time, and the tiles before the row dots: a result the tiles fail to write cannot pass
        # on one the kernel's scratch kept from an earlier call
        x = x if i == 0 else torch.randn(T, H, generator=torch.Generator().manual_seed(seed + i))
        was = kernels.tune(chunk=chunk, pipeline=pipe, int8_act=1, amx=1 if kernels.caps()["amx"] else 2, amx_pf=pf)
        try:
            kernels.take_stats()
            out = torch.full((T, H), float("nan"))
            kernels.Runner()(lib, x, idx, w, ew, out, 3)
            amx_calls = kernels.take_stats()["amx_calls"]
        finally:
            kernels.tune(*was)
        was = kernels.tune(amx=0, int8_act=1)
        rows = torch.empty(T, H)
        kernels.Runner()(lib, x, idx, w, ew, rows, 2)
        kernels.tune(*was)
        want = reference(ew, x, idx, w, E)
        assert amx_calls == int(H % step == 0 or I % step == 0), (chunk, pipe)
        assert torch.isfinite(out).all()
        assert rel(out, want) <= 3e-2 and rel(out, rows) <= 1e-3, (fmt, E, H, I, K, T, chunk, pipe, seed)
