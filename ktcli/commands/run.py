"""What chat and bench share: validate (refuse a run that would fail) → build with a progress bar."""
from __future__ import annotations

from ..errors import KtcliError


def load(profile, machine, need_tokenizer: bool = False):
    """Returns (validation, built). Every pre-launch check runs before any weight is read."""
    import torch

    from ..model.build import build
    from ..placement.validate import validate
    from ..report.progress import bytes_progress
    v = validate(profile, machine)
    v.refuse_if_failing()
    if need_tokenizer and v.source.checkpoint_dir is None:
        raise KtcliError(f"{v.source.spec} is an architecture config without a checkpoint or tokenizer",
                         "chat needs a checkpoint directory; use ktcli bench for config-only models")
    if profile.runtime.cpu_threads:
        torch.set_num_threads(profile.runtime.cpu_threads)
    with bytes_progress(f"loading {v.source.name}") as progress:
        built = build(v, progress=progress)
    return v, built
