"""Hybrid execution: ktcli-built models equal plain transformers on the same weights, per placement."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from ktcli.model.build import build
from ktcli.commands.options import machine_for, profile_from_flags
from ktcli.ops.base import set_stage
from ktcli.placement.validate import validate
from tiny import ARCHS, experts_rule, make_checkpoint, write_profile

PLACEMENTS = {
    "all-cpu-op": [experts_rule(".*", "cpu", "cpu", "cpu")],
    "mixed-ops": [experts_rule("0", "cpu", "torch", "torch"), experts_rule(".*", "cpu", "cpu", "cpu")],
    "prefill-torch-decode-cpu": [experts_rule(".*", "cpu", "torch", "cpu")],
}


def built(root, ckpt, rules, dtype="float32", **rt):
    prof = profile_from_flags(write_profile(root, ckpt, rules, dtype=dtype, **rt))
    v = validate(prof, machine_for(None))
    assert v.ok, [f.line() for f in v.errors()]
    return build(v)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_logits_match_transformers_fp32(tmp_path_factory, arch, placement):
    root = tmp_path_factory.getbasetemp()
    ckpt = make_checkpoint(root, arch)
    b = built(tmp_path_factory.mktemp("p"), ckpt, PLACEMENTS[placement])
    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = torch.randint(0, ref.config.vocab_size, (1, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        for stage in ("prefill", "decode"):
            set_stage(b.model, stage)
            assert rel(b.model(ids).logits, want) <= 1e-5, (arch, placement, stage)


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3"])
def test_logits_match_transformers_bf16(tmp_path_factory, arch):
    ckpt = make_checkpoint(tmp_path_factory.getbasetemp(), arch)
    b = built(tmp_path_factory.mktemp("p"), ckpt, PLACEMENTS["mixed-ops"], dtype="bfloat16")
    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, ref.config.vocab_size, (1, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel(b.model(ids).logits, ref(ids).logits) <= 1e-2


def test_demo_checkpoint_is_reproducible(tmp_path, monkeypatch):
    import hashlib
    import os

    from ktcli.model import demo
    digests = []
    for sub in ("a", "b"):
        monkeypatch.setenv("KTCLI_CACHE", str(tmp_path / sub))
        path = demo.ensure_demo()
        h = hashlib.sha256()
        for f in sorted(os.listdir(path)):
            h.update(f.encode() + open(os.path.join(path, f), "rb").read())
        digests.append(h.hexdigest())
    assert digests[0] == digests[1]
