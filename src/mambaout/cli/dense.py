"""`mambaout detect train|validate|predict` and `mambaout segment train|validate|predict`.

Options given on the command line beat the recipe's, which beat the defaults (see `mambaout.dense.config`).
Errors a user can fix are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from mambaout.cli.common import Parser, add_amp_argument, stdout_failed
from mambaout.utils.text import printable

S = argparse.SUPPRESS  # options not given stay out of the namespace, so they never override the recipe
B = argparse.BooleanOptionalAction  # an on/off option: --x / --no-x, as the classification commands have
ACTIONS = ("train", "validate", "predict")

# command-line flag -> (section.key); `type` and help live in the parser below
_TRAIN_FLAGS = {
    "backbone": "model.backbone",
    "drop_path": "model.drop_path_rate",
    "frozen_stages": "model.frozen_stages",
    "num_classes": "model.num_classes",
    "data": "data.data",
    "train_split": "data.train_split",
    "val_split": "data.val_split",
    "train_images": "data.train_images",
    "train_labels": "data.train_labels",
    "val_images": "data.val_images",
    "val_labels": "data.val_labels",
    "batch_size": "data.batch_size",
    "workers": "data.workers",
    "hflip": "data.hflip",
    "max_val_images": "data.max_val_images",
    "epochs": "train.epochs",
    "steps": "train.steps",
    "lr": "train.lr",
    "weight_decay": "train.weight_decay",
    "warmup_steps": "train.warmup_steps",
    "clip_grad": "train.clip_grad",
    "pretrained": "train.pretrained",
    "backbone_checkpoint": "train.backbone_checkpoint",
    "amp": "train.amp",
    "device": "train.device",
    "threads": "train.threads",
    "seed": "train.seed",
    "eval_every": "train.eval_every",
    "eval_at_start": "train.eval_at_start",
    "log_every": "train.log_every",
    "checkpoint_every": "train.checkpoint_every",
    "stop_after_steps": "train.stop_after_steps",
    "output": "train.output",
    "resume": "train.resume",
    "overwrite": "train.overwrite",
    "progress": "train.progress",
    # detection
    "kind": "model.kind",
    "max_size": "data.max_size",
    # segmentation
    "reduce_zero_label": "data.reduce_zero_label",
    "categories": "data.categories",
    "crop_size": "data.crop_size",
    "scale": "data.scale",
    "eval_flip": "data.eval_flip",
    "head_norm": "model.norm",
    "head_channels": "model.channels",
}


def _data_args(p: argparse.ArgumentParser, task: str, train: bool) -> None:
    labels = "COCO instances JSON" if task == "detect" else "folder of class-index PNG masks"
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        help="dataset root (detect: images/<split>/ or <split>/ and annotations/instances_<split>"
        ".json; segment: images/<split>/ and annotations/<split>/)",
    )
    if train:
        g.add_argument("--train-split", help="training split under --data")
        g.add_argument("--train-images", help="training image folder")
        g.add_argument("--train-labels", help=f"training labels: {labels}")
    g.add_argument("--val-split", help="validation split under --data")
    g.add_argument("--val-images", help="validation image folder")
    g.add_argument("--val-labels", help=f"validation labels: {labels}")
    g.add_argument("--max-val-images", type=int, help="evaluate only the first N validation images")
    g.add_argument("--workers", "-j", type=int, help="data loader processes")
    if task == "segment" and train:
        g.add_argument("--num-classes", type=int, help="classes when the masks hold 0..K-1 (or 1..K)")
        g.add_argument("--reduce-zero-label", action=B, help="mask value 0 is ignored (ADE20K), v becomes class v-1")
        g.add_argument("--categories", help="JSON list of {id, name}: the mask values that are classes, in order")
        g.add_argument("--crop-size", type=int, help="training crop (512 in the paper's setting)")
        g.add_argument("--scale", type=int, nargs=2, metavar=("LONG", "SHORT"), help="training/eval resize scale")
        g.add_argument("--eval-flip", action=B, help="evaluate with the flip too")


def train_parser(task: str) -> argparse.ArgumentParser:
    p = Parser(
        prog=f"mambaout {task} train",
        description=f"Train a MambaOut {'Mask R-CNN' if task == 'detect' else 'UperNet'}. Resolution: defaults < "
        "--recipe (--list-recipes) < options given here.",
        argument_default=S,
    )
    _data_args(p, task, train=True)
    g = p.add_argument_group("model")
    g.add_argument("--recipe", help="dense recipe name or YAML path (--list-recipes)")
    g.add_argument("--backbone", help="registered MambaOut name")
    g.add_argument("--pretrained", action=B, help="the backbone's published weights")
    g.add_argument("--backbone-checkpoint", help="classification weights for the backbone (any layout we read)")
    g.add_argument("--drop-path", type=float, help="backbone stochastic depth (0.3 Tiny, 0.3-0.4 Small, 0.6 Base)")
    g.add_argument("--frozen-stages", type=int, help="-1 none, 0 the stem, k the stem and the first k stages")
    if task == "detect":
        g.add_argument("--kind", choices=["mask_rcnn", "faster_rcnn"])
        g.add_argument("--img-size", type=int, help="shorter side for training and evaluation")
        g.add_argument("--max-size", type=int, help="longer side cap for training and evaluation")
    else:
        g.add_argument("--head-norm", choices=["bn", "gn"], help="UperNet's norm (bn: the paper's)")
        g.add_argument("--head-channels", type=int, help="UperNet's width (512: the paper's)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, help="passes over the training set (or --steps)")
    g.add_argument("--steps", type=int, help="optimizer steps (or --epochs)")
    g.add_argument("--batch-size", "-b", type=int, help="images per device")
    g.add_argument("--lr", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--warmup-steps", type=int)
    g.add_argument("--clip-grad", type=float)
    g.add_argument("--hflip", type=float, help="flip probability")
    add_amp_argument(g)
    g.add_argument("--device", choices=["cpu", "cuda"])
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g.add_argument("--seed", type=int)
    g.add_argument(
        "--set",
        dest="overrides",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="any config key (YAML value), e.g. --set model.fpn_channels=64; repeatable",
    )
    g = p.add_argument_group("run")
    g.add_argument("--output", "-o", help=f"run folder (default runs/<recipe or {task}>)")
    g.add_argument("--resume", help="run folder (or its state.pt) to continue, with its own configuration")
    g.add_argument("--overwrite", action=B, help="start over in a folder holding a run")
    g.add_argument("--eval-every", type=int, help="evaluate every N steps (and always at the end)")
    g.add_argument("--eval-at-start", action=B, help="evaluate before training (default: on)")
    g.add_argument("--log-every", type=int, help="steps between progress lines")
    g.add_argument("--checkpoint-every", type=int, help="also save the state every N steps")
    g.add_argument("--stop-after-steps", type=int, help="stop after N steps of this call (resume later)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress lines")
    g.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    g.add_argument("--list-recipes", action="store_true", help="list the dense recipes and exit")
    return p


def _overrides(args: argparse.Namespace, task: str) -> dict:
    from mambaout.utils.safe_yaml import load_yaml

    given = vars(args)
    out = {}
    for flag, key in _TRAIN_FLAGS.items():
        if flag in given:
            out[key] = list(given[flag]) if flag == "scale" else given[flag]
    if "img_size" in given:  # one size for training and evaluation
        out["data.min_sizes"] = [given["img_size"]]
        out["model.min_size"] = given["img_size"]
    if "max_size" in given:
        out["model.max_size"] = given["max_size"]
    for item in given.get("overrides") or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects SECTION.KEY=VALUE, got {item!r}")
        key = key.strip().replace("-", "_")
        out[key] = load_yaml(value, f"--set {key}")
    if given.get("resume"):
        extra = sorted(k for k in out if k not in ("train.resume", "train.stop_after_steps", "train.progress"))
        if extra:
            raise ValueError(f"--resume continues the run with its own configuration; leave out {', '.join(extra)}")
    return out


def _smoke_cap(cfg) -> None:
    """`MAMBAOUT_MAX_STEPS` from the environment caps the run's optimizer steps (as it caps `mambaout train`), so a
    documented command can be smoke-tested as written (tests/test_docs.py); the capped length is in config.yaml."""
    import os

    value = os.environ.get("MAMBAOUT_MAX_STEPS")
    if not value:
        return
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"MAMBAOUT_MAX_STEPS must be a positive integer, got {value!r}")
    t = cfg.train
    if t.epochs is not None or t.steps > int(value):
        t.epochs, t.steps = None, int(value)
        t.warmup_steps = min(t.warmup_steps, t.steps)


def train(task: str, argv: list[str]) -> int:
    from mambaout.dense.config import list_recipes, resolve
    from mambaout.dense.tasks import train as fit
    from mambaout.utils.optional import MissingDependency

    args = train_parser(task).parse_args(argv)
    if getattr(args, "list_recipes", False):
        print("\n".join(list_recipes()))
        return 0
    overrides = _overrides(args, task)
    recipe = getattr(args, "recipe", None)
    if getattr(args, "resume", None):
        overrides.setdefault("train.steps", 1)  # the run's own length comes from its state
        recipe = None
    cfg = resolve(task, recipe, overrides)
    if not getattr(args, "resume", None):
        _smoke_cap(cfg)
    if getattr(args, "print_config", False):
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    try:
        fit(cfg)
    except MissingDependency as e:
        raise ValueError(str(e)) from e
    return 0


# --- validate and predict --------------------------------------------------------------------------------------------


def validate_parser(task: str) -> argparse.ArgumentParser:
    p = Parser(
        prog=f"mambaout {task} validate",
        description="COCO box and mask AP (pycocotools)"
        if task == "detect"
        else "mIoU and pixel accuracy, single-scale, and with --flip also with the flip",
    )
    p.add_argument("--checkpoint", required=True, help=f"weights written by mambaout {task} train")
    _data_args(p, task, train=False)
    if task == "segment":
        p.add_argument("--flip", action="store_true", help="also evaluate with the flip (averaged probabilities)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    add_amp_argument(p, default="auto")
    p.add_argument("--results-file", help="write the numbers as JSON")
    return p


def _val_config(task: str, args, meta: dict):
    from mambaout.dense.config import DataConfig, RunConfig, TrainConfig, check
    from mambaout.dense.detection import DetectorConfig
    from mambaout.dense.upernet import SegmenterConfig

    model = (DetectorConfig if task == "detect" else SegmenterConfig)(**meta["dense_model"])
    data = DataConfig(
        data=args.data,
        val_split=args.val_split or meta.get("val_split"),  # the training run's, unless given
        val_images=args.val_images,
        val_labels=args.val_labels,
        workers=args.workers if args.workers is not None else 0,
        max_val_images=args.max_val_images,
    )
    if task == "segment":
        data.scale = meta.get("eval_scale", data.scale)
    cfg = RunConfig(task, model, data, TrainConfig(steps=1))
    check(cfg)  # --max-val-images 0, --workers -1, ... as train refuses them
    return cfg


def _load(task: str, path: str, device):
    from mambaout.dense.tasks import Task

    model, meta = Task.from_checkpoint(path, device)
    if meta["task"] != task:
        raise ValueError(f"{path} is a {meta['task']} checkpoint; use mambaout {meta['task']}")
    return model, meta


def validate(task: str, argv: list[str]) -> int:
    from mambaout.dense.tasks import make_task
    from mambaout.utils.device import autocast_setting, resolve_device
    from mambaout.utils.files import atomic_write_text, check_writable

    args = validate_parser(task).parse_args(argv)
    device = resolve_device(args.device)
    if args.results_file:
        check_writable(args.results_file, "--results-file", inputs=[args.checkpoint])
    model, meta = _load(task, args.checkpoint, device)
    cfg = _val_config(task, args, meta)
    t = make_task(cfg)
    val_set = t.val_set(meta)
    amp_dtype = autocast_setting(args.amp, device)[1]
    results = {"single-scale": t.evaluate(model, val_set, device, amp_dtype)}
    if task == "segment" and args.flip:
        cfg.data.eval_flip = True
        results["flip"] = t.evaluate(model, val_set, device, amp_dtype)
    for name, m in results.items():
        summary = m.pop("summary", None)
        if summary:
            print(summary)
        print(f"{name}: {t.describe(m)}")
    if args.results_file:
        atomic_write_text(args.results_file, json.dumps(dict(checkpoint=args.checkpoint, **results), indent=1))
    return 0


def predict_parser(task: str) -> argparse.ArgumentParser:
    p = Parser(
        prog=f"mambaout {task} predict",
        description="Pictures of the "
        + ("detections (boxes, masks, names, scores)" if task == "detect" else "segmentation (a colour per class)")
        + " and one predictions.json",
    )
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    p.add_argument("--checkpoint", required=True, help=f"weights written by mambaout {task} train")
    p.add_argument("--output", "-o", required=True, help="folder for the pictures and predictions.json")
    if task == "detect":
        p.add_argument("--score-threshold", type=float, default=0.5, help="draw and list detections scoring this")
    else:
        p.add_argument("--flip", action="store_true", help="average with the flipped image's prediction")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    return p


def predict(task: str, argv: list[str]) -> int:
    import torch

    from mambaout.data.image import load_image
    from mambaout.dense.coco import to_tensor
    from mambaout.dense.draw import draw_detections, draw_segmentation
    from mambaout.dense.tasks import segment_probs
    from mambaout.inference.predictor import find_images
    from mambaout.utils.device import resolve_device
    from mambaout.utils.files import atomic_write, atomic_write_text

    args = predict_parser(task).parse_args(argv)
    threshold = getattr(args, "score_threshold", 0.0)
    if not 0.0 <= threshold <= 1.0:  # NaN too: no score passes it, an empty answer with exit 0
        raise ValueError(f"--score-threshold must be a number in [0, 1], got {threshold}")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} is not a folder; predict writes pictures and predictions.json into one")
    device = resolve_device(args.device)
    model, meta = _load(task, args.checkpoint, device)
    names = meta["class_names"]
    paths = find_images(args.inputs)
    if not paths:
        raise ValueError(f"no images found in {' '.join(args.inputs)}")
    pictures = _picture_paths(paths, out, "jpg" if task == "detect" else "png")
    out.mkdir(parents=True, exist_ok=True)
    records, failed = [], 0
    for path in paths:
        try:
            img = load_image(path)
        except (ValueError, OSError) as e:
            print(f"mambaout {task} predict: skipped {printable(e)}", file=sys.stderr)
            failed += 1
            continue
        x = to_tensor(img).to(device)
        picture = pictures[path]
        with torch.no_grad():
            if task == "detect":
                o = {k: v.float().cpu() for k, v in model([x])[0].items()}
                keep = o["scores"] >= args.score_threshold
                drawn = draw_detections(img, o, names, args.score_threshold)
                atomic_write(picture, lambda tmp, drawn=drawn: drawn.save(tmp, format="JPEG", quality=90))
                dets = [
                    dict(label=names[int(lab) - 1], score=round(float(s), 4), box=[round(v, 1) for v in b.tolist()])
                    for b, lab, s in zip(o["boxes"][keep], o["labels"][keep], o["scores"][keep])
                ]
                records.append(dict(image=str(path), picture=str(picture), detections=dets))
            else:
                classes = segment_probs(model, x, meta["eval_scale"], args.flip, None).argmax(0).cpu()
                drawn = draw_segmentation(img, classes, len(names))
                atomic_write(picture, lambda tmp, drawn=drawn: drawn.save(tmp, format="PNG"))
                counts = torch.bincount(classes.flatten(), minlength=len(names))
                share = {names[i]: round(c / classes.numel(), 4) for i, c in enumerate(counts.tolist()) if c}
                share = dict(sorted(share.items(), key=lambda kv: -kv[1]))
                records.append(dict(image=str(path), picture=str(picture), class_fractions=share))
        print(f"{printable(path)} -> {printable(picture)}", flush=True)  # a name cannot write to the terminal
    atomic_write_text(out / "predictions.json", json.dumps(records, indent=1))
    print(f"{len(records)} pictures and predictions.json in {out}" + (f"; {failed} unreadable" if failed else ""))
    return 0 if records else 1


def _picture_paths(paths: list[Path], out: Path, suffix: str) -> dict[Path, Path]:
    """Each input's picture in `out`: `<stem>.<suffix>`, numbered where two inputs share a stem (a.jpg and a.png,
    or two folders' 0.png), so no picture replaces another.

    Raises:
        ValueError: a picture would replace one of the input images (`--output` is the input folder).
    """
    pictures: dict[Path, Path] = {}
    used: set[str] = set()
    for p in paths:
        name, n = f"{p.stem}.{suffix}", 0
        while name in used:
            n += 1
            name = f"{p.stem}-{n}.{suffix}"
        used.add(name)
        pictures[p] = out / name
    inputs = {q.resolve() for q in paths if q.is_file()}
    clash = next((q for q in pictures.values() if q.resolve() in inputs), None)
    if clash is not None:
        raise ValueError(f"the picture {clash} would replace that input image; pass another --output folder")
    return pictures


# --- dispatch --------------------------------------------------------------------------------------------------------


def main(task: str, argv: list[str] | None) -> int:
    from mambaout.utils.optional import MissingDependency
    from mambaout.weights.checkpoint import CheckpointError

    argv = sys.argv[1:] if argv is None else list(argv)
    usage = f"usage: mambaout {task} {{{','.join(ACTIONS)}}} [options]  ('mambaout {task} ACTION -h' for options)"
    if not argv:
        print(usage)
        return 2
    if argv[0] in ("-h", "--help"):  # the usage, then every action's options; exits 0 as argparse's --help does
        actions = (train_parser(task), validate_parser(task), predict_parser(task))
        Parser(
            prog=f"mambaout {task}",
            usage=usage.removeprefix("usage: "),
            epilog="\n\n".join(parser.format_help().rstrip() for parser in actions),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        ).parse_args(argv)
    action, rest = argv[0], argv[1:]
    if action not in ACTIONS:
        print(
            f"mambaout {task}: unknown action {action!r}: expected one of {', '.join(ACTIONS)} (options: mambaout {task} --help)",
            file=sys.stderr,
        )
        return 2
    try:
        return {"train": train, "validate": validate, "predict": predict}[action](task, rest)
    except (ValueError, OSError, CheckpointError, MissingDependency) as e:
        if stdout_failed(e):
            raise  # a closed pipe (`... | head -1`) or a full stdout: mambaout.cli.main ends it
        text = str(e).strip()
        text = text.splitlines()[-1] if "Traceback" in text else text  # an error re-raised from a loader worker
        print(f"mambaout {task} {action}: {text}", file=sys.stderr)
        return 2
