"""Accuracy cost of int8 / int4 CPU experts on a tiny model: logits error and greedy agreement vs bf16.

    python benchmarks/quant_accuracy.py --out benchmarks/results/quant-accuracy-tiny.json
    python benchmarks/quant_accuracy.py --inter 128 --group 128 --int8-act 1   # the int8-activation path

The prompt's logits (64 tokens) come from torch's GEMMs on the dequantized weights; `kernel_logits_rel_err`
is a 16-token forward, which runs the CPU kernel (≤ 16 tokens); greedy decoding runs the kernel too. With
--int8-act 1 and sizes that are multiples of 128, the kernel takes its integer path (int8 activations; VNNI
where the CPU has it, else its plain-C twin with the same arithmetic).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def measure(root, tokens=48, group=32, inter=64):
    from ktcli.model.build import build
    from ktcli.commands.options import machine_for, profile_from_flags
    from ktcli.engine import Engine, GenerationConfig
    from ktcli.placement.validate import validate
    from tiny import make_checkpoint, write_profile
    ckpt = make_checkpoint(root, "qwen2_moe", layers=4, hidden_size=128, moe_intermediate_size=inter,
                           shared_expert_intermediate_size=64)

    def model(fmt):
        rule = {"match": {"name": r"experts$"}, "replace": {"class": "Experts", "kwargs": {
            "prefill_device": "cpu", "generate_device": "cpu", "prefill_op": "cpu", "generate_op": "cpu",
            "weight_format": fmt, "group_size": group}}}
        prof = profile_from_flags(write_profile(root, ckpt, [rule], name=f"{fmt}.yaml", dtype="bfloat16"))
        return build(validate(prof, machine_for(None)))
    ids = torch.randint(0, 400, (1, 64), generator=torch.Generator().manual_seed(0))
    base = model("bf16")
    with torch.no_grad():
        ref_logits = base.model(ids.to(base.main_device)).logits.float().cpu()
        ref_short = base.model(ids[:, :16].to(base.main_device)).logits.float().cpu()
    ref_tokens, _ = Engine(base).generate(ids[0].tolist(), GenerationConfig(max_new_tokens=tokens, ignore_eos=True))
    out = {}
    for fmt in ("int8", "int4"):
        b = model(fmt)
        with torch.no_grad():
            lg = b.model(ids.to(b.main_device)).logits.float().cpu()
            short = b.model(ids[:, :16].to(b.main_device)).logits.float().cpu()
        toks, _ = Engine(b).generate(ids[0].tolist(), GenerationConfig(max_new_tokens=tokens, ignore_eos=True))
        agree = next((i for i, (a, c) in enumerate(zip(toks, ref_tokens)) if a != c), len(toks))
        out[fmt] = {"logits_rel_err": ((lg - ref_logits).norm() / ref_logits.norm()).item(),
                    "top1_agreement": (lg.argmax(-1) == ref_logits.argmax(-1)).float().mean().item(),
                    "kernel_logits_rel_err": ((short - ref_short).norm() / ref_short.norm()).item(),
                    "kernel_top1_agreement": (short.argmax(-1) == ref_short.argmax(-1)).float().mean().item(),
                    "greedy_tokens_equal_prefix": agree, "greedy_tokens": tokens, "group_size": group,
                    "moe_intermediate_size": inter}
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--inter", type=int, default=64, help="experts' intermediate size")
    ap.add_argument("--int8-act", choices=["0", "1"], help="KTCLI_CPU_INT8_ACT for the kernel")
    a = ap.parse_args()
    if a.int8_act:
        os.environ["KTCLI_CPU_INT8_ACT"] = a.int8_act
    from ktcli.ops import kernels
    with tempfile.TemporaryDirectory() as d:
        r = {"command": " ".join(["python", *sys.argv]), "results": measure(d, group=a.group, inter=a.inter),
             "kernel": kernels.get() is not None, "caps": kernels.caps(),
             "int8_activations": bool(kernels.get() and kernels.tune()[2])}
    print(json.dumps(r, indent=2))
    if a.out:
        from ktcli.files import write_atomic
        write_atomic(a.out, json.dumps(r, indent=2))
