"""Devices: the one resolver of a user's `--device`, and the names benchmarks print beside their numbers."""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path

import torch


def resolve_device(name: str | None):
    """A `torch.device` from a user's `--device` (None: cuda when available), checked to exist on this machine
    (ValueError: an unknown device type, or CUDA/MPS asked for where torch sees none)."""
    if name is None or name == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} asked for, but torch sees no CUDA device here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():  # torch.backends.mps: torch >= 1.12
            raise ValueError(f"--device {name} asked for, but MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {name!r}; use cpu, cuda or cuda:N")
    return dev


def autocast(device: torch.device, dtype: torch.dtype | None):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def autocast_setting(amp: str, device: torch.device) -> tuple[str, torch.dtype | None]:
    """The one reading of an `--amp` value on a device: `auto` is bf16 autocast on CUDA and full precision
    elsewhere; returns the setting's name (`none`, `bf16`, `fp16`) and its autocast dtype (None: no autocast)."""
    name = ("bf16" if device.type == "cuda" else "none") if amp == "auto" else amp
    return name, {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def cpu_name() -> str:
    """The CPU model, e.g. `'AMD EPYC 7B13'` (from /proc/cpuinfo; `platform.processor()` elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (`flags`, or `Features` on ARM, in /proc/cpuinfo); empty where they cannot be read."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                return frozenset(value.split())
    return frozenset()


def device_name(device: torch.device) -> str:
    """`'NVIDIA H100 80GB HBM3'`, or the CPU model with the thread count torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"
