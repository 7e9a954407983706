"""CPU inference path of the Gated CNN block: fused epilogues, no copies, the faster matmul library per shape.

`GatedCNNBlock._forward_reference` (models/mambaout.py) defines the math; this path computes the same (within 1e-5,
`tests/test_fastpath.py`) with fewer passes over memory: `fc1` runs as row blocks of its weight (views, so in-place
changes show at once), the activation and the residual add are fused into the matmuls, the conv reads its channels
in place, and the gate product is formed in place; no `torch.cat`. Implementations of these steps, `"onednn"`
(`mkldnn._linear_pointwise` with fused epilogues), `"blas"` (`torch.addmm`) and, where the C kernels are on,
`"native"` (their `linear`), are timed on the first call for each block shape and the fastest kept (`"auto"`;
`set_cpu_matmul` or MAMBAOUT_CPU_MATMUL fix one): which is faster depends on the CPU. The block's linear and conv
weights are packed for oneDNN once per input shape and weight version (a write through `.data` is not seen:
`forget_packed_weights`). A stage runs its blocks from plans (`stage_plans` /
`run_stage`), with the checks once per stage. Where the C kernels are on (`set_cpu_native`, kernels/native.py), the
conv and both gate products run as one C call, and the norms in C. Measurements and the reasons for each choice:
docs/performance.md.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading
import time
import warnings
import weakref

import torch
from torch import nn

from mambaout.kernels import native
from mambaout.utils import device

__all__ = [
    "onednn_available",
    "can_use_cpu_fastpath",
    "gated_block_inference",
    "stage_plans",
    "run_stage",
    "MATMUL_CHOICES",
    "set_cpu_matmul",
    "cpu_matmul",
    "cpu_matmul_choices",
    "forget_cpu_matmul_choices",
    "set_cpu_bf16",
    "cpu_bf16_enabled",
    "set_cpu_native",
    "cpu_native_enabled",
    "set_cpu_pack_convs",
    "cpu_pack_convs_enabled",
    "can_use_cpu_conv",
    "conv_channels_last",
    "outer_norm",
    "outer_linear",
    "forget_packed_weights",
]

MATMUL_CHOICES = ("auto", "onednn", "blas", "native")

# Activation module -> (oneDNN post-op, its algorithm). Anything else runs as its own module after the matmul.
_POST_OPS = {nn.ReLU: ("relu", ""), nn.SiLU: ("swish", "")}


def onednn_available() -> bool:
    """Whether this torch build has oneDNN with the fused linear op this path needs."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_ONEDNN = onednn_available()


def _post_op(act: nn.Module) -> tuple[str, str] | None:
    if type(act) is nn.GELU:
        return ("gelu", act.approximate)  # oneDNN's "none" is the exact erf GELU, "tanh" the approximation
    return _POST_OPS.get(type(act))


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _default(env: str, needs: str) -> bool:
    """`env`=1 or 0, else on only where measured faster: CPUs with the instruction set `needs` and without AMX
    (docs/performance.md). The bf16 blocks (MAMBAOUT_CPU_BF16) were measured on AVX512-BF16 (AMD Zen 5); the C
    kernels (MAMBAOUT_CPU_NATIVE) and the packed stem and downsampling convs (MAMBAOUT_CPU_PACK_CONVS) there and on
    AVX-512 without BF16 (Intel Ice Lake). Each is opt-in on other CPUs (AMX, AVX2 only), where it is not measured."""
    value = os.environ.get(env, "").strip()
    if value in ("0", "1"):
        return value == "1"
    flags = device.cpu_flags()
    return needs in flags and "amx_bf16" not in flags


_BF16 = _default("MAMBAOUT_CPU_BF16", "avx512_bf16")
_NATIVE = _default("MAMBAOUT_CPU_NATIVE", "avx512f")
_PACK_CONVS = _default("MAMBAOUT_CPU_PACK_CONVS", "avx512f")  # the stem's and downsampling layers' convs


def set_cpu_bf16(enabled: bool) -> None:
    """Whether bf16 blocks (bf16 weights and inputs) run this fast path too, for the whole process."""
    global _BF16
    _BF16 = bool(enabled)


def cpu_bf16_enabled() -> bool:
    """Whether bf16 blocks take the fast path (`set_cpu_bf16`, MAMBAOUT_CPU_BF16, else the CPU rule above)."""
    return _BF16


def set_cpu_native(enabled: bool) -> None:
    """Whether the fast path runs the conv and gate products through the C kernel (`kernels/native.py`, compiled on
    first use), for the whole process; where it cannot be built, the oneDNN steps run, with a warning."""
    global _NATIVE
    _NATIVE = bool(enabled)


