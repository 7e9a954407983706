"""`mambaout validate`: top-1 / top-5 / loss / throughput of one or more models on a labelled image set.

The set is an ImageFolder directory or a `.tar` of one; each model's eval transform and label map: docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from mambaout import kernels
from mambaout.cli.common import Parser, add_shared, fail, weights_kwargs
from mambaout.data.datasets import DIGITS, ImageDataset, create_dataset, folder_classes, imagenet_class_map
from mambaout.data.image import EvalSettings, eval_transform
from mambaout.data.loaders import eval_loader
from mambaout.deploy.runtimes import is_runtime_file, load_runtime_model
from mambaout.inference.precision import note, resolve_dtype, with_dtype
from mambaout.models.factory import create_model
from mambaout.training import classify
from mambaout.utils.device import resolve_device
from mambaout.utils.files import atomic_write_text, check_writable
from mambaout.utils.limits import check_crop_pct, check_img_size
from mambaout.utils.text import printable
from mambaout.weights.checkpoint import DownloadError


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(prog="mambaout validate", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "data",
        help="labelled images: an ImageFolder directory (<class>/<image>) or a .tar of one, or digits:val (the "
        "held-out split of the embedded digits)",
    )
    names_help = "registered model name(s), space- or comma-separated; optional with a checkpoint from mambaout train"
    p.add_argument("--model", nargs="+", default=[], help=names_help)
    files_help = "weights file(s), or exported models (.onnx run by ONNX Runtime, .xml by OpenVINO); pairs with --model"
    p.add_argument("--checkpoint", nargs="+", default=[], help=files_help)
    p.add_argument("--pretrained", action="store_true", help="use each --model's published weights")
    random_help = "score --model at random initialisation (a chance baseline)"
    p.add_argument("--random-weights", action="store_true", help=random_help)
    add_shared(p, "--num-classes", "--use-ema")
    img_help = "eval resolution (default: the weights' input size)"
    p.add_argument("--img-size", type=int, check=check_img_size, help=img_help)
    crop_help = "centre crop fraction (default: the weights' crop_pct)"
    p.add_argument("--crop-pct", type=float, check=check_crop_pct, help=crop_help)
    p.add_argument("--batch-size", "-b", type=int, default=128, least=1, help="halved and retried on out-of-memory")
    p.add_argument("--workers", "-j", type=int, default=2, least=0)
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    add_shared(p, "--dtype")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--results-file", help="write the results as JSON (top1/top5 in percent)")
    add_shared(p, "--fused-kernels")
    return p


def _specs(args) -> list[tuple[str | None, str | None]]:
    """(model name, checkpoint) pairs from --model and --checkpoint."""
    names = [n for item in args.model for n in item.split(",") if n]
    ckpts = list(args.checkpoint)
    if not names and not ckpts:
        raise ValueError("nothing to validate: pass --model NAME [--pretrained] and/or --checkpoint PATH")
    if ckpts and names and len(names) not in (1, len(ckpts)):
        raise ValueError(f"got {len(names)} --model names for {len(ckpts)} checkpoints: give one name, or one per file")
    if not ckpts:
        if args.pretrained and args.random_weights:
            raise ValueError("--pretrained and --random-weights exclude each other; pass one")
        if not (args.pretrained or args.random_weights):
            raise ValueError(
                f"--model {','.join(names)} has no weights to score: pass --pretrained (published weights), "
                "--checkpoint PATH, or --random-weights to score a random initialisation on purpose"
            )
        if args.use_ema:
            raise ValueError("--use-ema picks the EMA weights of --checkpoint files: pass --checkpoint PATH too")
        return [(n, None) for n in names]
    if len(names) == 1:
        names = names * len(ckpts)
    return list(zip(names or [None] * len(ckpts), ckpts))


def label_map(model, folders: list[str]) -> dict[str, int] | None:
    """Folder name -> the model's class index (None: sorted folder order)."""
    if "" in folders:  # images straight in the data folder: no label to score them against
        raise ValueError(
            "the data folder holds images beside (or instead of) class sub-folders: validate reads one sub-folder "
            "per class (DATA/<class>/<image>); for unlabelled images use mambaout predict"
        )
    names = getattr(model, "class_names", None)
    if names:
        index = {n: i for i, n in enumerate(names)}
        missing = [f for f in folders if f not in index]
        if missing:
            raise ValueError(
                f"the dataset's classes {missing[:3]} are not among the checkpoint's {len(names)} class names "
                f"({names[:3]}...); validate on a set with the same class folders"
            )
        return {f: index[f] for f in folders}
    mapping = imagenet_class_map(folders) if getattr(model, "num_classes", 0) == 1000 else None
    if mapping is not None:
        return mapping
    if getattr(model, "num_classes", len(folders)) != len(folders):
        # without class names the sorted folder order is the label: it means something only when the counts agree
        raise ValueError(
            f"the dataset has {len(folders)} classes but the model {model.num_classes} outputs, and its weights name "
            "no classes to match the folders by; pass the checkpoint trained on this dataset"
        )
    return None


