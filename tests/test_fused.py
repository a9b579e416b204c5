"""model/fused.py: the fused q/k/v projection and the unsorted router give the plain transformers model's logits
(fp32, prefill and decode) on fresh random weights, keep one copy of the projection weights, and leave classes it
does not know alone."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from ktcli.model.fused import fuse_decode
from tiny import make_checkpoint


def _logits(model, ids):
    """Prefill of ids[:-3], then three one-token steps: [S, V] logits of every position, through the cache."""
    from transformers import DynamicCache
    cache, out = DynamicCache(), []
    with torch.no_grad():
        r = model(ids[:, :-3], cache=cache, use_cache=True)
        out.append(r.logits[0])
        for i in range(ids.shape[1] - 3, ids.shape[1]):
            out.append(model(ids[:, i:i + 1], cache=cache, use_cache=True).logits[0])
    return torch.cat(out)


@pytest.mark.parametrize("arch,fused", [("qwen3_moe", 2), ("qwen2_moe", 1)])
def test_fused_modules_give_the_plain_models_logits(tmp_path_factory, arch, fused):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("fused"), arch, layers=2)
    plain = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    names = fuse_decode(model, device_types=("cpu",))
    assert len(names) == fused * model.config.num_hidden_layers   # attention (+ the router for Qwen3) a layer
    att = model.model.layers[0].self_attn
    assert att.q_proj.weight.data_ptr() == att.qkv_weight.data_ptr()          # views: one copy of the weights
    assert att.v_proj.weight.untyped_storage().data_ptr() == att.qkv_weight.untyped_storage().data_ptr()
    ids = torch.randint(0, plain.config.vocab_size, (1, 19), generator=torch.Generator().manual_seed(3))
    want, got = _logits(plain, ids), _logits(model, ids)
    assert ((got - want).norm() / want.norm()).item() <= 1e-5


def test_only_modules_on_the_given_devices_are_fused(tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("fused"), "qwen3_moe", layers=2)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    assert fuse_decode(model) == []                  # default: GPU modules only
    assert not hasattr(model.model.layers[0].self_attn, "qkv_weight")


def test_the_switch_leaves_every_module_unfused(tmp_path_factory, monkeypatch):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("fused"), "qwen3_moe", layers=2)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    monkeypatch.setenv("KTCLI_FUSED", "0")
    assert fuse_decode(model, device_types=("cpu",)) == []


def test_an_unknown_attention_class_keeps_its_forward():
    class OtherAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = self.k_proj = self.v_proj = torch.nn.Linear(4, 4)

    m = torch.nn.Sequential(OtherAttention())
    assert fuse_decode(m, device_types=("cpu",)) == []
