"""Where a model comes from: the embedded demo, a shipped architecture config, or a local HF checkpoint."""
from __future__ import annotations

import functools
import glob
import os
import re
from dataclasses import dataclass

from ..errors import CheckpointError

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


def shipped_configs() -> list:
    return sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".json"))


@dataclass
class ModelSource:
    spec: str                  # what the user wrote
    config_path: str
    checkpoint_dir: str | None  # None: a config only (shipped architecture) → synthetic weights
    config: object

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.checkpoint_dir or self.spec))


def resolve_model(spec: str, num_layers: int | None = None) -> ModelSource:
    """Read config.json only: enough for placement and memory checks, no weights touched."""
    from transformers import AutoConfig
    ckpt = None
    if spec == "demo":
        from .demo import ensure_demo
        ckpt = ensure_demo()
        cfg_path = os.path.join(ckpt, "config.json")
    elif spec in shipped_configs():
        cfg_path = os.path.join(CONFIG_DIR, f"{spec}.json")
    elif os.path.isdir(spec):
        ckpt, cfg_path = spec, os.path.join(spec, "config.json")
        if not os.path.isfile(cfg_path):
            raise CheckpointError(f"{spec} has no config.json", "point --model at a Hugging Face checkpoint directory")
    elif os.path.isfile(spec) and spec.endswith(".json"):
        cfg_path = spec
    else:
        raise CheckpointError(f"model {spec!r} not found: not a directory, a config.json, or a shipped config",
                              f"use 'demo', a checkpoint directory, or one of: {', '.join(shipped_configs())}")
    try:
        config = AutoConfig.from_pretrained(cfg_path)
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"cannot read {cfg_path}: {str(e).splitlines()[0]}",
                              "config.json must name a model_type transformers knows") from None
    if num_layers is not None:
        if num_layers < 1 or num_layers > config.num_hidden_layers:
            raise CheckpointError(f"--num-layers {num_layers} is outside 1..{config.num_hidden_layers}",
                                  f"the model has {config.num_hidden_layers} layers")
        config._ktcli_full_layers = config.num_hidden_layers   # reported by bench next to the truncated count
        config.num_hidden_layers = num_layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:num_layers]
    return ModelSource(spec, cfg_path, ckpt, config)


@functools.lru_cache(maxsize=1)
def supported_model_types() -> tuple:
    """Architectures whose experts class uses transformers' experts interface (one swap point per layer)."""
    import transformers
    root = os.path.join(os.path.dirname(transformers.__file__), "models")
    found = []
    for path in glob.glob(os.path.join(root, "*", "modeling_*.py")):
        with open(path, encoding="utf-8") as f:
            if re.search(r"^@use_experts_implementation", f.read(), re.M):
                found.append(os.path.basename(os.path.dirname(path)))
    return tuple(sorted(set(found)))


def meta_model(config, dtype=None):
    """The transformers model on the meta device: module tree and shapes, no memory."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):
        try:
            return AutoModelForCausalLM.from_config(config, dtype=dtype or torch.bfloat16)
        except ValueError as e:
            raise CheckpointError(f"transformers cannot build a causal LM for model_type "
                                  f"{config.model_type!r}: {str(e).splitlines()[0]}",
                                  "ktcli runs MoE causal LMs transformers knows (see validate-config's list)") from None


def find_experts(model) -> list:
    """[(name, module)] for every module with the experts interface's 3-D gate_up_proj/down_proj."""
    out = []
    for name, mod in model.named_modules():
        gu, dn = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
        if getattr(gu, "ndim", 0) == 3 and getattr(dn, "ndim", 0) == 3:
            out.append((name, mod))
    return out


def layer_index(name: str) -> int:
    m = re.search(r"layers\.(\d+)\.", name + ".")
    return int(m.group(1)) if m else -1
