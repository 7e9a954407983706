"""C kernels of the CPU path, compiled on first use for the CPU they run on (`csrc/gated_cpu.c`).

`gate_dwconv` is the Gated CNN block's token mixer after fc1: the depthwise conv of the conv channels and both gate
products in one pass over the map, where `kernels/cpu.py` otherwise makes three (oneDNN's conv into a new map, then
two products). The source is plain C with GCC/Clang vector extensions and OpenMP, no torch headers, so no torch build
to match: the system C compiler (`$CC`, else `cc`) builds it with `-O3 -march=native` into the cache folder
(`kernel_dir()`: `$MAMBAOUT_KERNEL_CACHE`, else `$MAMBAOUT_CACHE/kernels`; one file per source, compiler and CPU;
about 3 s, once per machine), and ctypes loads it.
It runs its threads in the OpenMP runtime torch has loaded (GNU's libgomp, Linux wheels), with torch's thread count.

`library()` is None, with the reason in `unavailable_reason()` and a one-line warning, where there is no compiler, the
compile fails, or torch runs another OpenMP runtime (two runtimes would spin against each other); `kernels/cpu.py`
then runs its oneDNN/BLAS steps. Whether the path is on at all is `kernels/cpu.py`'s switch (`set_cpu_native`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

from mambaout.utils import device
from mambaout.utils.files import atomic_write, cache_dir

__all__ = [
    "library",
    "unavailable_reason",
    "gate_dwconv",
    "layer_norm",
    "pack_linear",
    "linear",
    "block",
    "NORM_MAX_CHANNELS",
    "compile_command",
]

_SOURCE = Path(__file__).parent / "csrc" / "gated_cpu.c"
_FLAGS = ("-O3", "-march=native", "-mtune=generic", "-std=gnu11", "-fopenmp", "-shared", "-fPIC")
_LOCK = threading.Lock()
_REASON: list[str] = []  # why `library()` is None, once it has been asked
_log = logging.getLogger(__name__)

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
# mo_gate_dwconv(bf16, g, g_stride, id, id_stride, c, c_stride, weight, bias, B, H, W, ni, cc, k, threads)
_ARGTYPES = [_INT, _P, _I64, _P, _I64, _P, _I64, _P, _P, _INT, _INT, _INT, _INT, _INT, _INT, _INT]
# mo_layer_norm(bf16, gelu, x, x_stride, y, weight, bias, rows, C, eps, threads)
_NORM_ARGTYPES = [_INT, _INT, _P, _I64, _P, _P, _P, _I64, _INT, ctypes.c_float, _INT]
NORM_MAX_CHANNELS = 4096  # the kernel's row buffer (C_MAX)
# mo_linear(bf16, gelu, x, x_stride, packed weight, bias, res, res_stride, y, y_stride, M, K, N, threads)
_LINEAR_ARGTYPES = [_INT, _INT, _P, _I64, _P, _P, _P, _I64, _P, _I64, _I64, _I64, _I64, _INT]
_PANEL = 32  # output columns per packed panel (NR)
# mo_block(bf16, x, y, ws, norm weight, norm bias, eps, Wg, bg, Wic, bic, conv weight, conv bias, W2, b2, B, H, W, C,
#          hidden, cc, k, threads)
_BLOCK_ARGTYPES = [_INT, _P, _P, _P, _P, _P, ctypes.c_float, *[_P] * 8, *[_INT] * 8]


def _compiler() -> list[str] | None:
    cc = os.environ.get("CC", "").strip()
    if cc:
        return shlex.split(cc)
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return [found] if found else None


def compile_command(output: str) -> list[str] | None:
    """The command that builds the kernels into `output`, or None without a C compiler."""
    cc = _compiler()
    return None if cc is None else [*cc, *_FLAGS, str(_SOURCE), "-o", output]


def _torch_runs_libgomp() -> bool:
    """Whether the OpenMP runtime in this process is GNU's (what the library links against): torch's Linux wheels
    carry libgomp; a build with Intel's or LLVM's runtime would get a second pool of spinning threads beside it."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return "libgomp" in maps and "libiomp" not in maps and "libomp.so" not in maps


def _library_path(cc: list[str]) -> Path:
    """The cached library's path: a hash of the source, the compiler's version line, the flags and the CPU's flags
    (a library built with -march=native on one CPU can crash on another sharing the cache folder)."""
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), version.split("\n")[0].encode(), " ".join(_FLAGS).encode()):
        key.update(part)
    key.update(" ".join(sorted(device.cpu_flags())).encode() + platform.machine().encode())
    return kernel_dir() / f"gated_cpu-{key.hexdigest()[:16]}.so"


def kernel_dir() -> Path:
    """Where built kernels are kept: `$MAMBAOUT_KERNEL_CACHE`, else the `kernels` folder of the cache folder."""
    return Path(os.environ.get("MAMBAOUT_KERNEL_CACHE") or cache_dir() / "kernels")


