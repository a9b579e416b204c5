"""CUDA-graph decode: one step captured once per model load, replayed per token.

full: one graph; CPU-expert layers run inside it as C steps: flag words or host functions (ops/bridge.py, ops/steps.py).
piecewise: one graph per GPU segment between CPU-expert layers; the CPU work runs between replays.
Layers on several GPUs: one graph per GPU run of layers (full) or per segment (piecewise), replayed in turn, the
hidden state copied between them (model/devices.py).
"""
from __future__ import annotations

import torch

from ..ops.base import set_stage
from ..model import devices
from ..ops.bridge import HostCallbackBridge, PiecewiseBridge, SegmentedFullBridge, use_bridge


class DecodeGraph:
    def __init__(self, engine, mode: str):
        assert mode in ("full", "piecewise")
        self.engine, self.mode = engine, mode
        dev = engine.device
        self.tok = torch.zeros(1, 1, dtype=torch.long, device=dev)      # static inputs
        self.pos = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.logits = None                                               # static output [1, V]
        self.graph = self.bridge = None
        self.gpus = engine.gpus
        self.segmented = mode == "piecewise" or len(self.gpus) > 1
        # An embedding on the CPU (KTransformers' files) cannot be recorded: it runs before each replay, into a
        # static input the graph starts from.
        self.embed = engine.model.get_input_embeddings()
        self.embeds = None
        if not engine.built.plan.embed_device.startswith("cuda"):
            H = engine.model.config.hidden_size
            self.embeds = torch.zeros(1, 1, H, dtype=engine.built.dtype, device=dev)

    @torch.inference_mode()
    def capture(self):
        e = self.engine
        set_stage(e.model, "decode")
        n = len(e.ids)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):          # warm-up: cuBLAS handles and lazy allocations happen outside capture
            for _ in range(2):
                e.set_len(n)
                self.pos.fill_(n)
                e.forward(self.tok, self.pos, self.embeds)
        torch.cuda.current_stream().wait_stream(s)
        devices.synchronize(self.gpus)
        e.set_len(n)
        pool = torch.cuda.graph_pool_handle()
        if not self.segmented:
            self.bridge = HostCallbackBridge()
            self.graph = torch.cuda.CUDAGraph()
            with use_bridge(self.bridge), torch.cuda.graph(self.graph, pool=pool):
                self.logits = e.forward(self.tok, self.pos, self.embeds)
        else:
            self.bridge = PiecewiseBridge(pool) if self.mode == "piecewise" else SegmentedFullBridge(pool)
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s), use_bridge(self.bridge):
                self.bridge.begin()
                self.logits = e.forward(self.tok, self.pos, self.embeds)
                self.bridge.end()
            torch.cuda.current_stream().wait_stream(s)
        devices.synchronize(self.gpus)
        e.set_len(n)                         # capture recorded the cache-length increment but did not run it

    def run(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        self.tok.copy_(token.view(1, 1), non_blocking=True)
        self.pos.fill_(pos)
        if self.embeds is not None:
            self.embeds.copy_(self.embed(self.tok), non_blocking=True)
        if self.mode == "full":
            self.bridge.arm()        # flag steps: the C thread must expect this replay, or the GPU waits forever
        if self.segmented:
            self.bridge.replay()
        else:
            self.graph.replay()
        if self.logits.device != self.engine.device:    # an lm_head on another GPU
            return self.logits.to(self.engine.device, non_blocking=True)
        return self.logits

    @property
    def segments(self) -> int:
        return len(self.bridge.segments) if self.segmented else 1
