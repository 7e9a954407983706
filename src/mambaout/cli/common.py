"""What several commands share: choosing a model from the command line, and counting a model's parameters and MACs.

Commands import this module, never each other.
"""

from __future__ import annotations

import argparse
import errno

DEFAULT_MODEL = "mambaout_femto"


class Parser(argparse.ArgumentParser):
    """The commands' argument parser: no prefix abbreviations (`--checkpoint` is never `--checkpoint-every`), and a
    bad argument is one line naming it and where the options are listed, not the whole usage block."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        if len(message) > 300:  # argparse quotes the value it refused: a 5000-digit number is not a line
            message = message[:200] + " ... " + message[-60:]
        self.exit(2, f"{self.prog}: {message} (options: {self.prog} --help)\n")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model-choosing options shared by predict and export (`build_model` reads them)."""
    parser.add_argument(
        "--model",
        default=None,
        help=f"registered name, optionally with a weight tag (default: the checkpoint's model, else {DEFAULT_MODEL})",
    )
    parser.add_argument("--checkpoint", default=None, help="weights file (.safetensors/.pth) or URL")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="no checkpoint and no download: random weights (smoke tests, throughput)",
    )
    add_weights_args(parser)


def add_weights_args(parser: argparse.ArgumentParser) -> None:
    """timm's options for reading weights files: the classifier width and the EMA (validate, predict, export, demo)."""
    parser.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classifier width of weights that do not record it (timm or official files with another head)",
    )
    parser.add_argument(
        "--use-ema",
        action="store_true",
        help="take a training checkpoint's EMA weights (state_dict_ema) instead of its state_dict",
    )


def weights_kwargs(args: argparse.Namespace) -> dict:
    """`create_model` keywords of `add_weights_args`: --num-classes states the weights' width (never a new head)."""
    if args.num_classes is not None and args.num_classes < 1:
        raise ValueError(f"--num-classes must be >= 1, got {args.num_classes}")
    kwargs = {"num_classes": args.num_classes} if args.num_classes is not None else {}
    return dict(kwargs, replace_head=False)


def build_model(args: argparse.Namespace):
    """The model the shared options describe (published weights unless --checkpoint or --random-weights)."""
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

    variant, _ = get_variant(name)
    with torch.device("meta"):
        return variant.build()


def model_counts(name: str, img_size: int) -> tuple[int, int | None]:
    """(parameters, MACs at `img_size`) of a registered model, counted as the paper counts them (see `analysis.flops`).

    MACs are None where the model cannot run at that size (a ViT at a size that is no multiple of its patch).
    """
    from mambaout.analysis.flops import count_macs, count_params

    model = shape_only_model(name)
    try:
        macs = count_macs(model, img_size)
    except ValueError:
        macs = None
    return count_params(model), macs


def add_command_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """The options of every training command that are no setting: --set, --print-config, --list-recipes."""
    g = parser.add_argument_group("command")
    g.add_argument(
        "--set",
        dest="overrides",
        action="append",
        metavar="KEY=VALUE",
        help="any setting (YAML value) as KEY or SECTION.KEY, e.g. --set 'model_kwargs={kernel_size: 5}'; repeatable",
    )
    g.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    g.add_argument(
        "--list-recipes", action="store_true", help=f"the {command} recipes with their hardware, time, result"
    )


def smoke_steps(var: str) -> int | None:
    """A positive integer from the environment variable `var` (`MAMBAOUT_MAX_STEPS`, `MAMBAOUT_MAX_EPOCHS`): the
    cap of a run's length that lets tests/test_docs.py run a documented command as written; None when unset."""
    import os

    value = os.environ.get(var)
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{var} must be a positive integer, got {value!r}")
    return int(value)


def add_fused_kernels_argument(parser) -> None:
    """The `--fused-kernels` switch of the commands that run models (train, validate, predict)."""
    parser.add_argument(
        "--fused-kernels",
        action="store_true",
        help="CUDA: run the Gated CNN blocks through the opt-in fused Triton kernels (mambaout kernels says more)",
    )


