"""Fast paths of the Gated CNN block, each beside the plain PyTorch it must equal, and their switches.

`cpu`: CPU inference, on by default (measured faster). `gated_dwconv`: Triton kernels for CUDA, opt-in
(`set_fused_kernels(True)`, `--fused-kernels`, MAMBAOUT_FUSED_KERNELS=1) until measured correct and faster on a GPU.
`GatedCNNBlock` dispatches on the device it was built or moved to, so tracing and scripting see the plain graph;
`reference_mode()` forces the plain forward everywhere. docs/performance.md explains each path.
"""

from __future__ import annotations

import contextlib
import os

# fx_tracing(): whether `torch.fx.symbolic_trace` (torchvision's and timm's feature extractors included) is tracing now
try:  # torch >= 2.6; the older name logs a warning on every call in newer releases
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as fx_tracing
except ImportError:  # pragma: no cover - older torch
    from torch.fx._symbolic_trace import is_fx_tracing as fx_tracing

__all__ = [
    "fastpath_enabled",
    "fused_kernels_enabled",
    "set_fused_kernels",
    "fused_kernels",
    "reference_mode",
    "triton_interpreting",
    "fx_tracing",
]

# MAMBAOUT_FASTPATH=0 turns every fast path off for the process; MAMBAOUT_FUSED_KERNELS=1 opts in to the Triton ones.
_ENABLED = os.environ.get("MAMBAOUT_FASTPATH", "1") != "0"
_FUSED = os.environ.get("MAMBAOUT_FUSED_KERNELS", "0") == "1"


def triton_interpreting() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on CPU tensors through Triton's interpreter (slow; for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fastpath_enabled() -> bool:
    """Whether `GatedCNNBlock` may dispatch to a fast path (off under `reference_mode()` or MAMBAOUT_FASTPATH=0)."""
    return _ENABLED


def fused_kernels_enabled() -> bool:
    """Whether CUDA blocks use the Triton kernels (opt-in; see the module docstring)."""
    return _FUSED and _ENABLED


def set_fused_kernels(enabled: bool) -> None:
    """Opt in to (or out of) the fused Triton kernels for CUDA blocks, for the whole process."""
    global _FUSED
    _FUSED = bool(enabled)


@contextlib.contextmanager
def fused_kernels(enabled: bool = True):
    """`set_fused_kernels(enabled)` inside this context only."""
    before = _FUSED
    set_fused_kernels(enabled)
    try:
        yield
    finally:
        set_fused_kernels(before)


@contextlib.contextmanager
def reference_mode():
    """Run every block through its plain PyTorch forward inside this context."""
    global _ENABLED
    before, _ENABLED = _ENABLED, False
    try:
        yield
    finally:
        _ENABLED = before
