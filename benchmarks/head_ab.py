"""The classifier head on the CPU path against the plain module head, in the whole model's forward.

    flock /tmp/mambaout-cpu.lock python benchmarks/head_ab.py --threads 2 --img-size 64

The CPU path runs the head's linears through the C matmul and its norms through the C LayerNorm where the C kernels
are on (`kernels/cpu.py`: `outer_linear`, `outer_norm`); the "module" way calls the head's modules as they are. The
two ways alternate in one process (`--rounds` rounds of `--forwards` forwards each, after two untimed ones), under
`inference_mode`, and the medians of the rounds are printed with their ratio, and the largest logit difference.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import mambaout
from mambaout.kernels import cpu
from mambaout.models.mambaout import ClassifierHead
from mambaout.utils.device import cpu_name


def _module_head(head: ClassifierHead, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
    """What the head computes, through its modules only."""
    if head.global_pool == "avg":
        x = x.mean((1, 2))
    x = head.drop(head.pre_logits(head.norm(x)))
    return x if pre_logits else head.fc(x)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mambaout_femto")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--forwards", type=int, default=10, help="forwards per round")
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if dtype == torch.bfloat16:
        cpu.set_cpu_bf16(True)
    model = mambaout.create_model(args.model).eval().to(dtype)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, dtype=dtype)
    ways = {"module": _module_head, "C": ClassifierHead.forward}
    times: dict[str, list[float]] = {name: [] for name in ways}
    outputs = {}
    try:
        with torch.inference_mode():
            for _ in range(args.rounds):
                for name, forward in ways.items():
                    ClassifierHead.forward = forward
                    for _ in range(2):
                        outputs[name] = model(x)
                    start = time.perf_counter()
                    for _ in range(args.forwards):
                        model(x)
                    times[name].append((time.perf_counter() - start) / args.forwards)
    finally:
        ClassifierHead.forward = ways["C"]
    module, c_head = (statistics.median(times[name]) for name in ways)
    diff = float((outputs["C"].float() - outputs["module"].float()).abs().max())
    print(
        f"{args.model}, {args.dtype}, batch {args.batch_size}, {args.img_size} px, {args.threads} thread(s), "
        f"{cpu_name()}: module head {1e3 * module:.2f} ms, C head {1e3 * c_head:.2f} ms per forward "
        f"(median of {args.rounds} rounds of {args.forwards}), ratio {module / c_head:.3f}, max logit diff {diff:.1e}"
    )


if __name__ == "__main__":
    main()
