"""Fast paths of the Gated CNN block, each beside the plain PyTorch it must equal.

- `cpu`: float32 inference on CPU through oneDNN (chosen automatically under `no_grad` / `inference_mode`).
- `gated_dwconv`: Triton kernels for CUDA fusing the depthwise conv with the gate, forward and backward
  (chosen automatically on CUDA for GELU/SiLU blocks, training included).

`GatedCNNBlock.forward` dispatches; `reference_mode()` forces the plain forward everywhere (for comparisons).
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["fastpath_enabled", "reference_mode", "triton_interpreting"]

# MAMBAOUT_FASTPATH=0 turns every fast path off for the process.
_ENABLED = os.environ.get("MAMBAOUT_FASTPATH", "1") != "0"


def triton_interpreting() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on CPU tensors through Triton's interpreter (slow; for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fastpath_enabled() -> bool:
    """Whether `GatedCNNBlock` may dispatch to a fast path (off under `reference_mode()` or MAMBAOUT_FASTPATH=0)."""
    return _ENABLED


@contextlib.contextmanager
def reference_mode():
    """Run every block through its plain PyTorch forward inside this context."""
    global _ENABLED
    before, _ENABLED = _ENABLED, False
    try:
        yield
    finally:
        _ENABLED = before
