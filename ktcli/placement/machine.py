"""What the run will have: devices and their memory, detected here or given with --target-devices."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ..errors import UsageError

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(f"bad size {text!r}", "write sizes like 80GiB, 125GB or 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass
class Machine:
    devices: dict = field(default_factory=dict)   # 'cpu' / 'cuda:N' → bytes available
    cpu_cores: int = 1
    target: bool = False                          # described by --target-devices, not detected

    def has(self, device: str) -> bool:
        return device in self.devices


def physical_cores() -> int:
    try:
        import psutil
        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except Exception:
        return os.cpu_count() or 1


def detect_machine() -> Machine:
    import psutil
    import torch
    m = Machine(devices={"cpu": psutil.virtual_memory().available}, cpu_cores=physical_cores())
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, _total = torch.cuda.mem_get_info(i)
            m.devices[f"cuda:{i}"] = free
    return m


def parse_targets(text: str) -> Machine:
    """'cuda:0=80GiB,cpu=125GiB[,cores=16]' → Machine: validate for another machine (CI has no GPU)."""
    from .plan import normalize_device
    m = Machine(cpu_cores=physical_cores(), target=True)
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise UsageError(f"bad --target-devices entry {part!r}", "write DEVICE=SIZE, e.g. cuda:0=80GiB,cpu=125GiB")
        key, size = part.split("=", 1)
        if key.strip() == "cores":
            m.cpu_cores = int(size)
            continue
        dev = normalize_device(key)
        if dev is None:
            raise UsageError(f"unknown device {key!r} in --target-devices", "devices are cpu, cuda, cuda:N")
        m.devices[dev] = parse_size(size)
    if "cpu" not in m.devices:
        raise UsageError("--target-devices must include cpu=SIZE", "e.g. cuda:0=80GiB,cpu=125GiB")
    return m
