"""Ahead-of-time compiles of the package's Triton kernels for a GPU target, on any machine (Triton ships `ptxas`):
each kernel in each tile configuration and constexpr variant, timed, in an empty cache, so a slow compile shows here
rather than on a user's first forward. `mambaout kernels --aot sm_90` prints the table and fails over a bound.
"""

from __future__ import annotations

import itertools
import os
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from unittest import mock

__all__ = ["AotResult", "parse_target", "kernel_names", "variants", "compile_one", "compile_all", "DTYPES", "ACTS"]

# Activation dtype of a variant -> Triton pointer types of (activations, parameters). "bf16" is autocast: bf16
# activations from fc1 with float32 conv parameters; "fp32" is plain float32 training; "fp16" autocast in fp16.
DTYPES = {"bf16": ("bf16", "fp32"), "fp16": ("fp16", "fp32"), "fp32": ("fp32", "fp32")}
ACTS = ("gelu", "silu")

# Role of each pointer argument: an activation tensor, a parameter, or float32 scratch (gradients of the conv).
_POINTER_ROLE = {p: "act" for p in ("y_ptr", "z_ptr", "dz_ptr", "dy_ptr")}
_POINTER_ROLE.update(w_ptr="param", b_ptr="param", e_ptr="fp32", dw_ptr="fp32", db_ptr="fp32")
# Integer arguments the JIT specialises on divisibility by 16 (channel counts of real models are multiples of 16).
_DIVISIBLE = {"HIDDEN", "CC", "C_BEGIN", "C_END"}


@dataclass
class AotResult:
    kernel: str
    variant: str
    config: str
    seconds: float
    cubin_bytes: int


def parse_target(name: str):
    """`'sm_90'` -> Triton's `GPUTarget('cuda', 90, 32)`."""
    from triton.backends.compiler import GPUTarget

    m = re.fullmatch(r"sm_(\d{2,3})a?", name.strip())
    if not m or int(m.group(1)) < 70:
        raise ValueError(f"unknown GPU target {name!r}: use a CUDA architecture from sm_70 on, such as sm_90")
    return GPUTarget("cuda", int(m.group(1)), 32)


def _kernels() -> dict:
    """name -> (jit function, its constexpr variant axes)."""
    from mambaout.kernels import gated_dwconv as gd

    if not gd._HAS_TRITON:
        raise RuntimeError("Triton is not installed; `pip install triton` (it comes with the CUDA build of torch)")
    return {
        "gated_dwconv_fwd": (gd._fwd_kernel, ("ACT", "CONV", "HAS_BIAS")),
        "gated_dwconv_bwd_gate": (gd._bwd_gate_kernel, ("ACT", "CONV", "HAS_BIAS")),
        "gated_dwconv_bwd_conv": (gd._bwd_conv_kernel, ("HAS_BIAS",)),
    }


def kernel_names() -> list[str]:
    return list(_kernels())


def variants(
    dtypes: Sequence[str] = ("bf16",),
    acts: Sequence[str] = ("gelu",),
    biases: Sequence[bool] = (True,),
    names: Sequence[str] | None = None,
) -> Iterator[tuple[str, object, str, dict, dict]]:
    """Every (kernel name, jit fn, dtype, constexpr values, tile config) the package can launch in this selection."""
    from mambaout.kernels import gated_dwconv as gd

    for name, (fn, axes) in _kernels().items():
        if names and name not in names:
            continue
        values = dict(ACT=[gd.ACTIVATIONS.index(a) for a in acts], CONV=[False, True], HAS_BIAS=list(biases))
        for dtype in dtypes:
            for combo in itertools.product(*(values[a] for a in axes)):
                for config in gd.CONFIGS:
                    yield name, fn, dtype, dict(zip(axes, combo)), config


def compile_one(fn, dtype: str, constexprs: dict, config, target) -> tuple[float, int]:
    """Compile one kernel variant for `target`; returns (seconds, cubin bytes)."""
    import triton
    from triton.compiler import ASTSource, make_backend

    act_ty, param_ty = DTYPES[dtype]
    types = {"act": act_ty, "param": param_ty, "fp32": "fp32"}
    const = {**constexprs, **config.kwargs}
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        pointer = arg.endswith("_ptr")
        signature[arg] = "constexpr" if arg in const else "*" + types[_POINTER_ROLE[arg]] if pointer else "i32"
        if pointer or arg in _DIVISIBLE:  # pointers: torch allocations are 16-byte aligned
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=const, attrs=attrs)
    options = make_backend(target).parse_options({"num_warps": config.num_warps, "num_stages": config.num_stages})
    start = time.perf_counter()
    compiled = triton.compile(src, target=target, options=options.__dict__)
    return time.perf_counter() - start, len(compiled.asm.get("cubin", b""))


def compile_all(target_name: str = "sm_90", **selection) -> Iterator[AotResult]:
    """Compile every variant of `variants(**selection)` for `target_name` (uncached), yielding one timed result each."""
    target = parse_target(target_name)
    # A throw-away Triton cache: a cached kernel would 'compile' in 0 s and hide what a new user waits for.
    with (
        tempfile.TemporaryDirectory(prefix="mambaout-aot-") as cache,
        mock.patch.dict(os.environ, TRITON_CACHE_DIR=cache),
    ):
        for name, fn, dtype, constexprs, config in variants(**selection):
            seconds, size = compile_one(fn, dtype, constexprs, config, target)
            variant = " ".join([dtype] + [f"{k}={int(v)}" for k, v in constexprs.items()])
            tile = "P{BLOCK_P}xC{BLOCK_C} w{num_warps} s{num_stages}".format(**config.all_kwargs())
            yield AotResult(name, variant, tile, seconds, size)
