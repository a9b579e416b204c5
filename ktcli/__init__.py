"""ktcli: run large MoE models on one GPU plus CPU RAM.

Data path, one direction: profile → placement → build → engine → report.
"""
import os

# torch's OpenMP threads spin after each parallel region on the cores the CPU expert kernel's own team needs next;
# a split prefill's CPU share ran 2.2× faster with them asleep (benchmarks/HISTORY.md, 2026-12-05). Read when torch
# loads OpenMP, so only effective before `import torch`; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
