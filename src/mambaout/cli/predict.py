"""`mambaout predict IMAGE_OR_FOLDER...`: top-k classes of images, as text or one JSON document."""

from __future__ import annotations

import sys

from mambaout import kernels
from mambaout.cli.common import MODEL_OPTIONS, Parser, add_shared, build_model, fail
from mambaout.data.folders import unreadable_folder
from mambaout.inference.precision import note, resolve_dtype
from mambaout.inference.predictor import Predictor, dumps, find_images, format_text
from mambaout.utils.device import resolve_device
from mambaout.utils.text import count, printable
from mambaout.weights.checkpoint import CheckpointError, DownloadError


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="mambaout predict", description=__doc__)
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and folders (recursed)")
    add_shared(parser, *MODEL_OPTIONS)
    parser.add_argument("--topk", type=int, default=5, least=1, help="classes to show per image (default 5)")
    parser.add_argument("--batch-size", type=int, default=32, least=1, help="images per forward pass (default 32)")
    parser.add_argument("--workers", type=int, default=0, least=0, help="decoding processes (default 0: decode inline)")
    parser.add_argument("--json", action="store_true", help="print one JSON list (one entry per image) on stdout")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_shared(parser, "--fused-kernels", "--dtype")
    args = parser.parse_args(argv)
    kernels.set_fused_kernels(args.fused_kernels)
    try:
        device = resolve_device(args.device)
        model = build_model(args)
    except (ValueError, FileNotFoundError, CheckpointError, DownloadError) as e:
        return fail("predict", printable(e))
    dtype, message = resolve_dtype(args.dtype, device)
    note(message, "mambaout predict")  # the one line saying bf16 falls back to fp32 here
    predictor = Predictor(model, topk=args.topk, device=device, dtype=dtype)
    paths = find_images(args.inputs)
    if not paths:
        why = unreadable_folder(args.inputs) or f"no images found in {' '.join(args.inputs)}"  # permission denied
        return fail("predict", printable(why), 1)
    results, n_ok = [], 0
    show_bar = not args.no_progress and len(paths) > args.batch_size
    for pred in predictor.iter_predict(paths, args.batch_size, args.workers, progress=show_bar):
        d = pred.to_dict()
        if pred.error is not None:
            if not args.json:
                print(f"mambaout predict: skipped {printable(pred.error)}", file=sys.stderr)
        else:
            n_ok += 1
            if not args.json:
                print(format_text(d), flush=True)
        results.append(d)
    if args.json:
        print(dumps(results))  # the only thing this command writes to stdout with --json
    if n_ok < len(results):
        fail("predict", f"{len(results) - n_ok} of {count(len(results), 'file')} could not be read")
    return 0 if n_ok else 1
