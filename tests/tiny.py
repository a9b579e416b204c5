"""Tiny checkpoints of several MoE architectures, written as real HF checkpoint directories."""
import functools
import os

import torch
from transformers import AutoConfig

from ktcli.model.demo import build_tokenizer, write_checkpoint

ARCHS = {
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=32, norm_topk_prob=False),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8, norm_topk_prob=True),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_group=4, topk_group=2,
                        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=8, n_shared_experts=1, routed_scaling_factor=2.5,
                        num_key_value_heads=4),
}


@functools.lru_cache(maxsize=None)
def tokenizer():
    return build_tokenizer()


def tiny_config(arch, layers=3, **kw):
    tok = tokenizer()
    base = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), tie_word_embeddings=False)
    base.update(ARCHS[arch])
    base.update(kw)
    return AutoConfig.for_model(arch, **base)


def make_checkpoint(root, arch, seed=0, **kw):
    path = os.path.join(str(root), f"{arch}-{seed}")
    if not os.path.isdir(path):
        write_checkpoint(path, tiny_config(arch, **kw), tokenizer(), seed=seed)
        # transformers initialises some tiny weights to 0/1; perturb so every path matters
        from safetensors.torch import load_file, save_file
        f = os.path.join(path, "model.safetensors")
        sd = load_file(f)
        g = torch.Generator().manual_seed(seed)
        sd = {k: (v + 0.05 * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v
              for k, v in sd.items()}
        save_file(sd, f, metadata={"format": "pt"})
    return path


def write_profile(root, ckpt, rules, name="p.yaml", dtype="float32", **runtime):
    import yaml
    rt = {"max_seq_len": 256, "prefill_chunk": 64, **runtime}
    data = {"model": ckpt, "dtype": dtype, "runtime": rt, "rules": rules}
    p = os.path.join(str(root), name)
    with open(p, "w") as f:
        yaml.safe_dump(data, f)
    return p


def experts_rule(layers, device, prefill_op, decode_op, prefill_device=None):
    return {"match": {"name": rf"^model\.layers\.({layers})\.mlp\.experts$"},
            "replace": {"class": "Experts", "kwargs": {"prefill_device": prefill_device or device,
                                                      "generate_device": device, "prefill_op": prefill_op,
                                                      "generate_op": decode_op}}}
