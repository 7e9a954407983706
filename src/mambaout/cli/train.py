"""`mambaout train`: train a registered model from a recipe; command-line options override the recipe.

With no data argument it trains on the embedded scikit-learn digits (recipe `digits`), a few minutes on a CPU.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import yaml

from mambaout import kernels
from mambaout.cli.common import SHARED, fail, given_settings, one_line, settings_parser, smoke_steps, stdout_failed
from mambaout.training.classify import train as fit
from mambaout.training.config import SCHEMA, recipes_table, resolve_config, to_flat
from mambaout.utils.optional import MissingDependency
from mambaout.utils.text import printable
from mambaout.weights.checkpoint import DownloadError


@functools.lru_cache(maxsize=1)
def get_args_parser() -> argparse.ArgumentParser:
    """The options: one per setting (`mambaout.training.config.SCHEMA`), and the few that are no setting; built once
    per process (parsing leaves it as it was)."""
    description = (
        "Train a MambaOut (or any registered model). Resolution: built-in official recipe < --recipe < options "
        "given here. With no data, trains on scikit-learn's digits (recipe 'digits'). Every setting is also --set "
        "KEY=VALUE (or SECTION.KEY=VALUE); docs/settings.md lists them."
    )
    experiment = dict(help="timm's run name: the run folder is runs/NAME (or --output/NAME)")
    extra = ((["--experiment"], experiment), (["--fused-kernels"], SHARED["--fused-kernels"]))
    return settings_parser("mambaout train", description, SCHEMA, "train", *extra)


def parse_overrides(argv: list[str] | None) -> tuple[dict, argparse.Namespace]:
    """The settings given on the command line, as flat keys, and the parsed namespace."""
    args = get_args_parser().parse_args(argv)
    options, sets = given_settings(SCHEMA, args)
    given = {s.name: v for s, v in options.items()}
    if getattr(args, "experiment", None):  # timm's --output DIR --experiment NAME writes to DIR/NAME
        given["output"] = str(Path(given.get("output") or "runs") / args.experiment)
    return given | {s.name: v for s, v in sets.items()}, args


def _smoke_caps(flat: dict) -> dict:
    """The settings that cap a run to `MAMBAOUT_MAX_EPOCHS` epochs and `MAMBAOUT_MAX_STEPS` optimizer steps (as for
    the dense commands; none when it is within them), so tests/test_docs.py runs a documented command as written;
    stored in the run's config like any other setting. N steps are at most N epochs of at most N // epochs steps."""
    cap_epochs, cap_steps = smoke_steps("MAMBAOUT_MAX_EPOCHS"), smoke_steps("MAMBAOUT_MAX_STEPS")
    cap = min(c for c in (cap_epochs, cap_steps, 10**12) if c is not None)
    out = {}
    if flat["epochs"] + flat["cooldown_epochs"] > cap:
        epochs = min(flat["epochs"], cap)
        cooldown = min(flat["cooldown_epochs"], cap - epochs)
        out.update(epochs=epochs, cooldown_epochs=cooldown, warmup_epochs=min(flat["warmup_epochs"], epochs - 1))
    if cap_steps is not None:
        capped = {**flat, **out}
        per_epoch = cap_steps // (capped["epochs"] + capped["cooldown_epochs"])
        if flat["max_steps_per_epoch"] is None or flat["max_steps_per_epoch"] > per_epoch:
            out["max_steps_per_epoch"] = per_epoch
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        overrides, args = parse_overrides(argv)
        if getattr(args, "list_recipes", False):
            print(recipes_table())
            return 0
        print_config = getattr(args, "print_config", False)
        cfg = resolve_config(overrides, require_data=not print_config)
        if print_config:
            flat = to_flat(cfg)
            if flat["data_train"] is None:
                print("# data is unset: pass --data DIR or --data-train PATH [--data-val PATH] to train")
            print(yaml.safe_dump(flat, sort_keys=False))
            return 0
        caps = _smoke_caps(to_flat(cfg))
        if caps:
            cfg = resolve_config({**overrides, **caps})
            print(f"mambaout train: capped by the environment: {caps}", file=sys.stderr)
    except (ValueError, FileNotFoundError) as e:
        return fail("train", e)
    kernels.set_fused_kernels(getattr(args, "fused_kernels", False))  # same numbers either way: not in the config
    try:
        return 0 if fit(cfg) else 1
    except DownloadError as e:  # --pretrained offline: the weights file can be given instead
        return fail("train", f"{e.reason}; offline, pass the weights file as --initial-checkpoint PATH")
    except (ValueError, OSError, MissingDependency) as e:  # OSError: a full disk, a taken folder, a missing file
        if stdout_failed(e):
            raise  # a closed pipe or a full stdout: mambaout.cli.main ends it
        return fail("train", printable(one_line(e)))
