"""The CPU expert kernel (csrc/moe_cpu.c): compiled from source on first use for this machine's CPU.

Built with gcc -O3 -march=native (the instruction set is the running CPU's: AVX-512, AVX2, or plain). Its threads
are its own persistent team (csrc/team.h), not OpenMP: whichever thread calls (the flag-step thread, a CUDA host
function, the main thread) gets the same workers, woken in microseconds. If gcc is missing or the build fails,
`get()` returns None and the pure-torch path runs instead. KTCLI_CPU_CFLAGS adds compiler flags (A/B builds of a
compile-time variant in benchmarks, e.g. -DNDEBUG); they are part of the cached build's name.
"""
from __future__ import annotations

import atexit
import ctypes
import glob
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading

import torch

SRC = os.path.join(os.path.dirname(__file__), "csrc", "moe_cpu.c")
HEADERS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "csrc", "*.h")))   # part of the build's name
FORMATS = {"bf16": 0, "int8": 1, "int4": 2}
MAX_TOKENS = 16          # decode and small batches; larger bf16 prefill chunks go to torch's GEMMs
MAX_PAIRS = 4096         # (token, expert) pairs one call takes (moe_cpu.c)
SLICE_SCRATCH = 384 << 20  # long prefill chunks: tokens per call as many as this much scratch holds (pp512 of
                            # Qwen3-30B and Qwen2-57B in one call: every expert read once); one buffer for all layers


