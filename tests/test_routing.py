"""model/routing.py: `bench --routing uniform` draws each prefill token's experts at random; decode keeps the router's."""
import json

import torch

from conftest import profile
from ktcli.model.routing import set_routing
from test_hybrid import PLACEMENTS, built
from tiny import make_checkpoint


def test_uniform_routing_draws_distinct_experts_for_prefill_and_leaves_decode(tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.getbasetemp(), "qwen3_moe")
    b = built(tmp_path_factory.mktemp("p"), ckpt, PLACEMENTS["all-cpu-op"], dtype="float32")
    gates = [m.gate for m in b.model.modules() if hasattr(m, "gate") and hasattr(m, "experts")]
    E, K = b.model.config.num_experts, b.model.config.num_experts_per_tok
    x = torch.randn(64, b.model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    x = x.to(gates[0].weight.device, gates[0].weight.dtype)
    own = [g(x)[2] for g in gates]
    assert set_routing(b.model, "uniform") == len(gates) > 0
    for g, o in zip(gates, own):
        logits, scores, idx = g(x)
        assert idx.shape == (64, K) and idx.dtype == o.dtype and not torch.equal(idx, o)
        assert all(len(set(row)) == K for row in idx.tolist())                 # K distinct experts a token
        counts = torch.bincount(idx.reshape(-1), minlength=E)
        assert int((counts > 0).sum()) == E                                    # 64 × K pairs reach every expert
        assert torch.equal(g(x[:1])[2], o[:1])                                 # one token: the router's choice
    assert set_routing(b.model, "model") == 0
    assert all(torch.equal(g(x)[2], o) for g, o in zip(gates, own))           # hooks removed


def test_bench_records_the_routing_and_refuses_an_unknown_one(cli):
    r = cli("bench", "-r", "1", "--warmup", "0", "-p", "16", "-n", "2", "--routing", "uniform", "-o", "json")
    assert r.exit_code == 0, r
    d = json.loads(r.stdout)
    assert {row["routing"] for row in d["results"]} == {"uniform"}
    assert any("--routing uniform" in n for n in d["notes"])
    r = cli("bench", "-p", "16", "--routing", "fair", profile("demo.yaml"))
    assert r.exit_code == 2 and "Error: --routing must be one of model, uniform, got 'fair'" in r.output


def test_plain_transformers_models_route_the_same_way(tmp_path_factory):
    """Baselines (plain transformers) get the same hooks as ktcli's blocks, so their rows compare like for like."""
    from transformers import AutoModelForCausalLM
    ckpt = make_checkpoint(tmp_path_factory.getbasetemp(), "qwen3_moe")
    m = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    assert set_routing(m, "uniform") == m.config.num_hidden_layers
    gate = m.model.layers[0].mlp.gate
    x = torch.randn(32, m.config.hidden_size, generator=torch.Generator().manual_seed(2))
    idx = gate(x)[2]
    assert all(len(set(row)) == m.config.num_experts_per_tok for row in idx.tolist())
    assert set_routing(m, "model") == 0 and torch.equal(gate(x)[2], torch.topk(gate(x)[0], idx.shape[1]).indices)
