"""How CPU work joins the GPU stream: eagerly, inside one CUDA graph (host callbacks), or between graphs.

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

_HOSTFN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class _Driver:
    _lib = None

    @classmethod
    def launch_host_func(cls, stream: int, fn, arg: int | None = None) -> None:
        """fn: a ctypes callback or a C function's address; arg: the pointer it receives."""
        if cls._lib is None:
            cls._lib = ctypes.CDLL("libcuda.so.1")
            cls._lib.cuLaunchHostFunc.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
            cls._lib.cuLaunchHostFunc.restype = ctypes.c_int
        fn = ctypes.cast(fn, ctypes.c_void_p) if isinstance(fn, _HOSTFN) else ctypes.c_void_p(fn)
        rc = cls._lib.cuLaunchHostFunc(ctypes.c_void_p(stream), fn, ctypes.c_void_p(arg))
        if rc != 0:
            raise RuntimeError(f"cuLaunchHostFunc failed with CUresult {rc}")


class HostCallbackBridge:
    """Full-graph mode: the CPU step runs in a host callback, recorded into the graph with the GPU work."""
    name = "full"

    def __init__(self):
        self._keep = []          # ctypes callbacks must outlive the graph
        self.errors = []         # an exception inside a callback cannot propagate: recorded, raised after

    def cpu_step(self, step) -> None:
        def run(_):
            try:
                step()
            except BaseException as e:   # noqa: BLE001 — reported by check()
                self.errors.append(e)
        fn = _HOSTFN(run)
        self._keep.append(fn)
        _Driver.launch_host_func(torch.cuda.current_stream().cuda_stream, fn)

    def host_call(self, block, step) -> None:
        """The C kernel's layer step as a host node: moe_host(block), the block kept alive with the graph."""
        from . import kernels
        self._keep.append(block)
        fn = ctypes.cast(kernels.get().moe_host, ctypes.c_void_p).value
        _Driver.launch_host_func(torch.cuda.current_stream().cuda_stream, fn, block.addr)

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


class PiecewiseBridge:
    """Piecewise mode: each CPU step ends the graph segment being captured and starts the next one."""
    name = "piecewise"

    def __init__(self, pool):
        self.pool = pool
        self.segments = []       # [CUDAGraph, cpu_step or None] in replay order
        self._graph = None

    def begin(self):
        self._graph = torch.cuda.CUDAGraph()
        self._graph.capture_begin(pool=self.pool)

    def cpu_step(self, step) -> None:
        self._graph.capture_end()
        self.segments.append((self._graph, step))
        self.begin()

    def host_call(self, block, step) -> None:
        """The C step runs between segments (step calls moe_host on the block, which it keeps alive)."""
        self.cpu_step(step)

    def end(self):
        self._graph.capture_end()
        self.segments.append((self._graph, None))
        self._graph = None

    def replay(self):
        stream = torch.cuda.current_stream()
        for graph, step in self.segments:
            graph.replay()
            if step is not None:
                t0 = time.perf_counter()
                stream.synchronize()     # the D2H copies of this segment are done; one sync per CPU layer
                SyncClock.add(time.perf_counter() - t0)
                step()             # raises in this thread: nothing to record


def host_node_us(threads: int, n: int = 48, reps: int = 10) -> float | None:
    """µs one CPU-expert host node adds to a full-graph replay besides its kernel: the driver's hand-off to its
    callback thread and back, and the kernel team woken and joined with no work. Median of three: replays of
    n × (tiny kernel, moe_nop node) against n × tiny kernel. None without the C kernel or a GPU."""
    from . import kernels
    lib = kernels.get()
    if lib is None or not torch.cuda.is_available():
        return None
    arg, x = ctypes.c_int(threads), torch.zeros(1, device="cuda")
    fn = ctypes.cast(lib.moe_nop, ctypes.c_void_p).value

    def graph(host: bool):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(n):
                x.add_(1)
                if host:
                    _Driver.launch_host_func(torch.cuda.current_stream().cuda_stream, fn, ctypes.addressof(arg))
        return g

    def per_replay(g) -> float:
        g.replay()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            g.replay()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / reps

    with_host, plain = graph(True), graph(False)
    diffs = sorted(per_replay(with_host) - per_replay(plain) for _ in range(3))
    return max(diffs[1], 0.0) / n * 1e6


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
