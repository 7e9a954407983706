"""`mambaout demo`: the Gradio web demo (upload or paste an image, see the top-k labels).

The page offers only the models and checkpoints named here (an allow-list), each loaded at start; uploads go to a
private temporary folder that is removed when the command ends.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile
import threading

from mambaout.cli.common import DEFAULT_MODEL, Parser, add_shared, fail, weights_kwargs
from mambaout.utils.device import resolve_device
from mambaout.weights.checkpoint import CheckpointError, DownloadError


def _check_port(port: int) -> None:
    if not 1 <= port <= 65535:
        raise ValueError(f"a port is 1 to 65535, got {port}")


def get_args_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mambaout demo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        nargs="+",
        default=None,
        help=f"model(s) offered with published weights (default {DEFAULT_MODEL}.in1k, downloaded at start); with "
        "--checkpoint, the checkpoints' model (one name, or one per file) for weights without our metadata",
    )
    parser.add_argument("--checkpoint", nargs="+", default=None, help="weights file(s) offered, listed first")
    parser.add_argument("--random-weights", action="store_true", help="offer --model at random initialisation")
    parser.add_argument("--topk", type=int, default=5, least=1, help="labels shown per image (default 5)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: reachable from others)")
    parser.add_argument("--port", type=int, default=7860, check=_check_port, help="port (default 7860)")
    upload_help = "largest upload accepted, MiB (default 20)"
    parser.add_argument("--max-upload-mb", type=int, default=20, least=1, help=upload_help)
    examples_help = "folder of example images (default: the photos shipped with the package)"
    parser.add_argument("--examples", default=None, help=examples_help)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    add_shared(parser, "--num-classes", "--use-ema")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.checkpoint and args.random_weights:
        parser.error("--checkpoint and --random-weights exclude each other; pass one")
    try:
        from mambaout.inference.demo_app import build_app, launch
    except ImportError as e:
        return fail("demo", f"{e}; install the demo extra: pip install 'mambaout[demo]'")
    models = args.model
    if models is None and not args.checkpoint:
        models = [DEFAULT_MODEL + ("" if args.random_weights else ".in1k")]
    # Uploads go to a folder of this process only, removed when it ends (Ctrl+C or SIGTERM).
    previous = os.environ.get("GRADIO_TEMP_DIR")
    uploads = tempfile.mkdtemp(prefix="mambaout-demo-", dir=previous or None)
    os.environ["GRADIO_TEMP_DIR"] = uploads
    main_thread = threading.current_thread() is threading.main_thread()
    handler = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main_thread else None
    try:
        device = str(resolve_device(args.device))
        if args.use_ema and not args.checkpoint:
            raise ValueError("--use-ema picks the EMA weights of --checkpoint files: pass --checkpoint PATH too")
        model_kwargs = dict(weights_kwargs(args), use_ema=args.use_ema)
        app = build_app(models, args.checkpoint, args.random_weights, args.topk, args.examples, device, model_kwargs)
        launch(app, host=args.host, port=args.port, max_file_size=f"{args.max_upload_mb}mb")
    except (ValueError, OSError, CheckpointError, DownloadError) as e:  # OSError: the port is taken
        return fail("demo", e)
    finally:
        shutil.rmtree(uploads, ignore_errors=True)
        if previous is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = previous
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)
    return 0


def _exit_on_sigterm(signum, frame):
    raise SystemExit(0)  # unwinds through main's `finally`, which removes the uploads