def cpu_native_enabled() -> bool:
    """Whether the C kernel is asked for (`set_cpu_native`, MAMBAOUT_CPU_NATIVE, else the CPU rule above)."""
    return _NATIVE


def set_cpu_pack_convs(enabled: bool) -> None:
    """Whether the stem's and downsampling layers' convs run on weights packed by oneDNN (`conv_channels_last`),
    for the whole process."""
    global _PACK_CONVS
    _PACK_CONVS = bool(enabled)


def cpu_pack_convs_enabled() -> bool:
    """Whether those convs run packed (`set_cpu_pack_convs`, MAMBAOUT_CPU_PACK_CONVS, else the CPU rule above)."""
    return _PACK_CONVS


def _inference_ok(x: torch.Tensor, dtype: torch.dtype, modules: tuple[nn.Module, ...], ndim: int | None = 4) -> bool:
    """What the fast paths need: a plain CPU tensor of `ndim` dimensions (any for None) and the weights' dtype
    (float32; bf16 after `set_cpu_bf16(True)`), autograd off, no autocast, no tracing, export or compilation (those
    see the reference graph), and no hooks on `modules` or global ones (e.g. the MAC counter), because the paths call
    their weights."""
    return (
        not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype == dtype
        and (dtype == torch.float32 or (_BF16 and dtype == torch.bfloat16))
        and not torch.is_autocast_enabled("cpu")  # autocast decides dtypes op by op; the reference keeps that
        and (ndim is None or x.ndim == ndim)
        and not torch.jit.is_scripting()
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and not _exporting()
        and type(x) is torch.Tensor  # fake/functional tensors mean someone traces the graph: show the reference
        and not (any(_hooked(m) for m in modules) or _global_hooks())
    )


def can_use_cpu_fastpath(block: nn.Module, x: torch.Tensor) -> bool:
    """Whether `gated_block_inference` may replace the block's reference forward for this input: oneDNN is there,
    and `_inference_ok` for the block's modules (under `no_grad` / `inference_mode`, float32 or enabled bf16, none of
    the norm, linears, activation, conv, LayerScale and drop path hooked, e.g. by the MAC counter)."""
    return _ONEDNN and _inference_ok(x, block.fc1.weight.dtype, _parts(block))


def _exporting() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting and is_exporting())


def _global_hooks() -> bool:
    from torch.nn.modules import module

    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


