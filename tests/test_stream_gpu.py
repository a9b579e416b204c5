"""Streaming prefill on the GPU machine: host memory pinned in place, streamed and `auto` prefill against plain
transformers, every format, one or several chunks, and graph decode after each prefill path equal to eager."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from ktcli.engine import Engine, GenerationConfig
from ktcli.ops.base import HybridExperts
from ktcli.ops.costs import PrefillRates
from test_hybrid import built, rel
from test_kernel_model import reference_with_stored_weights, with_format
from tiny import experts_rule, make_checkpoint

pytestmark = pytest.mark.gpu

STREAM = experts_rule(".*", "cpu", "torch", "cpu", prefill_device="cuda")      # plan: prefill op `stream`
AUTO = {"match": {"name": r"^model\.layers\..*\.mlp\.experts$"},
        "replace": {"class": "Experts", "kwargs": {"generate_device": "cpu", "generate_op": "cpu"}}}
FAVOUR = {"stream": PrefillRates(pcie_bps=1e12, cpu_bps=1e6, cpu_flops=1e6, gpu_flops=1e14),
          "cpu": PrefillRates(pcie_bps=1e3, cpu_bps=1e12, cpu_flops=1e15, gpu_flops=1e14)}


def favour(b, way, monkeypatch):
    """Rates that make `auto` take `way` (no way but streaming and the CPU weighed); a split is forced at half the
    experts (rates alone rarely pick it on a tiny model), a routed layer gives the GPU its 3 most routed experts."""
    monkeypatch.setenv("KTCLI_PREFILL_WAYS", "none")
    b.streamer.rates = FAVOUR["stream" if way in ("split", "routed") else way]
    for m in experts_of(b) if way in ("split", "routed") else ():
        op = m.ops["prefill"]
        if way == "split":
            op.plan = lambda T, n=m.num_experts // 2: {"way": "split", "n_cpu": n, "seconds": 0.0}
        else:
            op.plan = lambda T, calibrated=True: {"way": "routed", "n_cpu": 0, "seconds": 0.0, "kernel": False}
            op.share = lambda T, c, long_bf16=False: (top3(c), 0.0)


def top3(counts):
    return tuple(sorted(sorted(range(len(counts)), key=lambda e: -counts[e])[:3]))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.getbasetemp(), "qwen2_moe", layers=4)


def experts_of(b):
    return [m for m in b.model.modules() if isinstance(m, HybridExperts)]


def test_host_memory_is_pinned_in_place(tmp_path, ckpt):
    b = built(tmp_path, ckpt, [STREAM], dtype="bfloat16")
    assert b.streamer is not None and b.streamer.pinned
    for m in experts_of(b):
        assert m.stream_src.gu.is_pinned() and m.stream_src.dn.is_pinned()
        assert m.stream_src.gu.data_ptr() == m.packed.gu.data_ptr()        # registered, not copied
    assert any(k.startswith("load: pin") for k in b.timings)


@pytest.mark.parametrize("fmt,group", [("bf16", 128), ("int8", 128), ("int4", 16)])
@pytest.mark.parametrize("rules,way", [([STREAM], "stream"), ([AUTO], "stream"), ([AUTO], "cpu"),
                                       ([AUTO], "split"), ([AUTO], "routed")])
@pytest.mark.parametrize("chunk", [64, 16])                 # 16: a 50-token prompt crosses 4 chunks
def test_prefill_logits_match_transformers(tmp_path, ckpt, fmt, group, rules, way, chunk, monkeypatch):
    dtype = "float32" if fmt != "bf16" else "bfloat16"
    b = built(tmp_path, ckpt, [with_format(r, fmt, group) for r in rules], dtype=dtype, prefill_chunk=chunk)
    favour(b, way, monkeypatch)
    ref = reference_with_stored_weights(ckpt, b.model, getattr(torch, dtype)).cuda()
    e = Engine(b, graph_mode="off")
    e.chunk = chunk                                          # the memory-sized default would take all 50 at once
    ids = torch.randint(0, ref.config.vocab_size, (50,), generator=torch.Generator().manual_seed(3)).tolist()
    b.streamer.take_stats()
    got = e.prefill(ids)
    stats = b.streamer.take_stats()
    assert (stats["layers_streamed"] > 0) == (way in ("stream", "split"))
    assert (stats["layers_cpu"] > 0) == (way == "cpu")
    assert (stats["layers_split"] > 0) == (way == "split") and (stats["layers_routed"] > 0) == (way == "routed")
    assert stats["moe_s"] > 0          # the main thread's time in MoE calls (a split's CPU share runs beside it)
    with torch.no_grad():
        want = ref(torch.tensor([ids]).cuda()).logits[:, -1]
    tol = 1e-5 if dtype == "float32" and (way == "stream" or fmt == "bf16") else 2e-2   # CPU int: int8 activations
    assert rel(got, want) <= (tol if dtype == "float32" else 2e-2), (fmt, way, chunk)


def test_a_split_joined_by_its_flag_equals_one_joined_by_the_host(tmp_path, ckpt, monkeypatch):
    """ops/joined.py: the GPU waits on the worker's flag, the host goes on; same logits as the host-joined split
    (KTCLI_SPLIT_JOIN=host), chunk after chunk."""
    from ktcli.ops.joined import joiner
    b = built(tmp_path, ckpt, [with_format(AUTO, "int8", 128)], dtype="float32", prefill_chunk=16)
    favour(b, "split", monkeypatch)
    e = Engine(b, graph_mode="off")
    e.chunk = 16
    ids = torch.randint(0, b.model.config.vocab_size, (50,), generator=torch.Generator().manual_seed(4)).tolist()
    monkeypatch.setenv("KTCLI_SPLIT_JOIN", "host")
    host = e.prefill(ids).clone()
    assert getattr(b.streamer, "split_joiner", None) is None
    e.reset()
    monkeypatch.delenv("KTCLI_SPLIT_JOIN")
    flag = e.prefill(ids)
    assert joiner(b.streamer).seq > 0 and rel(flag, host) <= 1e-5


@pytest.mark.parametrize("way", ["stream", "cpu", "split", "routed"])
@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_graph_decode_after_each_prefill_path_equals_eager(tmp_path, ckpt, way, fmt, monkeypatch):
    b = built(tmp_path, ckpt, [with_format(AUTO, fmt, 16)], dtype="bfloat16", max_seq_len=512)
    favour(b, way, monkeypatch)
    cfg = GenerationConfig(max_new_tokens=64, ignore_eos=True)
    prompt = list(range(5, 90))
    want = Engine(b, graph_mode="off").generate(prompt, cfg)[0]
    g = Engine(b, graph_mode="full")
    g.prepare()
    assert g.generate(prompt, cfg)[0] == want


def test_uploads_are_queued_through_the_cuda_runtime():
    """The routed layers' many small copies go through cudaMemcpyAsync (ops/cudart.py), not torch's copy_."""
    from ktcli.ops.cudart import copy_h2d, runtime
    assert runtime() is not None
    src = torch.randint(0, 255, (3, 1000), dtype=torch.uint8).pin_memory()
    dst = torch.zeros(2000, dtype=torch.uint8, device="cuda")
    s = torch.cuda.Stream()
    assert copy_h2d([(dst.data_ptr(), src[2].data_ptr(), 1000), (dst.data_ptr() + 1000, src.data_ptr(), 1000)], s)
    s.synchronize()
    assert torch.equal(dst.cpu(), torch.cat([src[2], src[0]]))


def test_bench_prints_a_prefill_roofline(tmp_path, ckpt, cli):
    from tiny import write_profile
    p = write_profile(tmp_path, ckpt, [AUTO], dtype="bfloat16", max_seq_len=600)
    r = cli("bench", p, "-p", "512", "-n", "0", "-r", "2", "--warmup", "1", "-o", "json",
            "--output-file", str(tmp_path / "b.json"))
    assert r.exit_code == 0, r
    import json
    rec = json.load(open(tmp_path / "b.json"))["results"][0]
    assert rec["test"] == "pp512" and 0 < rec["roofline_ratio"]
    assert rec["prefill_roofline"]["rates"]["pcie_GBps"] > 1
    ph = rec["prefill_phases"]
    assert 0 < ph["moe_s"] < ph["run_s"] and abs(ph["run_s"] - 512 / rec["tps_mean"]) < 0.5 * ph["run_s"]


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_one_kernel_dequantization_on_the_gpu_equals_the_reference(fmt):
    """The Triton kernel against quant.dequantize on the GPU, layer-sized and odd shapes."""
    from ktcli.ops.dequant_gpu import available, dequantize_fast
    from ktcli.ops.quant import dequantize, quantize
    gen = torch.Generator().manual_seed(6)
    for shape, g in (((3, 40, 64), 32), ((16, 1536, 2048), 128), ((5, 7, 96), 32)):
        q, s = quantize(fmt, torch.randn(*shape, generator=gen), g)
        q, s = q.cuda(), s.cuda()
        assert available(q)
        want = dequantize(fmt, q, s, g, torch.bfloat16)
        got = dequantize_fast(fmt, q, s, g, torch.bfloat16)
        assert ((got.float() - want.float()).abs() <= want.float().abs() * 2 ** -7 + 1e-30).all(), (fmt, shape)
