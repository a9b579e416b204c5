"""What chat and bench share: validate (refuse a run that would fail) → build with a progress bar."""
from __future__ import annotations

from ..errors import CheckpointError


def load(profile, machine, need_tokenizer: bool = False):
    """Returns (validation, built). Every pre-launch check runs before any weight is read."""
    import torch

    from ..model.build import build
    from ..model.weights import TOKENIZER_FILES, has_tokenizer
    from ..placement.validate import validate
    from ..report.progress import bytes_progress
    v = validate(profile, machine)
    v.refuse_if_failing()
    if need_tokenizer and v.source.checkpoint_dir is None:
        raise CheckpointError(f"{v.source.spec} is an architecture config without a checkpoint or tokenizer",
                              "chat needs a checkpoint directory; use ktcli bench for config-only models")
    if need_tokenizer and not has_tokenizer(v.source.checkpoint_dir):
        raise CheckpointError(f"{v.source.checkpoint_dir} has no tokenizer files ({', '.join(TOKENIZER_FILES)})",
                              "copy the tokenizer files from the model's original checkpoint")
    if profile.runtime.cpu_threads:
        torch.set_num_threads(profile.runtime.cpu_threads)
    prepare_cpu_kernel(v.plan)
    with bytes_progress(f"loading {v.source.name}") as progress:
        built = build(v, progress=progress)
    return v, built


def load_engine(flags: dict, fit: bool):
    """chat and serve: the profile from the shared flags (options.run_flags), --fit, the model with its tokenizer,
    and an engine with its CUDA graph captured. Returns (validation, built, engine)."""
    from ..engine import Engine
    from . import options as o
    flags = dict(flags)
    graphs = o.graph_switch(flags.pop("use_cuda_graph_kt"), flags.pop("use_cuda_graph"))
    prof = o.profile_from_flags(flags.pop("profile"), use_cuda_graph=graphs, **flags)
    machine = o.machine_for(None)
    if fit:
        prof = o.apply_fit(prof, machine)
    v, built = load(prof, machine, need_tokenizer=True)
    engine = Engine(built)
    from ..report.progress import preparing
    with preparing(engine):
        engine.prepare()
    return v, built, engine


def prepare_cpu_kernel(plan) -> None:
    """Compile the CPU expert kernel before loading (first use only), so the build is neither silent nor folded
    into the first timings; say so when it is unavailable and CPU experts fall back to torch's path."""
    from ..ops import kernels
    from ..report.progress import notice, status
    if not kernels.enabled() or not any({"cpu", "auto"} & {e.prefill.op, e.decode.op} for e in plan.experts):
        return
    if kernels.needs_build():      # said on every kind of stderr: it adds seconds once, before the timings
        notice("compiling the CPU expert kernel for this CPU (first use only)")
    with status("preparing the CPU expert kernel"):
        lib = kernels.get()
    if lib is None:
        reason = (kernels.error() or "unknown").strip().splitlines()[0]
        notice(f"the CPU expert kernel is unavailable ({reason}); CPU experts run torch's path, 3-4x slower")
