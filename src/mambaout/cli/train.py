"""`mambaout train`: train a registered model from a recipe; command-line options override the recipe.

With no data argument it trains on the embedded scikit-learn digits (recipe `digits`), a few minutes on a CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from mambaout import kernels
from mambaout.cli.common import Parser, add_amp_argument, add_fused_kernels_argument, stdout_failed
from mambaout.utils.text import printable

S = argparse.SUPPRESS  # options not given stay out of the namespace, so they never override the recipe
B = argparse.BooleanOptionalAction  # an on/off option: --x / --no-x


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="mambaout train",
        description="Train a MambaOut (or any registered model). Resolution: built-in official recipe < --recipe "
        "< options given here. With no data, trains on scikit-learn's digits (recipe 'digits').",
        argument_default=S,
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--data", "--data-dir", help="folder with <train-split>/ and <val-split>/ (ImageNet layout; folders or .tar)"
    )
    g.add_argument("--data-train", help="training set: an ImageFolder directory or .tar, or 'digits:train'")
    g.add_argument("--data-val", help="validation set: an ImageFolder directory or .tar, or 'digits:val'")
    g.add_argument("--train-split", help="name of the training split under --data (default train)")
    g.add_argument("--val-split", help="name of the validation split under --data (default val)")
    g.add_argument("--cache", action=B, help="keep image files in RAM")
    g.add_argument("--workers", "-j", type=int, help="data loader processes per rank")
    g.add_argument(
        "--data-pipeline",
        choices=["cpu", "gpu"],
        help="cpu: decode and augment in loader workers; gpu: uint8 batches augmented on the device (with --cache: "
        "decoded once, in memory)",
    )
    g = p.add_argument_group("model and recipe")
    g.add_argument("--recipe", help="recipe name (see --list-recipes) or path to a YAML file")
    g.add_argument("--model", help="registered model name (mambaout models)")
    g.add_argument("--drop-path", type=float, help="stochastic depth rate (default: the variant's recipe value)")
    g = p.add_argument_group("fine-tuning (timm's flag names)")
    g.add_argument("--pretrained", action=B, help="start from the model's published weights")
    g.add_argument(
        "--initial-checkpoint",
        metavar="PATH",
        help="start from these weights (official, timm or mambaout layout, or timm's train.py .pth.tar; the model "
        "is read from ours and timm's)",
    )
    g.add_argument(
        "--use-ema", action=B, help="take --initial-checkpoint's EMA weights (state_dict_ema), not its state_dict"
    )
    g.add_argument("--num-classes", type=int, help="classifier outputs (default: the training data's class count)")
    g.add_argument("--opt", help="optimizer: adamw (default), or a timm name: sgd, momentum, adam, lamb, ...")
    g.add_argument("--sched", help="lr schedule: cosine (default), tanh, poly, constant")
    g.add_argument("--layer-decay", type=float, help="layer-wise lr decay, e.g. 0.75 (the model's group_matcher)")
    g.add_argument("--min-lr", type=float, help="lr at the end of the schedule")
    g.add_argument("--warmup-lr", type=float, help="lr at the start of the warmup")
    g.add_argument("--drop", dest="drop_rate", type=float, help="dropout before the classifier")
    g = p.add_argument_group("training")
    g.add_argument("--img-size", type=int, help="training and eval resolution")
    g.add_argument("--epochs", type=int, help="cosine epochs (warmup included); cooldown epochs come on top")
    g.add_argument("--cooldown-epochs", type=int)
    g.add_argument("--warmup-epochs", type=int)
    g.add_argument("--batch-size", "-b", type=int, help="per-device (per-process) batch size")
    g.add_argument(
        "--eval-batch-size",
        "--validation-batch-size",
        type=int,
        help="evaluation batch size (default 2 x --batch-size)",
    )
    g.add_argument("--global-batch", type=int, help="images per optimizer step over all processes (accumulates)")
    g.add_argument("--lr", type=float, help="absolute learning rate (default: lr_base x global batch / 4096)")
    g.add_argument("--lr-base", type=float, help="learning rate at --lr-base-batch images per step")
    g.add_argument("--lr-base-batch", "--lr-base-size", type=int)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--clip-grad", type=float, help="max gradient norm")
    g.add_argument("--mixup", type=float)
    g.add_argument("--cutmix", type=float)
    g.add_argument("--smoothing", type=float)
    g.add_argument(
        "--auto-augment", "--aa", help="timm RandAugment string, e.g. rand-m9-mstd0.5-inc1; 'none' to disable"
    )
    g.add_argument("--reprob", type=float, help="random erasing probability")
    g.add_argument("--model-ema", action=B, help="keep and evaluate an EMA of the weights")
    g.add_argument("--model-ema-decay", type=float)
    g.add_argument(
        "--set",
        dest="overrides",
        action="append",
        metavar="KEY=VALUE",
        help="any config key (YAML value), e.g. --set 'model_kwargs={kernel_size: 5}'; repeatable",
    )
    g = p.add_argument_group("performance")
    g.add_argument("--device", choices=["cpu", "cuda"])
    add_amp_argument(g)
    g.add_argument("--channels-last", action=B)
    g.add_argument("--compile", "--torchcompile", action=B, help="torch.compile the model")
    g.add_argument("--grad-checkpointing", action=B)
    g.add_argument("--threads", type=int, help="torch CPU threads per process")
    g = p.add_argument_group("run")
    g.add_argument("--output", "-o", help="run folder (default runs/<recipe or model>)")
    g.add_argument("--experiment", help="timm's run name: the run folder is runs/NAME (or --output/NAME)")
    g.add_argument("--resume", help="run folder or its state.pt to continue from")
    g.add_argument("--overwrite", action=B, help="start over in a run folder that holds a run")
    g.add_argument("--seed", type=int)
    g.add_argument("--keep-top-k", "--checkpoint-hist", type=int, help="keep the weights of the k best epochs")
    g.add_argument("--eval-every", type=int, help="evaluate every N epochs")
    g.add_argument("--tensorboard", action=B)
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar or progress lines")
    g.add_argument(
        "--log-every", "--log-interval", type=int, help="optimizer steps between progress lines when not on a terminal"
    )
    g.add_argument("--max-steps-per-epoch", type=int, help="cap optimizer steps per epoch (smoke tests)")
    g.add_argument("--stop-after-epochs", type=int, help="stop after N epochs of this call (resume later)")
    g.add_argument("--stop-after-steps", type=int, help="stop after N optimizer steps of this call, mid-epoch too")
    g.add_argument("--checkpoint-every", type=int, help="also save the training state every N steps inside epochs")
    g.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    g.add_argument("--list-recipes", action="store_true", help="list the recipe names and exit")
    add_fused_kernels_argument(g)
    return p


def parse_overrides(argv: list[str] | None) -> tuple[dict, argparse.Namespace]:
    from mambaout.training.config import coerce
    from mambaout.utils.safe_yaml import load_yaml

    args = get_args_parser().parse_args(argv)
    skip = ("overrides", "print_config", "list_recipes", "fused_kernels", "experiment")  # not config keys
    given = {k: v for k, v in vars(args).items() if k not in skip}
    if getattr(args, "experiment", None):  # timm's --output DIR --experiment NAME writes to DIR/NAME
        given["output"] = str(Path(given.get("output") or "runs") / args.experiment)
    if given.get("auto_augment", "x").lower() in ("none", ""):
        given["auto_augment"] = None
    for item in getattr(args, "overrides", None) or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key = key.strip().replace("-", "_")
        given[key] = coerce(load_yaml(value, f"--set {key}"))
    return given, args


def _one_line(e: Exception) -> str:
    """The message of `e`; for an error re-raised from a data-loader worker, only its last line (the original
    error), not the worker's traceback that torch puts into the message."""
    text = str(e).strip()
    return printable(text.splitlines()[-1] if "Traceback" in text else text)


