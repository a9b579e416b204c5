"""runtime.compile: each decoder layer's attention, norms and router run torch.compile'd code for one-token decode.

Why: a small-expert layer's GPU part is ~70 small kernels (norms, rotary, cache update, attention, router); inside a
full graph each costs microseconds, so the GPU side of a Qwen3-30B layer takes ~0.2 ms against its few µs of bytes
(benchmarks/README.md, #15). Inductor fuses them into a few kernels. One token only: prefill's varying lengths would
recompile, and its time is in the experts. Experts are never compiled (their operators own their paths).
"""
from __future__ import annotations

import re
import types

import torch

from ..errors import KtcliError

ENABLED = True      # False: the wrapped modules run eagerly (benchmarks/compile_ab.py captures one graph of each)

PARTS = re.compile(r"(?:^|\.)layers\.\d+\.(self_attn|input_layernorm|post_attention_layernorm|"
                   r"(?:mlp|block_sparse_moe)\.gate)$")


def _wrap(name: str, mod: torch.nn.Module) -> None:
    eager = mod.forward
    compiled = torch.compile(eager, dynamic=False, fullgraph=True)

    def forward(self, hidden_states, *args, **kwargs):
        if hidden_states.shape[-2] != 1 or not ENABLED:     # prefill: [.., T, H] with T > 1
            return eager(hidden_states, *args, **kwargs)
        try:
            return compiled(hidden_states, *args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as e:   # a module torch.compile cannot trace whole
            raise KtcliError(f"runtime.compile: torch.compile cannot compile {name} ({type(mod).__name__}): "
                             f"{str(e).splitlines()[0][:200]}", "set runtime.compile: false") from None
    mod.forward = types.MethodType(forward, mod)


def compiled_graphs() -> int:
    """How many graphs torch.compile has produced in this process (tests: the compiled path ran)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def compile_decode(model: torch.nn.Module) -> list:
    """Wrap the modules named in PARTS; returns their names. Each layer's cache index specializes its compiled code
    (one entry per layer, the same kernels), so the recompile limits are raised to the layer count."""
    names = [(n, m) for n, m in model.named_modules() if PARTS.search(n)]
    cfg = torch._dynamo.config
    need = 2 * max(len(names), 8)
    for key in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, key):
            setattr(cfg, key, max(getattr(cfg, key), need))
    for n, m in names:
        _wrap(n, m)
    return [n for n, _ in names]