def slice_tokens(T: int, K: int, H: int, I: int) -> int:
    """Tokens per kernel call for a T-token int8/int4 prefill chunk: each call reads every expert it touches
    once, so the longest slice whose scratch (fp32 [T·K, 3I + H] and friends) fits SLICE_SCRATCH; ≥ MAX_TOKENS."""
    per_pair = 4 * (3 * I + H) + 2 * (H + I) + 4 * (H + I)   # fp32 rows, bf16 rows, AMX panels (≤ 2 a pair)
    return max(MAX_TOKENS, min(T, MAX_PAIRS // K, SLICE_SCRATCH // (per_pair * K)))


_lock = threading.Lock()
_long = {"scratch": None, "lock": threading.Lock()}   # the scratch of long calls, shared by every layer
_state = {"lib": None, "error": None, "tried": False}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((l for l in f if l.startswith("flags")), "")
    except OSError:
        return ""


def _target(cache: str | None = None) -> tuple:
    """(compiler, extra flags, the cached library's path for this source/CPU/compiler/flags)."""
    from ..files import cache_root
    cc = shutil.which(os.environ.get("CC", "gcc"))
    if cc is None:
        raise RuntimeError("no C compiler (gcc) on PATH")
    src = b""
    for path in (SRC, *HEADERS):
        with open(path, "rb") as f:
            src += f.read()
    extra = os.environ.get("KTCLI_CPU_CFLAGS", "").split()
    ident = src + _cpu_flags().encode() + cc.encode() + " ".join(extra).encode()
    key = hashlib.sha1(ident).hexdigest()[:16]
    folder = cache or os.path.join(cache_root(), "kernels")
    return cc, extra, os.path.join(folder, f"moe_cpu-{key}.so")


def needs_build() -> bool:
    """True when the first use on this machine (or of this source) will compile the kernel."""
    if _state["tried"]:
        return False
    try:
        return not os.path.isfile(_target()[2])
    except RuntimeError:
        return False


def build(cache: str | None = None) -> str:
    cc, extra, out = _target(cache)
    folder = os.path.dirname(out)
    if os.path.isfile(out):
        return out
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        obj, so = os.path.join(tmp, "k.o"), os.path.join(tmp, "k.so")
        flags = ["-O3", "-march=native", "-fopenmp-simd", "-pthread", "-fPIC", "-fno-math-errno", *extra]
        subprocess.run([cc, *flags, "-c", SRC, "-o", obj], check=True, capture_output=True, text=True)
        subprocess.run([cc, "-shared", obj, "-o", so, "-pthread", "-lm"], check=True, capture_output=True, text=True)
        os.replace(so, out)
    return out


def get():
    """The loaded kernel library, or None (with the reason in `error()`)."""
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                try:
                    lib = ctypes.CDLL(build())
                    lib.moe_forward.restype = ctypes.c_int
                    lib.moe_scratch_bytes.restype = ctypes.c_size_t
                    lib.moe_scratch_bytes.argtypes = [ctypes.c_int] * 4
                    lib.moe_caps.restype = ctypes.c_int
                    lib.stream_read.restype = ctypes.c_uint64
                    lib.moe_tune.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
                    lib.moe_profile.argtypes = [ctypes.c_void_p]
                    lib.moe_call.argtypes = [ctypes.c_void_p]
                    lib.moe_host.argtypes = [ctypes.c_void_p]
                    lib.moe_host.restype = None
                    lib.moe_flags_arm.argtypes = [ctypes.c_void_p]
                    lib.moe_stats.argtypes = [ctypes.c_void_p]
                    lib.moe_team.argtypes = [ctypes.c_void_p]
                    lib.moe_errors.restype = ctypes.c_int
                    atexit.register(lib.moe_shutdown)   # workers joined before the interpreter goes
                    _state["lib"] = lib
                    act = os.environ.get("KTCLI_CPU_INT8_ACT")   # 0/1 overrides "where VNNI exists"
                    if act in ("0", "1"):
                        _tune(lib, int8_act=int(act))
                except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
                    _state["error"] = getattr(e, "stderr", None) or str(e)
                _state["tried"] = True
    return _state["lib"]


def caps() -> dict:
    """Which fast paths this machine's build has: AVX-512 BF16 dot products, AVX-512 VNNI int8 dot products, AMX
    bf16 tiles for long chunks (the build has them and the OS granted the tile state), and whether that path is in
    use ("amx_on": the amx knob, KTCLI_CPU_AMX=0 turns it off)."""
    lib = get()
    c = lib.moe_caps() if lib else 0
    return {"dpbf16": bool(c & 1), "vnni": bool(c & 2), "amx": bool(c & 4), "amx_on": bool(c & 8)}


def bf16_activations() -> bool:
    """True when the bf16 path rounds activations to bf16 (AVX-512 BF16 dot products)."""
    return caps()["dpbf16"]


KNOBS = ("chunk", "prefetch", "int8_act", "pipeline", "spin_us", "pin", "amx", "amx_pf")


def tune(chunk: int = -1, prefetch: int = -1, int8_act: int = -1, pipeline: int = -1, spin_us: int = -1,
         pin: int = -1, amx: int = -1, amx_pf: int = -1) -> tuple:
    """Kernel knobs (benchmarks, tests); -1 keeps a setting. chunk: rows handed to threads in tasks of this many
    KiB of weights (0 = one contiguous range per thread); prefetch: software prefetch distance in bytes (0 = off);
    int8_act: int8 activations for int8/int4 weights (1 on, 0 off); pipeline: one task list over both matrices,
    an expert's down rows waiting only for its own gate/up rows (1), or two phases with a barrier between (0);
    spin_us: how long an idle worker spins before sleeping (KTCLI_CPU_SPIN_US); pin: workers pinned to cores
    (KTCLI_CPU_PIN; a change restarts the team); amx: experts with ≥ 8 tokens in a call through AMX tiles (bf16;
    int8 and int4 on the int8-activation path; 0 off, 1 where the CPU has AMX, 2 also the plain-C twin elsewhere:
    tests); amx_pf: how the tiles prefetch
    weight rows (0 each row's bytes ahead, 1 the next 32-row block swept in address order, 2 as 0 into L2; amx.h).
    Returns the previous settings, in KNOBS order, which `tune(*was)` restores."""
    return _tune(get(), chunk=chunk, prefetch=prefetch, int8_act=int8_act, pipeline=pipeline, spin_us=spin_us,
                 pin=pin, amx=amx, amx_pf=amx_pf)


def _tune(lib, **knobs) -> tuple:
    was = (ctypes.c_int * len(KNOBS))()
    lib.moe_tune((ctypes.c_int * len(KNOBS))(*(knobs.get(k, -1) for k in KNOBS)), was)
    return tuple(was)


def team() -> dict:
    """The kernel's thread team now: members (0 before the first call) and whether its workers are pinned."""
    out = (ctypes.c_int * 2)()
    get().moe_team(out)
    return {"threads": out[0], "pinned": bool(out[1])}


STATS = ("calls", "kernel_s", "host_calls", "host_s", "best_bps", "amx_calls")


def take_stats() -> dict | None:
    """The kernel's own counters since the last take (then zeroed), or None before the library is loaded: calls
    and seconds of every kernel call, of every layer step (moe_host: CUDA host functions, piecewise and eager
    decode), the fastest call's selected-expert bytes/s, calls where experts went through AMX tiles. Refused host calls: host_errors()."""
    lib = _state["lib"]
    if lib is None:
        return None
    out = (ctypes.c_double * len(STATS))()
    lib.moe_stats(out)
    return dict(zip(STATS, out))


def host_errors() -> int:
    """Host-function calls whose arguments the kernel refused since the last check (then zeroed)."""
    lib = _state["lib"]
    return lib.moe_errors() if lib is not None else 0


STAMPS = ("start", "prep", "gate_up", "down", "end")   # moe_cpu.c's T_* slots, 8 per thread


def profile(fn, threads: int) -> dict:
    """Runs fn() (one kernel call) with timestamps on; returns µs since the kernel's entry: "fork" the team
    started, "exit" the kernel returning, and per member (lists) "start" joining the call, "prep" the input
    ready, "gate_up" its last gate/up task done, "down" its last down task done, "end" its share of the output
    written. A member that did not join the call (it woke after the work was done) or took no task of a phase
    has None there."""
    lib = get()
    buf = (ctypes.c_double * (4 + 8 * threads))()
    lib.moe_profile(buf)
    try:
        fn()
    finally:
        lib.moe_profile(None)
    us = [1e6 * (v - buf[0]) if v else None for v in buf]
    return {"fork": us[1], "exit": us[2], **{k: us[4 + i::8][:threads] for i, k in enumerate(STAMPS)}}


class _Call(ctypes.Structure):
    """moe_cpu.c's Call: moe_forward's arguments, built once per set of buffers."""
    _fields_ = [*((n, ctypes.c_int) for n in ("T", "K", "H", "I")),
                *((n, ctypes.c_void_p) for n in ("x", "idx", "wts")),
                ("fmt", ctypes.c_int), ("G", ctypes.c_int),
                *((n, ctypes.c_void_p) for n in ("gu", "gu_s", "dn", "dn_s", "out", "scratch")),
                ("threads", ctypes.c_int), ("io", ctypes.c_int), ("E", ctypes.c_int), ("rc", ctypes.c_int)]


def enabled() -> bool:
    """KTCLI_CPU_KERNEL=0 forces the pure-torch path (A/B runs, fallback tests)."""
    return os.environ.get("KTCLI_CPU_KERNEL", "1") != "0"


def error():
    return _state["error"]


def _p(t):
    return t.data_ptr() if t is not None else None


class Runner:
    """Calls the kernel for one layer. bf16 or fp32 activations go in as they are; other dtypes through fp32
    buffers that grow once and are reused (no allocation afterwards). The ctypes arguments for a given set of
    buffers are built once: decode calls it with the same staging buffers every step."""

    def __init__(self):
        self.bufs, self.calls = {}, {}

    def _buf(self, name, n, dtype=torch.float32):
        b = self.bufs.get(name)
        if b is None or b.numel() < n or b.dtype != dtype:
            b = self.bufs[name] = torch.empty(n, dtype=dtype)
        return b[:n]

    def prepare(self, lib, x, idx, w, weights, out, threads: int):
        """The kernel's argument block for these buffers (x/w/out bf16 or fp32 alike, contiguous; idx int64), built
        once and kept with the scratch it points at; None when the buffers need conversion first. A CUDA graph
        records the block's address: the caller keeps the returned object alive as long as the graph."""
        T, H = x.shape
        K = idx.shape[1]
        direct = _io(x, w, out)
        if direct is None or idx.dtype != torch.int64 or not idx.is_contiguous():
            return None
        wt = (weights.gu, weights.gu_s, weights.dn, weights.dn_s)
        key = (x.data_ptr(), idx.data_ptr(), w.data_ptr(), out.data_ptr(), T, K, threads, direct, weights.fmt,
               weights.group, weights.inter, *(t.data_ptr() if t is not None else 0 for t in wt))
        block = self.calls.get(key)
        if block is None:
            I = weights.inter
            need = lib.moe_scratch_bytes(T, K, H, I)
            if len(self.calls) > 64:
                self.calls.clear()   # blocks a graph still uses are kept alive by the graph's owner
            scratch = self.bufs.get("scratch")
            if scratch is None or scratch.numel() < need:   # a new buffer: blocks made before keep the old one
                scratch = self.bufs["scratch"] = torch.empty(need, dtype=torch.uint8)
            block = self.calls[key] = Block(_args(x, idx, w, weights, out, scratch, threads), scratch)
        return block

    def __call__(self, lib, x, idx, w, weights, out, threads: int) -> None:
        """x [T,H], idx [T,K], w [T,K], out [T,H] (any float dtype); weights: an ExpertWeights of E experts (the
        kernel refuses ids outside [0, E))."""
        T, H = x.shape
        K = idx.shape[1]
        if idx.dtype != torch.int64 or not idx.is_contiguous():
            idx = self._buf("idx", T * K, torch.int64).view(T, K).copy_(idx)
        if _io(x, w, out) is not None and T > MAX_TOKENS:   # prefill: one scratch for every layer (a layer's own
            with _long["lock"]:                               # would be ~100 MiB × layers)
                self._long(lib, x, idx, w, weights, out, threads)
            return
        block = self.prepare(lib, x, idx, w, weights, out, threads)
        if block is None:
            of = self._buf("out", T * H).view(T, H)
            self(lib, self._buf("x", T * H).view(T, H).copy_(x), idx, self._buf("w", T * K).view(T, K).copy_(w),
                 weights, of, threads)
            out.copy_(of)
            return
        if lib.moe_call(block.addr) != 0:
            raise refused(T, K, weights)


    def _long(self, lib, x, idx, w, weights, out, threads: int) -> None:
        """A long call through the shared scratch: not cached (a block would keep an outgrown buffer alive)."""
        T, H = x.shape
        K = idx.shape[1]
        need = lib.moe_scratch_bytes(T, K, H, weights.inter)
        if _long["scratch"] is None or _long["scratch"].numel() < need:
            _long["scratch"] = None   # the old buffer goes before the new one comes
            _long["scratch"] = torch.empty(need, dtype=torch.uint8)
        call = _args(x, idx, w, weights, out, _long["scratch"], threads)
        if lib.moe_call(ctypes.addressof(call)) != 0:
            raise refused(T, K, weights)


def _io(x, w, out):
    """The kernel's io code for activations it takes as they are (0 fp32, 1 bf16, all three alike and contiguous),
    else None (they go through fp32 buffers)."""
    if not (x.is_contiguous() and w.is_contiguous() and out.is_contiguous()):
        return None
    return next((io for io, dt in enumerate((torch.float32, torch.bfloat16)) if x.dtype == w.dtype == out.dtype == dt),
                None)


def _args(x, idx, w, weights, out, scratch, threads: int) -> _Call:
    """moe_forward's argument block for these tensors (io taken as _io gives it)."""
    wt = (weights.gu, weights.gu_s, weights.dn, weights.dn_s)
    return _Call(x.shape[0], idx.shape[1], x.shape[1], weights.inter, _p(x), _p(idx), _p(w), FORMATS[weights.fmt],
                 weights.group, *(_p(t) for t in wt), _p(out), _p(scratch), threads, _io(x, w, out),
                 weights.gu.shape[0], 0)


def refused(T, K, weights) -> RuntimeError:
    return RuntimeError(f"moe_forward rejected its arguments (T={T}, K={K}, E={weights.gu.shape[0]}, "
                        f"group={weights.group}; T·K must be ≤ 4096 pairs a call, expert ids in [0, E))")


class Block:
    """One kernel argument block (moe_cpu.c's Call) with the scratch it points at; `addr` is what C receives."""

    def __init__(self, call, scratch):
        self.call, self.scratch, self.addr = call, scratch, ctypes.addressof(call)

    def run_host(self, lib) -> None:
        """The layer step as a CUDA host function would run it (eager and piecewise decode): same C entry."""
        lib.moe_host(self.addr)
        if self.call.rc != 0:
            lib.moe_errors()   # raised here: not again after a later graph replay
            raise RuntimeError("the CPU expert kernel refused its arguments (an expert id outside [0, E) or bad "
                               "sizes)")
