"""`mambaout detect train|validate|predict` and `mambaout segment train|validate|predict`.

Options given on the command line beat the recipe's, which beat the defaults (see `mambaout.dense.config`).
Errors a user can fix are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import yaml

from mambaout.cli.common import Parser, add_amp_argument, add_command_arguments, smoke_steps, stdout_failed
from mambaout.utils.text import printable

ACTIONS = ("train", "validate", "predict")


def _data_args(p: argparse.ArgumentParser, task: str) -> None:
    labels = "COCO instances JSON" if task == "detect" else "folder of class-index PNG masks"
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        help="dataset root (detect: images/<split>/ or <split>/ and annotations/instances_<split>"
        ".json; segment: images/<split>/ and annotations/<split>/)",
    )
    g.add_argument("--val-split", help="validation split under --data")
    g.add_argument("--val-images", help="validation image folder")
    g.add_argument("--val-labels", help=f"validation labels: {labels}")
    g.add_argument("--max-val-images", type=int, help="evaluate only the first N validation images")
    g.add_argument("--workers", "-j", type=int, help="data loader processes")


def train_parser(task: str) -> argparse.ArgumentParser:
    """The options: one per setting of the task (`mambaout.dense.config.schema`), and the few that are no setting."""
    from mambaout.dense.config import schema

    p = Parser(
        prog=f"mambaout {task} train",
        description=f"Train a MambaOut {'Mask R-CNN' if task == 'detect' else 'UperNet'}. Resolution: defaults < "
        "--recipe (--list-recipes) < options given here. Every setting is also --set KEY=VALUE (or "
        "SECTION.KEY=VALUE); docs/settings.md lists them.",
        argument_default=argparse.SUPPRESS,
    )
    add_command_arguments(p, f"{task} train")
    p.add_argument("--recipe", help="dense recipe name or YAML path (--list-recipes)")
    schema(task).add_arguments(p)
    return p


@functools.lru_cache(maxsize=2)
def _train_parser(task: str) -> argparse.ArgumentParser:
    return train_parser(task)  # built once per process and task: parsing leaves it as it was


# options that set a second setting too: one size for the detector's training and evaluation
_LINKED = {"model.min_size": ("data.min_sizes", lambda v: [v]), "data.max_size": ("model.max_size", lambda v: v)}


def _overrides(args: argparse.Namespace, task: str) -> dict:
    """The settings given as options and with --set, by `section.key`."""
    from mambaout.dense.config import schema

    sch = schema(task)
    out = {s.key: v for s, v in sch.given(args).items()}
    for key, (other, value) in _LINKED.items():
        if key in out and any(s.key == other for s in sch.settings):
            out[other] = value(out[key])
    out.update({s.key: v for s, v in sch.parse_set(getattr(args, "overrides", None)).items()})
    return out


def _smoke_cap(cfg) -> None:
    """`MAMBAOUT_MAX_STEPS` from the environment caps the run's optimizer steps (as it caps `mambaout train`), so a
    documented command can be smoke-tested as written (tests/test_docs.py); the capped length is in config.yaml."""
    cap = smoke_steps("MAMBAOUT_MAX_STEPS")
    t = cfg.train
    if cap is not None and (t.epochs is not None or t.steps > cap):
        t.epochs, t.steps = None, cap
        t.warmup_steps = min(t.warmup_steps, t.steps)


def train(task: str, argv: list[str]) -> int:
    from mambaout.dense.config import recipes_table, resolve, schema
    from mambaout.dense.engine import fit, load_resume
    from mambaout.utils.optional import MissingDependency

    args = _train_parser(task).parse_args(argv)
    if getattr(args, "list_recipes", False):
        print(recipes_table(task))
        return 0
    overrides = _overrides(args, task)
    recipe, base = getattr(args, "recipe", None), None
    if overrides.get("train.resume"):
        if recipe is not None:
            raise ValueError("--resume continues a run with its own recipe and settings; leave out --recipe")
        base = load_resume(schema(task).checked("train.resume", overrides["train.resume"]))[
            1
        ]  # the run's own configuration; options given now win
    cfg = resolve(task, recipe, overrides, base)
    if base is None:
        _smoke_cap(cfg)
    if getattr(args, "print_config", False):
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    if base is None and cfg.train.backbone_checkpoint:  # a run folder names one of its files: say which
        arch = f" {cfg.model.model_kwargs}" if cfg.model.model_kwargs else ""
        print(f"backbone: {cfg.model.backbone}{arch} from {cfg.train.backbone_checkpoint}")
    try:
        fit(cfg)
    except MissingDependency as e:
        raise ValueError(str(e)) from e
    return 0


# --- validate and predict --------------------------------------------------------------------------------------------


def validate_parser(task: str) -> argparse.ArgumentParser:
    p = Parser(
        prog=f"mambaout {task} validate",
        description="COCO box and mask AP (pycocotools), and per-category AP"
        if task == "detect"
        else "mIoU, pixel accuracy (aAcc) and mean class accuracy (mAcc), and per-class IoU and accuracy: "
        "single-scale, and with --flip, --multi-scale also with test-time augmentation",
    )
    p.add_argument("--checkpoint", required=True, help=f"weights written by mambaout {task} train")
    _data_args(p, task)
    if task == "segment":
        p.add_argument("--flip", action="store_true", help="also evaluate with the flip (averaged probabilities)")
        p.add_argument(
            "--multi-scale",
            action="store_true",
            help="also evaluate at the scale times each of --ratios, with the flip (the paper's multi-scale column)",
        )
        p.add_argument(
            "--ratios", type=float, nargs="+", help="--multi-scale's ratios (default 0.5 0.75 1.0 1.25 1.5 1.75)"
        )
        _slide_argument(p)
        p.add_argument("--label-dir", help="write each image's class map (of the last setting evaluated) as a PNG")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    add_amp_argument(p, default="auto")
    p.add_argument("--results-file", help="write the numbers as JSON, the per-class tables included")
    if task == "detect":
        p.add_argument(
            "--coco-results", help="write the detections as a COCO results JSON (bbox; segm as RLE) for COCO.loadRes"
        )
    return p


def _slide_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--slide",
        type=int,
        nargs="+",
        metavar=("WINDOW", "STRIDE"),
        help="sliding-window inference: square windows of WINDOW px every STRIDE px (default 2/3 of the window; "
        "ConvNeXt's ADE20K setting: 512 341)",
    )


def _inference(args, scale, flip: bool, ratios=(1.0,)):
    from mambaout.dense.tta import SegmentInference

    slide = args.slide or [None]
    if len(slide) > 2:
        raise ValueError(f"--slide takes WINDOW [STRIDE], got {len(slide)} numbers")
    return SegmentInference(tuple(scale), tuple(ratios), flip, slide[0], slide[1] if len(slide) > 1 else None)


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
    from mambaout.dense import results as out
    from mambaout.dense.tasks import make_task
    from mambaout.utils.device import autocast_setting, resolve_device
    from mambaout.utils.files import atomic_write_text, check_writable

    args = validate_parser(task).parse_args(argv)
    device = resolve_device(args.device)
    for flag in ("results_file", "coco_results"):
        if getattr(args, flag, None):
            check_writable(getattr(args, flag), "--" + flag.replace("_", "-"), inputs=[args.checkpoint])
    if task == "segment":
        if args.ratios and not args.multi_scale:
            raise ValueError("--ratios applies to --multi-scale; add --multi-scale")
        _inference(args, (1, 1), False)  # checks --slide before the model loads
        if args.label_dir and Path(args.label_dir).exists() and not Path(args.label_dir).is_dir():
            raise ValueError(f"--label-dir {args.label_dir} is not a folder")
    model, meta = _load(task, args.checkpoint, device)
    cfg = _val_config(task, args, meta)
    t = make_task(cfg)
    val_set = t.val_set(meta)
    amp_dtype = autocast_setting(args.amp, device)[1]
    names = meta["class_names"]
    results, tables = {}, []
    if task == "detect":
        detections, image_ids = t.detections(model, val_set, device, amp_dtype)
        metrics, ev = t.score(detections, image_ids)
        per_category = out.per_category(ev, t.cat_ids, names)
        results["single-scale"] = dict(metrics, per_category=per_category)
        tables.append(out.per_category_text(per_category))
        if args.coco_results:
            from mambaout.dense.coco import write_results

            write_results(args.coco_results, detections)
    else:
        scale = tuple(cfg.data.scale)
        settings = [_inference(args, scale, False)]
        if args.flip:
            settings.append(_inference(args, scale, True))
        if args.multi_scale:
            from mambaout.dense.tta import MULTI_SCALE_RATIOS

            settings.append(_inference(args, scale, True, args.ratios or MULTI_SCALE_RATIOS))
        label_dir = Path(args.label_dir) if args.label_dir else None
        if label_dir is not None:
            label_dir.mkdir(parents=True, exist_ok=True)
            pictures = _picture_paths(out.dataset_paths(val_set), label_dir, "png")
            paths = list(pictures.values())
        for i, setting in enumerate(settings):
            write = label_dir is not None and i == len(settings) - 1
            each = (lambda n, classes: out.write_label_png(paths[n], classes)) if write else None  # noqa: E731
            conf, n = t.confusion(model, val_set, device, amp_dtype, lambda x, s=setting: s(model, x, amp_dtype), each)
            m = conf.metrics()
            per_class = out.per_class(m, names)
            keys = ("mIoU", "aAcc", "mAcc", "classes", "pixels")
            results[setting.describe()] = dict({k: m[k] for k in keys}, images=n, per_class=per_class)
            tables.append(f"{setting.describe()} " + out.per_class_text(per_class))
        if label_dir is not None:
            print(f"{len(paths)} label PNGs (class indices 0-{len(names) - 1}) in {label_dir}")
    for m, table in zip(results.values(), tables):  # as detectron2: COCO's summary, then the table
        summary = m.pop("summary", None)
        if summary:
            print(summary)
        print(table)
    for name, m in results.items():
        shown = {k: v for k, v in m.items() if not isinstance(v, dict)}
        print(f"{name}: " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()))
    if args.results_file:
        atomic_write_text(args.results_file, json.dumps(dict(checkpoint=args.checkpoint, **results), indent=1))
    return 0


def predict_parser(task: str) -> argparse.ArgumentParser:
    p = Parser(
        prog=f"mambaout {task} predict",
        description="PNG pictures of the "
        + (
            "detections (boxes, masks, names, scores), predictions.json and results.json (COCO results: every "
            "detection, boxes and RLE masks, for COCO.loadRes)"
            if task == "detect"
            else "segmentation (a colour per class, with a legend) and predictions.json"
        ),
    )
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    p.add_argument("--checkpoint", required=True, help=f"weights written by mambaout {task} train")
    p.add_argument("--output", "-o", required=True, help="folder for the pictures and predictions.json")
    if task == "detect":
        p.add_argument(
            "--score-threshold",
            type=float,
            default=0.5,
            help="draw and list in predictions.json the detections scoring this (results.json holds them all)",
        )
        p.add_argument(
            "--coco-json",
            help="COCO JSON listing the inputs: image ids by file name (default: the file name's number, as COCO's "
            "000000000139.jpg, else the input's place from 1)",
        )
    else:
        p.add_argument("--flip", action="store_true", help="average with the flipped image's prediction")
        p.add_argument("--multi-scale", action="store_true", help="average over --ratios of the scale, and the flip")
        p.add_argument("--ratios", type=float, nargs="+", help="--multi-scale's ratios (default 0.5 0.75 ... 1.75)")
        _slide_argument(p)
        p.add_argument("--label-dir", help="also write each class map as a PNG of class indices 0..K-1")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    return p


def predict(task: str, argv: list[str]) -> int:
    import torch

    from mambaout.data.image import load_image
    from mambaout.dense import results as res
    from mambaout.dense.coco import to_coco_results, to_tensor, write_results
    from mambaout.dense.draw import draw_detections, draw_segmentation
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
    if task == "segment":
        if args.ratios and not args.multi_scale:
            raise ValueError("--ratios applies to --multi-scale; add --multi-scale")
        _inference(args, (1, 1), False)  # --slide checked before the model loads
    device = resolve_device(args.device)
    model, meta = _load(task, args.checkpoint, device)
    names = meta["class_names"]
    paths = find_images(args.inputs)
    if not paths:
        raise ValueError(f"no images found in {' '.join(args.inputs)}")
    pictures = _picture_paths(paths, out, "png")
    if task == "detect":
        ids = dict(zip(paths, res.image_ids(paths, args.coco_json)))
        cat_ids = meta["cat_ids"]
    else:
        from mambaout.dense.tta import MULTI_SCALE_RATIOS

        ratios = (args.ratios or MULTI_SCALE_RATIOS) if args.multi_scale else (1.0,)
        infer = _inference(args, meta["eval_scale"], args.flip or args.multi_scale, ratios)
        labels = _picture_paths(paths, Path(args.label_dir), "png") if args.label_dir else None
        if labels:
            Path(args.label_dir).mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    records, coco_results, failed = [], [], 0
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
                entries = to_coco_results(o, ids[path], cat_ids)  # every detection: what validate scores
                coco_results += entries
                keep = o["scores"] >= args.score_threshold
                drawn = draw_detections(img, o, names, args.score_threshold)
                dets = [
                    dict(label=names[int(lab) - 1], box=b.tolist(), **e)
                    for b, lab, e, k in zip(o["boxes"], o["labels"], entries, keep.tolist())
                    if k
                ]
                records.append(dict(image=str(path), image_id=ids[path], picture=str(picture), detections=dets))
            else:
                classes = infer(model, x).argmax(0).cpu()
                drawn = draw_segmentation(img, classes, names)
                if labels:
                    res.write_label_png(labels[path], classes)
                counts = torch.bincount(classes.flatten(), minlength=len(names))
                share = {names[i]: round(c / classes.numel(), 4) for i, c in enumerate(counts.tolist()) if c}
                share = dict(sorted(share.items(), key=lambda kv: -kv[1]))
                records.append(dict(image=str(path), picture=str(picture), class_fractions=share))
        atomic_write(picture, lambda tmp, drawn=drawn: drawn.save(tmp, format="PNG"))
        print(f"{printable(path)} -> {printable(picture)}", flush=True)  # a name cannot write to the terminal
    atomic_write_text(out / "predictions.json", json.dumps(records, indent=1))
    if task == "detect":
        write_results(out / "results.json", coco_results)
    written = "predictions.json" + (" and results.json" if task == "detect" else "")
    print(f"{len(records)} pictures and {written} in {out}" + (f"; {failed} unreadable" if failed else ""))
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
