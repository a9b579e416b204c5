"""Layers over two GPUs (multi-GPU machine): logits equal the plain transformers model, graph replay (one graph per
GPU, full and piecewise) equals eager decode token for token, prefill streams to each layer's own GPU. Skipped
below two GPUs; the one-GPU test of a KTransformers file (embedding on the CPU) under graphs runs on one."""
import pytest
import torch

from ktcli.engine import Engine, GenerationConfig
from test_hybrid import built, rel
from tiny import experts_rule, make_checkpoint

pytestmark = pytest.mark.gpu
two = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


def layers_rule(layers, device):
    return {"match": {"name": rf"^model\.layers\.({layers})\."},
            "replace": {"class": "default", "kwargs": {"generate_device": device, "prefill_device": device}}}


def tail_rule(device):
    return {"match": {"name": r"^model\.norm$|^lm_head$"},
            "replace": {"class": "default", "kwargs": {"generate_device": device, "prefill_device": device}}}


SPLIT = {   # experts; decoder layers 0-1 go on cuda:0, 2-3 on cuda:1
    "cpu-experts": [experts_rule(".*", "cpu", "cpu", "cpu")],
    "gpu-and-cpu-experts": [experts_rule("0", "cuda:0", "torch", "gpu_static"),
                            experts_rule("3", "cuda:1", "torch", "gpu_static"), experts_rule(".*", "cpu", "cpu", "cpu")],
    "auto-prefill": [experts_rule(".*", "cpu", "auto", "cpu", prefill_device="auto")],
}


def split_rules(experts, head="cuda:1"):
    return experts + [layers_rule("0|1", "cuda:0"), layers_rule("2|3", "cuda:1"), tail_rule(head)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.getbasetemp(), "qwen2_moe", layers=4)


@two
@pytest.mark.parametrize("placement", sorted(SPLIT))
def test_logits_over_two_gpus_match_transformers(tmp_path, ckpt, placement):
    from transformers import AutoModelForCausalLM
    b = built(tmp_path, ckpt, split_rules(SPLIT[placement]), dtype="float32")
    assert b.plan.segments == [("cuda:0", 0, 1), ("cuda:1", 2, 3)]
    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = torch.randint(0, ref.config.vocab_size, (1, 33))
    e = Engine(b, graph_mode="off")
    with torch.no_grad():
        want = ref(ids).logits[:, -1]
        got = e.prefill(ids[0].tolist()).cpu()
    assert rel(got, want) <= 1e-5
    assert str(b.model.model.layers[3].self_attn.q_proj.weight.device) == "cuda:1"


@two
@pytest.mark.parametrize("placement", sorted(SPLIT))
@pytest.mark.parametrize("mode", ["full", "piecewise"])
def test_graph_per_gpu_equals_eager(tmp_path, ckpt, placement, mode):
    b = built(tmp_path, ckpt, split_rules(SPLIT[placement]), dtype="bfloat16", max_seq_len=512)
    cfg = GenerationConfig(max_new_tokens=96, ignore_eos=True)
    prompts = [list(range(5, 40)), list(range(100, 117))]
    want = [Engine(b, graph_mode="off").generate(p, cfg)[0] for p in prompts]
    g = Engine(b, graph_mode=mode)
    g.prepare()
    assert g.graph.segments >= 2                        # at least one graph per GPU
    got = [g.generate(p, cfg)[0] for p in prompts]
    g.reset()
    got.append(g.generate(prompts[0], cfg)[0])
    assert got == want + want[:1]


@two
def test_lm_head_back_on_the_first_gpu(tmp_path, ckpt):
    """cuda:0 → cuda:1 → cuda:0: three segments, the logits where the engine reads them."""
    b = built(tmp_path, ckpt, split_rules(SPLIT["cpu-experts"], head="cuda:0"), dtype="bfloat16", max_seq_len=256)
    cfg = GenerationConfig(max_new_tokens=32, ignore_eos=True)
    want = Engine(b, graph_mode="off").generate(list(range(5, 30)), cfg)[0]
    g = Engine(b, graph_mode="full")
    assert g.generate(list(range(5, 30)), cfg)[0] == want


def test_kt_rule_file_embedding_on_cpu_under_graphs(tmp_path, ckpt):
    """KTransformers' files keep embed_tokens on the CPU; graph decode must equal eager (one GPU)."""
    rules = [experts_rule(".*", "cpu", "cpu", "cpu"),
             {"match": {"name": r"^model\.embed_tokens$"},
              "replace": {"class": "default", "kwargs": {"generate_device": "cpu", "prefill_device": "cpu"}}}]
    b = built(tmp_path, ckpt, rules, dtype="bfloat16", max_seq_len=256)
    assert b.plan.embed_device == "cpu"
    cfg = GenerationConfig(max_new_tokens=32, ignore_eos=True)
    want = Engine(b, graph_mode="off").generate(list(range(5, 30)), cfg)[0]
    assert Engine(b, graph_mode="full").generate(list(range(5, 30)), cfg)[0] == want
