"""runtime.compile: each layer's attention, norms and router torch.compile'd for one-token decode; decode equals
the uncompiled model token for token (fp32) on every architecture, prefill stays eager, bad values are profile errors."""
import pytest

from ktcli.engine import Engine, GenerationConfig
from ktcli.model.compile import PARTS, compiled_graphs
from test_hybrid import built, rel
from tiny import experts_rule, make_checkpoint

RULES = {"cpu": [experts_rule(".*", "cpu", "cpu", "cpu")],
         "torch": [experts_rule(".*", "cpu", "torch", "torch")]}


@pytest.mark.parametrize("arch,rules", [("qwen3_moe", "cpu"), ("qwen2_moe", "cpu"), ("deepseek_v3", "torch")])
def test_compiled_decode_equals_eager(tmp_path_factory, arch, rules):
    ckpt = make_checkpoint(tmp_path_factory.getbasetemp(), arch, layers=3)
    cfg = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    prompt = list(range(5, 30))
    plain = Engine(built(tmp_path_factory.mktemp("a"), ckpt, RULES[rules], max_seq_len=256), graph_mode="off")
    want, _ = plain.generate(prompt, cfg)
    b = built(tmp_path_factory.mktemp("b"), ckpt, RULES[rules], max_seq_len=256, compile=True)
    wrapped = [n for n, m in b.model.named_modules() if PARTS.search(n)]
    assert len(wrapped) >= 3 * 4 - (1 if arch == "deepseek_v3" else 0)   # attention, 2 norms, router a layer
    before = compiled_graphs()
    e = Engine(b, graph_mode="off")
    lp = e.prefill(prompt)                                  # prefill (25 tokens) runs the eager modules
    assert compiled_graphs() == before
    assert rel(lp, plain.prefill(prompt)) <= 1e-6
    e.reset()
    got, _ = e.generate(prompt, cfg)
    assert compiled_graphs() > before and got == want


def test_compile_must_be_a_bool(cli, tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: demo\nruntime:\n  compile: yes please\n")
    r = cli("validate-config", str(p))
    assert r.exit_code == 3 and f"{p}:3: runtime.compile must be bool" in r.output


def test_a_module_compile_cannot_trace_is_one_clear_error():
    import torch
    from ktcli.errors import KtcliError
    from ktcli.model.compile import _wrap

    class Breaks(torch.nn.Module):
        def forward(self, hidden_states):
            torch._dynamo.graph_break()       # fullgraph compile refuses it
            return hidden_states + 1

    m = Breaks()
    _wrap("model.layers.0.self_attn", m)
    assert torch.equal(m(torch.zeros(1, 3, 4)), torch.ones(1, 3, 4))      # prefill shapes stay eager
    with pytest.raises(KtcliError) as e:
        m(torch.zeros(1, 1, 4))
    assert "runtime.compile: torch.compile cannot compile model.layers.0.self_attn (Breaks)" in e.value.message
    assert e.value.hint == "set runtime.compile: false"


def test_the_switch_runs_the_wrapped_modules_eagerly():
    """model/compile.ENABLED = False (compile_ab.py's eager graph): a one-token forward compiles nothing and runs
    the module's own forward; True again: compiled."""
    import torch
    from ktcli.model import compile as comp

    class Doubles(torch.nn.Module):
        def forward(self, hidden_states):
            return hidden_states * 2

    m = Doubles()
    comp._wrap("model.layers.0.self_attn", m)
    before = compiled_graphs()
    try:
        comp.ENABLED = False
        assert torch.equal(m(torch.ones(1, 1, 4)), torch.full((1, 1, 4), 2.0)) and compiled_graphs() == before
    finally:
        comp.ENABLED = True
    assert torch.equal(m(torch.ones(1, 1, 4)), torch.full((1, 1, 4), 2.0)) and compiled_graphs() == before + 1


def test_a_compiling_run_says_so_before_its_first_decode(monkeypatch):
    """The first decode step compiles every layer (long on a 48-layer model): chat and bench say so first."""
    from types import SimpleNamespace as NS

    from ktcli.report import progress
    said = []
    monkeypatch.setattr(progress, "notice", said.append)
    for mode, comp in (("full", True), ("off", True), ("full", False)):
        with progress.preparing(NS(mode=mode, built=NS(profile=NS(runtime=NS(compile=comp))))):
            pass
    assert len(said) == 2 and all("runtime.compile" in s for s in said)
