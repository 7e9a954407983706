"""The stem's and downsampling layers' convs on the CPU path, measured: the weight as a channels-last copy (bit for
bit the module) against the weight packed by oneDNN for the input's shape (`MAMBAOUT_CPU_PACK_CONVS`).

    flock /tmp/mambaout-cpu.lock python benchmarks/outer_convs.py --model mambaout_femto --threads 1

Each conv of the model at its own input shape (batch 1 by default), float32 or bf16, under `inference_mode`; the two
ways alternate in blocks of `--calls` calls, `--rounds` times, and the best block of each is printed in µs per call,
with the largest difference between their outputs.
"""

from __future__ import annotations

import argparse
import time

import torch

import mambaout
from mambaout.kernels import cpu
from mambaout.utils.device import cpu_name


def _inputs(
    model: torch.nn.Module, batch: int, size: int, dtype: torch.dtype
) -> list[tuple[str, torch.nn.Conv2d, torch.Tensor]]:
    """(name, conv, its input) for every conv outside the blocks, from one forward with hooks."""
    seen = []
    hooks = [
        conv.register_forward_pre_hook(lambda mod, args, name=name: seen.append((name, mod, args[0].clone())))
        for name, conv in model.named_modules()
        if isinstance(conv, torch.nn.Conv2d) and ".blocks." not in name
    ]
    with torch.inference_mode():
        model(torch.randn(batch, 3, size, size, dtype=dtype))
    for hook in hooks:
        hook.remove()
    return seen


def _per_call(conv: torch.nn.Conv2d, x: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        cpu.conv_channels_last(conv, x)
    return (time.perf_counter() - start) / calls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mambaout_femto")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cpu.set_cpu_bf16(True)  # the bf16 convs take the same path where asked for
    model = mambaout.create_model(args.model).eval().to(dtype)
    print(f"{args.model}, {args.dtype}, batch {args.batch_size}, {args.threads} thread(s), {cpu_name()}")
    print("| conv | input | channels-last weight, µs | packed weight, µs | ratio | max diff |")
    print("| --- | --- | --- | --- | --- | --- |")
    with torch.inference_mode():
        for name, conv, x in _inputs(model, args.batch_size, args.img_size, dtype):
            best = {}
            outs = {}
            for _ in range(args.rounds):
                for packed in (False, True):
                    cpu._PACK_CONVS = packed
                    outs[packed] = cpu.conv_channels_last(conv, x)  # also packs for this shape, outside the timing
                    took = _per_call(conv, x, args.calls)
                    best[packed] = min(best.get(packed, took), took)
            diff = (outs[True].float() - outs[False].float()).abs().max().item()
            shape = "x".join(map(str, x.shape))
            plain, packed = best[False] * 1e6, best[True] * 1e6
            print(f"| {name} | {shape} | {plain:.0f} | {packed:.0f} | {plain / packed:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
