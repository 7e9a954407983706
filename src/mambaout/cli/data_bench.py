"""`mambaout data-bench`: training images per second of three input pipelines on the same data and cores.

- `ours cpu`: `data_pipeline: cpu`, our loader (timm transforms on PIL images in worker processes);
- `ours gpu`: `data_pipeline: gpu` with `cache`: decoded once (timed apart), then augmented on `--device`
  (on a machine without a GPU: the same code on CPU tensors, using the same cores through torch threads);
- `timm`: timm's own `create_dataset` + `create_loader` with the same augmentation.

Each pipeline is timed over `--batches` batches after `--warmup` untimed ones (worker start-up excluded), against
timm in the same run (docs/data.md). Mixup/CutMix is left out of all three (it runs on the training device anyway).
The options go through `mambaout train`'s resolution and checks, so a bad value is one line, not a traceback.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import torch
from timm.data import create_dataset, create_loader

from mambaout.cli.common import Parser, fail, one_line
from mambaout.data import gpu_loader as data_gpu
from mambaout.data.datasets import ImageDataset
from mambaout.data.gpu_aug import GpuAugment
from mambaout.data.loaders import train_loader
from mambaout.data.transforms import build_train_transform, timm_augment_kwargs
from mambaout.training.config import resolve_config
from mambaout.utils.device import cpu_name, resolve_device
from mambaout.utils.limits import check_img_size
from mambaout.utils.text import count, printable

MAX_WORKERS = 256  # the training config's bound on `workers` (DataConfig), which checks it again


def _batches(loader):
    """The loader's batches without end: when an epoch runs out, the next one starts (`set_epoch` reshuffles)."""
    for epoch in itertools.count():
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        n = 0
        for batch in loader:
            n += 1
            yield batch
        if n == 0:  # every loader here refuses a set smaller than one batch; this guards the loop itself
            raise ValueError("the loader gave no batch; lower --batch-size")


def _time(loader, batches: int, warmup: int, device: torch.device) -> float:
    """img/s over `batches` batches after `warmup` untimed ones (as many epochs as that takes)."""
    it = _batches(loader)
    for _ in range(warmup):
        next(it)
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        n += next(it)[0].shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - t0)


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(prog="mambaout data-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-train", help="ImageFolder directory or .tar (default: the recipe's data_train)")
    p.add_argument("--recipe", default="imagenette-h100", help="augmentation settings to use (default %(default)s)")
    p.add_argument("--img-size", type=int, check=check_img_size, help="override the recipe's img_size")
    p.add_argument("--batch-size", "-b", type=int, default=128, least=1)
    workers_help = f"loader processes (default: all cores, at most {MAX_WORKERS})"
    p.add_argument(
        "--workers", "-j", type=int, default=min(os.cpu_count() or 1, MAX_WORKERS), least=0, help=workers_help
    )
    p.add_argument("--batches", type=int, default=20, least=1, help="timed batches per pipeline")
    p.add_argument("--warmup", type=int, default=3, least=0, help="untimed batches first")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--only", nargs="+", choices=["cpu", "gpu", "timm"], default=["cpu", "gpu", "timm"])
    return p


def _resolve(args):
    """(config, device, images in the set) of the command line; ValueError or FileNotFoundError naming a bad option
    or data set."""
    # batch size, workers and image size bounded as for training; mixup off, since no pipeline here mixes (an odd
    # batch is then fine)
    overrides = dict(recipe=args.recipe, batch_size=args.batch_size, workers=args.workers, mixup=0.0, cutmix=0.0)
    overrides |= {k: v for k, v in dict(img_size=args.img_size, data_train=args.data_train).items() if v}
    cfg = resolve_config(overrides, require_data=False)
    device = resolve_device(args.device)
    if cfg.data.data_train is None:
        what = "an ImageFolder directory or a .tar of one"
        raise ValueError(f"recipe {cfg.run.recipe!r} names no data: pass --data-train PATH ({what})")
    if not os.path.exists(cfg.data.data_train):
        raise FileNotFoundError(f"no data at {cfg.data.data_train!r}; pass --data-train PATH")
    if "gpu" in args.only:
        GpuAugment.from_config(cfg.augment)  # what the device augmentation cannot do, said before any timing
    # listed once before any pipeline is built: a FIFO, a file that is no data set, a folder without images, and a set
    # smaller than one batch are one line here
    n_images = len(ImageDataset(cfg.data.data_train))
    if n_images < args.batch_size:
        raise ValueError(
            f"the training set ({n_images} images) is smaller than one batch of {args.batch_size}; lower --batch-size"
        )
    return cfg, device, n_images


def _bench(args, cfg, device: torch.device) -> tuple[dict[str, float], list[str]]:
    """img/s of each pipeline asked for, and notes to print under the table."""
    train_path, aug = cfg.data.data_train, cfg.augment
    bs, workers = args.batch_size, args.workers
    rows, notes = {}, []
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
        notes.append(f"ours gpu decoded {count(len(data), 'image')} once, in {decode_s:.1f} s (not in its img/s)")
    if "timm" in args.only:
        ds = create_dataset("", root=train_path, is_training=True)
        kwargs = dict(timm_augment_kwargs(aug), input_size=(3, aug.img_size, aug.img_size), batch_size=bs)
        kwargs.update(num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
        loader = create_loader(ds, is_training=True, use_prefetcher=False, **kwargs)
        rows["timm"] = _time(loader, args.batches, args.warmup, device)
    return rows, notes


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        cfg, device, n_images = _resolve(args)
        torch.set_num_threads(os.cpu_count() or 1)
        rows, notes = _bench(args, cfg, device)
    except (ValueError, FileNotFoundError) as e:  # the set's own trouble (all unreadable, ...) met while timing
        return fail("data-bench", printable(one_line(e)))
    bs, aug = args.batch_size, cfg.augment
    per_epoch = n_images // bs
    if args.warmup + args.batches > per_epoch:
        notes.insert(
            0,
            f"{n_images} images make {per_epoch} batch(es) of {bs} per epoch: the {args.warmup} + {args.batches} "
            "batches span several epochs (a pipeline starts its next epoch when one runs out)",
        )
    base = rows.get("timm")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{cfg.data.data_train} | {aug.img_size} px, {aug.auto_augment}, reprob {aug.reprob} | batch {bs}, "
        f"{args.workers} workers | {cpu_name()}, {os.cpu_count()} cores, load {load:.1f} | device {device}"
    )
    print(f"{'pipeline':<28} {'img/s':>9} {'x timm':>7}")
    for name, v in rows.items():
        ratio = f"{v / base:.2f}" if base else "-"
        print(f"{name:<28} {v:>9.0f} {ratio:>7}")
    for note in notes:
        print(note)
    return 0
