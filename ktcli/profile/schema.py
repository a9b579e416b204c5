"""Profile schema: strict (unknown keys are errors), every error names file:line."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace as dc_replace

from ..errors import ProfileError, UsageError
from .yamlpos import PosDict, PosList, load_yaml

# Every key a profile may hold, with the line docs/reference.md shows for it (generated from these tables).
FIELDS = {
    "model": "`demo` (default: the embedded tiny model), a local HF checkpoint directory, a config.json, or a "
             "shipped architecture (`qwen2-57b-a14b`, `qwen3-30b-a3b`, `mixtral-8x7b`)",
    "weights": "`checkpoint` (default: read the safetensors) or `synthetic` (real shapes, random values)",
    "dtype": "`bfloat16` (default), `float16` or `float32`",
    "device": "main device for attention, router, norms and shared experts: `auto` (default: cuda:0 if present), "
              "`cpu`, `cuda`, `cuda:N`",
    "num_layers": "keep only the first N decoder layers (quick runs on full-size shapes)",
    "runtime": "run settings, below",
    "rules": "placement rules (KTransformers shape), or the path of a KTransformers optimize-rule file",
}
RUNTIME_FIELDS = {
    "use_cuda_graph": "replay decode as a CUDA graph (default false); `true` means graph_mode full",
    "graph_mode": "`full` (one graph, CPU experts as C steps inside it), `piecewise` (graphs between CPU-expert "
                  "layers) or `off`; overrides use_cuda_graph",
    "max_seq_len": "KV cache length, prompt + reply (default 4096)",
    "cpu_threads": "threads for CPU experts (default: all physical cores)",
    "prefill_chunk": "tokens per prefill step; also sizes the pinned staging buffers (default 512); when experts "
                     "stream to the GPU, steps are as long as free GPU memory allows (the copy is paid per step)",
    "compile": "torch.compile each layer's attention, norms and router for one-token decode: a few fused kernels "
               "instead of ~70 small ones a layer, and on the GPU one GEMM for q, k and v and an unsorted router "
               "top-k (default false; the first decode compiles, about a second a layer)",
}
KWARG_FIELDS = {
    "generate_device": "where decode computes this module (experts: where their weights live)",
    "prefill_device": "where prefill computes it: cpu, cuda (CPU-resident experts stream to the GPU: operator "
                      "`stream`) or auto (per chunk the fastest of the two and a split of the layer's experts "
                      "between them; the default for experts that decode on the CPU when the model runs on a GPU)",
    "generate_op": "decode operator for experts (a name or KTransformers alias from the operator table)",
    "prefill_op": "prefill operator for experts",
    "out_device": "accepted for KTransformers files; outputs always return to the main device",
    "weight_format": "CPU experts storage: `bf16` (default), `int8` (per-row scales) or `int4` (per-group scales)",
    "group_size": "int4 group size along the input dimension (default 128; must divide hidden and intermediate)",
}
DTYPES = ("bfloat16", "float16", "float32")
GRAPH_MODES = ("full", "piecewise", "off")
WEIGHTS = ("checkpoint", "synthetic")
DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")   # the main device (experts' devices are checked per rule)
DEVICE_HINT = "devices are auto, cpu, cuda or cuda:N"
RULE_KWARGS = tuple(KWARG_FIELDS)


@dataclass
class Rule:
    """One KTransformers-shaped rule: match {name, class} → replace {class, kwargs}."""
    index: int
    file: str
    line: int
    name: str | None = None
    match_class: str | None = None
    replace_class: str = "default"
    kwargs: dict = field(default_factory=dict)
    recursive: bool = True
    ignored: list = field(default_factory=list)   # KTransformers parts ktcli does not use

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def label(self) -> str:
        return f"rule {self.index + 1}"

    def matches(self, name: str, cls_name: str) -> bool:
        if self.name is not None and re.search(self.name, name) is None:
            return False
        return self.match_class is None or self.match_class.rsplit(".", 1)[-1] == cls_name


@dataclass
class Runtime:
    use_cuda_graph: bool = False
    graph_mode: str | None = None       # None: follows use_cuda_graph (true → full)
    max_seq_len: int = 4096
    cpu_threads: int | None = None      # None: all physical cores
    prefill_chunk: int = 512
    compile: bool = False

    @property
    def mode(self) -> str:
        if self.graph_mode is not None:
            return self.graph_mode
        return "full" if self.use_cuda_graph else "off"


@dataclass
class Profile:
    path: str
    model: str = "demo"
    weights: str = "checkpoint"
    dtype: str = "bfloat16"
    device: str = "auto"                # where non-expert modules live unless a rule says otherwise
    num_layers: int | None = None
    runtime: Runtime = field(default_factory=Runtime)
    rules: list = field(default_factory=list)
    lines: dict = field(default_factory=dict)   # top-level key → line, for check locations

    def where(self, key: str) -> str | None:
        """file:line of a top-level key; None for the built-in default (there is no file to point at)."""
        return None if self.path.startswith("<") else f"{self.path}:{self.lines.get(key, 1)}"


def _err(file, line, msg, hint=None):
    return ProfileError(f"{file}:{line}", msg, hint or "the profile format, field by field: docs/reference.md")


def _expect(value, types, file, line, what):
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        names = "/".join(t.__name__ for t in _as_tuple(types))
        raise _err(file, line, f"{what} must be {names}, got {type(value).__name__} {value!r}",
                   f"write a {names} value (docs/reference.md lists every field)")
    return value


def _as_tuple(t):
    return t if isinstance(t, tuple) else (t,)


def _strict_keys(d: PosDict, allowed, file, what):
    for k in d:
        if k not in allowed:
            raise _err(file, d.key_lines[k], f"unknown key '{k}' in {what}",
                       f"allowed keys: {', '.join(allowed)}")


def _parse_rule(i: int, node, file: str) -> Rule:
    line = getattr(node, "line", 0)
    if not isinstance(node, PosDict):
        raise _err(file, line, f"rule {i + 1} must be a mapping with 'match' and 'replace'")
    _strict_keys(node, ("match", "replace", "recursive"), file, f"rule {i + 1}")
    rule = Rule(index=i, file=file, line=line)
    match = node.get("match")
    if not isinstance(match, PosDict) or not match:
        raise _err(file, line, f"rule {i + 1} needs a 'match' mapping with 'name' and/or 'class'")
    _strict_keys(match, ("name", "class"), file, "match")
    if "name" in match:
        rule.name = _expect(match["name"], str, file, match.key_lines["name"], "match.name")
        try:
            re.compile(rule.name)
        except re.error as e:
            raise _err(file, match.key_lines["name"], f"bad regex {rule.name!r} in match.name: {e}",
                       "names are Python regular expressions, e.g. '^model\\.layers\\.([0-1])\\.mlp\\.experts$'")
    if "class" in match:
        rule.match_class = _expect(match["class"], str, file, match.key_lines["class"], "match.class")
    repl = node.get("replace", PosDict())
    if not isinstance(repl, PosDict):
        raise _err(file, node.key_lines.get("replace", line), "'replace' must be a mapping")
    _strict_keys(repl, ("class", "kwargs", "device"), file, "replace")
    rule.replace_class = _expect(repl.get("class", "default"), str, file, repl.key_lines.get("class", line),
                                 "replace.class")
    kwargs = repl.get("kwargs", PosDict())
    if not isinstance(kwargs, PosDict):
        raise _err(file, repl.key_lines.get("kwargs", line), "replace.kwargs must be a mapping")
    from .ktransformers import is_kt_class
    for k, v in kwargs.items():
        if k == "group_size" and (isinstance(v, bool) or not isinstance(v, int) or v < 2):
            raise _err(file, kwargs.key_lines[k], f"group_size must be an integer ≥ 2, got {v!r}",
                       "int4 groups: 128, 64 or 32 inputs per scale")
        if k in RULE_KWARGS:
            rule.kwargs[k] = v if k == "group_size" else str(v)
        elif is_kt_class(rule.replace_class) and k == "transfer_map":
            rule.ignored.append("kwarg 'transfer_map' (the hidden state moves wherever consecutive layers change "
                                "device, read from the layers' rules)")
        elif is_kt_class(rule.replace_class):
            rule.ignored.append(f"kwarg '{k}'")
        else:
            raise _err(file, kwargs.key_lines[k], f"unknown kwarg '{k}' in replace.kwargs",
                       f"allowed: {', '.join(RULE_KWARGS)}")
    if "device" in repl:   # KTransformers' load device: ktcli loads weights where they compute
        rule.ignored.append("replace.device")
    if "recursive" in node:
        rule.recursive = _expect(node["recursive"], bool, file, node.key_lines["recursive"], "recursive")
    return rule


def _parse_rules(node, file: str) -> list:
    if node is None:
        return []
    if not isinstance(node, PosList):
        raise _err(file, getattr(node, "line", 1), "rules must be a list of match/replace rules")
    return [_parse_rule(i, r, file) for i, r in enumerate(node)]


def _parse_runtime(node, file: str) -> Runtime:
    if not isinstance(node, PosDict):
        raise _err(file, getattr(node, "line", 1), "runtime must be a mapping")
    _strict_keys(node, tuple(RUNTIME_FIELDS), file, "runtime")
    rt = Runtime()
    for key, types in (("use_cuda_graph", bool), ("max_seq_len", int), ("cpu_threads", int),
                       ("prefill_chunk", int), ("graph_mode", str), ("compile", bool)):
        if key in node and node[key] is not None:
            setattr(rt, key, _expect(node[key], types, file, node.key_lines[key], f"runtime.{key}"))
    if rt.graph_mode is not None and rt.graph_mode not in GRAPH_MODES:
        raise _err(file, node.key_lines["graph_mode"], f"runtime.graph_mode must be one of {', '.join(GRAPH_MODES)}")
    for key in ("max_seq_len", "cpu_threads", "prefill_chunk"):
        if getattr(rt, key) is not None and getattr(rt, key) < 1:
            raise _err(file, node.key_lines[key], f"runtime.{key} must be ≥ 1")
    return rt


def load_profile(path: str) -> Profile:
    """Read a ktcli profile, or a bare KTransformers rule list (used as the profile's rules)."""
    data = load_yaml(path)
    prof = Profile(path=path)
    if isinstance(data, PosList):          # a KTransformers optimize-rule file
        prof.rules = _parse_rules(data, path)
        return prof
    if data is None:
        return prof
    if not isinstance(data, PosDict):
        raise _err(path, 1, "a profile is a mapping (model, dtype, runtime, rules) or a list of rules")
    _strict_keys(data, tuple(FIELDS), path, "profile")
    prof.lines = dict(data.key_lines)
    for key in ("model", "weights", "dtype", "device"):
        if key in data:
            setattr(prof, key, str(_expect(data[key], str, path, data.key_lines[key], key)))
    if "num_layers" in data and data["num_layers"] is not None:
        prof.num_layers = _expect(data["num_layers"], int, path, data.key_lines["num_layers"], "num_layers")
    for key, allowed in (("dtype", DTYPES), ("weights", WEIGHTS)):
        if getattr(prof, key) not in allowed:
            raise _err(path, data.key_lines[key], f"{key} must be one of {', '.join(allowed)}")
    if not DEVICE.match(prof.device):
        raise _err(path, data.key_lines["device"], f"device '{prof.device}' is not a device ktcli runs on", DEVICE_HINT)
    if prof.model not in ("demo",) and not os.path.isabs(prof.model) and os.sep in prof.model:
        prof.model = os.path.normpath(os.path.join(os.path.dirname(path), prof.model))
    if "runtime" in data:
        prof.runtime = _parse_runtime(data["runtime"], path)
    rules = data.get("rules")
    if isinstance(rules, str):             # rules: ./Qwen2-57B-A14B-Instruct.yaml (KTransformers file)
        rfile = os.path.normpath(os.path.join(os.path.dirname(path), rules))
        rdata = load_yaml(rfile)
        prof.rules = _parse_rules(rdata, rfile)
    else:
        prof.rules = _parse_rules(rules, path)
    return prof


OVERRIDABLE = ("model", "weights", "dtype", "device", "num_layers")
RUNTIME_OVERRIDABLE = ("use_cuda_graph", "graph_mode", "max_seq_len", "cpu_threads", "prefill_chunk")


def apply_overrides(prof: Profile, **flags) -> Profile:
    """Flags win over the profile. Conflicting flags are usage errors, raised before anything loads."""
    flags = {k: v for k, v in flags.items() if v is not None}
    unknown = set(flags) - set(OVERRIDABLE) - set(RUNTIME_OVERRIDABLE)
    if unknown:
        raise ValueError(f"not an override: {sorted(unknown)}")
    if flags.get("use_cuda_graph") is False and flags.get("graph_mode") not in (None, "off"):
        raise UsageError(f"--graph-mode {flags['graph_mode']} conflicts with --use-cuda-graph false",
                         "drop one of the two flags")
    for key, allowed in (("dtype", DTYPES), ("weights", WEIGHTS), ("graph_mode", GRAPH_MODES)):
        if key in flags and flags[key] not in allowed:
            raise UsageError(f"--{key.replace('_', '-')} must be one of {', '.join(allowed)}, got {flags[key]!r}",
                             "int8/int4 are expert storage formats: weight_format in a rule (docs/reference.md)"
                             if key == "dtype" else "pick one of those")
    if "device" in flags and not DEVICE.match(flags["device"]):
        raise UsageError(f"--device '{flags['device']}' is not a device ktcli runs on", DEVICE_HINT)
    for key in ("max_seq_len", "cpu_threads", "prefill_chunk", "num_layers"):
        if key in flags and flags[key] < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be ≥ 1, got {flags[key]}",
                             "leave the flag out to use the profile's value")
    rt_flags = {k: flags[k] for k in RUNTIME_OVERRIDABLE if k in flags}
    if "use_cuda_graph" in rt_flags and "graph_mode" not in rt_flags:
        # the switch wins; a profile's piecewise choice survives "graphs on"
        keep = rt_flags["use_cuda_graph"] and prof.runtime.graph_mode in ("full", "piecewise")
        rt_flags["graph_mode"] = prof.runtime.graph_mode if keep else ("off" if not rt_flags["use_cuda_graph"] else None)
    if rt_flags.get("graph_mode"):
        rt_flags["use_cuda_graph"] = rt_flags["graph_mode"] != "off"
    top = {k: flags[k] for k in OVERRIDABLE if k in flags}
    return dc_replace(prof, runtime=dc_replace(prof.runtime, **rt_flags), **top)
