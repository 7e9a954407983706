"""What several commands share: the parser, the options they have in common, models from options, one-line errors.

Commands import this module, never each other.
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import sys

from mambaout.utils import schema as S
from mambaout.utils.schema import AMP_CHOICES  # one list for the train settings and these options

DEFAULT_MODEL = "mambaout_femto"
AMP_HELP = "mixed precision: bare --amp is bf16 (as in validate); or auto (bf16 on CUDA, none on CPU), none, fp16"

# the options several commands share, by flag (`add_shared`)
SHARED = {
    "--model": dict(
        help=f"registered name, optionally with a weight tag (default: the checkpoint's model, else {DEFAULT_MODEL})"
    ),
    "--checkpoint": dict(help="weights file (.safetensors/.pth) or URL"),
    "--random-weights": dict(
        action="store_true", help="no checkpoint and no download: random weights (smoke tests, throughput)"
    ),
    # timm's options for reading weights files: the classifier width and the EMA (`weights_kwargs`)
    "--num-classes": dict(
        type=int,
        least=1,
        help="classifier width of weights that do not record it (timm or official files with another head)",
    ),
    "--use-ema": dict(
        action="store_true", help="take a training checkpoint's EMA weights (state_dict_ema) instead of its state_dict"
    ),
    "--fused-kernels": dict(
        action="store_true",
        help="CUDA: run the Gated CNN blocks through the opt-in fused Triton kernels (mambaout kernels says more)",
    ),
    "--dtype": dict(
        choices=("bf16", "fp32"),  # mambaout.inference.precision.DTYPES
        default="fp32",
        help="inference dtype; bf16 needs a CPU with AVX512-BF16 or AMX (else fp32, said in one line) or a GPU",
    ),
}
MODEL_OPTIONS = ("--model", "--checkpoint", "--random-weights", "--num-classes", "--use-ema")  # `build_model`'s


class Parser(argparse.ArgumentParser):
    """The commands' argument parser: no prefix abbreviations (`--checkpoint` is never `--checkpoint-every`); a bad
    argument is one line naming it and where the options are listed, not the whole usage block; and the bound an
    option declares (`add_argument(..., least=N)`, or `check=f` raising ValueError) is checked as it is parsed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def add_argument(self, *args, least: int | None = None, check=None, **kwargs):
        action = super().add_argument(*args, **kwargs)
        action.check = check if least is None else functools.partial(_at_least, args[0], least)
        return action

    def parse_args(self, args=None, namespace=None):
        ns = super().parse_args(args, namespace)
        for action in self._actions:
            value = getattr(ns, action.dest, None)
            try:
                if getattr(action, "check", None) and value is not None:
                    action.check(value)
            except ValueError as e:
                self.error(str(e))
        return ns

    def error(self, message: str):
        if len(message) > 300:  # argparse quotes the value it refused: a 5000-digit number is not a line
            message = message[:200] + " ... " + message[-60:]
        self.exit(2, f"{self.prog}: {message} (options: {self.prog} --help)\n")


def _at_least(flag: str, least: int, value) -> None:
    if value < least:
        raise ValueError(f"{flag} must be >= {least}, got {value}")


def add_shared(parser: argparse.ArgumentParser, *flags: str) -> None:
    for flag in flags:
        parser.add_argument(flag, **SHARED[flag])


def add_amp_argument(parser, help: str = AMP_HELP, **kwargs) -> None:
    """`--amp [DTYPE]` of the commands that train or time a model (`AMP_HELP`)."""
    parser.add_argument("--amp", nargs="?", const="bf16", choices=AMP_CHOICES, metavar="DTYPE", help=help, **kwargs)


def fail(command: str, message, code: int = 2) -> int:
    """Print `mambaout COMMAND: message` on stderr; return `code` (the exit status)."""
    print(f"mambaout {command}: {message}", file=sys.stderr)
    return code


def one_line(e: BaseException) -> str:
    """The message of `e`; for an error re-raised from a data-loader worker, only its last line (the original error),
    not the worker's traceback that torch puts into the message."""
    text = str(e).strip()
    return text.splitlines()[-1] if "Traceback" in text else text


def weights_kwargs(args: argparse.Namespace) -> dict:
    """`create_model` keywords of --num-classes (the weights' width, never a new head)."""
    kwargs = {"num_classes": args.num_classes} if args.num_classes is not None else {}
    return dict(kwargs, replace_head=False)


