"""The Gated CNN block's token mixer in one GPU kernel, forward and backward: `act(g) * [i, dwconv(c)]` for the
`fc1` output `y = [g, i, c]`, read once (`c` through the conv's window), so the plain block's copies and separate passes
never happen; the backward recomputes the conv. A `torch.library` custom op with fake and autograd registrations, so
`torch.compile(fullgraph=True)` keeps it as one node (docs/performance.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mambaout.kernels import triton_interpreting

__all__ = ["gated_dwconv", "gated_dwconv_reference", "triton_available", "ACTIVATIONS"]

ACTIVATIONS = ("gelu", "silu")


def _check(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, hidden: int, act: str) -> int:
    """Validate the arguments; returns the number of conv channels."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if y.ndim != 4 or y.shape[-1] != 2 * hidden:
        raise ValueError(f"y must be [B, H, W, 2 * hidden] = [..., {2 * hidden}], got {tuple(y.shape)}")
    if weight.ndim != 4 or weight.shape[1] != 1 or weight.shape[2] != weight.shape[3] or weight.shape[2] % 2 != 1:
        raise ValueError(f"weight must be a depthwise [Cc, 1, k, k] kernel with odd k, got {tuple(weight.shape)}")
    cc = weight.shape[0]
    if not 0 < cc <= hidden:
        raise ValueError(f"the conv has {cc} channels; it needs between 1 and hidden={hidden}")
    if bias is not None and bias.shape != (cc,):
        raise ValueError(f"bias must have shape ({cc},), got {tuple(bias.shape)}")
    return cc


