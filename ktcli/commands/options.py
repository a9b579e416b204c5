"""Flags shared by chat, bench and validate-config, declared once."""
from __future__ import annotations

from typing import Optional

import typer
from typing_extensions import Annotated

from ..errors import UsageError
from ..profile import apply_overrides, load_profile

Model = Annotated[Optional[str], typer.Option("--model", "-m", help="'demo', a HF checkpoint directory, a config.json, or a shipped architecture (e.g. qwen2-57b-a14b).")]
Weights = Annotated[Optional[str], typer.Option("--weights", help="checkpoint (read the model's safetensors) or synthetic (random values, real shapes).")]
Dtype = Annotated[Optional[str], typer.Option("--dtype", help="bfloat16, float16 or float32.")]
Device = Annotated[Optional[str], typer.Option("--device", help="Main device for attention/router/shared experts: auto, cpu, cuda, cuda:N.")]
NumLayers = Annotated[Optional[int], typer.Option("--num-layers", help="Keep only the first N layers (quick runs on full-size shapes).")]
GraphKT = Annotated[Optional[str], typer.Option("--use_cuda_graph", metavar="true|false", help="KTransformers spelling of --use-cuda-graph.")]
Graph = Annotated[Optional[bool], typer.Option("--use-cuda-graph/--no-use-cuda-graph", help="Replay decode as a CUDA graph.", show_default=False)]
GraphMode = Annotated[Optional[str], typer.Option("--graph-mode", help="full (one graph, CPU experts as C steps inside it), piecewise (graphs between CPU-expert layers) or off.")]
MaxLen = Annotated[Optional[int], typer.Option("--max-seq-len", help="KV cache length (prompt + reply).")]
Threads = Annotated[Optional[int], typer.Option("--cpu-threads", help="Threads for CPU experts.")]
Targets = Annotated[Optional[str], typer.Option("--target-devices", help="Check for another machine: 'cuda:0=80GiB,cpu=125GiB[,cores=16]'.")]
ProfileArg = Annotated[Optional[str], typer.Argument(help="Profile YAML (or a KTransformers optimize-rule file). Default: the embedded demo.", show_default=False)]

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_bool(text: str, flag: str) -> bool:
    t = text.strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise UsageError(f"{flag} takes true or false, got {text!r}", "also accepted: 1/0, yes/no, on/off")


def graph_switch(kt: Optional[str], flag: Optional[bool]) -> Optional[bool]:
    """--use_cuda_graph VALUE and --use-cuda-graph/--no-use-cuda-graph mean the same; both must agree."""
    kt_val = None if kt is None else parse_bool(kt, "--use_cuda_graph")
    if kt_val is not None and flag is not None and kt_val != flag:
        raise UsageError("--use_cuda_graph and --use-cuda-graph disagree", "give one of them")
    return kt_val if kt_val is not None else flag


def profile_from_flags(path, *, model=None, weights=None, dtype=None, device=None, num_layers=None,
                       use_cuda_graph=None, graph_mode=None, max_seq_len=None, cpu_threads=None, prefill_chunk=None):
    """Load the profile (or the demo default) and apply flag overrides."""
    from ..profile.schema import Profile
    prof = load_profile(path) if path else Profile(path="<default>")
    return apply_overrides(prof, model=model, weights=weights, dtype=dtype, device=device, num_layers=num_layers,
                           use_cuda_graph=use_cuda_graph, graph_mode=graph_mode, max_seq_len=max_seq_len,
                           cpu_threads=cpu_threads, prefill_chunk=prefill_chunk)


RUN_FLAGS = ("profile", "model", "weights", "dtype", "device", "num_layers", "use_cuda_graph_kt", "use_cuda_graph",
             "graph_mode", "max_seq_len", "cpu_threads")


def run_flags(scope: dict) -> dict:
    """The profile flags chat and serve share, picked from the command's arguments (its locals())."""
    return {k: scope[k] for k in RUN_FLAGS}


def machine_for(targets: Optional[str]):
    from ..placement.machine import detect_machine, parse_targets
    return parse_targets(targets) if targets else detect_machine()


Fit = Annotated[bool, typer.Option("--fit", help="Choose the placement for this machine's memory first (ktcli plan), keeping your rules.")]


def plan_rates(machine, cpu_bw=None, gpu_bw=None, pcie_bw=None):
    """The rates `ktcli plan` predicts with: flags, else this machine's last measured ceilings, else defaults."""
    from ..engine.bandwidth import cached
    from ..placement.fit import Rates
    r, src = Rates(), ["defaults"]
    last = None if machine.target else cached()
    if last is not None:
        r.cpu_bw = last.cpu.value
        r.gpu_bw = last.cuda.value if last.cuda else r.gpu_bw
        src = [f"bandwidths measured here {last.measured_at}"]
    if cpu_bw:
        r.cpu_bw, src = cpu_bw * 1e9, src + ["--cpu-bw"]
    if gpu_bw:
        r.gpu_bw, src = gpu_bw * 1e9, src + ["--gpu-bw"]
    if pcie_bw:
        r.pcie_bw, src = pcie_bw * 1e9, src + ["--pcie-bw"]
    r.source = ", ".join(src)
    return r


def check_output_file(path: Optional[str]) -> None:
    """--output-file is refused before any work when it cannot be written (bench, plan)."""
    from ..files import output_problem
    problem = path and output_problem(path)
    if problem:
        raise UsageError(f"--output-file {path}: {problem}", "give a file path in an existing, writable directory")


def num_experts(config) -> int:
    return next(getattr(config, k) for k in ("num_experts", "num_local_experts", "n_routed_experts")
                if getattr(config, k, None))


def apply_fit(prof, machine):
    """--fit: the plan's rules for this machine, the user's own rules first; the chosen placement is printed."""
    from rich.console import Console

    from ..errors import KtcliError
    from ..placement.fit import fit
    from ..report.plan import render
    f = fit(prof, machine, fmt="auto", rates=plan_rates(machine))
    render(f, machine, Console(stderr=True, highlight=False, width=140))
    if f.notes:
        raise KtcliError(f"--fit: {f.notes[0]}", "a smaller model, --num-layers, or a machine with more memory")
    return f.profile
