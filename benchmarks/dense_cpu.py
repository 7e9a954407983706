"""Detection and segmentation throughput (img/s), training and inference, for MambaOut backbones on this machine.

    flock /tmp/mambaout-cpu.lock python benchmarks/dense_cpu.py --models mambaout_femto mambaout_tiny --threads 1

Mask R-CNN + FPN (torchvision, the paper's heads: FPN 256, box head 1024, mask head 256, 512 RoIs) at a shorter
side of --det-size, and UperNet (512 channels, BatchNorm, auxiliary head) on --seg-size crops, random weights and
random images with a few boxes/masks each: speed does not depend on the weights. Training is a full AdamW step
(forward, losses, backward, update); inference is `model.eval()` under no_grad. Each number is the median of
--repeat timed steps after --warmup untimed ones. On cores other processes share, --threads 1 measures what a
single thread does; more threads than idle cores wait on each other (we saw 6-8x slower steps at 2 threads, load 8).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from mambaout.dense.detection import DetectorConfig, create_detector
from mambaout.dense.upernet import SegmenterConfig, create_segmenter
from mambaout.utils.device import cpu_name


def _targets(n: int, size: int, gen: torch.Generator) -> list[dict]:
    out = []
    for _ in range(n):
        xy = torch.rand(4, 2, generator=gen) * size * 0.6
        wh = 16 + torch.rand(4, 2, generator=gen) * size * 0.35
        boxes = torch.cat([xy, xy + wh], 1)
        masks = torch.zeros(4, size, size, dtype=torch.uint8)
        for m, (x1, y1, x2, y2) in zip(masks, boxes.round().long().tolist()):
            m[y1:y2, x1:x2] = 1
        out.append(dict(boxes=boxes, labels=torch.randint(1, 81, (4,), generator=gen), masks=masks))
    return out


def _median_s(fn, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _train_and_infer(model, loss_inputs: tuple, infer_inputs, args) -> tuple[float, float]:
    """Median seconds of one AdamW training step on `loss_inputs` and of one no-grad forward of `infer_inputs`."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        model.train()
        loss = sum(model(*loss_inputs).values())
        opt.zero_grad()
        loss.backward()
        opt.step()

    def infer():
        model.eval()
        with torch.no_grad():
            model(infer_inputs)

    return _median_s(train_step, args.warmup, args.repeat), _median_s(infer, args.warmup, args.repeat)


def bench(name: str, args) -> list[tuple]:
    gen = torch.Generator().manual_seed(0)
    b, s, c = args.batch, args.det_size, args.seg_size
    det = create_detector(DetectorConfig(backbone=name, num_classes=80, min_size=s, max_size=s, drop_path_rate=0.0))
    images = [torch.rand(3, s, s, generator=gen) for _ in range(b)]
    det_s = _train_and_infer(det, (images, _targets(b, s, gen)), images, args)
    seg = create_segmenter(SegmenterConfig(backbone=name, num_classes=150, drop_path_rate=0.0))
    x = torch.rand(b, 3, c, c, generator=gen)
    seg_s = _train_and_infer(seg, (x, torch.randint(0, 150, (b, c, c), generator=gen)), x, args)
    return [
        (name, "Mask R-CNN", f"{s}x{s}", "train", b / det_s[0]),
        (name, "Mask R-CNN", f"{s}x{s}", "inference", b / det_s[1]),
        (name, "UperNet", f"{c}x{c}", "train", b / seg_s[0]),
        (name, "UperNet", f"{c}x{c}", "inference", b / seg_s[1]),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["mambaout_femto", "mambaout_tiny"])
    p.add_argument("--det-size", type=int, default=320)
    p.add_argument("--seg-size", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"# {cpu_name()}, {torch.get_num_threads()} threads, load average {load}, torch {torch.__version__}, batch {args.batch}"
    )
    print("| backbone | model | input | mode | img/s |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.models:
        for row in bench(name, args):
            print(f"| {row[0]} | {row[1]} | {row[2]} | {row[3]} | {row[4]:.2f} |", flush=True)
    print(f"# load average at the end: {', '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
