"""`mambaout benchmark`: our MambaOut against timm's, same weights, dtype, layout and batch, measured in one run.

Ours gets timm's weights and must agree with it before its steps are timed interleaved with timm's (timm, ours, timm,
...), so both see the same machine load. Peak memory on CPU is the growth of the resident set during one step,
sampled every millisecond (approximate: it misses shorter allocations and counts memory the allocator keeps).

    flock /tmp/mambaout-cpu.lock mambaout benchmark --models mambaout_femto mambaout_tiny --batch-size 16
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import datetime
import importlib.metadata as md
import io
import os
import re
import statistics
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mambaout import kernels
from mambaout.analysis.flops import count_macs
from mambaout.cli.common import Parser, add_amp_argument, fail, shape_only_model
from mambaout.deploy import benchmark as rt
from mambaout.inference import precision
from mambaout.utils.device import autocast, autocast_setting, device_name, resolve_device
from mambaout.utils.files import atomic_write_text, check_writable, output_target
from mambaout.utils.limits import check_img_size
from mambaout.utils.threads import set_threads

# --dtype -> the autocast dtype over fp32 weights, as in mixed-precision practice (None: plain fp32)
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Agreement checked before timing: max |ours - timm| over max |timm| of the logits (or of a weight gradient).
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 2e-2}


def default_csv(device: torch.device) -> str:
    """`benchmark-<device>-torch<version>.csv`, e.g. `benchmark-nvidia-h100-80gb-hbm3-torch2.14.1.csv`."""
    slug = re.sub(r"[^a-z0-9.]+", "-", device_name(device).lower()).strip("-")
    return f"benchmark-{slug}-torch{torch.__version__.split('+')[0]}.csv"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss() -> int:
    """The process's resident set in bytes (0 where /proc is not there to tell it)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 0


