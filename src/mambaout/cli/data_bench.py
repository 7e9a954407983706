"""`mambaout data-bench`: training images per second of three input pipelines on the same data and cores.

- `ours cpu`: `data_pipeline: cpu`, our loader (timm transforms on PIL images in worker processes);
- `ours gpu`: `data_pipeline: gpu` with `cache`: decoded once (timed apart), then augmented on `--device`
  (on a machine without a GPU: the same code on CPU tensors, using the same cores through torch threads);
- `timm`: timm's own `create_dataset` + `create_loader` with the same augmentation.

Each pipeline delivers `--batches` batches after `--warmup` untimed ones (worker start-up excluded); the ratio
column is against timm measured in the same run. Mixup/CutMix is left out of all three (it runs on the training
device in every case).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from mambaout.cli.common import Parser
from mambaout.utils.device import cpu_name


def _time(loader, batches: int, warmup: int, device: torch.device) -> float:
    """img/s over `batches` batches after `warmup` untimed ones."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        x = next(it)[0]
        n += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - t0)


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(prog="mambaout data-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-train", help="ImageFolder directory or .tar (default: the recipe's data_train)")
    p.add_argument("--recipe", default="imagenette-h100", help="augmentation settings to use (default %(default)s)")
    p.add_argument("--img-size", type=int, help="override the recipe's img_size")
    p.add_argument("--batch-size", "-b", type=int, default=128)
    p.add_argument("--workers", "-j", type=int, default=os.cpu_count(), help="loader processes (default: all cores)")
    p.add_argument("--batches", type=int, default=20, help="timed batches per pipeline")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", nargs="+", choices=["cpu", "gpu", "timm"], default=["cpu", "gpu", "timm"])
    return p


def main(argv: list[str] | None = None) -> int:
    from mambaout.data import gpu_loader as data_gpu
    from mambaout.data.datasets import ImageDataset
    from mambaout.data.gpu_aug import GpuAugment
    from mambaout.data.loaders import train_loader
    from mambaout.data.transforms import build_train_transform, timm_augment_kwargs
    from mambaout.training.config import resolve_config
    from mambaout.utils.limits import check_img_size

    parser = get_args_parser()
    args = parser.parse_args(argv)
    for flag, value, least in (("--batches", args.batches, 1), ("--batch-size", args.batch_size, 1)):
        if value < least:
            parser.error(f"{flag} must be >= {least}, got {value}")
    for flag, value in (("--warmup", args.warmup), ("--workers", args.workers)):
        if value < 0:
            parser.error(f"{flag} must be >= 0, got {value}")
    if args.img_size is not None:
        try:
            check_img_size(args.img_size)
        except ValueError as e:
            parser.error(str(e))
    overrides = dict(recipe=args.recipe)
    if args.img_size:
        overrides["img_size"] = args.img_size
    if args.data_train:
        overrides["data_train"] = args.data_train
    try:  # the same resolution and checks as `mambaout train`
        cfg = resolve_config(overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"mambaout data-bench: {e}", file=sys.stderr)
        return 2
    train_path, aug = cfg.data.data_train, cfg.augment
    if not os.path.exists(train_path):
        print(f"mambaout data-bench: no data at {train_path!r}; pass --data-train PATH", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    torch.set_num_threads(os.cpu_count() or 1)
    bs, workers = args.batch_size, args.workers
    rows = {}
    note = ""

    if "cpu" in args.only:
        ds = ImageDataset(train_path, build_train_transform(aug), cache=True)
        loader = train_loader(ds, bs, 0, 1, 0, workers, pin=device.type == "cuda", persistent=True)
        rows["ours cpu"] = _time(loader, args.batches, args.warmup, device)
        del loader
    if "gpu" in args.only:
        t0 = time.perf_counter()
        data = data_gpu.decoded_dataset(train_path, aug.img_size, device, workers=workers)
        decode_s = time.perf_counter() - t0
        loader = data_gpu.DecodedTrainLoader(data, GpuAugment.from_config(aug), bs)
        rows[f"ours gpu ({device.type} tensors)"] = _time(loader, args.batches, args.warmup, device)
        note = f"ours gpu decoded {len(data)} images once, in {decode_s:.1f} s (not in its img/s)"
    if "timm" in args.only:
        from timm.data import create_dataset, create_loader

        ds = create_dataset("", root=train_path, is_training=True)
        loader = create_loader(
            ds,
            input_size=(3, aug.img_size, aug.img_size),
            batch_size=bs,
            is_training=True,
            use_prefetcher=False,
            **timm_augment_kwargs(aug),
            num_workers=workers,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
        )
        rows["timm"] = _time(loader, args.batches, args.warmup, device)

    base = rows.get("timm")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{train_path} | {aug.img_size} px, {aug.auto_augment}, reprob {aug.reprob} | batch {bs}, "
        f"{workers} workers | {cpu_name()}, {os.cpu_count()} cores, load {load:.1f} | device {device}"
    )
    print(f"{'pipeline':<28} {'img/s':>9} {'x timm':>7}")
    for name, v in rows.items():
        ratio = f"{v / base:.2f}" if base else "-"
        print(f"{name:<28} {v:>9.0f} {ratio:>7}")
    if note:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
