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

import torch
import yaml

from mambaout.cli.common import (
    Parser,
    add_amp_argument,
    fail,
    given_settings,
    one_line,
    settings_parser,
    smoke_steps,
    stdout_failed,
)
from mambaout.data.image import load_image
from mambaout.dense.coco import to_tensor
from mambaout.dense.config import DataConfig, RunConfig, TrainConfig, check, recipes_table, resolve, schema
from mambaout.dense.results import picture_paths
from mambaout.dense.tasks import TASKS, Task, make_task, saved_config
from mambaout.dense.tasks import train as fit
from mambaout.inference.predictor import find_images
from mambaout.utils.device import autocast_setting, resolve_device
from mambaout.utils.files import atomic_write, atomic_write_text, check_writable
from mambaout.utils.optional import MissingDependency
from mambaout.utils.text import count, printable
from mambaout.weights.checkpoint import CheckpointError

ACTIONS = ("train", "validate", "predict")


@functools.lru_cache(maxsize=2)
def train_parser(task: str) -> argparse.ArgumentParser:
    """The options: one per setting of the task (`mambaout.dense.config.schema`), and the few that are no setting;
    built once per process and task (parsing leaves it as it was)."""
    description = (
        f"Train a MambaOut {TASKS[task].network}. Resolution: defaults < --recipe (--list-recipes) < options given "
        "here. Every setting is also --set KEY=VALUE (or SECTION.KEY=VALUE); docs/settings.md lists them."
    )
    recipe = (["--recipe"], dict(help="dense recipe name or YAML path (--list-recipes)"))
    return settings_parser(f"mambaout {task} train", description, schema(task), f"{task} train", recipe)


# options that set a second setting too: one size for the detector's training and evaluation
_LINKED = {"model.min_size": ("data.min_sizes", lambda v: [v]), "data.max_size": ("model.max_size", lambda v: v)}


def _overrides(args: argparse.Namespace, task: str) -> dict:
    """The settings given as options and with --set, by `section.key`."""
    sch = schema(task)
    options, sets = given_settings(sch, args)
    out = {s.key: v for s, v in options.items()}
    for key, (other, value) in _LINKED.items():
        if key in out and any(s.key == other for s in sch.settings):
            out[other] = value(out[key])
    return out | {s.key: v for s, v in sets.items()}


def _smoke_cap(cfg) -> None:
    """`MAMBAOUT_MAX_STEPS` from the environment caps the run's optimizer steps (as it caps `mambaout train`), so a
    documented command can be smoke-tested as written (tests/test_docs.py); the capped length is in config.yaml."""
    cap = smoke_steps("MAMBAOUT_MAX_STEPS")
    t = cfg.train
    if cap is not None and (t.epochs is not None or t.steps > cap):
        t.epochs, t.steps = None, cap
        t.warmup_steps = min(t.warmup_steps, t.steps)


def train(task: str, argv: list[str]) -> int:
    args = train_parser(task).parse_args(argv)
    if getattr(args, "list_recipes", False):
        print(recipes_table(task))
        return 0
    overrides = _overrides(args, task)
    recipe, base = getattr(args, "recipe", None), None
    if overrides.get("train.resume"):
        if recipe is not None:
            raise ValueError("--resume continues a run with its own recipe and settings; leave out --recipe")
        # the run's own configuration; options given now win
        base = saved_config(schema(task).checked("train.resume", overrides["train.resume"]))
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
    p = Parser(prog=f"mambaout {task} validate", description=TASKS[task].validate_help)
    p.add_argument("--checkpoint", required=True, help=f"weights written by mambaout {task} train")
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        help="dataset root (detect: images/<split>/ or <split>/ and annotations/instances_<split>"
        ".json; segment: images/<split>/ and annotations/<split>/)",
    )
    g.add_argument("--val-split", help="validation split under --data")
    g.add_argument("--val-images", help="validation image folder")
    g.add_argument("--val-labels", help=f"validation labels: {TASKS[task].labels_help}")
    g.add_argument("--max-val-images", type=int, help="evaluate only the first N validation images")
    g.add_argument("--workers", "-j", type=int, default=0, help="data loader processes")
    TASKS[task].validate_options(p)
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    add_amp_argument(p, default="auto")
    p.add_argument("--results-file", help="write the numbers as JSON, the per-class tables included")
    return p


