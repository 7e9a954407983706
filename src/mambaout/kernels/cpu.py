"""CPU inference path of the Gated CNN block: oneDNN matmuls with fused epilogues and no copies.

Profiling timm's `mambaout_tiny` on a 2-core AMD EPYC (float32, batch 16, torch 2.14) shows where the time goes:
`addmm` (MKL) 46%, then `copy_` (the strided conv input), GELU, `torch.cat`, the product and the residual add, each
a full pass over a large fresh tensor. Freshly allocated tensors above glibc's mmap threshold (32 MiB at most) are
returned to the kernel on free, so every such pass also pays page faults on new memory. This path:

1. runs `fc1` as three row blocks of its weight, `g`, `i` and `c`, each into its own contiguous tensor: the conv
   reads `c` in place (no strided copy) and the concatenation is never built;
2. runs every matmul through oneDNN (2-3x faster than MKL's `addmm` at these shapes here), with the activation
   fused into `g`'s matmul and the residual add fused into `fc2`'s;
3. forms the gate product in place in `g`'s tensor.

`GatedCNNBlock._forward_reference` (model.py) is the plain forward; `tests/test_fastpath.py` holds the two equal.
The weights are passed as they are, every call: pre-packing them into oneDNN's blocked layout (and caching that)
measured no faster per block (batch 1 and 16, all four stage shapes), and a cache could go stale when weights are
changed through `.data`, which bypasses the version counter.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["onednn_available", "can_use_cpu_fastpath", "gated_block_inference"]

# Activation module -> (oneDNN post-op, its algorithm). Anything else runs as its own module after the matmul.
_POST_OPS = {nn.ReLU: ("relu", ""), nn.SiLU: ("swish", "")}


def onednn_available() -> bool:
    """Whether this torch build has oneDNN with the fused linear op this path needs."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_ONEDNN = onednn_available()


def _linear(
    x: torch.Tensor, lin: nn.Linear, rows: tuple[int, int] | None = None, post_op: tuple[str, str] = ("none", "")
) -> torch.Tensor:
    """`lin(x)` restricted to output rows `rows`, with an optional fused activation; `[..., K]` -> `[..., rows]`."""
    rows = rows or (0, lin.out_features)
    weight = lin.weight[rows[0] : rows[1]].contiguous()  # a row block of a contiguous weight: a view, no copy
    bias = lin.bias[rows[0] : rows[1]] if lin.bias is not None else None
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, post_op[0], [], post_op[1])


def _post_op(act: nn.Module) -> tuple[str, str] | None:
    if type(act) is nn.GELU:
        return ("gelu", act.approximate)  # oneDNN's "none" is the exact erf GELU, "tanh" the approximation
    return _POST_OPS.get(type(act))


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def can_use_cpu_fastpath(block: nn.Module, x: torch.Tensor) -> bool:
    """Whether `gated_block_inference` may replace the block's reference forward for this input.

    Only for float32 CPU tensors outside autocast, with autograd off (under `no_grad` / `inference_mode`), outside
    tracing, export and compilation (those see the reference graph), and when nobody hooks `fc1`/`fc2` (e.g. the
    MAC counter), because this path calls their weights directly instead of the modules.
    """
    return (
        _ONEDNN
        and not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")  # autocast decides dtypes op by op; the reference keeps that
        and x.ndim == 4
        and block.fc1.weight.dtype == torch.float32
        and not torch.jit.is_scripting()
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and not _exporting()
        and type(x) is torch.Tensor  # fake/functional tensors mean someone traces the graph: show the reference
        and not (_hooked(block.fc1) or _hooked(block.fc2) or _global_hooks())
    )


def _exporting() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting and is_exporting())


def _global_hooks() -> bool:
    from torch.nn.modules import module

    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


def gated_block_inference(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The same block for inference on CPU (see the module docstring); `[B, H, W, C]` -> `[B, H, W, C]`."""
    hidden, cc = block.hidden, block.conv_channels
    xn = block.norm(x)  # [B, H, W, C]
    post_op = _post_op(block.act)
    g = _linear(xn, block.fc1, (0, hidden), post_op or ("none", ""))  # [B, H, W, hidden], activated if fused
    if post_op is None:
        g = block.act(g)
    c = _linear(xn, block.fc1, (2 * hidden - cc, 2 * hidden))  # [B, H, W, Cc], contiguous
    c = block.conv(c.permute(0, 3, 1, 2))  # [B, H, W, Cc] -> [B, Cc, H, W], a channels-last view: no copy
    g[..., hidden - cc :].mul_(c.permute(0, 2, 3, 1))  # [B, Cc, H, W] -> [B, H, W, Cc]
    if hidden > cc:
        g[..., : hidden - cc].mul_(_linear(xn, block.fc1, (hidden, 2 * hidden - cc)))  # the identity channels i
    if isinstance(block.ls, nn.Identity) and isinstance(block.drop_path, nn.Identity):
        # x + fc2(gate) in one oneDNN call: the residual add is the matmul's epilogue.
        w2 = block.fc2.weight.contiguous()
        return torch.ops.mkldnn._linear_pointwise.binary(g, x.contiguous(), w2, block.fc2.bias, "add")
    return x + block.drop_path(block.ls(_linear(g, block.fc2)))
