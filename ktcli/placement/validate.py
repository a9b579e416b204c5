"""Profile + flags + machine → plan + findings. validate-config stops here; chat and bench go on to build."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import CheckpointError, KtcliError
from ..model.config import find_experts, meta_model, resolve_model, supported_model_types
from ..model.weights import TOKENIZER_FILES
from . import checks, prefill_note
from .checks import ERROR, WARNING, Finding
from .plan import make_plan, normalize_device


@dataclass
class Validation:
    profile: object
    machine: object
    source: object = None
    model: object = None          # meta-device transformers model
    plan: object = None
    memory: object = None
    findings: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.severity == ERROR for f in self.findings)

    def errors(self):
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def exit_code(self) -> int:
        """0, or the code of the first error's kind (errors.EXIT_CODES): 4 for the model, 1 for the plan."""
        errs = self.errors()
        return 0 if not errs else 4 if errs[0].check in ("model", "checkpoint") else 1

    def refuse_if_failing(self) -> None:
        """Chat and bench stop here with the first error (validate-config lists them all)."""
        errs = self.errors()
        if errs:
            more = f" (and {len(errs) - 1} more: run ktcli validate-config)" if len(errs) > 1 else ""
            raise KtcliError(errs[0].line() + more, errs[0].fix, code=self.exit_code)


def main_device(profile, machine) -> str:
    if profile.device == "auto":
        return "cuda:0" if machine.has("cuda:0") else "cpu"
    dev = normalize_device(profile.device)
    if dev is None:
        raise KtcliError(f"{profile.where('device') or '--device'}: '{profile.device}' is not a device ktcli runs on",
                         "devices are auto, cpu, cuda or cuda:N")
    return dev


def check_source(profile, source, model) -> list:
    """The checkpoint as loading would find it (headers and index only), and whether it has a tokenizer."""
    from ..model.weights import check_checkpoint, has_tokenizer
    ckpt = source.checkpoint_dir
    if ckpt is None:
        return []
    out = []
    if profile.weights != "synthetic":
        try:
            check_checkpoint(model, ckpt)
        except CheckpointError as e:
            out.append(Finding(ERROR, "checkpoint", e.message, profile.where("model"), e.hint))
    if not has_tokenizer(ckpt):
        out.append(Finding(WARNING, "checkpoint", f"{ckpt} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): "
                           "chat cannot run; bench can", profile.where("model"),
                           "copy the tokenizer files from the model's original checkpoint"))
    return out


def validate(profile, machine) -> Validation:
    """Never loads weights: config.json and a meta-device model are enough."""
    v = Validation(profile, machine)
    try:
        v.source = resolve_model(profile.model, profile.num_layers)
    except CheckpointError as e:
        v.findings.append(Finding(ERROR, "model", e.message, profile.where("model"), e.hint))
        return v
    v.model = meta_model(v.source.config)
    cfg = v.source.config     # from_config copies the config; keep the --num-layers note on the copy too
    v.model.config._ktcli_full_layers = getattr(cfg, "_ktcli_full_layers", cfg.num_hidden_layers)
    if not find_experts(v.model):
        v.findings.append(Finding(ERROR, "model", f"{type(v.model).__name__} ({v.source.config.model_type}) has no "
                                  "experts module with transformers' experts interface",
                                  profile.where("model"),
                                  f"supported model types: {', '.join(supported_model_types())}"))
        return v
    v.findings += check_source(profile, v.source, v.model)
    v.plan = make_plan(v.model, profile.rules, main_device(profile, machine))
    v.findings += checks.check_rules(profile, v.plan, v.model)
    v.findings += checks.check_devices(profile, v.plan, machine)
    v.findings += checks.check_operators(profile, v.plan)
    v.findings += checks.check_formats(profile, v.plan, v.model)
    v.findings += checks.check_graphs(profile, v.plan)
    v.findings += prefill_note.check_prefill(profile, v.plan, v.model)
    mem_findings, v.memory = checks.check_memory(profile, v.plan, machine, v.model)
    v.findings += mem_findings
    v.findings += checks.check_threads(profile, machine)
    v.findings += [Finding("note", "ktransformers", text, where) for where, text in v.plan.notes]
    return v
