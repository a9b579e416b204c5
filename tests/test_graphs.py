"""CUDA-graph decode (GPU machine): replay equals eager decode token for token, for every placement kind."""
import pytest
import torch

from ktcli.engine import Engine, GenerationConfig
from test_hybrid import built
from tiny import experts_rule, make_checkpoint

pytestmark = pytest.mark.gpu

PLACEMENTS = {
    "seed": [experts_rule("0", "cuda", "torch", "gpu_static"), experts_rule(".*", "cpu", "cpu", "cpu")],
    "all-cpu": [experts_rule(".*", "cpu", "cpu", "cpu")],
    "all-gpu": [experts_rule(".*", "cuda", "torch", "gpu_static")],
    "alternating": [experts_rule("0|2", "cuda", "torch", "gpu_static"), experts_rule(".*", "cpu", "cpu", "cpu")],
    "prefill-gpu-decode-cpu": [experts_rule(".*", "cpu", "torch", "cpu", prefill_device="cuda")],
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.getbasetemp(), "qwen2_moe", layers=4)


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
@pytest.mark.parametrize("mode", ["full", "piecewise"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_graph_replay_equals_eager(tmp_path, ckpt, placement, mode, dtype):
    b = built(tmp_path, ckpt, PLACEMENTS[placement], dtype=dtype, max_seq_len=512)
    cfg = GenerationConfig(max_new_tokens=128, ignore_eos=True)
    prompts = [list(range(5, 40)), list(range(100, 117))]
    eager = Engine(b, graph_mode="off")
    want = [eager.generate(p, cfg)[0] for p in prompts]
    g = Engine(b, graph_mode=mode)
    g.prepare()
    assert g.graph is not None and g.capture_s > 0
    got = [g.generate(p, cfg)[0] for p in prompts]           # replay after new input
    g.reset()                                                # and after a chat reset
    got.append(g.generate(prompts[0], cfg)[0])
    assert got == want + want[:1]


def test_logits_with_layers_split_between_cuda_and_cpu(tmp_path, ckpt):
    from transformers import AutoModelForCausalLM
    b = built(tmp_path, ckpt, PLACEMENTS["alternating"], dtype="float32")
    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = torch.randint(0, ref.config.vocab_size, (1, 33))
    with torch.no_grad():
        got = b.model(ids.cuda()).logits.cpu()
        want = ref(ids).logits
    assert ((got - want).norm() / want.norm()).item() <= 1e-5


def quantized(rule, fmt, group):
    rule = {**rule, "replace": {**rule["replace"], "kwargs": {**rule["replace"]["kwargs"]}}}
    rule["replace"]["kwargs"].update(weight_format=fmt, group_size=group)
    return rule


@pytest.mark.parametrize("fmt,group", [("int8", 128), ("int4", 16)])
@pytest.mark.parametrize("mode", ["full", "piecewise"])
def test_quantized_cpu_experts_under_graphs_equal_eager(tmp_path, ckpt, fmt, group, mode):
    """int8/int4 CPU experts (the kernel's integer paths) inside a graph: replay equals eager token for token."""
    rules = [experts_rule("0", "cuda", "torch", "gpu_static"), quantized(experts_rule(".*", "cpu", "cpu", "cpu"), fmt, group)]
    b = built(tmp_path, ckpt, rules, dtype="bfloat16", max_seq_len=512)
    cfg = GenerationConfig(max_new_tokens=96, ignore_eos=True)
    prompt = list(range(7, 30))
    want = Engine(b, graph_mode="off").generate(prompt, cfg)[0]
    g = Engine(b, graph_mode=mode)
    g.prepare()
    assert g.generate(prompt, cfg)[0] == want


@pytest.mark.parametrize("mode", ["full", "piecewise"])
def test_an_error_inside_the_cpu_step_reaches_the_caller(tmp_path, ckpt, mode, monkeypatch):
    """A CPU-expert failure during replay in the Python step (inside a host callback under full graphs) is raised
    to the caller with its cause, not lost; the engine decodes again once the fault is gone."""
    from ktcli.ops.cpu import CpuExperts
    monkeypatch.setattr(CpuExperts, "host_block", lambda self, T: None)   # the Python step, not the C one
    b = built(tmp_path, ckpt, PLACEMENTS["seed"], dtype="bfloat16", max_seq_len=256)
    g = Engine(b, graph_mode=mode)
    g.prepare()
    cfg = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    ok = g.generate([5, 6, 7], cfg)[0]
    real = CpuExperts._moe

    def broken(self, x, *a):
        if x.shape[0] == 1:                      # decode only: the prefill before it runs as usual
            raise ValueError("injected CPU-expert fault")
        return real(self, x, *a)
    monkeypatch.setattr(CpuExperts, "_moe", broken)
    with pytest.raises((RuntimeError, ValueError), match="injected CPU-expert fault"):
        g.generate([5, 6, 7], cfg)
    monkeypatch.setattr(CpuExperts, "_moe", real)
    torch.cuda.synchronize()
    assert g.generate([5, 6, 7], cfg)[0] == ok


@pytest.mark.parametrize("mode", ["full", "piecewise", "off"])
def test_an_error_inside_the_c_host_step_is_one_clear_error(tmp_path, ckpt, mode):
    """The C step (moe_host on a block built before capture) refusing its arguments — here every layer's block
    told its layer has one expert — is raised once after the replay as one RuntimeError, in every graph mode;
    with the blocks repaired the engine decodes as before."""
    from ktcli.ops.cpu import CpuExperts
    b = built(tmp_path, ckpt, PLACEMENTS["all-cpu"], dtype="bfloat16", max_seq_len=256)
    g = Engine(b, graph_mode=mode)
    g.prepare()
    cfg = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    ok = g.generate([5, 6, 7], cfg)[0]
    blocks = [blk for m in b.model.modules() if hasattr(m, "ops") for op in m.ops.values()
              if isinstance(op, CpuExperts) for blk in op.runner.calls.values() if blk.call.T == 1]
    assert blocks, "decode used the C step"
    experts = [blk.call.E for blk in blocks]
    for blk in blocks:
        blk.call.E = 1
    with pytest.raises(RuntimeError, match="refused"):
        g.generate([5, 6, 7], cfg)
    for blk, e in zip(blocks, experts):
        blk.call.E = e
    torch.cuda.synchronize()
    assert g.generate([5, 6, 7], cfg)[0] == ok
