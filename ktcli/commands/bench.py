"""Benchmark prefill (pp N) and decode (tg N) like llama-bench; comma lists sweep, every combination in one run."""
from __future__ import annotations

import datetime
import sys
from typing import Optional

import typer
from typing_extensions import Annotated

from . import options as o

FORMATS = ("md", "csv", "json", "jsonl")


def _ints(text: str, flag: str) -> list:
    from ..errors import UsageError
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated integers, got {text!r}", f"for example {flag} 128,512") from None
    if not vals or any(v < 1 for v in vals):
        raise UsageError(f"{flag} values must be ≥ 1, got {text!r}", f"{flag} 0 alone skips those tests")
    return vals


def bench(profiles: Annotated[Optional[list[str]], typer.Argument(help="Profiles to compare (default: the embedded demo).", show_default=False)] = None,
          n_prompt: Annotated[str, typer.Option("-p", "--n-prompt", help="Prefill lengths, comma list (pp tests); 0 skips.")] = "512",
          n_gen: Annotated[str, typer.Option("-n", "--n-gen", help="Decode lengths, comma list (tg tests); 0 skips.")] = "128",
          reps: Annotated[int, typer.Option("-r", "--repetitions", min=1, help="Timed repetitions per test.")] = 5,
          warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed repetitions first; a pp row with `auto` prefill adds up to 4 while its plan still changes.")] = 1,
          model: o.Model = None, model_config: Annotated[Optional[str], typer.Option("--model-config", help="A shipped architecture (synthetic weights): " "qwen2-57b-a14b, qwen3-30b-a3b, mixtral-8x7b.")] = None,
          weights: o.Weights = None, dtype: o.Dtype = None, device: o.Device = None, num_layers: o.NumLayers = None,
          use_cuda_graph: Annotated[Optional[str], typer.Option("--use-cuda-graph", "--use_cuda_graph", help="Comma list of 0/1 (sweep).")] = None,
          graph_mode: Annotated[Optional[str], typer.Option("--graph-mode", help="Comma list of off, piecewise, full (sweep).")] = None,
          max_seq_len: o.MaxLen = None, cpu_threads: o.Threads = None, target_devices: o.Targets = None,
          baseline: Annotated[Optional[str], typer.Option("--baseline", help="Comma list: hf-accelerate, hf-gpu.")] = None,
          baseline_n_gen: Annotated[Optional[int], typer.Option("--baseline-n-gen", min=1, help="Decode length for baselines (slow ones).")] = None,
          output: Annotated[str, typer.Option("-o", "--output", help="md, csv, json or jsonl.")] = "md",
          output_file: Annotated[Optional[str], typer.Option("--output-file", help="Write here (atomically) instead of stdout.")] = None,
          fit: o.Fit = False,
          routing: Annotated[str, typer.Option("--routing", help="model (the router's choice) or uniform: each prefill token's experts drawn at random, as a trained, balanced router spreads them (synthetic weights' routers collapse onto a few experts).")] = "model",
          cached_bw: Annotated[bool, typer.Option("--cached-bw", help="Use the bandwidths an earlier run measured on this machine (labelled with when) instead of measuring them now.")] = False):
    from ..engine import sweep
    from ..engine.baselines import BASELINES
    from ..errors import UsageError
    from ..profile.schema import GRAPH_MODES
    from ..report.bench import add_baseline_ratios, finish, llama_fields, render
    from ..files import write_atomic
    from ..report.progress import preparing, steps_progress
    if output not in FORMATS:
        raise UsageError(f"-o must be one of {', '.join(FORMATS)}, got {output!r}", "md prints a table; json keeps every sample")
    o.check_output_file(output_file)
    if model and model_config:
        raise UsageError("--model and --model-config name the model twice", "give one")
    from ..model.routing import ROUTINGS
    if routing not in ROUTINGS:
        raise UsageError(f"--routing must be one of {', '.join(ROUTINGS)}, got {routing!r}", "uniform: every prefill token picks its experts at random")
    tests = [("pp", n) for n in _ints(n_prompt, "-p") if n] if n_prompt != "0" else []
    tests += [("tg", n) for n in _ints(n_gen, "-n") if n] if n_gen != "0" else []
    if not tests:
        raise UsageError("nothing to run: -p 0 and -n 0", "give -p N (prefill) or -n N (decode) a length")
    modes = []
    if graph_mode:
        modes = [m.strip() for m in graph_mode.split(",")]
        bad = [m for m in modes if m not in GRAPH_MODES]
        if bad:
            raise UsageError(f"--graph-mode values must be {', '.join(GRAPH_MODES)}, got {bad[0]!r}", "a comma list, e.g. off,full")
    elif use_cuda_graph:
        modes = ["full" if o.parse_bool(x, "--use-cuda-graph") else "off" for x in use_cuda_graph.split(",")]
    bases = [b.strip() for b in baseline.split(",")] if baseline else []
    if any(b not in BASELINES for b in bases):
        raise UsageError(f"--baseline values must be {', '.join(BASELINES)}, got {baseline!r}", "a comma list, e.g. hf-gpu,hf-accelerate")
    if model_config:
        model, weights = model_config, weights or "synthetic"
    profs = [o.profile_from_flags(p, model=model, weights=weights, dtype=dtype, device=device, num_layers=num_layers,
                                  max_seq_len=max_seq_len, cpu_threads=cpu_threads) for p in (profiles or [None])]
    machine = o.machine_for(target_devices)
    if fit:
        profs = [o.apply_fit(p, machine) for p in profs]
    btests = [(k, baseline_n_gen if k == "tg" and baseline_n_gen else n) for k, n in tests]
    sw = sweep.Sweep(profs, tests, modes, reps, warmup, bases, btests, machine, cached_bw, routing=routing)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    command = "ktcli bench " + " ".join(sys.argv[2:]) if "bench" in sys.argv[1:2] else None
    from ..engine.provenance import machine_info
    info = machine_info()

    def report(records):
        sweep.rooflines(sw, records)
        records = [finish(dict(r)) for r in records]
        add_baseline_ratios(records)
        for r in records:
            r.update(llama_fields(r, info, started))
        meta = {"command": command, "machine": info, "bandwidth": sw.bw.as_dict() if sw.bw else None,
                "notes": [f"{r['model']}: only {r['num_layers']} of {r['num_layers_full']} layers (--num-layers)"
                          for r in records[:1] if r.get("num_layers") != r.get("num_layers_full")]
                 + (["--routing uniform: prefill tokens' experts drawn at random (decode keeps the router's)"]
                    if routing == "uniform" else [])}
        k = info["kernel"]
        if k["enabled"] and not k["built"]:
            why = (k["error"] or "unknown").strip().splitlines()[0]
            meta["notes"].append(f"CPU expert kernel unavailable ({why}): CPU experts ran torch's path")
        return records, render(records, meta, output)

    def saved(records):   # partial results survive a run cut short
        if output_file:
            write_atomic(output_file, report(records)[1])

    with steps_progress("bench", sweep.count_steps(sw)) as tick:
        records, text = report(sweep.run(sw, tick, saved, lambda e: preparing(e, spinner=False)))
    if output_file:
        write_atomic(output_file, text)
    else:
        sys.stdout.write(text)
    if all(r.get("error") for r in records):
        raise typer.Exit(1)
