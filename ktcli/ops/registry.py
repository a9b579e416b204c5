"""The operator registry: name → declared capabilities + implementation.

Checks never special-case an operator: they read `devices`, `stages`, `graph_modes` and `why_not_graph`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Operator:
    name: str
    devices: tuple             # device types it computes on: "cuda", "cpu"
    graph_modes: tuple         # decode graph modes it works under: "off", "piecewise", "full"
    why_not_graph: str         # said when a graph mode is refused
    weight_formats: tuple      # formats its weights may be stored in
    aliases: tuple             # KTransformers names that map to it
    summary: str
    impl: str                  # "module:Class", imported only when a model is built
    stages: tuple = ("prefill", "decode")
    streams_from: tuple = ()   # where the weights live when it computes elsewhere (copied per layer, 2 slots)

    def load(self):
        mod, cls = self.impl.split(":")
        return getattr(importlib.import_module(f"ktcli.ops.{mod}"), cls)


OPERATORS = {op.name: op for op in (
    Operator(
        name="torch", devices=("cuda", "cpu"), graph_modes=("off",),
        why_not_graph="it loops over experts with torch.where(expert_mask[i]) / nonzero(): data-dependent "
                      "shapes and a host sync, which CUDA graph capture forbids "
                      "('operation not permitted when stream is capturing')",
        weight_formats=("bf16",), aliases=("KExpertsTorch", "eager"),
        summary="transformers' eager expert loop; the reference every operator is tested against",
        impl="torch_eager:TorchEagerExperts"),
    Operator(
        name="gpu_static", devices=("cuda",), graph_modes=("off", "piecewise", "full"), why_not_graph="",
        weight_formats=("bf16",), aliases=("KExpertsMarlin", "batched_mm"),
        summary="static shapes, no host sync: gathers the selected experts' weights by index and runs bmm "
                "(few tokens) or a fixed loop over all experts (many tokens); CUDA-graph safe",
        impl="gpu_static:GpuStaticExperts"),
    Operator(
        name="cpu", devices=("cpu",), graph_modes=("off", "piecewise", "full"), why_not_graph="",
        weight_formats=("bf16", "int8", "int4"), aliases=("KExpertsCPU",),
        summary="routed experts computed on the CPU from CPU-resident weights; under a CUDA graph it runs "
                "as C steps inside the graph (full) or between graph segments (piecewise)",
        impl="cpu:CpuExperts"),
    Operator(
        name="stream", devices=("cuda",), graph_modes=("off",), why_not_graph="a prefill operator",
        weight_formats=("bf16", "int8", "int4"), aliases=(), stages=("prefill",),
        streams_from=("cpu",),
        summary="prefill of CPU-resident experts on the GPU: weights copied from pinned host memory, the next "
                "layer's while this one computes; int8/int4 cross packed and are dequantized on the GPU",
        impl="prefill:StreamedExperts"),
    Operator(
        name="auto", devices=("auto",), graph_modes=("off",), why_not_graph="a prefill operator",
        weight_formats=("bf16", "int8", "int4"), aliases=(), stages=("prefill",),
        streams_from=("cpu",),
        summary="prefill of CPU-resident experts, per chunk the fastest of `stream`, `cpu` and a split (the CPU "
                "computes some experts while the rest stream) by rates measured at load (prefill_device: auto, the "
                "default for experts that decode on the CPU)",
        impl="prefill:AutoPrefill"),
)}

_ALIASES = {a.lower(): op.name for op in OPERATORS.values() for a in (op.name, *op.aliases)}


def resolve_op(name: str) -> Operator | None:
    key = _ALIASES.get(str(name).lower())
    return OPERATORS[key] if key else None


def op_names() -> str:
    return ", ".join(f"{o.name} ({'/'.join(o.aliases)})" for o in OPERATORS.values())


def default_op(device_type: str) -> Operator:
    """The operator a layer gets when its rule names none: what transformers itself would run there."""
    return OPERATORS["cpu"] if device_type == "cpu" else OPERATORS["torch"]
