"""CPU inference path of the Gated CNN block: fused epilogues, no copies, the faster matmul library per shape.

Profiling timm's `mambaout_tiny` on a 2-core AMD EPYC (float32, batch 16, torch 2.14) shows where the time goes:
`addmm` (MKL) 46%, then `copy_` (the strided conv input), GELU, `torch.cat`, the product and the residual add, each
a full pass over a large fresh tensor. Freshly allocated tensors above glibc's mmap threshold (32 MiB at most) are
returned to the kernel on free, so every such pass also pays page faults on new memory. This path:

1. runs `fc1` as three row blocks of its weight, `g`, `i` and `c`, each into its own contiguous tensor: the conv
   reads `c` in place (no strided copy) and the concatenation is never built;
2. fuses what it can around the matmuls: the activation into `g`'s, the residual add into `fc2`'s;
3. forms the gate product in place in `g`'s tensor.

Which matmul library is faster depends on the CPU, not only on the shape: on one 2-core AMD EPYC, oneDNN ran these
shapes 2-3x faster than MKL's `addmm`; on another (Zen 3), `addmm` was 5-30% faster at batch 1 and oneDNN faster
only for a few wide batch-16 shapes. So the block has two implementations of the same steps, `"onednn"`
(`mkldnn._linear_pointwise` with fused GELU/ReLU/SiLU and residual-add epilogues) and `"blas"` (`torch.addmm`,
in-place activation and bias), and by default (`"auto"`) it times both on the first call for each block shape
(rows, width, hidden, conv channels, threads) and keeps the faster one for that shape, as cuDNN's benchmark mode
does; `set_cpu_matmul("onednn" | "blas" | "auto")` or MAMBAOUT_CPU_MATMUL picks one for the process, and
`cpu_matmul_choices()` shows what was chosen. Both are held equal to the plain forward by `tests/test_fastpath.py`.

`GatedCNNBlock._forward_reference` (models/mambaout.py) is the plain forward. The weights are passed as they are,
every call: pre-packing them into oneDNN's blocked layout (and caching that) measured no faster per block (batch 1
and 16, all four stage shapes), and a cache could go stale when weights are changed through `.data`, which bypasses
the version counter.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
import weakref

import torch
from torch import nn

from mambaout.utils import device

__all__ = [
    "onednn_available",
    "can_use_cpu_fastpath",
    "gated_block_inference",
    "MATMUL_CHOICES",
    "set_cpu_matmul",
    "cpu_matmul",
    "cpu_matmul_choices",
    "forget_cpu_matmul_choices",
    "set_cpu_bf16",
    "cpu_bf16_enabled",
    "can_use_cpu_conv",
    "conv_channels_last",
]

MATMUL_CHOICES = ("auto", "onednn", "blas")

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


def _bf16_default() -> bool:
    """bf16 blocks take this path by default only on the CPUs it was measured faster on: AVX512-BF16 without AMX
    (AMD EPYC family 26, two threads: 1.19x the plain bf16 block at batch 1, 2.39x at batch 32; docs/performance.md).
    Elsewhere opt-in (MAMBAOUT_CPU_BF16=1); MAMBAOUT_CPU_BF16=0 turns it off."""
    env = os.environ.get("MAMBAOUT_CPU_BF16", "").strip()
    if env in ("0", "1"):
        return env == "1"
    flags = device.cpu_flags()
    return "avx512_bf16" in flags and "amx_bf16" not in flags


_BF16 = _bf16_default()


def set_cpu_bf16(enabled: bool) -> None:
    """Whether bf16 blocks (bf16 weights and inputs) run this fast path too, for the whole process."""
    global _BF16
    _BF16 = bool(enabled)


def cpu_bf16_enabled() -> bool:
    """Whether bf16 blocks take the fast path (`set_cpu_bf16`, MAMBAOUT_CPU_BF16, else the CPU rule above)."""
    return _BF16


def _inference_ok(x: torch.Tensor, dtype: torch.dtype, modules: tuple[nn.Module, ...]) -> bool:
    """What both fast paths need: a plain 4-D CPU tensor of the weights' dtype (float32; bf16 after
    `set_cpu_bf16(True)`), autograd off, no autocast, no tracing, export or compilation (those see the reference
    graph), and no hooks on `modules` or global ones (e.g. the MAC counter), because the paths call their weights."""
    return (
        not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype == dtype
        and (dtype == torch.float32 or (_BF16 and dtype == torch.bfloat16))
        and not torch.is_autocast_enabled("cpu")  # autocast decides dtypes op by op; the reference keeps that
        and x.ndim == 4
        and not torch.jit.is_scripting()
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and not _exporting()
        and type(x) is torch.Tensor  # fake/functional tensors mean someone traces the graph: show the reference
        and not (any(_hooked(m) for m in modules) or _global_hooks())
    )


def can_use_cpu_fastpath(block: nn.Module, x: torch.Tensor) -> bool:
    """Whether `gated_block_inference` may replace the block's reference forward for this input: oneDNN is there,
    and `_inference_ok` for `fc1` and `fc2` (under `no_grad` / `inference_mode`, float32 or enabled bf16)."""
    return _ONEDNN and _inference_ok(x, block.fc1.weight.dtype, (block.fc1, block.fc2))


def _exporting() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting and is_exporting())


def _global_hooks() -> bool:
    from torch.nn.modules import module

    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


_CL_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # conv -> (weight key, channels-last copy)


def can_use_cpu_conv(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether `conv_channels_last` may replace `conv(x)`: `_inference_ok` for the conv."""
    return _inference_ok(x, conv.weight.dtype, (conv,))


