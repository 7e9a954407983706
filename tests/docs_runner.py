"""Runs documented shell commands one after another in this one interpreter, for tests/test_docs.py.

`python docs_runner.py PLAN.json`, in the page's work folder: PLAN.json holds the commands in order. A `mambaout ...`
command with nothing for a shell to expand, quote or redirect is `mambaout.cli.main` on its words (the console
script's own call), in this process; anything else goes to `sh -c`. So Python starts, and imports torch, timm and
mambaout, once per page instead of once per command (4-7 CPU-seconds each; dense.md has 17). The thread count the
start-up chose is restored after each command (a `--threads N` changes it), and so is the working folder. Each
command's output follows a `=== COMMAND` line on stdout and stderr; it stops at the first command that fails and
writes the exit codes of those it ran to PLAN.json.out.
"""

import json
import os
import re
import subprocess
import sys
import traceback

from mambaout.utils import threads

IN_PROCESS = re.compile(r"mambaout( [\w./=:,@+%-]+)+")


def run(text: str) -> int:
    if not IN_PROCESS.fullmatch(text):
        return subprocess.run(["sh", "-c", text]).returncode
    from mambaout.cli import main

    sys.argv = ["mambaout", *text.split()[1:]]
    try:
        return main(sys.argv[1:])
    except SystemExit as e:  # argparse's errors and --help
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except Exception:  # what the process would print before exiting 1
        traceback.print_exc()
        return 1


def main() -> None:
    plan_file = sys.argv[1]
    threads.begin()  # the console script's start-up: torch, torchvision and timm, then the thread policy
    import timm  # noqa: F401

    start = threads.settle()
    start = (start.threads, start.reason, start.free)
    work, codes = os.getcwd(), []
    with open(plan_file) as f:
        plan = json.load(f)
    for text in plan:
        for stream in (sys.stdout, sys.stderr):
            print(f"\n=== {text}", file=stream, flush=True)
        codes.append(run(text))
        sys.stdout.flush()
        sys.stderr.flush()
        os.chdir(work)
        threads.set_threads(*start)
        if codes[-1]:
            break
    with open(plan_file + ".out", "w") as f:
        json.dump(codes, f)


if __name__ == "__main__":
    main()
