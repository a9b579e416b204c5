"""Check a profile and the flags a run would use, without loading weights (exit codes: docs/reference.md)."""
from __future__ import annotations

import json

import typer
from typing_extensions import Annotated

from . import options as o


def validate_config(profile: o.ProfileArg = None, model: o.Model = None, weights: o.Weights = None,
                    dtype: o.Dtype = None, device: o.Device = None, num_layers: o.NumLayers = None,
                    use_cuda_graph_kt: o.GraphKT = None, use_cuda_graph: o.Graph = None,
                    graph_mode: o.GraphMode = None, max_seq_len: o.MaxLen = None, cpu_threads: o.Threads = None,
                    target_devices: o.Targets = None,
                    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False):
    from rich.console import Console

    from ..placement.validate import validate
    from ..report.placement import as_dict, render
    prof = o.profile_from_flags(profile, model=model, weights=weights, dtype=dtype, device=device,
                                num_layers=num_layers, use_cuda_graph=o.graph_switch(use_cuda_graph_kt, use_cuda_graph),
                                graph_mode=graph_mode, max_seq_len=max_seq_len, cpu_threads=cpu_threads)
    v = validate(prof, o.machine_for(target_devices))
    if as_json:
        typer.echo(json.dumps(as_dict(v), indent=2))
    else:
        render(v, Console(highlight=False, width=140))
    raise typer.Exit(v.exit_code)
