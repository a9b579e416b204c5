"""Choose where each layer's experts live for a machine's memory; write it as a profile (or an SGLang command)."""
from __future__ import annotations

import sys
from typing import Optional

import typer
from typing_extensions import Annotated

from . import options as o

FORMATS = ("bf16", "int8", "int4", "auto")


def plan(profile: o.ProfileArg = None, model: o.Model = None, weights: o.Weights = None, dtype: o.Dtype = None,
         num_layers: o.NumLayers = None, target_devices: o.Targets = None, cpu_threads: o.Threads = None,
         context: Annotated[Optional[int], typer.Option("--context", min=1, help="Context length to keep KV-cache room for (default: the profile's max_seq_len).")] = None,
         fmt: Annotated[str, typer.Option("--format", help="CPU experts' storage: bf16, int8, int4, or auto (the first that fits).")] = "bf16",
         cpu_bw: Annotated[Optional[float], typer.Option("--cpu-bw", min=0.1, help="CPU read bandwidth, GB/s (default: measured here, else 80).")] = None,
         gpu_bw: Annotated[Optional[float], typer.Option("--gpu-bw", min=0.1, help="GPU read bandwidth, GB/s (default: measured here, else 2000).")] = None,
         pcie_bw: Annotated[Optional[float], typer.Option("--pcie-bw", min=0.1, help="Pinned host→GPU copy rate, GB/s, for the prefill prediction (default 25; a run prints its own as 'pcie').")] = None,
         output_file: Annotated[Optional[str], typer.Option("-o", "--output-file", help="Write the profile here (atomically) instead of stdout.")] = None,
         export: Annotated[Optional[str], typer.Option("--export", help="sglang: print the SGLang + kt-kernel launch command instead.")] = None):
    from rich.console import Console

    from ..errors import UsageError
    from ..files import write_atomic
    from ..model.config import resolve_model
    from ..placement.export import as_shell, sglang_command
    from ..placement.fit import fit
    from ..report.plan import render, to_yaml
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}", "auto picks the first that fits")
    if export not in (None, "sglang"):
        raise UsageError(f"--export takes sglang, got {export!r}", "leave it out to get a ktcli profile")
    o.check_output_file(output_file)
    prof = o.profile_from_flags(profile, model=model, weights=weights, dtype=dtype, num_layers=num_layers,
                                cpu_threads=cpu_threads)
    machine = o.machine_for(target_devices)
    f = fit(prof, machine, context=context, fmt=fmt, rates=o.plan_rates(machine, cpu_bw, gpu_bw, pcie_bw))
    err = Console(stderr=True, highlight=False, width=140)
    render(f, machine, err)
    if export:
        src = resolve_model(f.profile.model, f.profile.num_layers)
        argv, notes = sglang_command(f, src, o.num_experts(src.config))
        text = "".join(f"# {n}\n" for n in notes) + as_shell(argv) + "\n"
    else:
        text = to_yaml(f, machine, "ktcli plan " + " ".join(sys.argv[2:]) if "plan" in sys.argv[1:2] else "ktcli plan")
    if output_file:
        write_atomic(output_file, text)
        err.print(f"wrote {output_file}")
    else:
        sys.stdout.write(text)
    if f.notes:
        raise typer.Exit(1)
