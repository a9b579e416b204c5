"""ktcli: run large MoE models on one GPU plus CPU RAM.

Data path, one direction: profile → placement → build → engine → report.
"""
from .openmp import settle

settle()   # before anything imports torch (ktcli/openmp.py says why)

__version__ = "0.1.0"
