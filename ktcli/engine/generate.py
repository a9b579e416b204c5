"""Generation over a static KV cache: chunked prefill, then fixed-shape decode steps (eager or graph)."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from ..errors import KtcliError
from ..model.devices import gpus, synchronize
from ..ops.base import set_stage
from ..ops.clocks import take_all
from .sampling import sample
from .timing import GenerationStats, peak_host_bytes


class ContextFull(KtcliError):
    """A prompt the context cannot take (or an empty one): a mistake in the input, exit 2."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message, hint, code=2)


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple = ()                 # stop strings
    ignore_eos: bool = False         # bench: fixed lengths


def stream_chunk(built, max_len: int, floor: int) -> int:
    """Prefill chunk when layers stream: as many tokens as half the free GPU memory holds in activations (after
    the KV cache), at least the profile's prefill_chunk, at most the context."""
    from ..placement.memory import DTYPE_BYTES, kv_cache_bytes
    cfg, devs = built.model.config, gpus(built.plan)
    # each GPU holds its own layers' share of the KV cache
    free = min(torch.cuda.mem_get_info(d)[0] for d in devs) \
        - kv_cache_bytes(cfg, max_len, DTYPE_BYTES[built.profile.dtype]) // max(len(devs), 1)
    inter = max(getattr(cfg, k, 0) or 0 for k in ("intermediate_size", "moe_intermediate_size",
                                                   "shared_expert_intermediate_size"))
    per_token = (cfg.hidden_size * 8 + inter * 3 + cfg.num_experts_per_tok * cfg.hidden_size * 4) * 4
    return int(min(max_len, max(floor, free // 2 // per_token)))


class Engine:
    def __init__(self, built, graph_mode: str | None = None):
        from transformers import StaticCache
        self.built, self.model, self.device = built, built.model, built.main_device
        rt = built.profile.runtime
        self.max_len, self.chunk = rt.max_seq_len, min(rt.prefill_chunk, rt.max_seq_len)
        self.mode = graph_mode or rt.mode
        self.cache = StaticCache(config=self.model.config, max_cache_len=self.max_len)
        if built.streamer is not None:     # a streamed layer's copy is paid per chunk: chunks as long as fit
            self.chunk = stream_chunk(built, self.max_len, self.chunk)
        self.ids: list = []          # tokens whose K/V are in the cache, in order
        self.graph = None
        self.capture_s = 0.0
        tok, gen = built.tokenizer, getattr(self.model, "generation_config", None)
        eos = [getattr(tok, "eos_token_id", None)] + _as_list(getattr(gen, "eos_token_id", None))
        self.eos = {int(i) for i in eos if i is not None}
        # Waiting on a blocking-sync event sleeps instead of spinning: a spinning main thread would take a
        # core from the CPU experts that run in host callbacks during a full-graph replay.
        self._done = torch.cuda.Event(blocking=True) if self.device.type == "cuda" else None
        self._tok = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self._pos = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.gpus = gpus(built.plan)       # several: layers' hooks switch the current GPU; each forward restores it

    # -- low level -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, pos: torch.Tensor, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """ids/pos [1, T] → logits of the last position [1, V]; `embeds` [1, T, H] instead of ids when given."""
        T = ids.shape[1]
        # For T > 1 the last position by index, not by slice: the slice [:, -1:] keeps a stride that sends the
        # lm_head matmul down torch's batched path, which copies the whole lm_head weight on the CPU (2.5 s for
        # Qwen3's 151,936 × 2,048 per prefill chunk).
        keep = 1 if T == 1 else torch.tensor([T - 1], device=ids.device)
        inputs = {"input_ids": ids} if embeds is None else {"inputs_embeds": embeds}
        with torch.cuda.device(self.device) if len(self.gpus) > 1 else contextlib.nullcontext():
            out = self.model(**inputs, position_ids=pos, cache=self.cache, use_cache=True, logits_to_keep=keep)
        return out.logits[:, -1]

    @torch.inference_mode()
    def set_len(self, n: int) -> None:
        """Tell every cache layer how many positions are valid (prefix reuse, graph warm-up)."""
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(n)

    def prepare(self) -> None:
        """Allocate the cache and, with graphs on, capture the decode step once per model load."""
        if self.mode == "off" or self.graph is not None:
            return
        from .graphs import DecodeGraph
        t0 = time.perf_counter()
        self.prefill([0])
        self.graph = DecodeGraph(self, self.mode)
        self.graph.capture()
        self.reset()
        self.capture_s = time.perf_counter() - t0

    def reset(self) -> None:
        self.ids = []
        self.set_len(0)

    # -- stages ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, ids: list) -> torch.Tensor:
        if not ids:
            raise ContextFull("the prompt is empty: it encodes to no tokens", "give some text")
        if len(ids) >= self.max_len:
            raise ContextFull(f"the prompt has {len(ids)} tokens; the context holds {self.max_len}",
                              "raise --max-seq-len or shorten the prompt")
        reuse = 0
        while reuse < min(len(ids) - 1, len(self.ids)) and ids[reuse] == self.ids[reuse]:
            reuse += 1
        self.set_len(reuse)
        set_stage(self.model, "prefill")
        logits, st = None, self.built.streamer
        for a in range(reuse, len(ids), self.chunk):
            b = min(a + self.chunk, len(ids))
            x = torch.tensor([ids[a:b]], dtype=torch.long, device=self.device)
            p = torch.arange(a, b, device=self.device).unsqueeze(0)
            if timed := st is not None and st.trialing(b - a):    # `auto` times its two policies (calibration.py)
                policy = st.chunk_policy(b - a)
                synchronize(self.gpus)
                t0 = time.perf_counter()
            logits = self.forward(x, p)
            if timed:
                synchronize(self.gpus)
                st.observe_chunk(b - a, policy, time.perf_counter() - t0)
        if st is not None:
            st.collect()
        self.ids = list(ids)
        self.reused = reuse
        return logits

    @torch.inference_mode()
    def decode(self, token: torch.Tensor) -> torch.Tensor:
        """Feed `token` (0-d, on device) at the next position; logits [1, V] for the one after."""
        pos = len(self.ids)
        if self.graph is not None:
            logits = self.graph.run(token, pos)
        else:
            set_stage(self.model, "decode")
            self._tok.copy_(token.view(1, 1))
            self._pos.fill_(pos)
            logits = self.forward(self._tok, self._pos)
        return logits

    # -- generation ------------------------------------------------------------------------------------------
    def generate(self, prompt_ids: list, cfg: GenerationConfig, on_token=None, should_stop=None):
        """Yields nothing; calls on_token(id) as each token is read. Returns (new_ids, GenerationStats)."""
        cuda = self.device.type == "cuda"
        if cuda:
            for d in self.gpus:
                torch.cuda.reset_peak_memory_stats(d)
        self.prepare()
        st = GenerationStats(load_s=self.built.timings.get("load", 0.0), capture_s=self.capture_s, graph_mode=self.mode)
        gen = None
        if cfg.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        t0 = time.perf_counter()
        logits = self.prefill(prompt_ids)
        tok = sample(logits[0], cfg.temperature, cfg.top_k, cfg.top_p, gen)
        tid = int(tok)                                   # the one sync per token: read it to stream it
        st.prefill_s, st.prompt_tokens = time.perf_counter() - t0, len(prompt_ids) - self.reused
        new, text = [tid], ""
        take_all()
        st.stop_reason = "length"
        while True:
            if on_token:
                on_token(tid)
            if not cfg.ignore_eos and tid in self.eos:
                st.stop_reason = "eos"
                break
            if cfg.stop and self.built.tokenizer is not None:
                text = self.built.tokenizer.decode(new)
                if any(s in text for s in cfg.stop):
                    st.stop_reason = "stop"
                    break
            if len(new) >= cfg.max_new_tokens:
                break
            if len(self.ids) + 1 >= self.max_len:
                st.stop_reason = "context"
                break
            if should_stop and should_stop():
                st.stop_reason = "interrupted"
                break
            t1 = time.perf_counter()
            logits = self.decode(tok)
            self.ids.append(tid)
            tok = sample(logits[0], cfg.temperature, cfg.top_k, cfg.top_p, gen)
            if self._done is not None:
                self._done.record()
                self._done.synchronize()
            tid = int(tok)
            if self.graph is not None and self.graph.mode == "full":
                self.graph.bridge.check()   # host callbacks cannot raise: their errors are recorded
            st.latencies.append(time.perf_counter() - t1)
            new.append(tid)
        st.decode_tokens, st.decode_s = len(st.latencies), sum(st.latencies)
        for k, v in take_all().items():
            setattr(st, k, v)
        st.peak_gpu_bytes = max(torch.cuda.max_memory_allocated(d) for d in self.gpus) if cuda else 0
        st.peak_host_bytes = peak_host_bytes()
        return new, st


def _as_list(x):
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]
