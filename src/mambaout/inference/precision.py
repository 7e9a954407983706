"""Inference dtype on CPU: `--dtype bf16` where the CPU has bf16 arithmetic (AVX512-BF16, AMX-BF16, Arm BF16); where
PyTorch would emulate it through fp32 (slower than fp32 itself) fp32 runs, said in one line, unless `allow_emulated`.

bf16 converts the weights once and feeds bf16 images (`LowPrecision`) instead of autocast, which casts every weight
again on each forward (a large share of the work at batch 1). LayerNorm still accumulates in fp32; logits are fp32.
"""

from __future__ import annotations

import functools
import sys

import torch
from torch import nn

from mambaout.utils.device import cpu_flags, cpu_name

__all__ = ["DTYPES", "cpu_bf16_support", "resolve_dtype", "LowPrecision", "with_dtype"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# /proc/cpuinfo flags that mean native bf16 arithmetic: x86 (AVX512-BF16, AMX-BF16), Arm (FEAT_BF16)
_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


@functools.lru_cache(maxsize=1)
def cpu_bf16_support() -> tuple[bool, str]:
    """(whether this CPU does bf16 arithmetic natively, a few words naming the CPU and what it has)."""
    model, flags = cpu_name(), cpu_flags()
    found = [f for f in _BF16_FLAGS if f in flags]
    if found:
        return True, f"{model} ({', '.join(found)})"
    isa = torch.backends.cpu.get_cpu_capability()
    if not flags:
        return False, f"{model} ({isa}; cannot read its feature flags)"
    return False, f"{model} ({isa}, no AVX512-BF16 or AMX)"


def resolve_dtype(dtype: str, device: torch.device | str = "cpu", allow_emulated: bool = False) -> tuple[str, str]:
    """The dtype to run (`'fp32'` or `'bf16'`) for the one asked for, and a one-line note when they differ: CUDA runs
    bf16 as asked, a CPU without bf16 arithmetic runs fp32 unless `allow_emulated`. ValueError for an unknown dtype."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if dtype == "fp32" or torch.device(device).type != "cpu" or allow_emulated:
        return dtype, ""
    native, cpu = cpu_bf16_support()
    if native:
        return dtype, ""
    return "fp32", f"bf16 asked for, but this CPU, {cpu}, has no bf16 arithmetic (it would be emulated, slower): fp32"


class LowPrecision(nn.Module):
    """`model` with its weights in `dtype`: images are cast to `dtype` on the way in, logits to fp32 on the way out;
    other attributes are the wrapped model's."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.model = model.to(dtype)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype)).float()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":  # not set yet: no recursion into ourselves
                raise
            return getattr(self.model, name)  # model_name, pretrained_cfg, class_names, num_classes ...


def with_dtype(model: nn.Module, dtype: str) -> nn.Module:
    """`model` itself for fp32, else `LowPrecision(model, dtype)` (weights converted in place)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return model if dtype == "fp32" else LowPrecision(model, DTYPES[dtype])


def note(message: str, prog: str) -> None:
    """Print a fall-back note (one line on stderr) when there is one."""
    if message:
        print(f"{prog}: {message}", file=sys.stderr)