def _val_config(task: str, args, meta: dict):
    given = {k: getattr(args, k) for k in ("data", "val_images", "val_labels", "workers", "max_val_images")}
    data = DataConfig(**given, val_split=args.val_split or meta.get("val_split"))  # the training run's, unless given
    data.scale = meta.get("eval_scale", data.scale)  # a segmenter's, as it was trained to be evaluated
    cfg = RunConfig(task, TASKS[task].model_config(**meta["dense_model"]), data, TrainConfig(steps=1))
    check(cfg)  # --max-val-images 0, --workers -1, ... as train refuses them
    return cfg


def _load(task: str, path: str, device):
    model, meta = Task.from_checkpoint(path, device)
    if meta["task"] != task:
        raise ValueError(f"{path} is a {meta['task']} checkpoint; use mambaout {meta['task']}")
    return model, meta


def validate(task: str, argv: list[str]) -> int:
    args = validate_parser(task).parse_args(argv)
    device = resolve_device(args.device)
    for flag in ("results_file", "coco_results"):
        if getattr(args, flag, None):
            check_writable(getattr(args, flag), "--" + flag.replace("_", "-"), inputs=[args.checkpoint])
    TASKS[task].check_options(args, validate=True)
    model, meta = _load(task, args.checkpoint, device)
    t = make_task(_val_config(task, args, meta))
    val_set = t.val_set(meta)
    amp_dtype = autocast_setting(args.amp, device)[1]
    results, tables = t.validate(model, val_set, device, amp_dtype, args, meta["class_names"])
    for m, table in zip(results.values(), tables):  # as detectron2: COCO's summary, then the table
        if summary := m.pop("summary", None):
            print(summary)
        print(table)
    for name, m in results.items():
        print(f"{name}: {t.describe({k: v for k, v in m.items() if not isinstance(v, (dict, list))})}")
    if args.results_file:
        atomic_write_text(args.results_file, json.dumps(dict(checkpoint=args.checkpoint, **results), indent=1))
    return 0


def predict_parser(task: str) -> argparse.ArgumentParser:
    p = Parser(prog=f"mambaout {task} predict", description="PNG pictures of the " + TASKS[task].predict_help)
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    p.add_argument("--checkpoint", required=True, help=f"weights written by mambaout {task} train")
    p.add_argument("--output", "-o", required=True, help="folder for the pictures and predictions.json")
    TASKS[task].predict_options(p)
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    return p


def predict(task: str, argv: list[str]) -> int:
    args = predict_parser(task).parse_args(argv)
    threshold = getattr(args, "score_threshold", 0.0)
    if not 0.0 <= threshold <= 1.0:  # NaN too: no score passes it, an empty answer with exit 0
        raise ValueError(f"--score-threshold must be a number in [0, 1], got {threshold}")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} is not a folder; predict writes pictures and predictions.json into one")
    TASKS[task].check_options(args, validate=False)
    device = resolve_device(args.device)
    model, meta = _load(task, args.checkpoint, device)
    paths = find_images(args.inputs)
    if not paths:
        raise ValueError(f"no images found in {' '.join(args.inputs)}")
    pictures = picture_paths(paths, out, "png")
    each, finish = TASKS[task].predictor(args, meta, paths)
    out.mkdir(parents=True, exist_ok=True)
    records, failed = [], 0
    for path in paths:
        try:
            img = load_image(path)
        except (ValueError, OSError) as e:
            print(f"mambaout {task} predict: skipped {printable(e)}", file=sys.stderr)
            failed += 1
            continue
        with torch.no_grad():
            drawn, record = each(model, path, img, to_tensor(img).to(device), pictures[path])
        records.append(record)
        atomic_write(pictures[path], lambda tmp, drawn=drawn: drawn.save(tmp, format="PNG"))
        print(f"{printable(path)} -> {printable(pictures[path])}", flush=True)  # a name cannot write to the terminal
    atomic_write_text(out / "predictions.json", json.dumps(records, indent=1))
    written = finish(out)
    print(f"{count(len(records), 'picture')} and {written} in {out}" + (f"; {failed} unreadable" if failed else ""))
    return 0 if records else 1


# --- dispatch --------------------------------------------------------------------------------------------------------


def main(task: str, argv: list[str] | None) -> int:
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
        expected = f"expected one of {', '.join(ACTIONS)} (options: mambaout {task} --help)"
        return fail(task, f"unknown action {action!r}: {expected}")
    try:
        return {"train": train, "validate": validate, "predict": predict}[action](task, rest)
    except (ValueError, OSError, CheckpointError, MissingDependency) as e:
        if stdout_failed(e):
            raise  # a closed pipe (`... | head -1`) or a full stdout: mambaout.cli.main ends it
        return fail(f"{task} {action}", one_line(e))
