"""How a C CPU-expert step joins a CUDA stream inside a graph: a host function, or two words the GPU and a C thread
poll (csrc/flags.h). Both through the driver API (ctypes on libcuda), both recorded by stream capture.

flags: per step the graph writes go = i (cuStreamWriteValue32), waits for done == i (cuStreamWaitValue32), and
resets done; the kernel library's server thread spins on go and runs step i. It must be armed once per replay
(`FlagSteps.arm`). hostfn: cuLaunchHostFunc(moe_host, block). `step_kind()` picks flags where a probe graph
shows the driver captures and runs them, unless KTCLI_CPU_STEP=hostfn|flags says otherwise.
"""
from __future__ import annotations

import ctypes
import os
import time

import torch

WAIT_EQ = 0x1   # CU_STREAM_WAIT_VALUE_EQ
WAIT_GEQ = 0x0  # CU_STREAM_WAIT_VALUE_GEQ (32-bit wrapping compare)


class Driver:
    _lib = None

    @classmethod
    def lib(cls):
        if cls._lib is None:
            lib = ctypes.CDLL("libcuda.so.1")
            lib.cuLaunchHostFunc.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
            for name in ("cuStreamWriteValue32", "cuStreamWaitValue32"):
                fn = getattr(lib, name + "_v2", None) or getattr(lib, name)
                fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
                setattr(lib, "ktcli_" + name, fn)
            get = getattr(lib, "cuMemHostGetDevicePointer_v2", None) or lib.cuMemHostGetDevicePointer
            get.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]
            lib.ktcli_devptr = get
            cls._lib = lib
        return cls._lib

    @classmethod
    def check(cls, rc: int, what: str) -> None:
        if rc != 0:
            raise RuntimeError(f"{what} failed with CUresult {rc}")

    @classmethod
    def launch_host_func(cls, stream: int, fn: int, arg: int | None = None) -> None:
        """fn: a C function's address (or a ctypes callback cast to one); arg: the pointer it receives."""
        cls.check(cls.lib().cuLaunchHostFunc(ctypes.c_void_p(stream), ctypes.c_void_p(fn), ctypes.c_void_p(arg)),
                  "cuLaunchHostFunc")

    @classmethod
    def write_value(cls, stream: int, addr: int, value: int) -> None:
        cls.check(cls.lib().ktcli_cuStreamWriteValue32(ctypes.c_void_p(stream), addr, value, 0), "cuStreamWriteValue32")

    @classmethod
    def wait_value(cls, stream: int, addr: int, value: int, cmp: int = WAIT_EQ) -> None:
        cls.check(cls.lib().ktcli_cuStreamWaitValue32(ctypes.c_void_p(stream), addr, value, cmp),
                  "cuStreamWaitValue32")

    @classmethod
    def device_ptr(cls, host_ptr: int) -> int:
        out = ctypes.c_uint64()
        cls.check(cls.lib().ktcli_devptr(ctypes.byref(out), ctypes.c_void_p(host_ptr), 0), "cuMemHostGetDevicePointer")
        return out.value


class _Req(ctypes.Structure):
    """csrc/flags.h's Req."""
    _fields_ = [("go", ctypes.c_void_p), ("done", ctypes.c_void_p), ("blocks", ctypes.c_void_p), ("n", ctypes.c_int)]


class FlagSteps:
    """One graph's C steps through the go/done words; `arm()` before every replay of that graph."""

    def __init__(self):
        self.words = torch.zeros(32, dtype=torch.int32, pin_memory=True)   # go at [0], done at [16]: two lines
        self.go, self.done = self.words.data_ptr(), self.words.data_ptr() + 64
        self.dgo, self.ddone = Driver.device_ptr(self.go), Driver.device_ptr(self.done)
        self.blocks, self._req = [], None

    def add(self, block, stream: int) -> None:
        self.wait(self.post(block, stream), stream)

    def post(self, block, stream: int) -> int:
        """Start step i (go = i) and return i; the stream goes on with work that does not need its output."""
        self.blocks.append(block)
        i = len(self.blocks)
        Driver.write_value(stream, self.dgo, i)
        return i

    def wait(self, i: int, stream: int) -> None:
        """The stream waits for step i's output."""
        Driver.wait_value(stream, self.ddone, i)
        Driver.write_value(stream, self.ddone, 0)   # the next replay waits for its own done

    def arm(self) -> None:
        if not self.blocks:
            return
        from . import kernels
        if self._req is None:
            self._table = (ctypes.c_void_p * len(self.blocks))(*(b.addr for b in self.blocks))
            self._req = _Req(self.go, self.done, ctypes.addressof(self._table), len(self.blocks))
        if kernels.get().moe_flags_arm(ctypes.addressof(self._req)) != 0:
            raise RuntimeError("the CPU-expert step thread could not start; rerun with KTCLI_CPU_STEP=hostfn")


def empty_block(threads: int):
    """A step with no work (T = 0): the team woken and joined. For the probes below."""
    from . import kernels
    return kernels.Block(kernels._Call(T=0, threads=threads), None)


def _timed_graph(kind: str, threads: int, n: int, reps: int = 10) -> float:
    """Seconds per replay of n × (tiny kernel, empty step of `kind`), or of n × tiny kernel when kind is None."""
    from . import kernels
    x, blocks = torch.zeros(1, device="cuda"), [empty_block(threads) for _ in range(n)]
    flags = FlagSteps() if kind == "flags" else None
    fn = ctypes.cast(kernels.get().moe_host, ctypes.c_void_p).value
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for b in blocks:
            x.add_(1)
            stream = torch.cuda.current_stream().cuda_stream
            if kind == "flags":
                flags.add(b, stream)
            elif kind == "hostfn":
                Driver.launch_host_func(stream, fn, b.addr)

    def replay():
        if flags:
            flags.arm()
        g.replay()

    replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        replay()
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def step_cost_us(kind: str, threads: int, n: int = 48) -> float:
    """µs one empty C step of `kind` adds to a replay (median of three against the same graph without steps):
    the fixed cost of a CPU-expert layer in full-graph decode besides its kernel."""
    diffs = sorted(_timed_graph(kind, threads, n) - _timed_graph(None, threads, n) for _ in range(3))
    return max(diffs[1], 0.0) / n * 1e6


_kind = None


def step_kind() -> str:
    """'flags' where this driver captures and runs the go/done handshake (checked once with a probe graph),
    else 'hostfn'; KTCLI_CPU_STEP=hostfn|flags overrides."""
    global _kind
    want = os.environ.get("KTCLI_CPU_STEP", "")
    if want in ("hostfn", "flags"):
        return want
    if _kind is None and not torch.cuda.is_available():
        return "hostfn"
    if _kind is None:
        try:
            _timed_graph("flags", 2, 2, reps=2)
            _kind = "flags"
        except RuntimeError:
            _kind = "hostfn"
    return _kind