def _build(path: Path) -> Path:
    """Compile into `path` (atomically: processes that build at once each rename a whole file onto it)."""

    def run(tmp: str) -> None:
        start = time.perf_counter()
        done = subprocess.run(compile_command(tmp), capture_output=True, text=True, timeout=600)
        if done.returncode:
            lines = (done.stderr or done.stdout).strip().splitlines() or [f"exit status {done.returncode}"]
            raise RuntimeError(f"{shlex.join(compile_command(str(path)))} failed: {lines[0]}")
        _log.info("compiled the CPU kernels in %.1f s: %s", time.perf_counter() - start, path)

    try:
        return atomic_write(path, run, suffix=".so")
    except OSError:  # a read-only cache folder: a private copy for this process
        return atomic_write(Path(tempfile.mkdtemp(prefix="mambaout-kernels-")) / path.name, run, suffix=".so")


def _load() -> ctypes.CDLL:
    """The library, built first where the cache lacks it. Raises with the reason where it cannot be had."""
    if not sys.platform.startswith("linux"):
        raise RuntimeError(f"the C kernels are built for Linux only (this is {sys.platform})")
    if not _torch_runs_libgomp():
        raise RuntimeError("torch does not run GNU OpenMP (libgomp), which the C kernels share")
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    path = _library_path(cc)
    if not path.is_file():
        path = _build(path)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:  # a damaged file in the cache (a full disk once, a copy cut short): built again, once
        lib = ctypes.CDLL(str(_build(path)))
    lib.mo_gate_dwconv.argtypes, lib.mo_gate_dwconv.restype = _ARGTYPES, None
    lib.mo_layer_norm.argtypes, lib.mo_layer_norm.restype = _NORM_ARGTYPES, None
    lib.mo_linear.argtypes, lib.mo_linear.restype = _LINEAR_ARGTYPES, None
    lib.mo_block.argtypes, lib.mo_block.restype = _BLOCK_ARGTYPES, None
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (`unavailable_reason()` says why; warned once)."""
    with _LOCK:
        try:
            return _load()
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            _REASON[:] = [reason]
            warnings.warn(
                f"mambaout's C kernels for CPU are unavailable ({reason}); the oneDNN path runs instead "
                "(MAMBAOUT_CPU_NATIVE=0 silences this)",
                RuntimeWarning,
                stacklevel=2,
            )
            return None


def unavailable_reason() -> str | None:
    """Why `library()` returned None; None when it loaded or was not asked yet."""
    return _REASON[0] if _REASON else None


def gate_dwconv(
    g: torch.Tensor, i: torch.Tensor | None, c: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """In place on the activated gate `g` `[B, H, W, hidden]` (contiguous): `g[..., :ni] *= i` and
    `g[..., ni:] *= conv(c)`, the depthwise k x k conv with zero padding k // 2, `ni = hidden - cc`.

    Args:
        i: the identity channels `[B, H, W, ni]`, None when ni is 0; c: the conv channels `[B, H, W, cc]`. Both may
            be channel slices of one map (rows of pixels a fixed stride apart); the same dtype as g (float32 or
            bfloat16).
        weight: the conv weight as float32 `[k, k, cc]`, contiguous; bias: float32 `[cc]` or None.
    """
    if not (g.is_contiguous() and weight.is_contiguous() and weight.dtype == torch.float32):
        raise ValueError("gate_dwconv: g and the float32 weight must be contiguous (see the docstring)")
    lib = library()
    B, H, W, hidden = g.shape
    cc, k = c.shape[-1], weight.shape[0]
    lib.mo_gate_dwconv(
        int(g.dtype == torch.bfloat16),
        g.data_ptr(),
        g.stride(2),
        None if i is None else i.data_ptr(),
        0 if i is None else i.stride(2),
        c.data_ptr(),
        c.stride(2),
        weight.data_ptr(),
        None if bias is None else bias.data_ptr(),
        B,
        H,
        W,
        hidden - cc,
        cc,
        k,
        torch.get_num_threads(),
    )


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, gelu: bool = False
) -> torch.Tensor:
    """`torch.layer_norm(x, x.shape[-1:], weight, bias, eps)` for a contiguous float32 or bfloat16 `x` of at most
    `NORM_MAX_CHANNELS` channels, with float32 `weight` and `bias` (contiguous); the result in x's dtype. Mean and
    variance in float32 (two passes), one rounding at the store. `gelu`: the exact GELU of the result, in the same
    pass (before the store)."""
    C = x.shape[-1]
    if not (x.is_contiguous() and weight.is_contiguous() and weight.dtype == torch.float32 and C <= NORM_MAX_CHANNELS):
        raise ValueError("layer_norm: contiguous x of at most NORM_MAX_CHANNELS channels, float32 weight")
    lib = library()
    y = torch.empty_like(x)
    rows = x.numel() // C if C else 0
    bf16 = int(x.dtype == torch.bfloat16)
    bias_ptr = None if bias is None else bias.data_ptr()
    lib.mo_layer_norm(
        bf16, int(gelu), x.data_ptr(), C, y.data_ptr(), weight.data_ptr(), bias_ptr, rows, C, eps,
        torch.get_num_threads(),
    )  # fmt: skip
    return y


def pack_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A linear layer's `weight` `[N, K]` (float32, or bfloat16 with K even) and `bias` as `linear` reads them:
    panels of 32 output rows, zero-padded, each `[K, 32]` (bf16: `[K / 2, 32, 2]`, pairs of k), and the bias as
    float32 padded to the panels (zeros without one). Returns (packed weight, padded bias, N)."""
    N, K = weight.shape
    if weight.dtype == torch.bfloat16 and K % 2:
        raise ValueError(f"pack_linear: a bfloat16 weight needs an even number of inputs, got {K}")
    panels = -(-N // _PANEL)
    w = weight.detach().new_zeros(panels * _PANEL, K)
    w[:N] = weight.detach()
    w = w.view(panels, _PANEL, K)
    if weight.dtype == torch.bfloat16:
        packed = w.view(panels, _PANEL, K // 2, 2).permute(0, 2, 1, 3).contiguous()  # [panels, K/2, 32, 2]
    else:
        packed = w.transpose(1, 2).contiguous()  # [panels, K, 32]
    b = torch.zeros(panels * _PANEL, dtype=torch.float32)
    if bias is not None:
        b[:N] = bias.detach().float()
    return packed, b, N


def linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor,
    N: int,
    res: torch.Tensor | None = None,
    gelu: bool = False,
) -> torch.Tensor:
    """`x @ W.T + bias` (`+ res`) over the last dimension of a contiguous `x` `[..., K]`, with `pack_linear`'s
    weight; a new contiguous `[..., N]` in x's dtype. `res`: contiguous `[..., N]`, x's dtype. `gelu`: the exact
    (erf) GELU of the sum, before `res`. float32 sums, bf16 rounded once at the store."""
    K = x.shape[-1]
    if not (x.is_contiguous() and packed.dtype == x.dtype and (res is None or res.is_contiguous())):
        raise ValueError("linear: contiguous x and res, and a weight packed in x's dtype (see the docstring)")
    rows = x.numel() // K if K else 0
    y = torch.empty((*x.shape[:-1], N), dtype=x.dtype)
    library().mo_linear(
        int(x.dtype == torch.bfloat16), int(gelu), x.data_ptr(), K, packed.data_ptr(),
        bias.data_ptr(), None if res is None else res.data_ptr(), N, y.data_ptr(), N, rows, K, N,
        torch.get_num_threads(),
    )  # fmt: skip
    return y


def block(
    x: torch.Tensor,
    norm: tuple[torch.Tensor, torch.Tensor | None, float],
    gate: tuple[torch.Tensor, torch.Tensor, int],
    ic: tuple[torch.Tensor, torch.Tensor, int],
    conv: tuple[torch.Tensor, torch.Tensor | None],
    fc2: tuple[torch.Tensor, torch.Tensor, int],
    cc: int,
) -> torch.Tensor:
    """A whole Gated CNN block with the exact GELU and the residual added by fc2, in one call: `layer_norm`, then
    `linear` for fc1's gate rows (GELU) and for its identity-and-conv rows, `gate_dwconv`, and `linear` for fc2 with
    `x` as the residual; the same calls in the same order as one by one, so the same result bit for bit.

    Args:
        x: `[B, H, W, C]` contiguous, float32 or bfloat16 (C even for bfloat16); a new tensor like it is returned.
        norm: the LayerNorm's float32 weight and bias (or None), contiguous, and its eps.
        gate, ic, fc2: `pack_linear` results for fc1's rows `:hidden`, `hidden:` and fc2, packed in x's dtype.
        conv: the depthwise conv's float32 `[k, k, cc]` weight and `[cc]` bias (or None), as `gate_dwconv` reads them.
        cc: the conv channels (the last `cc` of the hidden ones).
    """
    B, H, W, C = x.shape
    hidden = gate[2]
    nw, nb, eps = norm
    cw, cb = conv
    if not (x.is_contiguous() and gate[0].dtype == x.dtype and nw.dtype == torch.float32 and C <= NORM_MAX_CHANNELS):
        raise ValueError("block: contiguous x, weights packed in its dtype, float32 norm weight (see the docstring)")
    if ic[2] != hidden or fc2[2] != C or cw.shape != (cw.shape[0], cw.shape[0], cc):
        raise ValueError(f"block: fc1's rows ({hidden}, {ic[2]}), fc2's ({fc2[2]}) or the conv's {tuple(cw.shape)} do "
                         f"not fit {C} channels, {hidden} hidden, {cc} conv channels")  # fmt: skip
    ws = torch.empty(x.numel() // C * (C + 2 * hidden), dtype=x.dtype)
    y = torch.empty_like(x)
    library().mo_block(
        int(x.dtype == torch.bfloat16), x.data_ptr(), y.data_ptr(), ws.data_ptr(),
        nw.data_ptr(), None if nb is None else nb.data_ptr(), eps,
        gate[0].data_ptr(), gate[1].data_ptr(), ic[0].data_ptr(), ic[1].data_ptr(),
        cw.data_ptr(), None if cb is None else cb.data_ptr(), fc2[0].data_ptr(), fc2[1].data_ptr(),
        B, H, W, C, hidden, cc, cw.shape[0], torch.get_num_threads(),
    )  # fmt: skip
    return y
