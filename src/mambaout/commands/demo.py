"""`mambaout demo`: the Gradio web demo (upload or paste an image, see the top-k labels)."""

from __future__ import annotations

import argparse
import sys

from mambaout.commands.common import DEFAULT_MODEL


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mambaout demo", description=__doc__)
    parser.add_argument(
        "--model", default=None, help=f"model selected at start (default {DEFAULT_MODEL}.in1k, downloaded on first use)"
    )
    parser.add_argument("--checkpoint", default=None, help="weights file selected at start instead of --model")
    parser.add_argument("--random-weights", action="store_true", help="start with --model at random initialisation")
    parser.add_argument("--topk", type=int, default=5, help="labels shown per image (default 5)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: reachable from others)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument(
        "--examples", default=None, help="folder of example images (default: the photos shipped with the package)"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    args = parser.parse_args(argv)
    if args.topk < 1:
        parser.error(f"--topk must be >= 1, got {args.topk}")
    if args.checkpoint and args.random_weights:
        parser.error("--checkpoint and --random-weights exclude each other; pass one")
    try:
        from mambaout.demo_app import build_app, launch
    except ImportError as e:
        print(f"mambaout demo: {e}; install the demo extra: pip install 'mambaout[demo]'", file=sys.stderr)
        return 2
    model = args.model or (None if args.checkpoint else f"{DEFAULT_MODEL}" + ("" if args.random_weights else ".in1k"))
    app = build_app(model, args.checkpoint, args.random_weights, args.topk, args.examples, args.device)
    launch(app, host=args.host, port=args.port)
    return 0