def conv_channels_last(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` in channels-last memory: the input made channels-last (a no-op for the permuted channels-last
    views between stages), the weight held in channels-last memory, the layout oneDNN reads at once for that input.
    Given the plain weight, oneDNN reorders it on every call: 1.4 of the 1.75 ms of femto's last downsampling conv at
    batch 1 (one thread, AMD EPYC family 26). The copy is kept per conv and made again when the weight's storage,
    version (any in-place change but one through `.data`), dtype or shape changes."""
    w = conv.weight
    key = (w.data_ptr(), w._version, w.dtype, w.shape)
    cached = _CL_WEIGHTS.get(conv)
    if cached is None or cached[0] != key:
        cached = (key, w.detach().contiguous(memory_format=torch.channels_last))
        _CL_WEIGHTS[conv] = cached
    return conv._conv_forward(x.contiguous(memory_format=torch.channels_last), cached[1], conv.bias)


def _gated_onednn(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block through oneDNN matmuls with fused epilogues; `[B, H, W, C]` -> `[B, H, W, C]`."""
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
    if _plain_residual(block):
        # x + fc2(gate) in one oneDNN call: the residual add is the matmul's epilogue.
        w2 = block.fc2.weight.contiguous()
        return torch.ops.mkldnn._linear_pointwise.binary(g, x.contiguous(), w2, block.fc2.bias, "add")
    return x + block.drop_path(block.ls(_linear(g, block.fc2)))


def _addmm(x2d: torch.Tensor, lin: nn.Linear, rows: tuple[int, int]) -> torch.Tensor:
    """`lin(x2d)` restricted to output rows `rows` through BLAS; `[N, K]` -> `[N, rows]`, contiguous."""
    weight = lin.weight[rows[0] : rows[1]].t()  # a transposed view: BLAS reads it in place
    if lin.bias is None:
        return torch.mm(x2d, weight)
    return torch.addmm(lin.bias[rows[0] : rows[1]], x2d, weight)


def _gated_blas(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The same steps through `torch.addmm` (MKL or OpenBLAS), activation and bias in place; `[B, H, W, C]` in and out."""
    hidden, cc = block.hidden, block.conv_channels
    B, H, W, C = x.shape
    xn = block.norm(x).reshape(-1, C)  # [BHW, C]
    g = _addmm(xn, block.fc1, (0, hidden))  # [BHW, hidden]
    if type(block.act) is nn.GELU:
        torch.ops.aten.gelu_(g, approximate=block.act.approximate)
    else:
        g = block.act(g)
    c = _addmm(xn, block.fc1, (2 * hidden - cc, 2 * hidden)).view(B, H, W, cc)
    c = block.conv(c.permute(0, 3, 1, 2))  # a channels-last view: no copy
    g = g.view(B, H, W, hidden)
    g[..., hidden - cc :].mul_(c.permute(0, 2, 3, 1))
    if hidden > cc:
        g[..., : hidden - cc].mul_(_addmm(xn, block.fc1, (hidden, 2 * hidden - cc)).view(B, H, W, hidden - cc))
    g = g.view(-1, hidden)
    w2, b2 = block.fc2.weight.t(), block.fc2.bias
    if _plain_residual(block):
        out = torch.addmm(x.reshape(-1, C), g, w2)  # x + g @ W2^T: the residual is addmm's input term
        if b2 is not None:
            out.add_(b2)
        return out.view(B, H, W, C)
    y = torch.addmm(b2, g, w2) if b2 is not None else torch.mm(g, w2)
    return x + block.drop_path(block.ls(y.view(B, H, W, C)))


def _plain_residual(block: nn.Module) -> bool:
    return isinstance(block.ls, nn.Identity) and isinstance(block.drop_path, nn.Identity)


_IMPLS = {"onednn": _gated_onednn, "blas": _gated_blas}
_MODE = os.environ.get("MAMBAOUT_CPU_MATMUL", "auto").strip().lower() or "auto"
if _MODE not in MATMUL_CHOICES:
    warnings.warn(f"MAMBAOUT_CPU_MATMUL={_MODE!r} is not one of {', '.join(MATMUL_CHOICES)}: using auto", stacklevel=1)
_CHOSEN: dict[tuple, str] = {}  # block shape -> the implementation measured faster for it (auto mode)
_MAX_SHAPES = 512  # beyond this many distinct shapes, new ones run "onednn" without timing
_LOCK = threading.Lock()


def set_cpu_matmul(mode: str) -> None:
    """Which matmul library the CPU fast path uses: "auto" (time both per block shape, keep the faster), "onednn",
    or "blas" (`torch.addmm`). For the whole process; MAMBAOUT_CPU_MATMUL sets the starting value."""
    global _MODE
    if mode not in MATMUL_CHOICES:
        raise ValueError(f"cpu matmul {mode!r}: expected one of {', '.join(MATMUL_CHOICES)}")
    _MODE = mode


def cpu_matmul() -> str:
    """The mode `set_cpu_matmul` / MAMBAOUT_CPU_MATMUL set (an unknown value in the variable reads as "auto")."""
    return _MODE if _MODE in MATMUL_CHOICES else "auto"


def cpu_matmul_choices() -> dict[tuple, str]:
    """What "auto" chose so far: (rows, dim, hidden, conv channels, act, threads, dtype) -> "onednn" | "blas"."""
    with _LOCK:
        return dict(_CHOSEN)


def forget_cpu_matmul_choices() -> None:
    """Drop what "auto" chose, so the next call of each shape times both libraries again."""
    with _LOCK:
        _CHOSEN.clear()


def _shape_key(block: nn.Module, x: torch.Tensor) -> tuple:
    rows = x.numel() // x.shape[-1]
    act = type(block.act).__name__
    return (rows, x.shape[-1], block.hidden, block.conv_channels, act, torch.get_num_threads(), str(x.dtype))


def _time_impls(block: nn.Module, x: torch.Tensor, repeats: int = 4) -> str:
    """Run each implementation once to warm up, then `repeats` times interleaved; the one with the lower minimum.

    The minimum, not the median: other processes only ever add time to a run, so the fastest run of each is the
    closest to its own speed (chosen under load by the median, "blas" won shapes where oneDNN is 2-3x faster alone).
    """
    times: dict[str, list[float]] = {name: [] for name in _IMPLS}
    with torch.random.fork_rng(devices=[]):  # drop path in train mode draws numbers: the timed runs leave no trace
        for impl in _IMPLS.values():
            impl(block, x)
        for _ in range(repeats):
            for name, impl in _IMPLS.items():
                start = time.perf_counter()
                impl(block, x)
                times[name].append(time.perf_counter() - start)
    return min(times, key=lambda name: min(times[name]))


def gated_block_inference(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The same block for inference on CPU (see the module docstring); `[B, H, W, C]` -> `[B, H, W, C]`."""
    mode = cpu_matmul()
    if mode == "auto":
        key = _shape_key(block, x)
        mode = _CHOSEN.get(key)
        if mode is None:
            mode = _time_impls(block, x) if len(_CHOSEN) < _MAX_SHAPES else "onednn"
            with _LOCK:
                _CHOSEN.setdefault(key, mode)
    return _IMPLS[mode](block, x)
