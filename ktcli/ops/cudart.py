"""Host → GPU copies issued at C cost: cudaMemcpyAsync of the CUDA runtime torch loaded, called through ctypes.

Why: a routed prefill layer uploads its GPU experts as one copy per part and run of consecutive experts, 60-100
copies a layer; through torch (slicing, views, copy_) they cost the host ~20 µs each, about 2 ms a layer (Qwen3-30B
int4 pp2048, H100 host, 2026-12-06), while the copies themselves take about 1 ms. Where the runtime is not found
(a torch linked statically), the caller falls back to torch's copies.
"""
from __future__ import annotations

import ctypes

H2D = 1          # cudaMemcpyHostToDevice
_lib = None      # None: not looked up yet; False: not found


def runtime():
    """The CUDA runtime library this process loaded (libcudart), or None."""
    global _lib
    if _lib is None:
        _lib = False
        try:
            with open("/proc/self/maps") as f:
                path = next((line.split()[-1] for line in f if "/libcudart.so" in line), None)
            if path is not None:
                lib = ctypes.CDLL(path)
                lib.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                ctypes.c_void_p]
                lib.cudaMemcpyAsync.restype = ctypes.c_int
                _lib = lib
        except (OSError, AttributeError):
            _lib = False
    return _lib or None


def copy_h2d(copies: list, stream) -> bool:
    """Queue [(dst device pointer, src host pointer, bytes), …] on `stream` (a torch.cuda.Stream); False where the
    runtime was not found (nothing queued)."""
    lib = runtime()
    if lib is None:
        return False
    s = ctypes.c_void_p(stream.cuda_stream)
    for dst, src, n in copies:
        if rc := lib.cudaMemcpyAsync(dst, src, n, H2D, s):
            raise RuntimeError(f"cudaMemcpyAsync of {n} bytes failed with CUDA error {rc}")
    return True
