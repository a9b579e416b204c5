"""Weights into place: checkpoint tensors stream straight to their final device and dtype, or synthetic fill.

Checkpoints may use the legacy per-expert names (`experts.N.gate_proj.weight`, Mixtral's `w1/w3/w2` under
`block_sparse_moe`): these are fused into the 3-D layout (gate_up_proj [E,2I,H], down_proj [E,H,I]) as they
stream in, one expert slice at a time.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch

from ..errors import CheckpointError

_LEGACY = re.compile(r"^(?P<mod>.*\.experts)\.(?P<e>\d+)\.(?P<w>gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
_PART = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


@dataclass
class Target:
    param: str          # model parameter name
    expert: int | None  # expert index for legacy per-expert tensors
    part: str | None    # gate / up / down


def map_name(name: str) -> Target:
    name = name.replace(".block_sparse_moe.", ".mlp.")
    m = _LEGACY.match(name)
    if not m:
        return Target(name, None, None)
    part = _PART[m.group("w")]
    param = f"{m.group('mod')}.{'down_proj' if part == 'down' else 'gate_up_proj'}"
    return Target(param, int(m.group("e")), part)


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class Shard:
    """One safetensors file read with plain reads into the destination memory.

    Why not safe_open: its memory map keeps every touched page resident in this process until the file is
    closed, which doubles peak RSS on a CPU-resident load. readinto() puts bytes straight where they live.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            self.f = open(path, "rb")
            n = int.from_bytes(self.f.read(8), "little")
            header = json.loads(self.f.read(n)) if 0 < n < 2**30 else None
        except (OSError, ValueError):
            header = None
        if not isinstance(header, dict):
            raise CheckpointError(f"cannot read {path}: not a safetensors file",
                                  "the file is truncated or not safetensors; re-copy it")
        header.pop("__metadata__", None)
        self.base, self.tensors = 8 + n, header
        size = os.path.getsize(path)
        end = max((t["data_offsets"][1] for t in header.values()), default=0)
        if self.base + end > size:
            raise CheckpointError(f"cannot read {path}: truncated ({size} bytes, header promises {self.base + end})",
                                  "the file is truncated; re-copy it")

    def shape(self, name):
        return tuple(self.tensors[name]["shape"])

    def read_into(self, name: str, dst: torch.Tensor, bounce: dict) -> None:
        info = self.tensors[name]
        src_dtype = _DTYPES.get(info["dtype"])
        if src_dtype is None:
            raise CheckpointError(f"{name} in {self.path} has dtype {info['dtype']}, which ktcli cannot load",
                                  "convert the checkpoint to bf16/fp16/fp32 safetensors")
        begin, end = info["data_offsets"]
        self.f.seek(self.base + begin)
        if dst.device.type == "cpu" and dst.dtype == src_dtype and dst.is_contiguous():
            self.f.readinto(memoryview(dst.view(torch.uint8).numpy()).cast("B"))
            return
        tmp = bounce.get(src_dtype)
        if tmp is None or tmp.numel() < dst.numel():   # one reusable (pinned when a GPU is the target) buffer
            pin = dst.device.type == "cuda"
            tmp = bounce[src_dtype] = torch.empty(dst.numel(), dtype=src_dtype, pin_memory=pin)
        view = tmp[: dst.numel()]
        self.f.readinto(memoryview(view.view(torch.uint8).numpy()).cast("B"))
        dst.copy_(view.view(dst.shape))
        if dst.device.type == "cuda":
            torch.cuda.current_stream(dst.device).synchronize()   # the bounce buffer is reused next

    def close(self):
        self.f.close()


