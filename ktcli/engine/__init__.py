"""Engine: static KV cache, chunked prefill, decode (eager or CUDA graph), sampling. Never prints."""
from .generate import Engine, GenerationConfig, ContextFull
from .timing import GenerationStats

__all__ = ["Engine", "GenerationConfig", "ContextFull", "GenerationStats"]
