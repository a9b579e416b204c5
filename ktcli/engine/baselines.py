"""Baselines measured in the same run: plain transformers + accelerate CPU offload, and plain transformers on GPU.

Both use transformers' own modules end to end (no ktcli operator), with the same synthetic or checkpoint weights.
"""
from __future__ import annotations

import time

import torch

from ..model.config import find_experts, meta_model
from ..model.build import DTYPES, materialize
from ..model.weights import fill_synthetic, load_checkpoint
from ..errors import KtcliError

BASELINES = ("hf-accelerate", "hf-gpu")


def build_baseline(kind: str, source, dtype: str, synthetic: bool):
    if not torch.cuda.is_available():
        raise KtcliError(f"baseline {kind} needs a GPU", "run baselines on a CUDA machine")
    model = meta_model(source.config, DTYPES[dtype]).eval().requires_grad_(False)
    experts = {n for n, _ in find_experts(model)}
    on_cpu = lambda name: kind == "hf-accelerate" and name.rsplit(".", 1)[0] in experts   # noqa: E731
    params, buffers = materialize(model, lambda name: "cpu" if on_cpu(name) else "cuda")
    if synthetic or source.checkpoint_dir is None:
        fill_synthetic(params)
    else:
        load_checkpoint(params, source.checkpoint_dir, buffers=buffers)
    if kind == "hf-accelerate":
        # What a user tries first: device_map with the routed experts on "cpu" → accelerate offload hooks
        # move each experts module's weights to the GPU when it runs.
        from accelerate import dispatch_model
        dmap = {"": 0, **{e: "cpu" for e in experts}}
        model = dispatch_model(model, device_map=dmap, main_device=0)
    return model


@torch.inference_mode()
def run_baseline_test(model, kind: str, n: int, reps: int, warmup: int, seed=0, tick=None) -> dict:
    from transformers import DynamicCache
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(warmup + reps):
        cache = DynamicCache(config=model.config)
        if kind == "pp":
            ids = torch.randint(0, vocab, (1, n), generator=gen).cuda()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
            torch.cuda.synchronize()
        else:
            tok = torch.randint(0, vocab, (1, 1), generator=gen).cuda()
            out = model(input_ids=tok, cache=cache, use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                out = model(input_ids=tok, cache=cache, use_cache=True, logits_to_keep=1)
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                int(tok)
        dt = time.perf_counter() - t0
        if i >= warmup:
            samples.append(n / dt)
        if tick:
            tick()
    return {"samples": samples, "breakdown": {}}
