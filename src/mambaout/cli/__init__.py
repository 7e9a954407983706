"""`mambaout <command> ...`: each command lives in its own module with a `main(argv=None) -> int`."""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys

from mambaout.cli.common import fail, stdout_failed

# command -> (module, one-line help); modules are imported only when their command runs. The dense tasks share
# cli/dense.py, whose main takes the task first.
DENSE_TASKS = ("detect", "segment")
COMMANDS: dict[str, tuple[str, str]] = {
    name: (f"mambaout.cli.{'dense' if name in DENSE_TASKS else name.replace('-', '_')}", help_)
    for name, help_ in {
        "models": "list the variants with parameters, MACs and published top-1",
        "train": "train a model from a recipe (no data: the embedded digits default)",
        "validate": "top-1/top-5 of checkpoints or published weights on a labelled image set",
        "flops": "params and MACs of every model at any size; the Transformer FLOPs argument",
        "predict": "top-k classes of images or folders (text or --json)",
        "demo": "web demo (Gradio): upload an image, see the top-k labels",
        "export": "export to ONNX (dynamic batch) or torch.export .pt2",
        "benchmark": "img/s, ms/step and memory of ours vs timm, measured in one run",
        "data-bench": "training img/s of our cpu and gpu input pipelines vs timm's loader",
        "detect": "detection and instance segmentation (Mask R-CNN + FPN): train, validate (COCO AP), predict",
        "segment": "semantic segmentation (UperNet): train, validate (mIoU, pixel accuracy), predict",
        "kernels": "which block implementation runs where; --aot sm_90 times every Triton compile",
    }.items()
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items())
    return (
        f"usage: mambaout <command> [options]\n\ncommands:\n{lines}\n\n'mambaout <command> -h' for a command's options"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from mambaout import __version__

        print(__version__)
        return 0
    if argv[0] not in COMMANDS:
        print(f"mambaout: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    command = argv[0]
    _start_up(command)
    try:
        module = importlib.import_module(COMMANDS[command][0])
        task = (command,) if command in DENSE_TASKS else ()
        code = module.main(*task, argv[1:]) or 0
        sys.stdout.flush()  # here, not at exit: a full stdout is then one line, not "Exception ignored"
        return code
    except KeyboardInterrupt as e:
        # what was written stays: every file is written atomically, and training saved its state if it could
        return fail(command, str(e) or "interrupted (Ctrl-C); files already written are kept", 130)
    except OSError as e:
        if not stdout_failed(e):
            if e.filename is None:
                raise
            # the file system refused a path the user gave (a name too long, a loop of links, a read-only disk):
            # one line naming it, as every other bad path is
            from mambaout.utils.text import printable

            name = printable(str(e.filename))
            name = name if len(name) <= 120 else name[:60] + "..." + name[-57:]
            return fail(command, f"{name}: {e.strerror or e}")
        name = _silence_stdout()
        if isinstance(e, BrokenPipeError):
            # the reader went away (`mambaout predict ... | head -1`): nothing more to say, as `cat` says nothing
            return 0
        return fail(command, f"cannot write to stdout ({name}): {e.strerror}")


def _start_up(command: str) -> None:
    """Import what every command needs (torch, torchvision, timm: seconds) with Ctrl-C ending the process at once,
    in one line: nothing has been written yet, and an interrupt inside an extension's import would otherwise end
    in a long traceback, or abort the interpreter from C++ code. Ctrl-C behaves as usual afterwards. Then the
    thread policy (`mambaout.utils.threads`): as many torch threads as cores were left free during the import."""

    def stop(signum, frame):
        os.write(2, f"mambaout {command}: interrupted while starting (Ctrl-C); nothing was written\n".encode())
        os._exit(130)

    try:
        previous = signal.signal(signal.SIGINT, stop)
    except ValueError:  # not the main thread (a caller's worker thread): nothing to install
        previous = None
    from mambaout.utils import threads

    threads.begin()  # the thread policy watches the machine while torch loads (mambaout/utils/threads.py)
    try:
        import timm  # noqa: F401  (imports torch and torchvision)

        threads.settle()
    except ValueError as e:  # MAMBAOUT_THREADS / OMP_NUM_THREADS that is not a count
        raise SystemExit(fail(command, e)) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _silence_stdout() -> str:
    """Point stdout at /dev/null, so the interpreter's own flush at exit has nowhere left to fail; return its name."""
    name = "<stdout>"
    # OSError etc.: stdout replaced by an object without a descriptor (tests), or no /proc
    with contextlib.suppress(OSError, ValueError, AttributeError):
        name = os.readlink(f"/proc/self/fd/{sys.stdout.fileno()}")
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return name
