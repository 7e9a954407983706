"""The C matmul (`native.linear`) against oneDNN and BLAS at one model's block shapes, per call.

    flock /tmp/mambaout-cpu.lock python benchmarks/c_matmul.py --threads 1

Each of the block's matmuls at batch 1 (fc1's gate or identity-and-conv rows, `rows x dim -> hidden`, and fc2,
`rows x hidden -> dim`), float32, `x @ W.T + b`: ours on the weight packed once (`native.pack_linear`), oneDNN's
`_linear_pointwise` on a weight it reordered once for the row count, and `torch.addmm`. Prints the best of
`--rounds` blocks of `--calls` calls, in µs and GFLOP/s.
"""

from __future__ import annotations

import argparse
import time

import torch

import mambaout
from mambaout.kernels import native
from mambaout.utils.device import cpu_name


def best_us(fn, calls: int, rounds: int) -> float:
    for _ in range(calls // 10 + 1):
        fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mambaout_femto")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if native.library() is None:
        raise SystemExit(f"the C kernels are unavailable here: {native.unavailable_reason()}")
    model = mambaout.create_model(a.model)
    shapes = []
    for i, stage in enumerate(model.stages):
        block = stage.blocks[0]
        side = a.img_size // 2 ** (i + 2)
        dim, hidden = block.fc1.in_features, block.fc2.in_features
        shapes += [(side * side, dim, hidden), (side * side, hidden, dim)]
    print(f"{a.model}, batch 1, float32, {a.threads} thread(s), {cpu_name()}")
    print("| rows x in -> out | C matmul, µs (GFLOP/s) | oneDNN | addmm |")
    print("| --- | --- | --- | --- |")
    for m, k, n in shapes:
        cells = [f"{us:.1f} ({2 * m * k * n / us / 1e3:.0f})" for us in time_shape(m, k, n, a.calls, a.rounds)]
        print(f"| {m}x{k} -> {n} | " + " | ".join(cells) + " |")


def time_shape(m: int, k: int, n: int, calls: int, rounds: int) -> list[float]:
    """µs per call of `x @ W.T + b` for x `[m, k]`, W `[n, k]`: the C matmul, oneDNN, addmm."""
    x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    packed = native.pack_linear(w, b)
    onednn_w = torch.ops.mkldnn._reorder_linear_weight(w, m)
    fns = [
        lambda: native.linear(x, *packed),
        lambda: torch.ops.mkldnn._linear_pointwise(x, onednn_w, b, "none", [], ""),
        lambda: torch.addmm(b, x, w.t()),
    ]
    return [best_us(fn, calls, rounds) for fn in fns]


if __name__ == "__main__":
    with torch.inference_mode():
        main()
