"""What a results file records about where and how it was made: machine, software, commit, CPU kernel build."""
from __future__ import annotations

import os
import platform
import subprocess

import torch

from .bandwidth import cpu_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def git_commit() -> str | None:
    """The commit that ran: $KTCLI_GIT_COMMIT (set by benchmarks/run_gpu.sh from the checkout it was sent from,
    since a copied tree's .git can be stale), else `git rev-parse HEAD` (+ "-dirty" with uncommitted changes)."""
    env = os.environ.get("KTCLI_GIT_COMMIT", "").strip()
    if env:
        return env
    try:
        git = lambda *a: subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True, timeout=5)  # noqa: E731
        sha = git("rev-parse", "HEAD").stdout.strip()
        if len(sha) != 40:          # a copy without history prints "HEAD"
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "ktcli").stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def kernel_state() -> dict:
    """Whether the CPU expert kernel is in use, and if not why (CPU experts then run torch's 3-4× slower path)."""
    from ..ops import kernels
    lib = kernels.get()
    return {"built": lib is not None, "enabled": kernels.enabled(), "error": kernels.error(),
            "cflags": os.environ.get("KTCLI_CPU_CFLAGS", ""), "caps": kernels.caps(),
            "int8_activations": bool(lib is not None and kernels.tune()[2])}


def ktcli_env(env=os.environ) -> dict:
    """The KTCLI_* switches set for the run (A/B knobs such as KTCLI_PREFILL_WAYS are not in the command line),
    paths and the commit aside."""
    return {k: v for k, v in sorted(env.items()) if k.startswith("KTCLI_") and k not in ("KTCLI_CACHE", "KTCLI_GIT_COMMIT")}


def machine_info() -> dict:
    import transformers
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "host": platform.node(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "git_commit": git_commit(), "kernel": kernel_state(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""), "ktcli_env": ktcli_env()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
