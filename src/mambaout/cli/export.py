"""`mambaout export`: a model as ONNX (dynamic batch axis) or a `torch.export` program (.pt2), with its metadata."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mambaout.cli.common import add_model_args, build_model
from mambaout.utils.files import check_writable
from mambaout.utils.limits import check_img_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="mambaout export", description=__doc__)
    add_model_args(parser)
    parser.add_argument(
        "--format",
        choices=("onnx", "pt2", "hf"),
        default=None,
        help="default: from the --output suffix; hf: a folder with config.json + model.safetensors (timm's Hub layout)",
    )
    parser.add_argument(
        "destination", nargs="?", default=None, metavar="OUTPUT", help="file to write (.onnx or .pt2), or folder for hf"
    )
    parser.add_argument("--output", "-o", default=None, help="the same as OUTPUT, as an option")
    parser.add_argument("--img-size", type=int, default=None, help="input side in pixels (default: the model's)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    parser.add_argument("--check", action="store_true", help="run the export and PyTorch side by side and compare")
    args = parser.parse_args(argv)
    if args.destination is not None and args.output is not None and args.destination != args.output:
        parser.error(f"two outputs given ({args.destination} and --output {args.output}); pass one")
    args.output = args.output or args.destination
    if args.output is None:
        parser.error("name the file or folder to write: mambaout export [options] OUTPUT (or --output OUTPUT)")
    fmt = args.format or ("pt2" if args.output.endswith(".pt2") else "onnx" if args.output.endswith(".onnx") else None)
    if fmt is None:
        parser.error(f"cannot tell the format from {args.output!r}: pass --format onnx or --format pt2")
    if fmt == "hf" and args.check:
        parser.error("--check applies to onnx and pt2; an hf folder holds the weights themselves")
    suffix = Path(args.output).suffix.lower()
    if suffix in (".onnx", ".pt2") and suffix != f".{fmt}":
        parser.error(
            f"--format {fmt} would write {fmt} bytes into {args.output}; name the file .{fmt}, or drop --format"
        )
    try:
        if args.img_size is not None:
            check_img_size(args.img_size)
        if fmt != "hf":  # hf writes a folder
            check_writable(args.output, "--output")
    except ValueError as e:
        parser.error(str(e))
    if args.opset is not None and fmt != "onnx":
        parser.error("--opset applies to --format onnx only")

    from mambaout.inference.export import DEFAULT_OPSET, export_onnx, export_pt2
    from mambaout.weights.checkpoint import CheckpointError, DownloadError

    try:
        model = build_model(args)
        if fmt == "hf":
            from mambaout.inference.predictor import class_names_for
            from mambaout.weights.hub import export_hf

            names = class_names_for(model)  # the words `mambaout predict` prints, for transformers' id2label
            folder = export_hf(model, args.output, [names.label(i) for i in range(model.num_classes)])
            print(f"wrote {folder}/config.json and model.safetensors (timm: create_model('local-dir:{folder}'))")
            return 0
        if fmt == "onnx":
            path = export_onnx(model, args.output, args.img_size, args.opset or DEFAULT_OPSET)
        else:
            path = export_pt2(model, args.output, args.img_size)
    except ImportError as e:
        print(f"mambaout export: {e}; install the export extra: pip install 'mambaout[export]'", file=sys.stderr)
        return 2
    except (ValueError, OSError, CheckpointError, DownloadError) as e:
        print(f"mambaout export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)
    if args.check:
        from mambaout.utils.optional import MissingDependency

        try:
            diff = check_export(model, path, fmt, args.img_size)
        except MissingDependency as e:
            print(f"mambaout export: {e}", file=sys.stderr)
            return 2
        print(f"max abs diff vs PyTorch (batch 3): {diff:.2e}", file=sys.stderr)
        if diff > 1e-4:
            print("mambaout export: the exported model disagrees with PyTorch beyond 1e-4", file=sys.stderr)
            return 1
    return 0


def check_export(model, path, fmt: str, img_size: int | None = None, batch_size: int = 3) -> float:
    """Max abs difference of the exported model's logits from PyTorch's on random input (another batch size)."""
    import torch

    _, h, w = model.pretrained_cfg["input_size"]
    if img_size is not None:
        h = w = img_size
    x = torch.randn(batch_size, 3, h, w)
    with torch.no_grad():
        want = model.eval()(x)
    if fmt == "onnx":
        from mambaout.utils.optional import require

        ort = require("onnxruntime", "export --check", "onnxruntime  (or the export extra: 'mambaout[export]')")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    else:
        from mambaout.inference.export import load_pt2

        program, _ = load_pt2(path)
        with torch.no_grad():
            got = program.module()(x)
    return (got - want).abs().max().item()
