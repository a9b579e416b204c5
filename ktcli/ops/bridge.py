"""How CPU work joins the GPU stream: eagerly, inside one CUDA graph (C steps, or host callbacks for Python), or between graphs.

Host callbacks go through the driver's cuLaunchHostFunc (ctypes on libcuda), which stream capture records
as a host node. Where the C kernel runs the layer, the node calls the kernel library's `moe_host` on an
argument block built before capture: no Python, no GIL, no hand-off between threads. Rules: a callback makes no
CUDA calls and allocates nothing on the GPU or pinned; every buffer exists before capture.
"""
from __future__ import annotations

import ctypes
import threading
import time

import torch

from .clocks import SyncClock

from .steps import Driver, FlagSteps, step_kind

_HOSTFN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class HostCallbackBridge:
    """Full-graph mode: the CPU step runs in a host callback, recorded into the graph with the GPU work."""
    name = "full"

    def __init__(self):
        self._keep = []          # ctypes callbacks must outlive the graph
        self.errors = []         # an exception inside a callback cannot propagate: recorded, raised after
        self.kind = step_kind()  # how C steps join the stream (ops/steps.py); its probe must run before capture
        self.flags = FlagSteps() if self.kind == "flags" else None

    def cpu_step(self, step) -> None:
        def run(_):
            try:
                step()
            except BaseException as e:   # noqa: BLE001 — reported by check()
                self.errors.append(e)
        fn = _HOSTFN(run)
        self._keep.append(fn)
        Driver.launch_host_func(torch.cuda.current_stream().cuda_stream, ctypes.cast(fn, ctypes.c_void_p).value)

    def host_call(self, block, step) -> None:
        """The C kernel's layer step: through the go/done words, or as a host node calling moe_host(block); the
        block kept alive with the graph."""
        from . import kernels
        if self.flags is not None:
            self.wait(self.post(block))
            return
        self._keep.append(block)
        Driver.launch_host_func(torch.cuda.current_stream().cuda_stream,
                                ctypes.cast(kernels.get().moe_host, ctypes.c_void_p).value, block.addr)

    def post(self, block) -> int:
        """Flag steps: start block's step and return its number; `wait(i)` before its output is read."""
        self._keep.append(block)
        return self.flags.post(block, torch.cuda.current_stream().cuda_stream)

    def wait(self, i: int) -> None:
        self.flags.wait(i, torch.cuda.current_stream().cuda_stream)

    def arm(self) -> None:
        """Before every replay: the C thread serving flag steps expects this graph's steps."""
        if self.flags is not None:
            self.flags.arm()

    def check(self):
        """Raise what the callbacks of the last replay recorded: every error, counted, the first as the cause."""
        from . import kernels
        refused = kernels.host_errors()
        if refused:
            self.errors.append(RuntimeError(f"the CPU expert kernel refused its arguments in {refused} layer "
                                            "call(s) (an expert id outside [0, E) or bad sizes)"))
        if self.errors:
            errs, self.errors = self.errors, []
            kinds = list(dict.fromkeys(repr(e) for e in errs))
            raise RuntimeError(f"CPU experts failed inside the CUDA graph ({len(errs)} layer call(s)): "
                               + "; ".join(kinds)) from errs[0]


def map_tensors(obj, fn):
    """obj with fn applied to every tensor inside tuples, lists and dicts; anything else (the cache) as is."""
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


class SegmentedCapture:
    """Graphs in segments: capture ends and begins again, and replay runs each segment's graph on its GPU followed
    by what was recorded after it (a CPU step, the copies of tensors that crossed to the next GPU)."""

    def __init__(self, pool):
        self.pool = pool
        self.segments = []       # [CUDAGraph, device, [after-steps]] in replay order
        self._graph = self._dev = None
        self._streams = {}       # device → its capture stream (the first segment uses the caller's)
        self._moved = {}         # id(src) → (src, dst): tensors already copied to another GPU in this graph

    def begin(self, device=None):
        if device is not None:   # another GPU: capture on a stream of its own, that GPU current
            if device not in self._streams:
                self._streams[device] = torch.cuda.Stream(device)
            torch.cuda.set_stream(self._streams[device])
        self._stream = torch.cuda.current_stream()
        self._dev = torch.device(device) if device is not None else self._stream.device
        self._graph = torch.cuda.CUDAGraph()
        self._graph.capture_begin(pool=self.pool)

    def _close(self):
        if torch.cuda.current_stream() != self._stream:   # the forward moved on (its device context ended)
            torch.cuda.set_stream(self._stream)
        self._graph.capture_end()
        self.segments.append((self._graph, self._dev, []))

    def cross(self, device, args, kwargs):
        """Layers on `device` from here: tensors from another GPU get a static copy there, filled at replay after
        the segment that ends here; one that already crossed (cos/sin, mask) reuses its copy."""
        fresh = {}           # id → tensor: one copy for a tensor passed twice
        map_tensors((args, kwargs), lambda t: fresh.setdefault(id(t), t) if t.device != device
                    and id(t) not in self._moved else None)
        if fresh or self._dev != device:
            self._close()
            for t in fresh.values():
                dst = torch.empty_like(t, device=device)
                self._moved[id(t)] = (t, dst)
                self.segments[-1][2].append(lambda d=dst, s=t: d.copy_(s, non_blocking=True))
            self.begin(device)

        def sub(t):
            hit = self._moved.get(id(t))
            return hit[1] if hit is not None and hit[0] is t and t.device != device else t
        return map_tensors(args, sub), map_tensors(kwargs, sub)

    def end(self):
        self._close()
        self._graph = None
        for dev in self._streams:          # the other GPUs' default streams back as their current ones
            torch.cuda.set_stream(torch.cuda.default_stream(dev))

    def replay(self):
        for graph, dev, after in self.segments:
            with torch.cuda.device(dev):
                graph.replay()
                for step in after:
                    step()


class SegmentedFullBridge(SegmentedCapture, HostCallbackBridge):
    """Full mode over several GPUs: one graph per GPU segment, CPU steps inside each as in one full graph."""

    def __init__(self, pool):
        SegmentedCapture.__init__(self, pool)
        HostCallbackBridge.__init__(self)


class PiecewiseBridge(SegmentedCapture):
    """Piecewise mode: each CPU step ends the graph segment being captured and starts the next one."""
    name = "piecewise"

    def cpu_step(self, step) -> None:
        self._close()
        self.segments[-1][2].append(lambda dev=self._dev: self._cpu(dev, step))
        self.begin()

    def host_call(self, block, step) -> None:
        """The C step runs between segments (step calls moe_host on the block, which it keeps alive)."""
        self.cpu_step(step)

    @staticmethod
    def _cpu(dev, step):
        t0 = time.perf_counter()
        torch.cuda.current_stream(dev).synchronize()   # the D2H copies of this segment are done; one sync per CPU layer
        SyncClock.add(time.perf_counter() - t0)
        step()             # raises in this thread: nothing to record


_state = threading.local()


def active():
    return getattr(_state, "bridge", None)


class use_bridge:
    """with use_bridge(b): CPU expert layers called in this thread join the stream through `b`."""

    def __init__(self, bridge):
        self.bridge = bridge

    def __enter__(self):
        self.prev, _state.bridge = active(), self.bridge
        return self.bridge

    def __exit__(self, *exc):
        _state.bridge = self.prev
