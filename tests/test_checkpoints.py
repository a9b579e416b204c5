"""Checkpoint loading: legacy names fused, sharded index, clear errors for bad checkpoints, peak RSS."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from safetensors.torch import load_file, save_file

from tiny import experts_rule, make_checkpoint, write_profile


def copy_ckpt(tmp_path, src, name="c"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def qwen(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.getbasetemp(), "qwen2_moe")


def build_error(tmp_path, ckpt):
    """The message a damaged checkpoint gets, asserted the same from validate-config and from loading."""
    from ktcli.model.build import build
    from ktcli.commands.options import machine_for, profile_from_flags
    from ktcli.errors import KtcliError
    from ktcli.placement.validate import validate
    prof = profile_from_flags(write_profile(tmp_path, str(ckpt), [experts_rule(".*", "cpu", "cpu", "cpu")]))
    v = validate(prof, machine_for(None))
    # validate-config finds it from the headers alone (exit 4), and loading says the same if it gets that far
    assert v.exit_code == 4 and v.errors()[0].check == "checkpoint", [f.line() for f in v.findings]
    with pytest.raises(KtcliError) as e:
        build(v)
    assert e.value.message == v.errors()[0].message and e.value.code == 4
    return e.value.message


def test_sharded_index_and_fused_names_load(tmp_path, qwen):
    """Split into two shards with an index, one using fused 3-D expert names: both load the same."""
    from ktcli.model.build import build
    from ktcli.commands.options import machine_for, profile_from_flags
    from ktcli.placement.validate import validate
    import torch
    c = copy_ckpt(tmp_path, qwen)
    sd = load_file(c / "model.safetensors")
    os.remove(c / "model.safetensors")
    fused = {}
    for L in range(3):
        p = f"model.layers.{L}.mlp.experts"
        fused[f"{p}.gate_up_proj"] = torch.stack([torch.cat([sd.pop(f"{p}.{e}.gate_proj.weight"),
                                                             sd.pop(f"{p}.{e}.up_proj.weight")]) for e in range(8)])
        fused[f"{p}.down_proj"] = torch.stack([sd.pop(f"{p}.{e}.down_proj.weight") for e in range(8)])
    save_file(sd, c / "a.safetensors", metadata={"format": "pt"})
    save_file(fused, c / "b.safetensors", metadata={"format": "pt"})
    wm = {**{k: "a.safetensors" for k in sd}, **{k: "b.safetensors" for k in fused}}
    (c / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    prof = profile_from_flags(write_profile(tmp_path, str(c), [experts_rule(".*", "cpu", "cpu", "cpu")]))
    b = build(validate(prof, machine_for(None)))
    ref = load_file(os.path.join(qwen, "model.safetensors"))
    got = b.model.model.layers[1].mlp.experts
    assert torch.equal(got.gate_up_proj[3, :16], ref["model.layers.1.mlp.experts.3.gate_proj.weight"])
    assert torch.equal(got.down_proj[5], ref["model.layers.1.mlp.experts.5.down_proj.weight"])


def test_missing_shard(tmp_path, qwen):
    c = copy_ckpt(tmp_path, qwen)
    (c / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "x.safetensors"}}))
    assert build_error(tmp_path, c) == "missing shard x.safetensors (listed in model.safetensors.index.json for lm_head.weight)"


def test_missing_tensor(tmp_path, qwen):
    c = copy_ckpt(tmp_path, qwen)
    sd = load_file(c / "model.safetensors")
    del sd["model.norm.weight"]
    save_file(sd, c / "model.safetensors")
    assert build_error(tmp_path, c) == "checkpoint lacks 1 tensor(s), first: model.norm.weight"


def test_shape_mismatch(tmp_path, qwen):
    c = copy_ckpt(tmp_path, qwen)
    sd = load_file(c / "model.safetensors")
    sd["model.norm.weight"] = sd["model.norm.weight"][:-1].clone()
    save_file(sd, c / "model.safetensors")
    assert build_error(tmp_path, c) == "model.norm.weight has shape (31,), the model expects (32,)"


def test_truncated_file(tmp_path, qwen):
    c = copy_ckpt(tmp_path, qwen)
    f = c / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    assert build_error(tmp_path, c).startswith(f"cannot read {f}")


def test_no_safetensors(tmp_path, qwen):
    c = copy_ckpt(tmp_path, qwen)
    os.remove(c / "model.safetensors")
    assert build_error(tmp_path, c) == f"{c} has no *.safetensors files"


PEAK = textwrap.dedent("""
    import json, resource, sys
    import torch
    from ktcli.model.build import build
    from ktcli.commands.options import machine_for, profile_from_flags
    from ktcli.placement.validate import validate
    v = validate(profile_from_flags(sys.argv[1]), machine_for(None))
    import ktcli.model.build  # imports done before the baseline
    def rss():
        return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) * 1024
    base = rss()
    b = build(v)
    peak = int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024
    print(json.dumps({"base": base, "peak": peak, "weights": b.weight_bytes.get("cpu", 0)}))
""")


@pytest.mark.slow
def test_peak_rss_during_load_is_bounded(tmp_path):
    """A ~1.5 GB checkpoint with per-expert names: peak RSS ≤ 1.1 × CPU weights + a small constant."""
    from tiny import tiny_config, tokenizer
    from ktcli.model.demo import write_checkpoint
    cfg = tiny_config("qwen2_moe", layers=6, hidden_size=1024, intermediate_size=256, moe_intermediate_size=512,
                      num_experts=64, shared_expert_intermediate_size=256)
    ckpt = write_checkpoint(str(tmp_path / "big"), cfg, tokenizer(), dtype=__import__("torch").bfloat16)
    size = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt))
    assert size > 1.2e9
    prof = write_profile(tmp_path, ckpt, [experts_rule(".*", "cpu", "cpu", "cpu")], dtype="bfloat16")
    out = subprocess.run([sys.executable, "-c", PEAK, prof], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["weights"] > 1.2e9
    assert r["peak"] - r["base"] <= 1.1 * r["weights"] + 64 * 2**20, r
    # int8 experts are quantized layer by layer as they load: peak stays near the int8 size, not the bf16 one
    prof8 = write_profile(tmp_path, ckpt, [{**experts_rule(".*", "cpu", "cpu", "cpu"), "replace": {
        "class": "Experts", "kwargs": {"prefill_device": "cpu", "generate_device": "cpu", "prefill_op": "cpu",
                                       "generate_op": "cpu", "weight_format": "int8"}}}], name="q.yaml", dtype="bfloat16")
    out = subprocess.run([sys.executable, "-c", PEAK, prof8], capture_output=True, text=True, check=True)
    q = json.loads(out.stdout.strip().splitlines()[-1])
    assert q["weights"] < 0.55 * r["weights"]
    layer_bf16 = r["weights"] / 6                      # 6 layers
    assert q["peak"] - q["base"] <= q["weights"] + 2 * layer_bf16 + 64 * 2**20, q
    assert q["peak"] - q["base"] < r["weights"], q       # below what the bf16 model alone would need