def gated_dwconv_reference(
    y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, hidden: int, act: str = "gelu"
) -> torch.Tensor:
    """Plain PyTorch: `act(g) * [i, dwconv(c)]` for `y = [g, i, c]` `[B, H, W, 2 * hidden]` -> `[B, H, W, hidden]`."""
    cc = _check(y, weight, bias, hidden, act)
    g, i, c = torch.split(y, (hidden, hidden - cc, cc), dim=-1)
    k = weight.shape[-1]
    c = F.conv2d(c.permute(0, 3, 1, 2), weight, bias, padding=k // 2, groups=cc)  # [B, H, W, Cc] -> [B, Cc, H, W]
    c = c.permute(0, 2, 3, 1)  # [B, Cc, H, W] -> [B, H, W, Cc]
    return (F.gelu(g) if act == "gelu" else F.silu(g)) * torch.cat((i, c), dim=-1)


# --- Triton kernels ----------------------------------------------------------------------------------------------------
#
# Layout: y is contiguous `[N, 2 * hidden]` with N = B * H * W pixels in row-major (b, h, w) order. Hidden channel
# j of the product reads its gate from column j and its value from column hidden + j: for j < hidden - Cc that is
# the identity branch `i`, otherwise conv channel j - (hidden - Cc) of `c`. Each program owns a tile of BLOCK_P
# pixels by BLOCK_C hidden channels; the identity and conv channel ranges are launched separately so no program
# pays for the conv window on identity channels.

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # CPU-only installs: the block falls back to PyTorch
    _HAS_TRITON = False


def triton_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on `device`: CUDA with Triton, or any device under `TRITON_INTERPRET=1`."""
    return _HAS_TRITON and (torch.device(device).type == "cuda" or triton_interpreting())


if _HAS_TRITON:

    @triton.jit
    def _act_grad(g, ACT: tl.constexpr):
        """(act(g), d act / d g); the forward kernel's compile drops the unused derivative."""
        if ACT == 0:  # exact (erf) GELU, as nn.GELU()
            cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
            pdf = tl.exp(-0.5 * g * g) * 0.3989422804014327
            return g * cdf, cdf + g * pdf
        else:
            s = 1.0 / (1.0 + tl.exp(-g))
            return g * s, s * (1.0 + g * (1.0 - s))

    # Compile time is part of the design (docs/performance.md): the k x k tap loops are runtime loops (KS is a plain
    # int, not a constexpr), so ptxas does not unroll 49 masked 2-D loads; NPIX, H and W are not specialised either,
    # so a new batch size or resolution reuses the compiled kernel. `mambaout kernels --aot sm_90` bounds each compile.
    _NO_SPECIALIZE = ["NPIX", "H", "W", "KS"]

    @triton.jit
    def _dwconv_tile(
        src_ptr,
        w_ptr,
        p,
        hh,
        ww,
        cj,
        pm,
        cm,
        H,
        W,
        SRC_STRIDE,
        SRC_COL0,
        KS,
        FLIP: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """Depthwise `KS x KS` correlation (or, with FLIP, its transpose) of a [BLOCK_P, BLOCK_C] tile, fp32."""
        R = KS // 2
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        cols = SRC_COL0 + cj[None, :]
        for dy in range(0, KS):
            oy = (R - dy) if FLIP else (dy - R)  # transposed conv: output pixel p gathers from p - offset
            hs = hh + oy
            row_ok = pm & (hs >= 0) & (hs < H)
            for dx in range(0, KS):
                ox = (R - dx) if FLIP else (dx - R)
                ws = ww + ox
                ok = row_ok & (ws >= 0) & (ws < W)
                q = p + oy * W + ox
                v = tl.load(src_ptr + q[:, None] * SRC_STRIDE + cols, mask=ok[:, None] & cm[None, :], other=0.0)
                wt = tl.load(w_ptr + cj * (KS * KS) + dy * KS + dx, mask=cm, other=0.0)
                acc += v.to(tl.float32) * wt.to(tl.float32)[None, :]
        return acc

    @triton.jit
    def _gate_and_value(
        y_ptr,
        w_ptr,
        b_ptr,
        NPIX,
        H,
        W,
        HIDDEN,
        CC,
        C_BEGIN,
        C_END,
        KS,
        CONV: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """This program's tile: pixels `p`, hidden channels `j`, its mask, the gate `g` and the value `v` (the identity
        channel, or the conv of `c` plus its bias), both fp32."""
        p = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
        j = C_BEGIN + tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        pm = p < NPIX
        cm = j < C_END
        m = pm[:, None] & cm[None, :]
        row = 2 * HIDDEN
        g = tl.load(y_ptr + p[:, None] * row + j[None, :], mask=m, other=0.0).to(tl.float32)
        if CONV:
            cj = j - (HIDDEN - CC)
            hh, ww = (p // W) % H, p % W
            v = _dwconv_tile(y_ptr, w_ptr, p, hh, ww, cj, pm, cm, H, W, row, row - CC, KS, False, BLOCK_P, BLOCK_C)
            if HAS_BIAS:
                v += tl.load(b_ptr + cj, mask=cm, other=0.0).to(tl.float32)[None, :]
        else:
            v = tl.load(y_ptr + p[:, None] * row + HIDDEN + j[None, :], mask=m, other=0.0).to(tl.float32)
        return p, j, m, g, v

    @triton.jit(do_not_specialize=_NO_SPECIALIZE)
    def _fwd_kernel(
        y_ptr,
        w_ptr,
        b_ptr,
        z_ptr,
        NPIX,
        H,
        W,
        HIDDEN,
        CC,
        C_BEGIN,
        C_END,
        KS,
        ACT: tl.constexpr,
        CONV: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        p, j, m, g, v = _gate_and_value(
            y_ptr, w_ptr, b_ptr, NPIX, H, W, HIDDEN, CC, C_BEGIN, C_END, KS, CONV, HAS_BIAS, BLOCK_P, BLOCK_C
        )
        a, _ = _act_grad(g, ACT)
        z = a * v
        tl.store(z_ptr + p[:, None] * HIDDEN + j[None, :], z.to(z_ptr.dtype.element_ty), mask=m)

    @triton.jit(do_not_specialize=_NO_SPECIALIZE)
    def _bwd_gate_kernel(
        y_ptr,
        w_ptr,
        b_ptr,
        dz_ptr,
        dy_ptr,
        e_ptr,
        NPIX,
        H,
        W,
        HIDDEN,
        CC,
        C_BEGIN,
        C_END,
        KS,
        ACT: tl.constexpr,
        CONV: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """dg for every channel; di for identity channels; e = dz * act(g), the conv output's gradient, for conv ones."""
        p, j, m, g, v = _gate_and_value(
            y_ptr, w_ptr, b_ptr, NPIX, H, W, HIDDEN, CC, C_BEGIN, C_END, KS, CONV, HAS_BIAS, BLOCK_P, BLOCK_C
        )
        dz = tl.load(dz_ptr + p[:, None] * HIDDEN + j[None, :], mask=m, other=0.0).to(tl.float32)
        a, da = _act_grad(g, ACT)
        row = 2 * HIDDEN
        if CONV:
            tl.store(e_ptr + p[:, None] * CC + (j - (HIDDEN - CC))[None, :], dz * a, mask=m)
        else:
            tl.store(dy_ptr + p[:, None] * row + HIDDEN + j[None, :], (dz * a).to(dy_ptr.dtype.element_ty), mask=m)
        tl.store(dy_ptr + p[:, None] * row + j[None, :], (dz * v * da).to(dy_ptr.dtype.element_ty), mask=m)

    @triton.jit(do_not_specialize=_NO_SPECIALIZE)
    def _bwd_conv_kernel(
        y_ptr,
        w_ptr,
        e_ptr,
        dy_ptr,
        dw_ptr,
        db_ptr,
        NPIX,
        H,
        W,
        HIDDEN,
        CC,
        KS,
        HAS_BIAS: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """dc = conv^T(e) into y's conv columns of dy; dweight and dbias summed over the tile, then added atomically."""
        R = KS // 2
        p = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
        cj = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        pm = p < NPIX
        cm = cj < CC
        m = pm[:, None] & cm[None, :]
        row = 2 * HIDDEN
        c0 = 2 * HIDDEN - CC
        hh, ww = (p // W) % H, p % W
        dc = _dwconv_tile(e_ptr, w_ptr, p, hh, ww, cj, pm, cm, H, W, CC, 0, KS, True, BLOCK_P, BLOCK_C)
        tl.store(dy_ptr + p[:, None] * row + c0 + cj[None, :], dc.to(dy_ptr.dtype.element_ty), mask=m)
        # dweight[cj, dy, dx] = sum_p e[p] * c[p + offset(dy, dx)]
        e = tl.load(e_ptr + p[:, None] * CC + cj[None, :], mask=m, other=0.0)
        for dy in range(0, KS):
            hs = hh + (dy - R)
            row_ok = pm & (hs >= 0) & (hs < H)
            for dx in range(0, KS):
                ws = ww + (dx - R)
                ok = row_ok & (ws >= 0) & (ws < W)
                q = p + (dy - R) * W + (dx - R)
                c = tl.load(y_ptr + q[:, None] * row + c0 + cj[None, :], mask=ok[:, None] & cm[None, :], other=0.0)
                tl.atomic_add(dw_ptr + cj * (KS * KS) + dy * KS + dx, tl.sum(e * c.to(tl.float32), axis=0), mask=cm)
        if HAS_BIAS:
            tl.atomic_add(db_ptr + cj, tl.sum(e, axis=0), mask=cm)

    # At most four tiles per kernel (each is compiled on first use, and again for every constexpr variant):
    # channel tiles of 32-128 keep loads coalesced along C; pixel tiles amortise the k*k weight loads.
    # Autotuning picks again for each new value of the `key` arguments.
    CONFIGS = (
        triton.Config(dict(BLOCK_P=64, BLOCK_C=32), num_warps=4, num_stages=1),
        triton.Config(dict(BLOCK_P=64, BLOCK_C=64), num_warps=4, num_stages=1),
        triton.Config(dict(BLOCK_P=128, BLOCK_C=64), num_warps=8, num_stages=1),
        triton.Config(dict(BLOCK_P=32, BLOCK_C=128), num_warps=4, num_stages=1),
    )
    _KEY = ["HIDDEN", "CC", "W", "KS"]
    _fwd_tuned = triton.autotune(CONFIGS, key=[*_KEY, "CONV"])(_fwd_kernel)
    _bwd_gate_tuned = triton.autotune(CONFIGS, key=[*_KEY, "CONV"])(_bwd_gate_kernel)
    _bwd_conv_tuned = triton.autotune(CONFIGS, key=_KEY, reset_to_zero=["dw_ptr", "db_ptr"])(_bwd_conv_kernel)

# The interpreter runs each program in numpy: a fixed small tile keeps tests fast and skips autotuning.
_INTERPRET_BLOCKS = {"BLOCK_P": 64, "BLOCK_C": 32}


def _launch(tuned, plain, grid_c, npix, *args, **kwargs):
    """Launch the autotuned kernel on GPU, or the plain one with a fixed tile under the interpreter."""

    def grid(meta):
        return (triton.cdiv(npix, meta["BLOCK_P"]), triton.cdiv(grid_c, meta["BLOCK_C"]))

    if triton_interpreting():
        plain[grid(_INTERPRET_BLOCKS)](*args, **kwargs, **_INTERPRET_BLOCKS)
    else:
        tuned[grid](*args, **kwargs)


def _launch_gate(tuned, plain, y, weight, bias, outputs: tuple, hidden: int, cc: int, act: str) -> None:
    """Launch a gate kernel (forward or backward) on the identity channels, if any, then on the conv channels."""
    B, H, W, _ = y.shape
    npix = B * H * W
    bias_arg = bias.contiguous() if bias is not None else weight  # never read when HAS_BIAS is False
    consts = dict(KS=weight.shape[-1], ACT=ACTIVATIONS.index(act), HAS_BIAS=bias is not None)
    for first, end, conv in ([(0, hidden - cc, False)] if hidden > cc else []) + [(hidden - cc, hidden, True)]:
        args = (y, weight, bias_arg, *outputs, npix, H, W, hidden, cc, first, end)
        _launch(tuned, plain, end - first, npix, *args, CONV=conv, **consts)


# --- torch.library custom ops: opaque to torch.compile, with shapes for tracing and a registered backward -----------


@torch.library.custom_op("mambaout::gated_dwconv", mutates_args=(), device_types=None)
def gated_dwconv(
    y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, hidden: int, act: str
) -> torch.Tensor:
    """`act(g) * [i, dwconv(c)]` for `y = [g, i, c]`: `[B, H, W, 2 * hidden]` -> `[B, H, W, hidden]` (Triton).

    `y` is the block's `fc1` output; `weight` `[Cc, 1, k, k]` (k odd) and `bias` `[Cc]` (or None) the depthwise conv's,
    which runs on the last `Cc` of the `hidden` value channels; `act` is `'gelu'` (exact) or `'silu'`.
    """
    if not triton_available(y.device):
        raise RuntimeError(
            f"mambaout::gated_dwconv needs Triton on CUDA (or TRITON_INTERPRET=1), got a {y.device.type} tensor; "
            "use gated_dwconv_reference"
        )
    cc = _check(y, weight, bias, hidden, act)
    y, weight = y.contiguous(), weight.contiguous()
    z = y.new_empty(*y.shape[:-1], hidden)
    if y.numel() > 0:
        _launch_gate(_fwd_tuned, _fwd_kernel, y, weight, bias, (z,), hidden, cc, act)
    return z


@gated_dwconv.register_fake
def _(y, weight, bias, hidden, act):
    _check(y, weight, bias, hidden, act)
    return y.new_empty(*y.shape[:-1], hidden)


@torch.library.custom_op("mambaout::gated_dwconv_backward", mutates_args=(), device_types=None)
def gated_dwconv_backward(
    dz: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, hidden: int, act: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients `(dy, dweight, dbias)` of `gated_dwconv`; dbias is zeros when there is no bias."""
    cc = _check(y, weight, bias, hidden, act)
    y, dz, weight = y.contiguous(), dz.contiguous(), weight.contiguous()
    B, H, W, _ = y.shape
    ks = weight.shape[-1]
    dy = torch.empty_like(y)
    e = torch.empty(B, H, W, cc, device=y.device, dtype=torch.float32)  # the conv output's gradient, kept in fp32
    dw = torch.zeros(cc, ks * ks, device=y.device, dtype=torch.float32)
    db = torch.zeros(cc, device=y.device, dtype=torch.float32)
    if y.numel() > 0:
        _launch_gate(_bwd_gate_tuned, _bwd_gate_kernel, y, weight, bias, (dz, dy, e), hidden, cc, act)
        args = (y, weight, e, dy, dw, db, B * H * W, H, W, hidden, cc)
        _launch(_bwd_conv_tuned, _bwd_conv_kernel, cc, B * H * W, *args, KS=ks, HAS_BIAS=bias is not None)
    return dy, dw.view_as(weight).to(weight.dtype), db.to(weight.dtype)


@gated_dwconv_backward.register_fake
def _(dz, y, weight, bias, hidden, act):
    return torch.empty_like(y), torch.empty_like(weight), weight.new_empty(weight.shape[0])


def _setup_context(ctx, inputs, output):
    y, weight, bias, hidden, act = inputs
    ctx.save_for_backward(y, weight, bias)  # the conv output is recomputed, not saved
    ctx.hidden, ctx.act = hidden, act


def _backward(ctx, dz):
    y, weight, bias = ctx.saved_tensors
    dy, dw, db = gated_dwconv_backward(dz, y, weight, bias, ctx.hidden, ctx.act)
    return dy, dw, (db if bias is not None else None), None, None


gated_dwconv.register_autograd(_backward, setup_context=_setup_context)
