"""`mambaout export`: a model as ONNX (dynamic batch axis, fp32 or int8), OpenVINO IR or a `torch.export` program.

int8: `--format onnx-int8 --calib DIR` quantises the ONNX export with ONNX Runtime's static quantiser, calibrated on
`--calib-images` images from DIR (mambaout.deploy.quantize); score it with `mambaout validate DATA --checkpoint F.onnx`.
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import torch

from mambaout.cli.common import MODEL_OPTIONS, Parser, add_shared, build_model, fail, stdout_failed
from mambaout.data.image import eval_transform
from mambaout.dense.tasks import TASKS, Task
from mambaout.deploy.quantize import calibration_images, quantize_int8
from mambaout.deploy.runtimes import export_openvino, load_runtime_model, ort_session
from mambaout.inference.export import DEFAULT_OPSET, check_opset, export_onnx, export_pt2, load_pt2
from mambaout.inference.predictor import class_names_for
from mambaout.utils.files import check_writable
from mambaout.utils.limits import check_img_size
from mambaout.utils.optional import MissingDependency
from mambaout.utils.text import count
from mambaout.weights.checkpoint import CheckpointError, DownloadError, read_checkpoint
from mambaout.weights.hub import export_hf


def main(argv: list[str] | None = None) -> int:
    parser = export_parser()
    args = parser.parse_args(argv)
    fmt = _output_format(parser, args)
    try:
        written = (_export_dense if _dense_task(args.checkpoint) else _export_classifier)(args, fmt)
    except ImportError as e:
        return fail("export", f"{e}; install the export extra: pip install 'mambaout[export]'")
    except (ValueError, OSError, CheckpointError, DownloadError) as e:
        if stdout_failed(e):
            raise  # a closed pipe or a full stdout: mambaout.cli.main ends it
        return fail("export", e)
    if written is None:  # an hf folder, named in its own line
        return 0
    path, compare = written
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)
    if not args.check:
        return 0
    try:
        diff, what, tolerance = compare()
    except MissingDependency as e:
        return fail("export", e)
    except ValueError as e:
        return fail("export", f"the check failed: {e}", 1)
    print(f"max abs diff vs PyTorch ({what}): {diff:.2e}", file=sys.stderr)
    if not math.isfinite(diff):  # NaN compares False with everything: `nan > 1e-4` would pass the check
        why = f"the difference from PyTorch is {diff} (non-finite logits from the export or from PyTorch)"
        return fail("export", f"the check failed: {why}", 1)
    if diff > tolerance:
        return fail("export", f"the exported model disagrees with PyTorch beyond {tolerance:g}", 1)
    return 0


def export_parser() -> Parser:
    parser = Parser(prog="mambaout export", description=__doc__)
    add_shared(parser, *MODEL_OPTIONS)
    parser.add_argument(
        "--format",
        choices=("onnx", "onnx-int8", "openvino", "pt2", "hf"),
        default=None,
        help="default: from the --output suffix (.onnx, .xml: openvino, .pt2); onnx-int8: int8 ONNX, needs --calib; "
        "hf: a folder with config.json + model.safetensors (timm's Hub layout)",
    )
    parser.add_argument("--calib", default=None, help="onnx-int8: a folder of images to calibrate on (any layout)")
    calib_help = "onnx-int8: calibration images drawn from --calib (default 256)"
    parser.add_argument("--calib-images", type=int, default=256, least=1, help=calib_help)
    output_help = "file to write (.onnx, .xml for openvino, .pt2), or folder for hf"
    parser.add_argument("destination", nargs="?", default=None, metavar="OUTPUT", help=output_help)
    parser.add_argument("--output", "-o", default=None, help="the same as OUTPUT, as an option")
    img_help = "input side in pixels (default: the model's)"
    parser.add_argument("--img-size", type=int, default=None, check=check_img_size, help=img_help)
    opset_help = "ONNX opset, 18 to the installed onnx's newest (default 18)"
    parser.add_argument("--opset", type=int, default=None, help=opset_help)
    parser.add_argument("--check", action="store_true", help="run the export and PyTorch side by side and compare")
    overwrite_help = "hf: replace another model's export found in the --output folder"
    parser.add_argument("--overwrite", action="store_true", help=overwrite_help)
    return parser


def _output_format(parser: Parser, args) -> str:
    """The format to write (`--format`, else from the output's suffix), once every option is checked against it;
    `parser.error` (exit 2) when they disagree."""
    if args.destination is not None and args.output is not None and args.destination != args.output:
        parser.error(f"two outputs given ({args.destination} and --output {args.output}); pass one")
    args.output = args.output or args.destination
    if args.output is None:
        parser.error("name the file or folder to write: mambaout export [options] OUTPUT (or --output OUTPUT)")
    suffix = Path(args.output).suffix.lower()
    fmt = args.format or {".pt2": "pt2", ".onnx": "onnx", ".xml": "openvino"}.get(suffix)
    if fmt is None:
        parser.error(f"cannot tell the format from {args.output!r}: pass --format onnx, onnx-int8, openvino or pt2")
    if (fmt == "onnx-int8") != (args.calib is not None):
        parser.error("--format onnx-int8 needs --calib DIR (images to calibrate on), and --calib only applies to it")
    if fmt == "hf" and args.check:
        parser.error("--check applies to onnx and pt2; an hf folder holds the weights themselves")
    want = {"onnx-int8": ".onnx", "openvino": ".xml"}.get(fmt, f".{fmt}")
    if suffix in (".onnx", ".pt2", ".xml") and suffix != want:
        parser.error(
            f"--format {fmt} would write {fmt} bytes into {args.output}; name the file {want}, or drop --format"
        )
    try:
        if fmt != "hf":  # hf writes a folder
            check_writable(args.output, "--output", inputs=[args.checkpoint])
    except ValueError as e:
        parser.error(str(e))
    if args.opset is not None and fmt not in ("onnx", "onnx-int8", "openvino"):
        parser.error("--opset applies to the ONNX-based formats (onnx, onnx-int8, openvino) only")
    return fmt


def _export_classifier(args, fmt: str):
    """A classification model (`--model`, `--checkpoint`) in `fmt`: None for an hf folder, else the file written and
    its check (`(max abs difference, what was compared, tolerance)` against PyTorch)."""
    if args.opset is not None:
        check_opset(args.opset)  # before the model is built
    model = build_model(args)
    if fmt == "hf":
        names = class_names_for(model)  # the words `mambaout predict` prints, for transformers' id2label
        labels = [names.label(i) for i in range(model.num_classes)]
        folder = export_hf(model, args.output, labels, overwrite=args.overwrite)
        print(f"wrote {folder}/config.json and model.safetensors (timm: create_model('local-dir:{folder}'))")
        return None
    if fmt == "onnx":
        path = export_onnx(model, args.output, args.img_size, args.opset or DEFAULT_OPSET)
    elif fmt == "onnx-int8":
        path = _export_int8(model, args)
    elif fmt == "openvino":
        path = export_openvino(model, args.output, args.img_size, args.opset)
    else:
        path = export_pt2(model, args.output, args.img_size)
    # int8 is not meant to equal fp32: its measure is top-1 (mambaout validate)
    tolerance = math.inf if fmt == "onnx-int8" else 1e-4
    return path, lambda: (check_export(model, path, fmt, args.img_size), "batch 3", tolerance)


def _dense_task(checkpoint) -> str | None:
    """`detect` or `segment` when `checkpoint` is a local file `mambaout detect|segment train` wrote, else None."""
    if checkpoint is None or not Path(checkpoint).is_file() or Path(checkpoint).suffix not in (".safetensors", ".pt"):
        return None
    try:
        task = read_checkpoint(checkpoint)[1].get("task")
    except (CheckpointError, ValueError, OSError):
        return None  # the classification path says what is wrong with the file
    return task if task in TASKS else None


def _export_dense(args, fmt: str):
    """A segmenter or detector checkpoint as ONNX (inputs and outputs: docs/dense.md, "Export"), and its check, as
    `_export_classifier`."""
    if fmt != "onnx":
        raise ValueError(f"a detection or segmentation checkpoint exports as onnx only, not {fmt}")
    if args.model is not None or args.random_weights or args.use_ema or args.num_classes is not None:
        raise ValueError(
            "a detection or segmentation checkpoint carries its own model: leave out --model, "
            "--random-weights, --use-ema and --num-classes"
        )
    model, meta = Task.from_checkpoint(args.checkpoint, torch.device("cpu"))
    task = TASKS[meta["task"]]
    path, hw = task.export_model(model, meta, args)
    return path, lambda: task.check_export(model.eval(), ort_session(path), hw)


def _export_int8(model, args):
    """fp32 ONNX export, then ONNX Runtime's static int8 quantisation calibrated on --calib (a temporary fp32 file)."""
    if not Path(args.calib).is_dir():
        raise ValueError(f"--calib {args.calib} is not a folder; pass a folder of images to calibrate on")
    transform = eval_transform(model.pretrained_cfg, args.img_size)
    images = calibration_images(args.calib, transform, args.calib_images)
    print(f"calibrating on {count(len(images), 'image')} from {args.calib}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, Path(tmp) / "fp32.onnx", args.img_size, args.opset or DEFAULT_OPSET)
        return quantize_int8(fp32, args.output, images)


def check_export(model, path, fmt: str, img_size: int | None = None, batch_size: int = 3) -> float:
    """Max abs difference of the exported model's logits from PyTorch's on random input (another batch size)."""
    h, w = (img_size, img_size) if img_size is not None else model.pretrained_cfg["input_size"][1:]
    x = torch.randn(batch_size, 3, h, w)
    with torch.no_grad():
        want = model.eval()(x)
        if fmt in ("onnx", "onnx-int8", "openvino"):
            got = load_runtime_model(path)(x)
        else:
            got = load_pt2(path)[0].module()(x)
    return (got - want).abs().max().item()
