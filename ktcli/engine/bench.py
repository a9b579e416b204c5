"""llama-bench-style measurements on an Engine: pp N (prefill N tokens), tg N (decode N tokens)."""
from __future__ import annotations

import time

import torch

from ..ops.clocks import HostClock, SyncClock
from .generate import GenerationConfig


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_ids(vocab: int, n: int, gen: torch.Generator) -> list:
    return torch.randint(0, vocab, (n,), generator=gen).tolist()


def run_test(engine, kind: str, n: int, reps: int, warmup: int, seed: int = 0, tick=None) -> dict:
    """{'samples': [t/s per repetition], 'reps': [{'s', 'cpu_experts_s', 'gpu_wait_s'} per repetition],
    'breakdown': {… ms per token over all repetitions}}; random prompts, EOS ignored."""
    vocab = engine.model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    engine.prepare()
    samples, timed = [], []
    for i in range(warmup + reps):
        engine.reset()
        if kind == "pp":
            ids = random_ids(vocab, n, gen)
            _sync(engine.device)
            HostClock.take(), SyncClock.take()
            t0 = time.perf_counter()
            engine.prefill(ids)
            _sync(engine.device)
            dt, cpu, gpu = time.perf_counter() - t0, HostClock.take(), SyncClock.take()
        else:
            _, st = engine.generate(random_ids(vocab, 1, gen), GenerationConfig(max_new_tokens=n + 1, ignore_eos=True))
            dt, cpu, gpu = st.decode_s, st.cpu_experts_s, st.gpu_wait_s
        if i >= warmup:
            samples.append(n / dt)
            timed.append({"s": dt, "cpu_experts_s": cpu, "gpu_wait_s": gpu})
        if tick:
            tick()
    total, cpu, gpu = (sum(r[k] for r in timed) for k in ("s", "cpu_experts_s", "gpu_wait_s"))
    per_tok = 1e3 / (n * len(timed)) if timed else 0.0
    return {"samples": samples, "reps": timed,
            "breakdown": {"ms_per_token": total * per_tok, "cpu_experts_ms": cpu * per_tok,
                          "gpu_wait_ms": gpu * per_tok, "other_ms": max(total - cpu - gpu, 0.0) * per_tok}}