def checkpoint_files(ckpt: str) -> dict:
    """tensor name → shard path, from model.safetensors.index.json or the *.safetensors present."""
    index = os.path.join(ckpt, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            wm = json.load(f)["weight_map"]
        out = {}
        for name, shard in wm.items():
            path = os.path.join(ckpt, shard)
            if not os.path.isfile(path):
                raise CheckpointError(f"missing shard {shard} (listed in {os.path.basename(index)} for {name})",
                                      "re-download or re-copy the checkpoint")
            out[name] = path
        return out
    shards = sorted(f for f in os.listdir(ckpt) if f.endswith(".safetensors"))
    if not shards:
        raise CheckpointError(f"{ckpt} has no *.safetensors files",
                              "use a safetensors checkpoint, or --weights synthetic to benchmark its shapes")
    out = {}
    for s in shards:
        sh = Shard(os.path.join(ckpt, s))
        out.update({k: sh.path for k in sh.tensors})
        sh.close()
    return out


def _slot(param: torch.Tensor, t: Target, name: str) -> torch.Tensor:
    """The region of `param` that tensor `name` fills."""
    if t.expert is None:
        return param
    if t.expert >= param.shape[0]:
        raise CheckpointError(f"{name}: expert {t.expert} but the model has {param.shape[0]} experts",
                              "does config.json belong to these weights?")
    if t.part == "down":
        return param[t.expert]
    half = param.shape[1] // 2
    return param[t.expert, :half] if t.part == "gate" else param[t.expert, half:]


def load_checkpoint(params: dict, ckpt: str, progress=None, buffers=None, done=None, dry_run=False) -> None:
    """Copy every checkpoint tensor into `params` (name → preallocated tensor on its final device).

    `buffers` (persistent buffers, e.g. DeepSeek's e_score_correction_bias) are filled when present;
    `done(name)` is called as soon as a parameter is complete (quantization can start while loading goes on).
    `dry_run`: read the headers only and raise what loading would (validate-config; params may be on meta)."""
    params = {**(buffers or {}), **params}
    required = set(params) - set(buffers or {})
    sizes = {n: p.numel() for n, p in params.items()}
    files = checkpoint_files(ckpt)
    filled = {name: 0 for name in params}
    by_file, bounce = {}, {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        shard = Shard(path)
        try:
            for name in names:
                t = map_name(name)
                if t.param not in params:
                    continue   # e.g. rotary inv_freq saved by old checkpoints
                if name not in shard.tensors:
                    raise CheckpointError(f"{name} is listed for {path} but not in it", "re-copy the checkpoint")
                dst = _slot(params[t.param], t, name)
                if shard.shape(name) != tuple(dst.shape):
                    raise CheckpointError(f"{name} has shape {shard.shape(name)}, the model expects "
                                          f"{tuple(dst.shape)}", "does config.json belong to these weights?")
                filled[t.param] += dst.numel()
                if dry_run:
                    continue
                shard.read_into(name, dst, bounce)
                if done and filled[t.param] == sizes[t.param]:
                    params[t.param] = None     # let done() free it (e.g. bf16 experts once quantized)
                    done(t.param)
                if progress:
                    progress(dst.numel() * dst.element_size())
                del dst
        finally:
            shard.close()
    missing = [n for n in params if n in required and filled[n] < sizes[n]]
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s), first: {missing[0]}",
                              "the checkpoint is incomplete or for another architecture")


def fill_synthetic(params: dict, seed: int = 0, progress=None, done=None) -> None:
    """Same shapes, random values: a 64 MiB random block tiled over each tensor (fast, parallel copy)."""
    g = torch.Generator().manual_seed(seed)
    block = (torch.rand(32 * 2**20, generator=g) * 0.04 - 0.02)
    blocks = {}
    for i, name in enumerate(list(params)):     # names only: done() may drop finished tensors from params
        p = params[name]
        if p.ndim == 1 and ("norm" in name or "layernorm" in name):
            p.fill_(1.0)
        elif "correction_bias" in name:
            p.zero_()
        else:
            key = (p.dtype, p.device)
            if key not in blocks:
                blocks[key] = block.to(p.device, p.dtype)
            src, flat, n = blocks[key], p.view(-1), p.numel()
            off, pos = (i * 7919) % src.numel(), 0
            while pos < n:
                k = min(n - pos, src.numel() - off)
                flat[pos:pos + k].copy_(src[off:off + k])
                pos, off = pos + k, 0
        nbytes = p.numel() * p.element_size()
        del p
        if done:
            done(name)
        if progress:
            progress(nbytes)


def check_checkpoint(meta_model, ckpt: str) -> None:
    """Everything loading would find wrong, from the safetensors headers and the index alone: a missing shard, a
    truncated file, a tensor of the wrong shape, a missing tensor. Raises CheckpointError."""
    params = dict(meta_model.named_parameters())
    buffers = {n: b for n, b in meta_model.named_buffers()
               if n.rpartition(".")[2] not in meta_model.get_submodule(n.rpartition(".")[0])._non_persistent_buffers_set}
    if getattr(meta_model.config, "tie_word_embeddings", False):
        params.pop("lm_head.weight", None)
    load_checkpoint(params, ckpt, buffers=buffers, dry_run=True)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def has_tokenizer(ckpt: str) -> bool:
    return any(os.path.isfile(os.path.join(ckpt, f)) for f in TOKENIZER_FILES)
