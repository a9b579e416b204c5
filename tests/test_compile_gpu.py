"""runtime.compile on the GPU machine: compiled modules inside a full graph (and piecewise) replay equal the same
compiled model's eager decode token for token; compiled logits stay within bf16 tolerance of the uncompiled ones."""
import pytest
import torch

from ktcli.engine import Engine, GenerationConfig
from test_graphs import PLACEMENTS
from test_hybrid import built, rel
from tiny import make_checkpoint

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.getbasetemp(), "qwen3_moe", layers=4)


@pytest.mark.parametrize("placement", ["seed", "all-cpu"])
@pytest.mark.parametrize("mode", ["full", "piecewise"])
def test_compiled_graph_equals_compiled_eager(tmp_path, ckpt, placement, mode):
    b = built(tmp_path, ckpt, PLACEMENTS[placement], dtype="bfloat16", max_seq_len=512, compile=True)
    cfg = GenerationConfig(max_new_tokens=64, ignore_eos=True)
    prompts = [list(range(5, 40)), list(range(100, 117))]
    want = [Engine(b, graph_mode="off").generate(p, cfg)[0] for p in prompts]
    g = Engine(b, graph_mode=mode)
    assert [g.generate(p, cfg)[0] for p in prompts] == want


def test_compiled_logits_close_to_uncompiled(tmp_path_factory, ckpt):
    plain = Engine(built(tmp_path_factory.mktemp("a"), ckpt, PLACEMENTS["seed"], dtype="bfloat16", max_seq_len=256),
                   "off")
    comp = Engine(built(tmp_path_factory.mktemp("b"), ckpt, PLACEMENTS["seed"], dtype="bfloat16", max_seq_len=256,
                        compile=True), "full")
    comp.prepare()
    prompt = list(range(5, 40))
    plain.prefill(prompt)
    comp.prefill(prompt)
    tok = torch.tensor(7, device="cuda")
    assert rel(comp.decode(tok), plain.decode(tok)) <= 2e-2