def _smoke_caps(flat: dict) -> dict:
    """`MAMBAOUT_MAX_EPOCHS` / `MAMBAOUT_MAX_STEPS` (optimizer steps per epoch) from the environment: the settings
    that cap a run to them (none when it is within them), so a documented command can be smoke-tested as written
    (tests/test_docs.py). They are resolved and stored in the run's config like any other setting."""
    import os

    caps = {}
    for var, key in (("MAMBAOUT_MAX_EPOCHS", "epochs"), ("MAMBAOUT_MAX_STEPS", "max_steps_per_epoch")):
        value = os.environ.get(var)
        if value:
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"{var} must be a positive integer, got {value!r}")
            caps[key] = int(value)
    out = {}
    if "epochs" in caps and flat["epochs"] + flat["cooldown_epochs"] > caps["epochs"]:
        epochs = min(flat["epochs"], caps["epochs"])
        out.update(epochs=epochs, cooldown_epochs=0, warmup_epochs=min(flat["warmup_epochs"], epochs - 1))
    steps = caps.get("max_steps_per_epoch")
    if steps is not None and (flat["max_steps_per_epoch"] is None or flat["max_steps_per_epoch"] > steps):
        out["max_steps_per_epoch"] = steps
    return out


def main(argv: list[str] | None = None) -> int:
    from mambaout.training.classify import train as fit
    from mambaout.training.config import list_recipes, resolve_config, to_flat
    from mambaout.utils.optional import MissingDependency
    from mambaout.weights.checkpoint import DownloadError

    try:
        overrides, args = parse_overrides(argv)
        if getattr(args, "list_recipes", False):
            print("\n".join(list_recipes()))
            return 0
        print_config = getattr(args, "print_config", False)
        cfg = resolve_config(overrides, require_data=not print_config)
    except (ValueError, FileNotFoundError) as e:
        print(f"mambaout train: {e}", file=sys.stderr)
        return 2
    if print_config:
        flat = to_flat(cfg)
        if flat["data_train"] is None:
            print("# data is unset: pass --data DIR or --data-train PATH [--data-val PATH] to train")
        print(yaml.safe_dump(flat, sort_keys=False))
        return 0
    try:
        caps = _smoke_caps(to_flat(cfg))
        if caps:
            cfg = resolve_config({**overrides, **caps})
            print(f"mambaout train: capped by the environment: {caps}", file=sys.stderr)
    except ValueError as e:
        print(f"mambaout train: {e}", file=sys.stderr)
        return 2
    kernels.set_fused_kernels(getattr(args, "fused_kernels", False))  # same numbers either way: not in the config
    try:
        result = fit(cfg)
    except DownloadError as e:  # --pretrained offline: the weights file can be given instead
        print(
            f"mambaout train: {e.reason}; offline, pass the weights file as --initial-checkpoint PATH", file=sys.stderr
        )
        return 2
    except (ValueError, OSError, MissingDependency) as e:  # OSError: a full disk, a taken folder, a missing file
        if stdout_failed(e):
            raise  # a closed pipe or a full stdout: mambaout.cli.main ends it
        print(f"mambaout train: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0 if result else 1


if __name__ == "__main__":
    sys.exit(main())