def make_step(model, mode: str, x: torch.Tensor, dtype: str, context=contextlib.nullcontext):
    """A zero-argument callable running one inference forward or one training step (forward, loss, backward, AdamW),
    inside `context()` (a `mambaout.kernels` mode)."""
    amp = autocast(x.device, DTYPES[dtype])
    if mode == "infer":
        model.eval()

        def infer():
            with context(), torch.inference_mode(), amp:
                return model(x)

        return infer
    model.train()
    target = torch.randint(0, model.num_classes, (x.shape[0],), device=x.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=x.device.type == "cuda")

    def train():
        with context():
            with amp:
                loss = F.cross_entropy(model(x), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    return train


def _agreement(ref, ours, mode: str, x: torch.Tensor, dtype: str) -> float:
    """max |ours - timm| / max |timm| on the logits (infer) or on the first block's fc1 weight gradient (train)."""
    amp = autocast(x.device, DTYPES[dtype])
    if mode == "infer":
        with torch.inference_mode(), amp:
            a, b = ref.eval()(x).float(), ours.eval()(x).float()
    else:
        grads = []
        for m in (ref, ours):
            m.train().zero_grad(set_to_none=True)
            with amp:
                m(x).float().logsumexp(-1).mean().backward()
            grads.append(m.stages[0].blocks[0].fc1.weight.grad.float().clone())
            m.zero_grad(set_to_none=True)
        a, b = grads
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()


def _peak_memory(step, device: torch.device) -> float:
    """MiB: CUDA peak allocated over one step, or CPU resident-set growth during one step (see module docstring)."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    base = peak = _rss()
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.wait(0.001):
            peak = max(peak, _rss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        step()
    finally:
        stop.set()
        thread.join()
    return (max(peak, _rss()) - base) / 2**20


def benchmark_model(
    name: str,
    mode: str = "infer",
    batch_size: int = 16,
    dtype: str = "fp32",
    compile: bool = False,
    channels_last: bool = False,
    device: str = "cpu",
    img_size: int = 224,
    warmup: int = 2,
    iters: int = 5,
    with_reference: bool = False,
    with_fused: bool = False,
) -> list[dict]:
    """Time timm's and our `name` side by side, one row per implementation (see module docstring): `with_reference`
    adds ours with every fast path off (`ours-reference`), `with_fused` ours with the fused Triton kernels (CUDA)."""
    if mode not in ("infer", "train"):
        raise ValueError(f"mode must be 'infer' or 'train', got {mode!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if batch_size < 1 or iters < 1 or warmup < 0:
        raise ValueError(f"need batch_size >= 1, iters >= 1, warmup >= 0; got {batch_size}, {iters}, {warmup}")
    dev = resolve_device(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ref, ours = (m.to(dev, memory_format=fmt) for m in rt.twins(name))  # identical weights, float32
    x = torch.randn(batch_size, 3, img_size, img_size, device=dev).contiguous(memory_format=fmt)
    agree = _agreement(ref, ours, mode, x[:2], dtype)
    if agree > TOLERANCE[dtype]:
        raise RuntimeError(
            f"{name}: ours and timm disagree ({agree:.2e} relative > {TOLERANCE[dtype]:.0e} for {dtype}); not timing"
        )
    # each implementation's model and the kernels mode its steps run in ("ours": the default, whatever the process set)
    impls = {"timm": (ref, contextlib.nullcontext), "ours": (ours, lambda: kernels.fused_kernels(False))}
    if with_reference:  # our model through the plain block forward: what the fast paths add
        impls["ours-reference"] = (copy.deepcopy(ours), kernels.reference_mode)
    if with_fused:
        impls["ours-fused"] = (copy.deepcopy(ours), kernels.fused_kernels)
    steps = {k: make_step(torch.compile(m) if compile else m, mode, x, dtype, ctx) for k, (m, ctx) in impls.items()}
    times = _time_interleaved(steps, warmup, iters, dev)
    base, rows = statistics.median(times["timm"]), []
    for key, step in steps.items():  # the columns in the order of the CSV files already written
        med, t = statistics.median(times[key]), times[key]
        row = dict(model=name, impl=key, mode=mode, device=device_name(dev), dtype=dtype, batch_size=batch_size)
        row.update(img_size=img_size, compile=compile, channels_last=channels_last)
        row.update(img_per_s=round(batch_size / med, 2), ms_per_step=round(1e3 * med, 2), ms_min=round(1e3 * min(t), 2))
        row.update(ms_max=round(1e3 * max(t), 2), peak_mem_mib=round(_peak_memory(step, dev), 1))
        diff = float(f"{agree:.2e}") if key == "ours" else 0.0
        row.update(speedup_vs_timm=round(base / med, 3), rel_diff_vs_timm=diff, iters=iters, torch=torch.__version__)
        rows.append(dict(row, date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")))
    return rows


def _time_interleaved(steps: dict, warmup: int, iters: int, dev: torch.device) -> dict[str, list[float]]:
    """Seconds of each step, `iters` rounds of one step of each implementation in turn (after `warmup` rounds)."""
    for _ in range(warmup):  # includes compilation and packing the fast path's weights
        for step in steps.values():
            step()
    _sync(dev)
    times = {k: [] for k in steps}
    for _ in range(iters):
        for key, step in steps.items():
            _sync(dev)
            t0 = time.perf_counter()
            step()
            _sync(dev)
            times[key].append(time.perf_counter() - t0)
    return times


def format_table(rows: list[dict]) -> str:
    header = f"{'model':<18} {'impl':<15} {'img/s':>9} {'ms/step':>9} {'min-max ms':>17} {'peak MiB':>9} {'vs timm':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        spread = f"{r['ms_min']:.0f}-{r['ms_max']:.0f}"
        lines.append(
            f"{r['model']:<18} {r['impl']:<15} {r['img_per_s']:>9.1f} {r['ms_per_step']:>9.1f} {spread:>17} "
            f"{r['peak_mem_mib']:>9.1f} {r['speedup_vs_timm']:>7.2f}x"
        )
    return "\n".join(lines)


def write_csv(rows: list[dict], path: str | Path) -> None:
    """Append `rows` to the CSV `path` (a header first when it is new), as one atomic replacement of the file. Rows
    with columns the file lacks (written by another version, or another kind of run) rewrite it with the union of
    the columns, old rows leaving the new ones empty: nothing is misaligned or lost."""
    path = output_target(path, "--csv")  # a device or a FIFO is refused, never appended to
    old = path.read_text() if path.exists() else ""
    fields = list(rows[0])
    if old:
        kept = csv.DictReader(io.StringIO(old))
        known = list(kept.fieldnames or [])
        fields = known + [f for r in rows for f in r if f not in known]
        fields = list(dict.fromkeys(fields))
        if fields != known:
            rows = [*kept, *rows]
            old = ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    if not old:
        writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, old + buf.getvalue())


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(prog="mambaout benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["mambaout_tiny"], help="registered names that timm also has")
    p.add_argument("--mode", choices=["infer", "train"], default="infer", help="inference, or a full AdamW step")
    p.add_argument("--batch-size", type=int, default=16, least=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), help="bf16/fp16 run under autocast (default fp32)")
    add_amp_argument(
        p, help="autocast as train and validate name it: bare --amp is --dtype bf16; auto: bf16 on CUDA, fp32 on CPU"
    )
    compile_help = "torch.compile both models (--runtimes: add compiled rows, fp32 and bf16)"
    p.add_argument("--compile", action="store_true", help=compile_help)
    p.add_argument("--channels-last", action="store_true", help="channels-last input and conv weights for both")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:i]")
    p.add_argument("--img-size", type=int, default=224, check=check_img_size)
    p.add_argument("--warmup", type=int, default=2, least=0, help="untimed steps per model first")
    p.add_argument("--iters", type=int, default=5, least=1, help="timed steps per model, interleaved")
    threads_help = "CPU threads (default: the cores free at start-up, utils/threads.py)"
    p.add_argument("--threads", type=int, default=None, least=1, help=threads_help)
    p.add_argument("--with-reference", action="store_true", help="also time our model with the fast paths off")
    fused_help = "also time our model with the opt-in fused Triton kernels (CUDA)"
    p.add_argument("--fused-kernels", action="store_true", help=fused_help)
    p.add_argument("--csv", default=None, help="append the rows to this CSV file (default: write none)")
    p.add_argument(
        "--runtimes",
        action="store_true",
        help="CPU: timm, ours fp32/bf16/int8, ONNX Runtime, OpenVINO side by side at batch 1 and --batch-size, "
        "with a roofline line (mambaout.deploy.benchmark)",
    )
    p.add_argument("--calib", default=None, help="--runtimes: images to calibrate the int8 row on (default: random)")
    p.add_argument("--rounds", type=int, default=1, help="--runtimes: run every row's process this many times")
    p.add_argument("--only", nargs="+", default=None, help="--runtimes: just these rows (and timm fp32, the baseline)")
    return p


def _runtimes(args) -> list[dict]:
    """`--runtimes`: the deployment table of the first of --models (see mambaout.deploy.benchmark); its CSV rows."""
    name, cpu = args.models[0], device_name(torch.device("cpu"))
    sizes = tuple(sorted({1, args.batch_size}))
    options = dict(compile=args.compile, rounds=args.rounds, only=args.only)  # threads: torch's, as set above
    rows = rt.runtime_rows(name, sizes, args.img_size, args.iters, args.warmup, args.calib, **options)
    versions = _versions()
    print(
        f"{cpu}, {name} at {args.img_size} px, each row in its own process, median of {args.iters * args.rounds} "
        f"steps, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {versions}"
    )
    print(rt.format_runtime_table(rows))
    for line in rt.round_ratio_lines(rows):
        print(line)
    peaks = {d: rt.gemm_peak_gflops(d) for d in ("fp32", "int8")}
    peaks["bf16"] = rt.gemm_peak_gflops("bf16") if precision.cpu_bf16_support()[0] else None
    for line in rt.roofline_lines(rows, count_macs(shape_only_model(name), args.img_size), peaks):
        print(line)
    return [dict(r, device=cpu, versions=versions) for r in rows]


def _versions() -> str:
    found = []
    for dist in ("torch", "timm", "onnxruntime", "openvino"):
        with contextlib.suppress(md.PackageNotFoundError):
            found.append(f"{dist} {md.version(dist)}")
    return ", ".join(found)


def _dtype(args: argparse.Namespace) -> str:
    """--dtype, or the autocast dtype --amp names (train's and validate's flag); given both, they must agree."""
    if args.amp is None:
        return args.dtype or "fp32"
    amp, _ = autocast_setting(args.amp, torch.device(args.device))
    dtype = "fp32" if amp == "none" else amp
    if args.dtype is not None and args.dtype != dtype:
        raise ValueError(f"--amp {args.amp} means --dtype {dtype} here, not --dtype {args.dtype}; pass one of them")
    return dtype


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        resolve_device(args.device)
        args.dtype = _dtype(args)
        if args.csv:
            check_writable(args.csv, "--csv")
    except ValueError as e:
        parser.error(str(e))
    if args.threads:
        set_threads(args.threads)
    if args.runtimes and torch.device(args.device).type != "cpu":
        parser.error("--runtimes compares CPU runtimes: pass --device cpu")
    if not args.runtimes and (args.calib or args.only or args.rounds != 1):
        parser.error("--calib, --only and --rounds apply to --runtimes only")
    keys = ("mode", "batch_size", "dtype", "compile", "channels_last", "device", "img_size", "warmup", "iters")
    options = {k: getattr(args, k) for k in (*keys, "with_reference")}
    try:
        if args.runtimes:
            rows = _runtimes(args)
        else:
            rows = [r for name in args.models for r in benchmark_model(name, **options, with_fused=args.fused_kernels)]
            print(
                f"{rows[0]['device']}, torch {rows[0]['torch']}, {args.mode}, {args.dtype}, batch {args.batch_size}, "
                f"{args.img_size}px, compile={args.compile}, channels_last={args.channels_last}, "
                f"median of {args.iters} interleaved steps"
            )
            print(format_table(rows))
    except ValueError as e:
        return fail("benchmark", e)
    if args.csv:
        try:
            write_csv(rows, args.csv)
        except OSError as e:
            return fail("benchmark", f"cannot append to --csv {args.csv} ({e})")
        print(f"rows appended to {args.csv}")
    return 0
