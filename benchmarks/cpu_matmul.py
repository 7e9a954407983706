"""The CPU fast path's matmul library, measured: timm, then ours with "auto", "onednn" and "blas", interleaved.

    flock /tmp/mambaout-cpu.lock python benchmarks/cpu_matmul.py --models mambaout_femto --batch-sizes 1 16 32

Same weights (copied from timm's model), same input, float32 under `inference_mode`; each step of each row is
timed in turn, so a disturbance hits all rows alike. Prints img/s, the ratio to timm, the max |logit difference|
to timm, and for "auto" which library it chose at each stage shape (rows = batch x H x W, width). Which library
is faster depends on the CPU (see `mambaout/kernels/cpu.py`), which is why "auto" times both on first use.
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import mambaout
from mambaout.kernels import cpu
from mambaout.utils.device import cpu_name

MODES = ("auto", "onednn", "blas")


def _run(name: str, batch: int, steps: int, img_size: int) -> None:
    theirs = timm.create_model(name).eval()
    ours = mambaout.create_model(name).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {k: [] for k in ("timm", *MODES)}
    diffs = {}
    with torch.inference_mode():
        want = theirs(x)
        for mode in MODES:
            cpu.set_cpu_matmul(mode)
            diffs[mode] = (ours(x) - want).abs().max().item()  # also the warm-up, and "auto"'s timing run
        cpu.forget_cpu_matmul_choices()
        cpu.set_cpu_matmul("auto")
        ours(x)  # what "auto" picks for this batch's shapes
        chosen = sorted({(key[0], key[1], lib) for key, lib in cpu.cpu_matmul_choices().items()}, reverse=True)
        for _ in range(steps):
            for row in times:
                if row != "timm":
                    cpu.set_cpu_matmul(row)
                model = theirs if row == "timm" else ours
                start = time.perf_counter()
                model(x)
                times[row].append(time.perf_counter() - start)
    cpu.set_cpu_matmul("auto")
    base = statistics.median(times["timm"])
    for row, values in times.items():
        med = statistics.median(values)
        label = "timm" if row == "timm" else f"ours, {row}"
        diff = f"{diffs[row]:.1e}" if row in diffs else "0"
        print(f"| {name} | {batch} | {label} | {batch / med:.1f} | {base / med:.2f}x | {diff} |")
    picks = ", ".join(f"{rows}x{width} {lib}" for rows, width, lib in chosen)
    print(f"|  |  | auto chose | {picks} |  |  |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["mambaout_femto"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16, 32])
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (median; default 10)")
    p.add_argument("--img-size", type=int, default=224)
    args = p.parse_args()
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, timm {timm.__version__}")
    print("| model | batch | implementation | img/s | vs timm | max abs diff vs timm |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.models:
        for batch in args.batch_sizes:
            _run(name, batch, args.steps, args.img_size)


if __name__ == "__main__":
    main()
