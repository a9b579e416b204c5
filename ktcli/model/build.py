"""Build the model a plan describes: transformers class on meta → HybridExperts swapped in → weights placed."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..errors import CheckpointError, KtcliError
from ..ops.base import HybridExperts, layout_problem
from ..ops.cpu import Staging
from ..ops.quant import hugepages
from . import devices
from .config import meta_model
from .overlap import overlap_shared_experts
from .weights import fill_synthetic, load_checkpoint

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Built:
    model: torch.nn.Module
    tokenizer: object
    plan: object
    profile: object
    main_device: torch.device
    dtype: torch.dtype
    staging: Staging | None
    timings: dict = field(default_factory=dict)   # stage → seconds
    weight_bytes: dict = field(default_factory=dict)   # device → bytes of weights resident
    streamer: object = None                            # ops.stream.Streamer when prefill streams experts
    prefill_rates: object = None                       # ops.costs.PrefillRates probed for a roofline without one


def _device_of(name: str, plan, experts_devices: dict) -> str:
    mod = name.rsplit(".", 1)[0]
    if mod in experts_devices:
        return experts_devices[mod]
    while mod and mod not in plan.module_devices:
        mod = mod.rsplit(".", 1)[0] if "." in mod else ""
    return plan.module_devices.get(mod, plan.main_device)


def materialize(model, device_of):
    """Give every meta parameter real, empty storage on `device_of(name)` (filled in place afterwards: no
    whole-model copy in RAM) and move buffers likewise. Returns (params, persistent buffers) by name."""
    params, buffers = {}, {}
    for name, p in list(model.named_parameters()):
        real = torch.empty(p.shape, dtype=p.dtype, device=device_of(name))
        mod_name, attr = name.rsplit(".", 1)
        model.get_submodule(mod_name)._parameters[attr] = torch.nn.Parameter(real, requires_grad=False)
        params[name] = real
    for name, b in list(model.named_buffers()):
        mod_name, attr = name.rsplit(".", 1) if "." in name else ("", name)
        mod = model.get_submodule(mod_name)
        mod._buffers[attr] = b.to(device_of(name))
        if attr not in mod._non_persistent_buffers_set:
            buffers[name] = mod._buffers[attr]
    return params, buffers


def _move_output_hook(device):
    def hook(_mod, _inp, out):
        return out.to(device)
    return hook


def _move_input_hook(device):
    def hook(_mod, args):
        return tuple(a.to(device) if torch.is_tensor(a) else a for a in args)
    return hook


def build(validation, progress=None) -> Built:
    """`validation` must be ok. `progress(total_bytes)` returns an advance(nbytes) callback (or None)."""
    prof, plan, src = validation.profile, validation.plan, validation.source
    t0 = time.perf_counter()
    dtype = DTYPES[prof.dtype]
    model = meta_model(src.config, dtype)
    model.eval().requires_grad_(False)
    main = torch.device(plan.main_device)
    cfg = model.config
    staging = None
    if any(e.decode.device == "cpu" or e.prefill.device in ("cpu", "auto") for e in plan.experts) and main.type == "cuda":
        chunk = min(prof.runtime.prefill_chunk, prof.runtime.max_seq_len)
        staging = Staging(chunk, cfg.hidden_size, cfg.num_experts_per_tok, dtype, pin=True,
                          threads=prof.runtime.cpu_threads or 0)
    experts_devices = {}
    for e in plan.experts:
        orig = model.get_submodule(e.module)
        bad = layout_problem(orig)
        if bad and not (e.prefill.op == e.decode.op == "torch"):
            raise KtcliError(f"{type(orig).__name__} uses an experts layout ktcli's operators do not read ({bad})",
                             "place these experts with the 'torch' operator")
        parent, attr = e.module.rsplit(".", 1)
        setattr(model.get_submodule(parent), attr, HybridExperts(orig, e, dtype, staging))
        experts_devices[e.module] = e.home
    overlap_shared_experts(model)   # shared experts run while the CPU computes the routed ones

    params, buffers = materialize(model, lambda name: _device_of(name, plan, experts_devices))
    total = sum(t.numel() * t.element_size() for t in params.values())
    for t in params.values():
        if t.device.type == "cpu" and t.ndim == 3:   # expert stacks living on the CPU
            hugepages(t)
    advance = progress(total) if progress else None
    # Each layer's experts are packed (int8/int4: quantized, bf16 copy freed) as soon as both tensors are in,
    # so peak RAM is the stored format plus about one layer, not the whole bf16 model.
    owner = {f"{e.module}.{w}": model.get_submodule(e.module) for e in plan.experts for w in ("gate_up_proj", "down_proj")}
    pending = {}

    def done(name):
        m = owner.get(name)
        if m is not None:
            params.pop(name, None)        # the module holds it; after finalize() nothing does
            pending[id(m)] = pending.get(id(m), 0) + 1
            if pending[id(m)] == 2:
                m.finalize()

    if prof.weights == "synthetic" or src.checkpoint_dir is None:
        fill_synthetic(params, progress=advance, done=done)
    else:
        tied = getattr(cfg, "tie_word_embeddings", False)
        if tied and "lm_head.weight" in params:
            params.pop("lm_head.weight")
        load_checkpoint(params, src.checkpoint_dir, progress=advance, buffers=buffers, done=done)
        if tied:
            model.tie_weights()
    for m in model.modules():
        if isinstance(m, HybridExperts) and not hasattr(m, "packed"):
            m.finalize()
    streamer, stream_times = _streamer(model, main, cfg, prof, plan)
    # Modules off the main device (KTransformers puts embed_tokens on the CPU) hand their output back.
    emb = model.get_input_embeddings()
    if plan.embed_device != plan.main_device:
        emb.register_forward_pre_hook(_move_input_hook(torch.device(plan.embed_device)))
        emb.register_forward_hook(_move_output_hook(main))
    head = model.get_output_embeddings()
    if plan.lm_head_device != plan.main_device and not plan.lm_head_device.startswith("cuda"):
        head.register_forward_pre_hook(_move_input_hook(torch.device(plan.lm_head_device)))
        head.register_forward_hook(_move_output_hook(main))
    devices.install(model, plan)     # layers, norm or lm_head on other GPUs: the hidden state follows them
    if prof.runtime.compile:
        from .compile import compile_decode
        from .fused import fuse_decode
        fuse_decode(model)           # one q/k/v GEMM, unsorted top-k (GPU modules); before the wrappers take forward
        compile_decode(model)        # compiled at the first one-token forward (graph warm-up or first decode)
    weight_bytes = {}
    for p in model.parameters():
        weight_bytes[str(p.device)] = weight_bytes.get(str(p.device), 0) + p.numel() * p.element_size()
    for m in model.modules():
        if isinstance(m, HybridExperts) and m.quantized:
            weight_bytes["cpu"] = weight_bytes.get("cpu", 0) + m.quantized.nbytes()
    if main.type == "cuda":
        torch.cuda.synchronize()
    tokenizer = load_tokenizer(src.checkpoint_dir)
    return Built(model, tokenizer, plan, prof, main, dtype, staging,
                 timings={"load": time.perf_counter() - t0, **stream_times}, weight_bytes=weight_bytes,
                 streamer=streamer)


def _streamer(model, main, cfg, prof, plan):
    """The Streamer of the layers whose prefill may copy CPU-resident experts to the GPU: host memory pinned,
    two slots allocated, rates measured; one per GPU when layers sit on several. (None, {}) when no layer streams."""
    from ..ops.registry import resolve_op
    from ..ops.stream import Streamer, Streamers
    layers = [m for m in model.modules() if isinstance(m, HybridExperts)
              and resolve_op(m.placement.prefill.op).streams_from and m.home.type == "cpu"]
    if not layers or main.type != "cuda":
        return None, {}
    by_gpu = {}
    for m in layers:       # a layer streams to the GPU its prefill names, else (auto) to its attention's
        dev = m.placement.prefill.device
        by_gpu.setdefault(dev if dev.startswith("cuda") else plan.layer_device(m.layer), []).append(m)
    times, out = {}, []
    for dev, ms in by_gpu.items():
        st = Streamer(torch.device(dev))
        for m in ms:
            st.add(m)
        for k, v in st.setup(cfg.num_experts_per_tok, prof.runtime.cpu_threads or 0).items():
            times[f"load: {k}"] = times.get(f"load: {k}", 0.0) + v
        out.append(st)
    return (out[0] if len(out) == 1 else Streamers(out)), times


def load_tokenizer(ckpt):
    """The checkpoint's tokenizer, or None without one (bench runs without; chat refuses before loading)."""
    from .weights import has_tokenizer
    if ckpt is None or not has_tokenizer(ckpt):
        return None
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(ckpt)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the tokenizer from {ckpt}: {str(e).splitlines()[0]}",
                              "the checkpoint needs tokenizer.json and tokenizer_config.json") from None