_CL_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # conv -> (key, channels-last or packed weight)
_CAN_PACK = _ONEDNN and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight")
_CAN_PACK_LINEAR = _ONEDNN and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def can_use_cpu_conv(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether `conv_channels_last` may replace `conv(x)`: `_inference_ok` for the conv."""
    return _inference_ok(x, conv.weight.dtype, (conv,))


def outer_norm(norm: nn.Module, x: torch.Tensor, act: nn.Module | None = None) -> torch.Tensor | None:
    """`norm(x)` (`act(norm(x))` with an exact GELU `act`: the stem's) over the last dimension (channels) outside the
    blocks (the stem's, the downsampling layers' and the head's norms), or None where this does not apply (the caller
    runs the modules): through the C kernel where it is on (float32 or bf16; the GELU in the same pass), else for bf16
    maps of fewer than 32 channels (femto's and kobe's stem) through float32, within one bf16 rounding of it: torch's
    bf16 LayerNorm runs rows shorter than a few vector registers at a third of the speed."""
    if not (type(norm) is nn.LayerNorm and norm.weight is not None and x.dtype in (torch.float32, torch.bfloat16)):
        return None
    if act is not None and not (type(act) is nn.GELU and act.approximate == "none"):
        return None
    modules = (norm,) if act is None else (norm, act)
    if norm.normalized_shape != x.shape[-1:] or not _inference_ok(x, norm.weight.dtype, modules, ndim=None):
        return None
    if _native_norm(x):
        return native.layer_norm(x, *_f32_params(norm, norm.weight, norm.bias), norm.eps, gelu=act is not None)
    if x.dtype != torch.bfloat16 or x.shape[-1] >= 32:
        return None
    y = x.to(torch.float32, memory_format=torch.contiguous_format)  # one pass: layout and dtype
    bias = norm.bias.float() if norm.bias is not None else None
    y = torch.layer_norm(y, norm.normalized_shape, norm.weight.float(), bias, norm.eps).to(x.dtype)
    return y if act is None else act(y)


_LINEARS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # linear -> (key, `native.pack_linear` result)


def outer_linear(lin: nn.Module, x: torch.Tensor, act: nn.Module | None = None) -> torch.Tensor | None:
    """`act(lin(x))` over the last dimension for the classifier head's linears, or None where this does not apply
    (the caller runs the modules): through the C matmul (`native.linear`) where the C kernels are on, float32 or bf16
    (an even number of inputs), with the exact GELU (`act`, if any) in its store. Its weight is packed once per
    version, as the blocks' are (`_native_linears`); one made under `torch.inference_mode` has no version, so the
    modules run it. Within float rounding of the modules (another summation order)."""
    if type(lin) is not nn.Linear or not (act is None or (type(act) is nn.GELU and act.approximate == "none")):
        return None
    w, b = lin.weight, lin.bias
    modules = (lin,) if act is None else (lin, act)
    if not _inference_ok(x, w.dtype, modules, ndim=None):  # first: no C library under compilation or export
        return None
    if w.is_inference() or (b is not None and b.is_inference()) or x.shape[-1] != lin.in_features:
        return None
    if (w.dtype == torch.bfloat16 and x.shape[-1] % 2) or not (_NATIVE and native.library() is not None):
        return None
    key = (_key(w), None if b is None else _key(b))
    packed = _derived(_LINEARS, lin, key, lambda: native.pack_linear(w, b))
    return native.linear(x.contiguous(), *packed, gelu=act is not None)


def _native_norm(x: torch.Tensor) -> bool:
    """Whether `native.layer_norm` takes this map: the C kernels on and built, contiguous, not too many channels."""
    return _NATIVE and x.is_contiguous() and x.shape[-1] <= native.NORM_MAX_CHANNELS and native.library() is not None


_F32: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # norm -> (key, float32 weight, float32 bias)


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.detach().float().contiguous() if t is not None else None


def _f32_params(norm: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    """A norm's weight and bias as the C kernel reads them, float32 and contiguous: themselves when they are; else
    copies kept per norm and made again when a tensor or its version changes (at every call for inference tensors)."""
    tensors = (weight,) if bias is None else (weight, bias)
    if all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors):
        return weight, bias
    if any(t.is_inference() for t in tensors):
        return _f32(weight), _f32(bias)
    return _derived(_F32, norm, tuple(map(_key, tensors)), lambda: (_f32(weight), _f32(bias)))


def _native_conv(conv: nn.Conv2d) -> bool:
    """Whether `conv` is what `native.gate_dwconv` computes: depthwise, square odd kernel, padding k // 2, stride 1."""
    weight, _, padding, stride, dilation, groups = _conv_args(conv)
    cc, one, k, k2 = weight.shape
    square = one == 1 and k == k2 and k % 2 == 1 and groups == cc == conv.in_channels
    return square and padding == [k // 2] * 2 and stride == [1, 1] and dilation == [1, 1]


def _conv_args(conv: nn.Conv2d) -> tuple | None:
    """(weight, bias, padding, stride, dilation, groups) of a plain zero-padded `nn.Conv2d`, else None."""
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    return (conv.weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)


def conv_channels_last(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` for the stem's and downsampling layers' convs, in channels-last memory, input and output, so oneDNN
    neither reorders the weight nor the maps at every call. Where measured faster (`_PACK_CONVS`) through oneDNN on
    the weight packed for the input's shape, within float rounding of the module (another summation order); else on
    a channels-last copy of the weight, bit for bit the module's result. The derived weight is kept per conv and
    made again when the weight's storage, version (any in-place change but one through `.data`), dtype or shape, or
    for a packed one the input's shape, changes; one made under `torch.inference_mode` has no version, so the module
    runs it (on the channels-last input)."""
    w = conv.weight
    x = x.contiguous(memory_format=torch.channels_last)
    if w.is_inference():
        return conv(x)
    args = _conv_args(conv) if _PACK_CONVS and _CAN_PACK else None
    if args is None:
        cl = _derived(_CL_WEIGHTS, conv, _key(w), lambda: w.detach().contiguous(memory_format=torch.channels_last))
        return conv._conv_forward(x, cl, conv.bias)
    _, bias, padding, stride, dilation, groups = args
    packed = _derived(
        _CL_WEIGHTS, conv, (*_key(w), x.shape), lambda: _pack_conv(w, padding, stride, dilation, groups, x.shape)
    )
    return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, padding, stride, dilation, groups, "none", [], "")


def _pack_conv(weight: torch.Tensor, padding, stride, dilation, groups: int, shape) -> torch.Tensor:
    """`weight` reordered by oneDNN for inputs of `shape`, which it would otherwise do at every call."""
    return torch.ops.mkldnn._reorder_convolution_weight(weight.detach(), padding, stride, dilation, groups, list(shape))


def _key(t: torch.Tensor) -> tuple:
    """What a tensor derived from `t` depends on: its storage, version (in-place changes), dtype and shape."""
    return (t.data_ptr(), t._version, t.dtype, t.shape)


def _versions(*tensors: torch.Tensor | None) -> tuple | None:
    """The versions of `tensors` (None entries skipped), or None when one was made under `torch.inference_mode`: it
    has no version counter, so nothing derived from it can be kept."""
    present = [t for t in tensors if t is not None]
    return None if any(t.is_inference() for t in present) else tuple(t._version for t in present)


def _derived(store, owner, key: tuple | None, make):
    """`make()`, kept in `store` (a module's weak dictionary, or a plan's dict) under `owner` while `key` stays the
    same, one entry per owner; made at every call when `key` is None (see `_versions`)."""
    if key is None:
        return make()
    cached = store.get(owner)
    if cached is None or cached[0] != key:
        cached = store[owner] = (key, make())
    return cached[1]


_NO_POST_OP = ("none", "")


class _Plan:
    """One block's tensors as the fast path calls them, so that a call slices, looks up and checks nothing.

    fc1's row blocks `g`, `i`, `c` and `ic` (gate, identity, conv, identity and conv) are views of its weight and
    bias, not copies (`_weights` packs them). `_plan` makes the plan again when one of
    the block's modules is replaced, or a linear or conv weight or bias or the norm's weight gets new storage (`.to()`,
    `.data = ...`, a new Parameter). A norm other than a plain `nn.LayerNorm`, a conv other than a zero-padded
    `nn.Conv2d` and an activation oneDNN cannot fuse run as their modules.
    """

    def __init__(self, block: nn.Module, key: tuple):
        self.key, self.modules = key, key[0]
        norm, fc1, act, conv, fc2, ls, drop_path = self.modules
        self.w1, self.w2 = fc1.weight, fc2.weight  # the Parameters (a new one, or new storage, makes a new plan)
        hidden, cc = self.hidden, self.cc = block.hidden, block.conv_channels
        self.shape = (hidden, cc, type(act).__name__)
        self.norm = (norm.normalized_shape, norm.weight, norm.bias, norm.eps) if type(norm) is nn.LayerNorm else None
        self.g, self.ic = _rows(fc1, 0, hidden), _rows(fc1, hidden, 2 * hidden)  # the gate; the identity and conv
        self.i, self.c = _rows(fc1, hidden, 2 * hidden - cc), _rows(fc1, 2 * hidden - cc, 2 * hidden)
        self.conv = _conv_args(conv)
        self.native = self.conv is not None and _native_conv(conv)  # a conv `native.gate_dwconv` computes
        # what the implementations derive from the weights, by `_derived`: "dwconv" (`_dwconv`), "gate"
        # (`_native_weights`), "onednn" (`_weights`), "native" (`_native_linears`)
        self.derived: dict[str, tuple] = {}
        self.biases = (_param(fc1, "bias"), _param(fc2, "bias"))
        self.fc2 = _rows(fc2, 0, fc2.out_features)
        self.post_op = _post_op(act)
        self.plain = isinstance(ls, nn.Identity) and isinstance(drop_path, nn.Identity)  # the residual add fuses
        # `_gated_native` runs the whole block as one C call (`native.block`): exact GELU, C conv, affine LayerNorm
        exact_gelu = self.post_op == ("gelu", "none")
        self.one_call = self.plain and exact_gelu and self.native and self.norm is not None and norm.weight is not None


def _rows(lin: nn.Linear, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Output rows `lo:hi` of a linear layer, (weight, bias): a row block of a contiguous weight is a view, no copy."""
    bias = lin.bias.detach()[lo:hi] if lin.bias is not None else None
    return lin.weight.detach()[lo:hi].contiguous(), bias


_PART_NAMES = ("norm", "fc1", "act", "conv", "fc2", "ls", "drop_path")
_PLAIN_LAYERS = (nn.Linear, nn.Conv2d, nn.LayerNorm)


def _parts(block: nn.Module) -> tuple[nn.Module, ...]:
    """The block's modules, from its module dict: `nn.Module.__getattr__` costs about 1 µs a name, and a forward
    checks every block's parts (`_plan`)."""
    parts = tuple(map(block._modules.get, _PART_NAMES))
    return parts if None not in parts else tuple(getattr(block, name) for name in _PART_NAMES)


def _param(m: nn.Module, name: str) -> torch.Tensor | None:
    """`getattr(m, name, None)` for a weight or bias: the plain torch layers' straight from their parameter dict
    (see `_parts`); any other module (a parametrized one computes its weight at each access) through the attribute."""
    return m._parameters.get(name) if type(m) in _PLAIN_LAYERS else getattr(m, name, None)


def _ptr(t: torch.Tensor | None) -> int:
    return t.data_ptr() if t is not None else 0


# glibc's malloc hands freed blocks above its mmap threshold back to the kernel, so each forward's activations of that
# size would be fresh pages (1,900 page faults per femto forward at batch 1). The first plan raises the thresholds for
# the process, as ONNX Runtime's arena keeps its memory; MAMBAOUT_CPU_MALLOC=0 leaves malloc alone.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@functools.cache  # once per process
def _keep_freed_memory() -> None:
    """Raise glibc's thresholds (see above)."""
    if os.environ.get("MAMBAOUT_CPU_MALLOC", "").strip() == "0" or not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt  # glibc's, in the process already
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    mallopt(_M_TRIM_THRESHOLD, 128 << 20)


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # block -> its _Plan


def _plan(block: nn.Module) -> _Plan:
    parts = _parts(block)
    norm, fc1, _, conv, fc2 = parts[:5]
    w1, w2 = _param(fc1, "weight"), _param(fc2, "weight")
    key = (parts, w1.data_ptr(), _ptr(_param(fc1, "bias")), w2.data_ptr(), _ptr(_param(fc2, "bias")))
    key += (_ptr(_param(conv, "weight")), _ptr(_param(conv, "bias")), _ptr(_param(norm, "weight")))
    plan = _PLANS.get(block)
    if plan is None or plan.key != key:
        _keep_freed_memory()
        plan = _Plan(block, key)
        if w1.is_contiguous() and w2.is_contiguous():  # else the row blocks are copies: no caching
            _PLANS[block] = plan
    return plan


def _norm(p: _Plan, x: torch.Tensor) -> torch.Tensor:
    if p.norm is None:
        return p.modules[0](x)
    shape, weight, bias, eps = p.norm
    if weight is not None and _native_norm(x):
        return native.layer_norm(x, *_f32_params(p.modules[0], weight, bias), eps)
    return torch.layer_norm(x, *p.norm)


def _dwconv(p: _Plan, c: torch.Tensor) -> torch.Tensor:
    """The depthwise conv through its weight packed for oneDNN (which otherwise reorders it at every call), packed
    again when the input shape or the weight's version changes (as `_weights`: not after a write through `.data`)."""
    if p.conv is None or not _CAN_PACK or p.conv[0].is_inference():
        return p.modules[3](c)
    weight, bias, padding, stride, dilation, groups = p.conv
    key = (c.shape, weight._version)
    pw = _derived(p.derived, "dwconv", key, lambda: _pack_conv(weight, padding, stride, dilation, groups, c.shape))
    return torch.ops.mkldnn._convolution_pointwise(c, pw, bias, padding, stride, dilation, groups, "none", [], "")


def _native_weights(p: _Plan) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The conv's weight as `native.gate_dwconv` reads it, float32 `[k, k, Cc]`, and its float32 bias; made again
    when a version changes (as `_weights`), at every call for tensors made under `torch.inference_mode`."""
    weight, bias = p.conv[:2]

    def make():
        k = weight.shape[-1]
        w = weight.detach().float().reshape(-1, k * k).t().contiguous().view(k, k, -1)  # [Cc, 1, k, k] -> [k, k, Cc]
        return w, bias.detach().float() if bias is not None else None

    return _derived(p.derived, "gate", _versions(weight, bias), make)


def _gate(p: _Plan, g: torch.Tensor, i: torch.Tensor | None, c: torch.Tensor) -> None:
    """`g *= cat(i, conv(c))` in place on the activated gate `[B, H, W, hidden]`; `i`, `c` `[B, H, W, *]` are fc1's
    identity and conv channels (rows of pixels a fixed stride apart). One pass in the C kernel where it is on and
    built, else oneDNN's conv, then the two products."""
    hidden, cc = p.hidden, p.cc
    if _NATIVE and p.native and native.library() is not None:
        native.gate_dwconv(g, i, c, *_native_weights(p))
        return
    c = _dwconv(p, c.permute(0, 3, 1, 2))  # [B, H, W, Cc] -> [B, Cc, H, W]
    g[..., hidden - cc :].mul_(c.permute(0, 2, 3, 1))  # [B, Cc, H, W] -> [B, H, W, Cc]
    if hidden > cc:
        g[..., : hidden - cc].mul_(i)


def _lin(x: torch.Tensor, rows: tuple, post_op: tuple[str, str] = _NO_POST_OP) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, rows[0], rows[1], post_op[0], [], post_op[1])


_ONE_CALL_ROWS = 4096


def _one_call(rows: int) -> bool:
    """Whether fc1's identity and conv channels come from one matmul call (see `_identity_and_conv`)."""
    return rows <= _ONE_CALL_ROWS


def _identity_and_conv(p: _Plan, lin, xn: torch.Tensor, w: dict) -> tuple[torch.Tensor | None, torch.Tensor]:
    """fc1's identity channels `i` (None if there are none) and conv channels `c`, `[B, H, W, *]`, through `lin` with
    the row blocks `w`. Up to `_ONE_CALL_ROWS` rows, one call for both: a call's fixed cost (10-20 us) is more than
    the conv's copy of its strided channels there. Above, the copy costs more: two calls, each into a tensor the conv
    reads in place."""
    hidden, cc = p.hidden, p.cc
    if _one_call(xn.numel() // xn.shape[-1]):
        ic = lin(xn, w["ic"])
        return ic[..., : hidden - cc], ic[..., hidden - cc :]
    return (lin(xn, w["i"]) if hidden > cc else None), lin(xn, w["c"])


def _weights(p: _Plan, rows: int) -> dict[str, tuple]:
    """The row blocks `_gated_onednn` calls for `rows` input rows, (weight, bias) by name, the weights packed by oneDNN
    for that row count (else it reorders them at every call: docs/performance.md), bit for bit the same result.
    Packed again when the row count or a weight's version changes (any in-place change through the parameter); after
    a write through `.data`, which the version misses, call `forget_packed_weights`. Plain weights where packing is
    unavailable, and for weights made under `torch.inference_mode` (no version to check)."""
    names = ("g", "ic", "fc2") if _one_call(rows) else ("g", "i", "c", "fc2") if p.hidden > p.cc else ("g", "c", "fc2")
    if not _CAN_PACK_LINEAR or p.w1.is_inference() or p.w2.is_inference():
        return {name: getattr(p, name) for name in names}

    def pack() -> dict[str, tuple]:
        blocks = {name: getattr(p, name) for name in names}
        return {name: (torch.ops.mkldnn._reorder_linear_weight(w, rows), b) for name, (w, b) in blocks.items()}

    return _derived(p.derived, "onednn", (rows, p.w1._version, p.w2._version), pack)


def forget_packed_weights() -> None:
    """Drop every packed weight and plan of the CPU path, so the next call packs the weights as they are now: needed
    only after writing a linear or conv weight through `.data`, which its version counter does not see."""
    _PLANS.clear()
    _CL_WEIGHTS.clear()
    _F32.clear()
    _LINEARS.clear()


def _add_residual(p: _Plan, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`x + drop_path(layer_scale(y))`: the block's end where the residual add does not fuse into fc2 (`p.plain`)."""
    return x + p.modules[6](p.modules[5](y))


def _gated_onednn(p: _Plan, x: torch.Tensor) -> torch.Tensor:
    """The block through oneDNN matmuls with fused epilogues; `[B, H, W, C]` -> `[B, H, W, C]`."""
    xn = _norm(p, x)  # [B, H, W, C]
    w = _weights(p, xn.numel() // xn.shape[-1])
    g = _lin(xn, w["g"], p.post_op or _NO_POST_OP)  # [B, H, W, hidden], activated if fused
    if p.post_op is None:
        g = p.modules[2](g)
    _gate(p, g, *_identity_and_conv(p, _lin, xn, w))
    if p.plain:  # x + fc2(gate) in one oneDNN call: the residual add is the matmul's epilogue
        return torch.ops.mkldnn._linear_pointwise.binary(g, x.contiguous(), *w["fc2"], "add")
    return _add_residual(p, x, _lin(g, w["fc2"]))


def _mm(x2d: torch.Tensor, rows: tuple) -> torch.Tensor:
    """`x2d @ weight.T + bias` through BLAS (the transposed view is read in place); `[N, K]` -> `[N, rows]`."""
    weight, bias = rows
    return torch.mm(x2d, weight.t()) if bias is None else torch.addmm(bias, x2d, weight.t())


def _gated_blas(p: _Plan, x: torch.Tensor) -> torch.Tensor:
    """The same steps through `torch.addmm` (MKL or OpenBLAS), activation and bias in place; `[B, H, W, C]` in and
    out."""
    hidden, act = p.hidden, p.modules[2]
    B, H, W, C = x.shape
    xn = _norm(p, x).reshape(-1, C)  # [BHW, C]
    g = _mm(xn, p.g)  # [BHW, hidden]
    if type(act) is nn.GELU:
        torch.ops.aten.gelu_(g, approximate=act.approximate)
    else:
        g = act(g)
    i, c = _identity_and_conv(p, lambda t, rows: _mm(t, rows).view(B, H, W, -1), xn, vars(p))
    _gate(p, g.view(B, H, W, hidden), i, c)
    if p.plain:
        out = torch.addmm(x.reshape(-1, C), g, p.fc2[0].t())  # x + g @ W2^T: the residual is addmm's input term
        if p.fc2[1] is not None:
            out.add_(p.fc2[1])
        return out.view(B, H, W, C)
    return _add_residual(p, x, _mm(g, p.fc2).view(B, H, W, C))


def _native_linears(p: _Plan) -> dict[str, tuple]:
    """fc1's gate rows, its identity-and-conv rows and fc2, packed for `native.linear`; packed again when a weight's
    or bias's version changes (as `_weights`: not after a write through `.data`), at every call for tensors made
    under `torch.inference_mode` (no version to check)."""

    def pack() -> dict[str, tuple]:
        return {name: native.pack_linear(*getattr(p, name)) for name in ("g", "ic", "fc2")}

    return _derived(p.derived, "native", _versions(p.w1, p.w2, *p.biases), pack)


_ONE_BLOCK_CALL = True  # `_gated_native`: a block that `p.one_call` allows as one C call (same bits; off: step by step)


def _gated_native(p: _Plan, x: torch.Tensor) -> torch.Tensor:
    """The same steps with the matmuls in C too (`native.linear`: no library call's fixed cost per matmul), the exact
    GELU in the gate rows' matmul (another activation as its module after it); `[B, H, W, C]` in and out. Where the
    block allows (`p.one_call`), all of it in one C call (`native.block`), without Python between the steps."""
    w = _native_linears(p)
    if p.one_call and _ONE_BLOCK_CALL and x.is_contiguous() and x.shape[-1] <= native.NORM_MAX_CHANNELS:
        _, weight, bias, eps = p.norm
        norm = (*_f32_params(p.modules[0], weight, bias), eps)
        return native.block(x, norm, w["g"], w["ic"], _native_weights(p), w["fc2"], p.cc)
    xn = _norm(p, x)
    act = p.modules[2]
    fused = p.post_op == ("gelu", "none")  # the exact GELU: in the matmul's store
    g = native.linear(xn, *w["g"], gelu=fused)  # [B, H, W, hidden]
    if not fused:
        g = act(g)
    ic = native.linear(xn, *w["ic"])
    ni = p.hidden - p.cc
    _gate(p, g, ic[..., :ni], ic[..., ni:])
    if p.plain:  # x + fc2(gate): the residual added in the matmul's store
        return native.linear(g, *w["fc2"], res=x.contiguous())
    return _add_residual(p, x, native.linear(g, *w["fc2"]))


def _native_linear_ok(p: _Plan, x: torch.Tensor) -> bool:
    """Whether `_gated_native` takes this block and input: the C kernels on and built, bf16 widths even (the
    kernel reads bf16 in pairs along the inputs)."""
    if not (_NATIVE and native.library() is not None):
        return False
    return x.dtype == torch.float32 or (x.shape[-1] % 2 == 0 and p.hidden % 2 == 0)


_IMPLS = {"onednn": _gated_onednn, "blas": _gated_blas, "native": _gated_native}
_MODE = os.environ.get("MAMBAOUT_CPU_MATMUL", "auto").strip().lower() or "auto"
if _MODE not in MATMUL_CHOICES:
    warnings.warn(f"MAMBAOUT_CPU_MATMUL={_MODE!r} is not one of {', '.join(MATMUL_CHOICES)}: using auto", stacklevel=1)
_CHOSEN: dict[tuple, str] = {}  # block shape -> the implementation measured faster for it (auto mode)
_MAX_SHAPES = 512  # beyond this many distinct shapes, new ones run "onednn" without timing
_LOCK = threading.Lock()


def set_cpu_matmul(mode: str) -> None:
    """Which matmuls the CPU fast path uses: "auto" (time each per block shape, keep the fastest), "onednn", "blas"
    (`torch.addmm`) or "native" (the C kernels' `native.linear`, where they are on; else "onednn"). For the whole
    process; MAMBAOUT_CPU_MATMUL sets the starting value."""
    global _MODE
    if mode not in MATMUL_CHOICES:
        raise ValueError(f"cpu matmul {mode!r}: expected one of {', '.join(MATMUL_CHOICES)}")
    _MODE = mode


def cpu_matmul() -> str:
    """The mode `set_cpu_matmul` / MAMBAOUT_CPU_MATMUL set (an unknown value in the variable reads as "auto")."""
    return _MODE if _MODE in MATMUL_CHOICES else "auto"


def cpu_matmul_choices() -> dict[tuple, str]:
    """What "auto" chose so far: (rows, dim, hidden, conv channels, act, threads, dtype) -> "onednn" | "blas" |
    "native"."""
    with _LOCK:
        return dict(_CHOSEN)


def forget_cpu_matmul_choices() -> None:
    """Drop what "auto" chose, so the next call of each shape times both libraries again."""
    with _LOCK:
        _CHOSEN.clear()


def _choice(p: _Plan, x: torch.Tensor) -> str:
    """The implementation for this block and input: the set mode, or in "auto" the one timed faster for the shape."""
    mode = cpu_matmul()
    if mode == "native" and not _native_linear_ok(p, x):
        return "onednn"
    if mode != "auto":
        return mode
    key = (x.numel() // x.shape[-1], x.shape[-1], *p.shape, torch.get_num_threads(), str(x.dtype))
    mode = _CHOSEN.get(key)
    if mode is None:
        mode = _time_impls(p, x) if len(_CHOSEN) < _MAX_SHAPES else "onednn"
        with _LOCK:
            mode = _CHOSEN.setdefault(key, mode)
    if mode == "native" and not _native_linear_ok(p, x):  # chosen while the C kernels were on
        return "onednn"
    return mode


def _time_impls(p: _Plan, x: torch.Tensor, repeats: int = 4) -> str:
    """Run each implementation once to warm up, then `repeats` times interleaved; the one with the lower minimum.

    The minimum, not the median: other processes only ever add time to a run, so the fastest run of each is the
    closest to its own speed (chosen under load by the median, "blas" won shapes where oneDNN is 2-3x faster alone).
    """
    impls = {name: impl for name, impl in _IMPLS.items() if name != "native" or _native_linear_ok(p, x)}
    times: dict[str, list[float]] = {name: [] for name in impls}
    with torch.random.fork_rng(devices=[]):  # drop path in train mode draws numbers: the timed runs leave no trace
        for impl in impls.values():
            impl(p, x)
        for _ in range(repeats):
            for name, impl in impls.items():
                start = time.perf_counter()
                impl(p, x)
                times[name].append(time.perf_counter() - start)
    return min(times, key=lambda name: min(times[name]))


def gated_block_inference(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The same block for inference on CPU (see the module docstring); `[B, H, W, C]` -> `[B, H, W, C]`."""
    p = _plan(block)
    return _IMPLS[_choice(p, x)](p, x)


def stage_plans(blocks: nn.Sequential, x: torch.Tensor) -> list[_Plan] | None:
    """The plans of a stage's Gated CNN blocks when every block may take the fast path for `x`, else None.

    The conditions of `can_use_cpu_fastpath` checked once for the stage, then only each block's dtype and hooks (on
    the block, its modules, and the stage's `Sequential`, all of which `run_stage` does not call).
    """
    if not (_ONEDNN and len(blocks) and not _hooked(blocks)):
        return None
    first = next(iter(blocks))
    dtype = _param(_parts(first)[1], "weight").dtype
    if not _inference_ok(x, dtype, ()):  # first: fake tensors (export, compile) have no storage to make plans of
        return None
    plans = [_plan(block) for block in blocks]
    for block, p in zip(blocks, plans):
        if _hooked(block) or p.w1.dtype != dtype or any(map(_hooked, p.modules)):
            return None
    return plans


def run_stage(plans: list[_Plan], x: torch.Tensor) -> torch.Tensor:
    """The blocks of `stage_plans` one after another, without a module call or a check between them; the
    implementation chosen once per block shape (a stage's blocks share their input's shape)."""
    impls: dict[tuple, object] = {}
    for p in plans:
        impl = impls.get(p.shape)
        if impl is None:
            impl = impls[p.shape] = _IMPLS[_choice(p, x)]
        x = impl(p, x)
    return x
