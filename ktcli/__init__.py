"""ktcli: run large MoE models on one GPU plus CPU RAM.

Data path, one direction: profile → placement → build → engine → report.
"""
__version__ = "0.1.0"
