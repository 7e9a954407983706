"""`mambaout kernels`: which block implementation runs where, and `--aot sm_90` to time every Triton compile.

`--aot` (docs/performance.md) exits 1 if one compile takes longer than `--max-seconds`: a kernel that would stall a
user's first forward pass fails CI instead.
"""

from __future__ import annotations

import argparse
import math

from mambaout import kernels
from mambaout.cli.common import Parser, fail
from mambaout.utils.text import count


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="mambaout kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--aot", metavar="TARGET", help="compile every Triton kernel/config for TARGET (e.g. sm_90)")
    p.add_argument("--max-seconds", type=float, default=10.0, help="fail if one compile takes longer (default 10)")
    p.add_argument("--dtypes", default="bf16", help="activation dtypes, comma-separated: bf16,fp16,fp32 (default bf16)")
    p.add_argument("--acts", default="gelu", help="gate activations, comma-separated: gelu,silu (default gelu)")
    p.add_argument("--kernel", action="append", help="only this kernel (repeatable; default: all)")
    p.add_argument("--all", action="store_true", help="every dtype, activation and bias variant")
    return p


def _split(value: str, allowed, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise ValueError(f"--{what} {value!r}: expected a comma-separated subset of {', '.join(allowed)}")
    return items


def _describe() -> None:
    from mambaout.kernels import cpu

    on = kernels.fused_kernels_enabled()
    matmul = cpu.cpu_matmul()
    if matmul == "auto":
        matmul = "auto (oneDNN, BLAS or the C kernels' per block shape, timed on first use)"
    print("Gated CNN block implementations (GatedCNNBlock picks one per call; all compute the same function):")
    bf16 = "on" if cpu.cpu_bf16_enabled() else "opt-in (MAMBAOUT_CPU_BF16=1)"
    print(f"  CPU, no autograd, float32   fused-epilogue fast path (kernels/cpu.py)      default on, matmuls: {matmul}")
    print(f"  CPU, no autograd, bfloat16  the same steps in bf16                         {bf16}")
    print(f"  CPU C kernels               conv + gate, LayerNorm (kernels/native.py)     {_native_state(cpu)}")
    packed = "on" if cpu._PACK_CONVS else "opt-in (MAMBAOUT_CPU_PACK_CONVS=1)"
    print(f"  CPU stem, downsampling      convs on weights packed by oneDNN              {packed}")
    print("  CUDA                        PyTorch + cuDNN depthwise conv (the reference) default")
    print(f"  CUDA, fused kernels on      Triton gated_dwconv (kernels/gated_dwconv.py)  {'ON' if on else 'opt-in'}")
    print("Turn the fused kernels on with --fused-kernels (train, validate, predict, benchmark),")
    print("mambaout.kernels.set_fused_kernels(True), or MAMBAOUT_FUSED_KERNELS=1. Pick the CPU matmul library with")
    print("MAMBAOUT_CPU_MATMUL=auto|onednn|blas|native or mambaout.kernels.cpu.set_cpu_matmul(...).")


def _native_state(cpu) -> str:
    """The C kernels: opt-in, or asked for and built (where), or asked for and unavailable (why)."""
    from mambaout.kernels import native

    if not cpu.cpu_native_enabled():
        return "opt-in (MAMBAOUT_CPU_NATIVE=1)"
    lib = native.library()
    return f"on, built in {lib._name}" if lib is not None else f"asked for, unavailable: {native.unavailable_reason()}"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not (args.max_seconds > 0 and math.isfinite(args.max_seconds)):  # `nan` would never flag a compile as slow
        parser.error(f"--max-seconds must be a positive number of seconds, got {args.max_seconds:g}")
    if not args.aot:
        _describe()
        return 0
    from mambaout.kernels import aot

    try:
        aot.parse_target(args.aot)  # a bad name is one line before any compile
        selection = dict(
            dtypes=list(aot.DTYPES) if args.all else _split(args.dtypes, list(aot.DTYPES), "dtypes"),
            acts=list(aot.ACTS) if args.all else _split(args.acts, aot.ACTS, "acts"),
            biases=(False, True) if args.all else (True,),
            names=_split(",".join(args.kernel), aot.kernel_names(), "kernel") if args.kernel else None,
        )
        results = aot.compile_all(args.aot, **selection)
        slow, total, n = [], 0.0, 0
        print(f"{'kernel':<24} {'variant':<34} {'config':<18} {'seconds':>8} {'cubin KB':>9}")
        for r in results:
            n, total = n + 1, total + r.seconds
            flag = "  SLOW" if r.seconds > args.max_seconds else ""
            line = f"{r.kernel:<24} {r.variant:<34} {r.config:<18} {r.seconds:>8.2f} {r.cubin_bytes / 1024:>9.1f}{flag}"
            print(line, flush=True)
            if flag:
                slow.append(r)
    except (ValueError, RuntimeError) as e:
        return fail("kernels", e)
    print(f"{count(n, 'compile')} for {args.aot} in {total:.1f} s; slowest allowed {args.max_seconds:g} s")
    if slow:
        first = f"{slow[0].kernel} {slow[0].config}: a user's first forward on the fused path would stall"
        return fail("kernels", f"{count(len(slow), 'compile')} over {args.max_seconds:g} s, e.g. {first}", 1)
    return 0
