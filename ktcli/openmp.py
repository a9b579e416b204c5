"""torch's OpenMP wait policy, chosen before torch loads OpenMP (it reads the environment once, at load).

With a GPU, ktcli's CPU work is its own expert kernel, whose thread team wants every core; torch's OpenMP threads,
spinning after its last CPU operation (a split's gather), held those cores: the kernel ran 2.2× slower until they
slept (PASSIVE; benchmarks/HISTORY.md, 2026-12-05). Without a GPU torch does all the work in many small parallel
regions, where the spin pays: the demo model decoded at 290 t/s spinning and 150 asleep on the 2-core dev machine.
"""
from __future__ import annotations

import os


def gpu_visible(env=os.environ, exists=os.path.exists) -> bool:
    """A CUDA or ROCm device node that CUDA_VISIBLE_DEVICES does not hide (no torch import: it would load OpenMP)."""
    if env.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    return exists("/dev/nvidiactl") or exists("/dev/kfd")


def settle(env=os.environ, exists=os.path.exists) -> str:
    """Sets OMP_WAIT_POLICY=PASSIVE where a GPU is visible, unless the user set a policy; returns the one in force
    ('' for OpenMP's default)."""
    if "OMP_WAIT_POLICY" not in env and gpu_visible(env, exists):
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env.get("OMP_WAIT_POLICY", "")
