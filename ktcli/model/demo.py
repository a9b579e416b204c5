"""The embedded default: a tiny qwen2_moe checkpoint generated locally on first use (no download).

It is written as a real HF checkpoint (config.json, model.safetensors with per-expert tensor names,
tokenizer.json + chat template) and then loaded through the same path as a user's checkpoint.
"""
from __future__ import annotations

import os
import shutil
import tempfile

from ..files import cache_root

DEMO_VERSION = "1"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
_CORPUS = """Mixture of experts models route every token to a few experts. The router picks the top experts
and their weights. Experts that live on the CPU are computed there; the GPU keeps attention, the router and
the shared expert. A CUDA graph records one decode step and replays it for every new token. Hello! How are
you today? I am a tiny demo model with random weights, so my answers are noise. The quick brown fox jumps
over the lazy dog. Prefill reads the prompt; decode writes one token at a time. Memory bandwidth decides
how fast the CPU can read the weights of the selected experts."""


def cache_dir() -> str:
    return os.path.join(cache_root(), f"demo-v{DEMO_VERSION}")


def demo_config(vocab_size: int, **overrides):
    from transformers import Qwen2MoeConfig
    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
              shared_expert_intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              num_experts=8, num_experts_per_tok=2, max_position_embeddings=2048, norm_topk_prob=False,
              bos_token_id=0, eos_token_id=2, tie_word_embeddings=False)
    kw.update(overrides)
    return Qwen2MoeConfig(**kw)


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE trained in milliseconds on the corpus above; deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_checkpoint(path: str, config, tokenizer, seed: int = 0, dtype=None) -> str:
    """Random-init `config`'s causal LM with a fixed seed and save it with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    model.generation_config.eos_token_id = config.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def ensure_demo() -> str:
    """Generate once into the cache (atomically: temp dir then rename), then reuse."""
    target = cache_dir()
    if os.path.isfile(os.path.join(target, "model.safetensors")):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo-", dir=os.path.dirname(target))
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()     # ktcli shows its own progress; transformers' bar is noise here
        tok = build_tokenizer()
        cfg = demo_config(len(tok), eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                          bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"))
        write_checkpoint(tmp, cfg, tok)
        try:
            os.rename(tmp, target)
        except OSError:          # another process won the race; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