def build_model(args: argparse.Namespace):
    """The model `MODEL_OPTIONS` describe (published weights unless --checkpoint or --random-weights)."""
    from mambaout.models.factory import create_model
    from mambaout.models.variants import get_variant

    if args.checkpoint is not None and args.random_weights:
        raise ValueError("--checkpoint and --random-weights exclude each other; pass one")
    if args.use_ema and args.checkpoint is None:
        raise ValueError("--use-ema picks the EMA weights of a --checkpoint file: pass --checkpoint PATH too")
    if args.checkpoint is not None:
        return create_model(args.model, checkpoint=args.checkpoint, use_ema=args.use_ema, **weights_kwargs(args))
    name = args.model or DEFAULT_MODEL
    variant, _ = get_variant(name)
    if not args.random_weights and not variant.weights:
        raise ValueError(f"{variant.name} has no published weights: pass --checkpoint PATH or --random-weights")
    return create_model(name, pretrained=not args.random_weights, **weights_kwargs(args))


def shape_only_model(name: str):
    """A registered model on the meta device: shapes only, so parameter and MAC counts take milliseconds."""
    import torch

    from mambaout.models.variants import get_variant

    with torch.device("meta"):
        return get_variant(name)[0].build()


def model_counts(name: str, img_size: int) -> tuple[int, int | None]:
    """(parameters, MACs at `img_size`) of a registered model, counted as the paper counts them (`analysis.flops`);
    MACs are None where the model cannot run at that size (a ViT at a size that is no multiple of its patch)."""
    from mambaout.analysis.flops import count_macs, count_params

    model = shape_only_model(name)
    try:
        macs = count_macs(model, img_size)
    except ValueError:
        macs = None
    return count_params(model), macs


def smoke_steps(var: str) -> int | None:
    """A positive integer from the environment variable `var` (`MAMBAOUT_MAX_STEPS`, `MAMBAOUT_MAX_EPOCHS`): the
    cap of a run's length that lets tests/test_docs.py run a documented command as written; None when unset."""
    value = os.environ.get(var)
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{var} must be a positive integer, got {value!r}")
    return int(value)


def stdout_failed(e: BaseException) -> bool:
    """Whether `e` is stdout failing: a closed pipe, or a full disk or I/O error that no named file reported (files
    report their own: `FileWriteError`, or an OSError naming the file). Commands that turn an OSError into a one-line
    message re-raise these, so `mambaout.cli.main` ends a closed pipe quietly (exit 0) and names a full stdout."""
    from mambaout.utils.files import FileWriteError

    return isinstance(e, BrokenPipeError) or (
        isinstance(e, OSError)
        and not isinstance(e, FileWriteError)
        and e.filename is None
        and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG)
    )


# --- the training commands' options: one per setting, and the few that are no setting ---------------------------


def settings_parser(prog: str, description: str, schema: S.Schema, command: str, *extra: tuple) -> Parser:
    """A training command's parser: --set, --print-config, --list-recipes, the `extra` options (`(flags, keywords)`)
    and `add_settings`; options not given stay out of the namespace (so they never replace a recipe's value)."""
    p = Parser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    g = p.add_argument_group("command")
    set_help = "any setting (YAML value) as KEY or SECTION.KEY, e.g. --set 'model_kwargs={kernel_size: 5}'; repeatable"
    g.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE", help=set_help)
    g.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    recipes_help = f"the {command} recipes with their hardware, time, result"
    g.add_argument("--list-recipes", action="store_true", help=recipes_help)
    for flags, kwargs in extra:
        p.add_argument(*flags, **kwargs)
    add_settings(p, schema)
    return p


def add_settings(parser: argparse.ArgumentParser, schema: S.Schema) -> None:
    """One option per setting of `schema` that has flags, in a group per section."""
    for section, cls in schema.sections.items():
        doc = (cls.__doc__ or "").strip().split("\n")[0]
        group = parser.add_argument_group(section, doc.replace("%", "%%"))
        for s in schema.settings:
            if s.section == section and s.flags:
                group.add_argument(*s.flags, dest=s.key, default=argparse.SUPPRESS, **_argument(s))


def given_settings(schema: S.Schema, args: argparse.Namespace) -> tuple[dict, dict]:
    """The settings given as options in a namespace `settings_parser` filled, and those given with --set, by
    `Setting`."""
    values = vars(args)
    return {s: values[s.key] for s in schema.settings if s.key in values}, schema.parse_set(values.get("overrides"))


def _argument(s: S.Setting) -> dict:
    """`add_argument` keywords of a setting, from its check: every value reaches the check, which says what is
    wrong in the one line every other source of a value gets (argparse's own `choices` and `type` would not)."""
    check, help_ = s.check, s.help.replace("%", "%%")
    default = S.show_default(s.default).replace("%", "%%")
    text = "{" + ",".join(check.choices) + "}" if check.choices else s.name.upper()
    kw = {
        "boolean": dict(action=argparse.BooleanOptionalAction),
        "number": dict(type=S.scalar, metavar="N"),
        "list": dict(type=S.scalar, nargs=check.nargs, metavar="N"),
        "text": dict(metavar=text),
    }.get(check.kind, dict(type=S.yaml_value, metavar="YAML"))
    kw["help"] = f"{help_} (default {default})" if help_ else f"default {default}"
    return kw | s.field.metadata.get("cli", {})
