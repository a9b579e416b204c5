"""What chat and bench share: validate (refuse a run that would fail) → build with a progress bar."""
from __future__ import annotations

from ..errors import KtcliError
from ..placement.checks import ERROR


def refuse_if_failing(v) -> None:
    errs = [f for f in v.findings if f.severity == ERROR]
    if errs:
        more = f" (and {len(errs) - 1} more: run ktcli validate-config)" if len(errs) > 1 else ""
        raise KtcliError(errs[0].line() + more, errs[0].fix)


def load(profile, machine, need_tokenizer: bool = False):
    """Returns (validation, built). Every pre-launch check runs before any weight is read."""
    import torch

    from ..build.model import build
    from ..placement.validate import validate
    from ..report.progress import bytes_progress
    v = validate(profile, machine)
    refuse_if_failing(v)
    if need_tokenizer and v.source.checkpoint_dir is None:
        raise KtcliError(f"{v.source.spec} is an architecture config without a checkpoint or tokenizer",
                         "chat needs a checkpoint directory; use ktcli bench for config-only models")
    if profile.runtime.cpu_threads:
        torch.set_num_threads(profile.runtime.cpu_threads)
    with bytes_progress(f"loading {v.source.name}") as progress:
        built = build(v, progress=progress)
    return v, built
