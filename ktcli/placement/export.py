"""The SGLang + kt-kernel launch command equivalent to a plan, for users who need a multi-user server or several GPUs.

kt-kernel keeps the same number of experts of every layer on the GPU (`--kt-num-gpu-experts`, per layer) where ktcli
keeps whole layers: the command spreads the plan's GPU experts evenly over the layers (same memory). Every flag it
prints is listed, with its source and version, in sglang_flags.json (a test holds the two together).
"""
from __future__ import annotations

import json
import os
import shlex

FLAGS = os.path.join(os.path.dirname(__file__), "sglang_flags.json")
KT_METHOD = {"bf16": "BF16", "int8": "AMXINT8", "int4": "AMXINT4"}


def known_flags() -> dict:
    with open(FLAGS, encoding="utf-8") as f:
        return json.load(f)["flags"]


def sglang_command(fit, source, num_experts: int) -> tuple:
    """(argv, comment lines) for `python -m sglang.launch_server`."""
    layers = len(fit.gpu_layers) + len(fit.cpu_layers) + len(fit.pinned)
    per_layer = round(len(fit.gpu_layers) * num_experts / max(layers, 1))
    path = source.checkpoint_dir or f"/path/to/{source.name}"
    weights = path if fit.fmt == "bf16" else f"{path.rstrip('/')}-kt-{fit.fmt}"
    argv = ["python", "-m", "sglang.launch_server", "--model-path", path, "--served-model-name", source.name,
            "--context-length", str(fit.profile.runtime.max_seq_len), "--trust-remote-code",
            "--mem-fraction-static", "0.90", "--tensor-parallel-size", str(max(len(fit.segments), 1)),
            "--kt-method", KT_METHOD[fit.fmt],
            "--kt-weight-path", weights, "--kt-cpuinfer", str(fit.profile.runtime.cpu_threads),
            "--kt-threadpool-count", "1", "--kt-num-gpu-experts", str(per_layer)]
    notes = [f"{len(fit.gpu_layers)} of {layers} layers' experts on the GPU in ktcli's plan = {per_layer} of "
             f"{num_experts} experts per layer in kt-kernel's"]
    if fit.segments:
        notes.append(f"{len(fit.segments)} GPUs: SGLang splits every layer over them (tensor parallel) where ktcli's "
                     "plan gives each GPU whole layers; the GPU experts per layer are the same total")
    if fit.fmt != "bf16":
        notes.append(f"first convert the CPU experts to {fit.fmt} (kt-kernel's scripts/convert_weights.py "
                     f"--input-path {path} --input-type bf16 --output {weights} --quant-method {fit.fmt})")
    notes.append("--kt-threadpool-count is the number of NUMA nodes: raise it on multi-socket machines")
    return argv, notes


def as_shell(argv: list) -> str:
    parts = [shlex.quote(a) for a in argv]
    lines, cur = [], " ".join(parts[:3])
    for i in range(3, len(parts)):
        if parts[i].startswith("--"):
            lines.append(cur)
            cur = "    " + parts[i]
        else:
            cur += " " + parts[i]
    return " \\\n".join(lines + [cur])