def eval_dataset(model, data: str, img_size: int | None = None, crop_pct: float | None = None):
    """The labelled images of `data` as `model` is evaluated on them: its eval transform, its label map."""
    transform = eval_transform(model.pretrained_cfg, img_size, crop_pct)
    if data.startswith(DIGITS):  # the embedded set of the default `mambaout train`: digits:val is its held-out split
        dataset = create_dataset(data, transform=transform, img_size=img_size or model.pretrained_cfg["input_size"][-1])
        mapping = label_map(model, dataset.classes)
        if mapping is not None and any(mapping[c] != i for i, c in enumerate(dataset.classes)):
            raise ValueError(f"the model's class names {model.class_names[:3]}... are not the digits 0-9 in order")
        return dataset
    mapping = label_map(model, folder_classes(data))
    # no substitution: an unreadable file is left out and named, never counted as another image
    return ImageDataset(data, transform=transform, class_to_idx=mapping, substitute=False)


def validate_one(name, checkpoint, args, device) -> dict:
    pretrained = bool(args.pretrained and checkpoint is None)
    dtype = args.run_dtype  # --dtype after the hardware check
    if is_runtime_file(checkpoint):  # an exported model (ONNX, int8 ONNX, OpenVINO): its runtime runs it on CPU
        if device.type != "cpu" or args.dtype != "fp32" or args.amp or args.channels_last:
            raise ValueError(
                f"{checkpoint} runs in its runtime on CPU at the precision it was exported with: "
                "drop --device cuda, --dtype, --amp and --channels-last"
            )
        model = load_runtime_model(checkpoint)
    else:
        model = create_model(
            name, pretrained=pretrained, checkpoint=checkpoint, use_ema=args.use_ema, **weights_kwargs(args)
        )
    settings = EvalSettings.from_dict(model.pretrained_cfg, f"{model.model_name}'s eval settings")
    dataset = eval_dataset(model, args.data, args.img_size, args.crop_pct)
    model = with_dtype(model.to(device).eval(), dtype)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    batch = args.batch_size
    while True:
        loader = eval_loader(dataset, batch, workers=args.workers, pin=device.type == "cuda")
        try:
            m = classify.evaluate(model, loader, device, torch.bfloat16 if args.amp else None, args.channels_last)
            break
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2
            torch.cuda.empty_cache()  # a no-op where CUDA was never initialised
            print(f"out of memory: retrying with batch size {batch}", file=sys.stderr)
    if m["count"] == 0:
        raise ValueError(
            f"no readable image in {args.data}: all {m['skipped']} files failed to decode (first: "
            f"{m['skipped_files'][0] if m['skipped_files'] else '?'}); check the files or re-extract them"
        )
    # the keys in the order of the results files already written
    r = dict(model=model.model_name, checkpoint=str(checkpoint) if checkpoint else None, pretrained=pretrained)
    r.update(data=str(args.data), top1=round(m["top1"], 3), top5=round(m["top5"], 3), loss=round(m["loss"], 5))
    r.update(count=m["count"], skipped=m["skipped"], skipped_files=m["skipped_files"])
    crop = args.crop_pct if args.crop_pct is not None else settings.crop_pct
    r.update(img_size=args.img_size or settings.input_size[-1], crop_pct=crop, interpolation=settings.interpolation)
    r.update(batch_size=batch, img_s=round(m["img_s"], 1), device=str(device), amp="bf16" if args.amp else "none")
    return dict(r, dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    kernels.set_fused_kernels(args.fused_kernels)
    try:
        specs = _specs(args)
        if not Path(args.data).exists() and not args.data.startswith("digits:"):
            raise FileNotFoundError(f"{args.data} does not exist; pass an ImageFolder directory or a .tar of one")
        if args.amp and args.dtype != "fp32":
            raise ValueError("--amp (bf16 autocast) and --dtype bf16 (bf16 weights) exclude each other; pass one")
        if args.results_file:
            check_writable(args.results_file, "--results-file", inputs=[*args.checkpoint, args.data])
        device = resolve_device(args.device)

        args.run_dtype, message = resolve_dtype(args.dtype, device)
        note(message, "mambaout validate")
        results = []
        for name, ckpt in specs:
            t0 = time.perf_counter()
            r = validate_one(name, ckpt, args, device)
            label = printable(r["model"] + (f" ({ckpt})" if ckpt else ""))
            print(
                f"{label}: top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  loss {r['loss']:.4f}  "
                f"{r['count']} images at {r['img_size']} px, {r['img_s']:.0f} img/s ({time.perf_counter() - t0:.0f}s)"
                + (f"  skipped {r['skipped']} unreadable" if r["skipped"] else "")
            )
            if r["skipped"]:
                more = f" (+{r['skipped'] - 10} more)" if r["skipped"] > 10 else ""
                names = printable(", ".join(r["skipped_files"][:10]))
                print(f"  unreadable, not counted: {names}{more}", file=sys.stderr)
            results.append(r)
    except (ValueError, FileNotFoundError, DownloadError) as e:
        return fail("validate", printable(e))
    if args.results_file:
        # one model: a flat object with top1/top5; several: a list of them
        text = json.dumps(results[0] if len(results) == 1 else results, indent=2) + "\n"
        try:
            atomic_write_text(args.results_file, text)
        except OSError as e:
            return fail("validate", f"cannot write --results-file {args.results_file} ({e})")
    return 0
