"""The CPU expert kernel (csrc/moe_cpu.c): compiled from source on first use for this machine's CPU.

Built with gcc -O3 -march=native (the instruction set is the running CPU's: AVX-512, AVX2, or plain), linked
against torch's own libgomp so kernel and torch share one OpenMP thread pool. If gcc is missing or the build
fails, `get()` returns None and the pure-torch path runs instead.
"""
from __future__ import annotations

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
HEADERS = [os.path.join(os.path.dirname(__file__), "csrc", "dots.h")]
FORMATS = {"bf16": 0, "int8": 1, "int4": 2}
MAX_TOKENS = 16          # decode and small batches; larger prefill chunks go to torch's GEMMs
_lock = threading.Lock()
_state = {"lib": None, "error": None, "tried": False}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((l for l in f if l.startswith("flags")), "")
    except OSError:
        return ""


def _torch_gomp() -> str | None:
    libs = glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*.so*"))
    return libs[0] if libs else None


def build(cache: str | None = None) -> str:
    from ..build.demo import cache_dir
    cc = shutil.which(os.environ.get("CC", "gcc"))
    if cc is None:
        raise RuntimeError("no C compiler (gcc) on PATH")
    gomp = _torch_gomp()
    src = b""
    for path in (SRC, *HEADERS):
        with open(path, "rb") as f:
            src += f.read()
    key = hashlib.sha1(src + _cpu_flags().encode() + str(gomp).encode() + cc.encode()).hexdigest()[:16]
    folder = cache or os.path.join(os.path.dirname(cache_dir()), "kernels")
    out = os.path.join(folder, f"moe_cpu-{key}.so")
    if os.path.isfile(out):
        return out
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        obj, so = os.path.join(tmp, "k.o"), os.path.join(tmp, "k.so")
        flags = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-fno-math-errno"]
        subprocess.run([cc, *flags, "-c", SRC, "-o", obj], check=True, capture_output=True, text=True)
        link = [gomp, f"-Wl,-rpath,{os.path.dirname(gomp)}"] if gomp else ["-fopenmp"]
        subprocess.run([cc, "-shared", obj, "-o", so, *link, "-lm"], check=True, capture_output=True, text=True)
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
                    lib.moe_tune.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p]
                    if os.environ.get("KTCLI_CPU_INT8_ACT") == "0":
                        lib.moe_tune(-1, -1, 0, (ctypes.c_int * 3)())
                    _state["lib"] = lib
                except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
                    _state["error"] = getattr(e, "stderr", None) or str(e)
                _state["tried"] = True
    return _state["lib"]


def caps() -> dict:
    """Which fast paths this machine's build has: AVX-512 BF16 dot products, AVX-512 VNNI int8 dot products."""
    lib = get()
    c = lib.moe_caps() if lib else 0
    return {"dpbf16": bool(c & 1), "vnni": bool(c & 2)}


def bf16_activations() -> bool:
    """True when the bf16 path rounds activations to bf16 (AVX-512 BF16 dot products)."""
    return caps()["dpbf16"]


def tune(chunk: int = -1, prefetch: int = -1, int8_act: int = -1) -> tuple:
    """Kernel knobs (benchmarks, tests): rows handed to threads in chunks of this many KiB of weights (0 = one
    contiguous range per thread), software prefetch distance in bytes (0 = off), int8 activations for int8/int4 weights (1 on, 0 off); -1 keeps a setting.
    Returns the previous (chunk, prefetch, int8_act), which `tune(*was)` restores."""
    was = (ctypes.c_int * 3)()
    get().moe_tune(chunk, prefetch, int8_act, was)
    return tuple(was)


def enabled() -> bool:
    """KTCLI_CPU_KERNEL=0 forces the pure-torch path (A/B runs, fallback tests)."""
    return os.environ.get("KTCLI_CPU_KERNEL", "1") != "0"


def error():
    return _state["error"]


def _p(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else ctypes.c_void_p(0)


class Runner:
    """Calls the kernel for one layer; its fp32 buffers grow once and are reused (no allocation afterwards)."""

    def __init__(self):
        self.bufs = {}

    def _buf(self, name, n, dtype=torch.float32):
        b = self.bufs.get(name)
        if b is None or b.numel() < n or b.dtype != dtype:
            b = self.bufs[name] = torch.empty(n, dtype=dtype)
        return b[:n]

    def __call__(self, lib, x, idx, w, weights, out, threads: int) -> None:
        """x [T,H], idx [T,K], w [T,K], out [T,H] (any float dtype); weights: an ExpertWeights."""
        T, H = x.shape
        K = idx.shape[1]
        I = weights.inter
        scratch = self._buf("scratch", lib.moe_scratch_bytes(T, K, H, I), torch.uint8)
        xf = self._buf("x", T * H).view(T, H).copy_(x)
        wf = self._buf("w", T * K).view(T, K).copy_(w)
        ix = self._buf("idx", T * K, torch.int64).view(T, K).copy_(idx)
        of = out if out.dtype == torch.float32 and out.is_contiguous() else self._buf("out", T * H).view(T, H)
        rc = lib.moe_forward(T, K, H, I, _p(xf), _p(ix), _p(wf), FORMATS[weights.fmt], weights.group,
                             _p(weights.gu), _p(weights.gu_s), _p(weights.dn), _p(weights.dn_s), _p(of),
                             _p(scratch), threads)
        if rc != 0:
            raise RuntimeError(f"moe_forward rejected its arguments (T={T}, K={K}, group={weights.group})")
        if of is not out:
            out.copy_(of)