def stdout_failed(e: BaseException) -> bool:
    """Whether `e` is stdout failing: a closed pipe, or a full disk or I/O error that no named file reported.

    Writes to named files report their own failures (`mambaout.utils.files.FileWriteError`, or an OSError carrying
    the file name); what is left is a print. Commands that turn an OSError into their own one-line message re-raise
    these, so `mambaout.cli.main` ends a closed pipe quietly (exit 0) and names stdout when it is full.
    """
    from mambaout.utils.files import FileWriteError

    if isinstance(e, BrokenPipeError):
        return True
    return (
        isinstance(e, OSError)
        and not isinstance(e, FileWriteError)
        and e.filename is None
        and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG)
    )


def add_dtype_argument(parser) -> None:
    """`--dtype {fp32,bf16}` of the commands that run a model (predict, validate)."""
    parser.add_argument(
        "--dtype",
        choices=("bf16", "fp32"),  # mambaout.inference.precision.DTYPES
        default="fp32",
        help="inference dtype; bf16 needs a CPU with AVX512-BF16 or AMX (else fp32, said in one line) or a GPU",
    )


from mambaout.utils import schema as S  # noqa: E402
from mambaout.utils.schema import AMP_CHOICES  # noqa: E402  (one list for the train settings and these options)

AMP_HELP = "mixed precision: bare --amp is bf16 (as in validate); or auto (bf16 on CUDA, none on CPU), none, fp16"


def add_amp_argument(parser, help: str = AMP_HELP, **kwargs) -> None:
    """`--amp [DTYPE]` of the commands that train or time a model (train, benchmark, detect/segment): a bare `--amp`
    is bf16 autocast, as validate's `--amp` switch; or auto (bf16 on CUDA, none on CPU), none, bf16, fp16."""
    parser.add_argument("--amp", nargs="?", const="bf16", choices=AMP_CHOICES, metavar="DTYPE", help=help, **kwargs)


def add_settings(parser: argparse.ArgumentParser, schema: S.Schema) -> None:
    """One option per setting of `schema` that has flags, in a group per section; options not given stay out of the
    namespace (so they never replace a recipe's value)."""
    for section, cls in schema.sections.items():
        doc = (cls.__doc__ or "").strip().split("\n")[0]
        group = parser.add_argument_group(section, doc.replace("%", "%%"))
        for s in schema.settings:
            if s.section == section and s.flags:
                group.add_argument(*s.flags, dest=s.key, default=argparse.SUPPRESS, **_argument(s))


def given_settings(schema: S.Schema, args: argparse.Namespace) -> dict:
    """The settings given as options in a namespace `add_settings` filled, by `Setting`."""
    values = vars(args)
    return {s: values[s.key] for s in schema.settings if s.key in values}


def _argument(s: S.Setting) -> dict:
    """`add_argument` keywords of a setting, from its check: every value reaches the check, which says what is
    wrong in the one line every other source of a value gets (argparse's own `choices` and `type` would not)."""
    check, help_ = s.check, s.help.replace("%", "%%")
    default = S.show_default(s.default).replace("%", "%%")
    kw: dict = {"help": f"{help_} (default {default})" if help_ else f"default {default}"}
    if check.kind == "boolean":
        kw["action"] = argparse.BooleanOptionalAction
    elif check.kind == "number":
        kw.update(type=S.scalar, metavar="N")
    elif check.kind == "list":
        kw.update(type=S.scalar, nargs=check.nargs, metavar="N")
    elif check.kind == "text":
        kw["metavar"] = "{" + ",".join(check.choices) + "}" if check.choices else s.name.upper()
    else:
        kw.update(type=S.yaml_value, metavar="YAML")
    kw.update(s.field.metadata.get("cli", {}))
    return kw
