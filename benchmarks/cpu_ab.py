"""One part of the CPU path on and off, in the whole model's forward, both ways in one process.

    flock /tmp/mambaout-cpu.lock python benchmarks/cpu_ab.py --change head --threads 2 --img-size 64
    flock /tmp/mambaout-cpu.lock python benchmarks/cpu_ab.py --change block-call --threads 2 --dtype bf16

`--change head`: the head's linears through the C matmul and its norms through the C LayerNorm where the C kernels
are on (`kernels/cpu.py`: `outer_linear`, `outer_norm`), against the head's modules as they are. `--change
block-call`: each Gated CNN block as one C call (`native.block`) against the same C calls made one by one from
Python (`_ONE_BLOCK_CALL`; the blocks run the C matmul both ways, or with `--matmul auto` what `auto` picks). The two ways
alternate (`--rounds` rounds of `--forwards` forwards each, after two untimed ones), under `inference_mode`, and the
medians of the rounds are printed with their ratio, and the largest logit difference.
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
    p.add_argument("--change", choices=["head", "block-call"], required=True)
    matmul_help = "block-call: the blocks' matmuls (auto: timed again per shape at each switch, untimed)"
    p.add_argument("--matmul", choices=["native", "auto"], default="native", help=matmul_help)
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
    if args.change == "head":
        names, ways = ("module head", "C head"), (_module_head, ClassifierHead.forward)

        def use(way) -> None:
            ClassifierHead.forward = way
    else:
        cpu.set_cpu_matmul(args.matmul)
        names, ways = ("step by step", "one call"), (False, True)

        def use(way) -> None:
            cpu._ONE_BLOCK_CALL = way
            cpu.forget_cpu_matmul_choices()  # "auto" times each shape again in the untimed forwards

    times: dict[str, list[float]] = {name: [] for name in names}
    outputs = {}
    try:
        with torch.inference_mode():
            for _ in range(args.rounds):
                for name, way in zip(names, ways):
                    use(way)
                    for _ in range(2):
                        outputs[name] = model(x)
                    start = time.perf_counter()
                    for _ in range(args.forwards):
                        model(x)
                    times[name].append((time.perf_counter() - start) / args.forwards)
    finally:
        use(ways[1])
    before, after = (statistics.median(times[name]) for name in names)
    diff = float((outputs[names[1]].float() - outputs[names[0]].float()).abs().max())
    print(
        f"{args.model}, {args.dtype}, batch {args.batch_size}, {args.img_size} px, {args.threads} thread(s), "
        f"{cpu_name()}: {names[0]} {1e3 * before:.2f} ms, {names[1]} {1e3 * after:.2f} ms per forward "
        f"(median of {args.rounds} rounds of {args.forwards}), ratio {before / after:.3f}, max logit diff {diff:.1e}"
    )


if __name__ == "__main__":
    main()
