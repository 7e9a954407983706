"""Wall time of the README's jobs quiet and beside one busy process, under each CPU thread setting.

    python benchmarks/thread_policy.py --jobs train validate predict --settings before policy passive

Each (job, setting, load) runs as its own `mambaout` process; "busy" starts `python -c "while True: pass"` one second
before the job and stops it after. Settings (environment of the job):

- before:  every core as a thread, libgomp's default wait (what `mambaout` did before the thread policy);
- policy:  the default now (mambaout/utils/threads.py: threads from the cores left free at start-up);
- passive: every core as a thread, OMP_WAIT_POLICY=PASSIVE (threads sleep at once at a barrier, no spinning);
- spin1k:  every core as a thread, GOMP_SPINCOUNT=1000 (a short spin, then sleep);
- one:     one thread (MAMBAOUT_THREADS=1, what `--threads 1` does).

Prints one line per run with the 1-minute load average before it, then the ratio busy/quiet per (job, setting).
The load average counts our own busy process and job; other users of the machine show up as load above ~2.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {
    "before": {"MAMBAOUT_THREADS": "all"},
    "policy": {},
    "passive": {"MAMBAOUT_THREADS": "all", "OMP_WAIT_POLICY": "PASSIVE"},
    "spin1k": {"MAMBAOUT_THREADS": "all", "GOMP_SPINCOUNT": "1000"},
    "one": {"MAMBAOUT_THREADS": "1"},
}
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def jobs(tmp: Path, data: Path) -> dict[str, list[str]]:
    ckpt = tmp / "digits" / "last.safetensors"
    images = tmp / "images"
    return {
        "train": ["train", "--epochs", "1", "--no-progress", "--overwrite", "--output", str(tmp / "train")],
        "validate": ["validate", str(data), "--model", "mambaout_femto", "--random-weights", "--img-size", "112"],
        "predict": ["predict", str(images), "--checkpoint", str(ckpt), "--topk", "1"],
    }


def prepare(tmp: Path, data: Path) -> None:
    """A digits checkpoint for predict, and 200 of the sample's images as files."""
    import tarfile

    subprocess.run(
        ["mambaout", "train", "--epochs", "1", "--no-progress", "--output", str(tmp / "digits")],
        check=True,
        capture_output=True,
    )
    out = tmp / "images"
    out.mkdir()
    with tarfile.open(data) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.lower().endswith((".jpg", ".jpeg", ".png"))]
        for i, m in enumerate(members[:200]):
            (out / f"{i:03d}{Path(m.name).suffix}").write_bytes(tar.extractfile(m).read())


def run(argv: list[str], env: dict, busy: bool, timeout: float) -> float | None:
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        if hog:
            time.sleep(1.0)
        t0 = time.perf_counter()
        try:
            subprocess.run(["mambaout", *argv], env=env, check=True, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        return time.perf_counter() - t0
    finally:
        if hog:
            hog.kill()
            hog.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", nargs="+", default=["train", "validate", "predict"])
    parser.add_argument("--settings", nargs="+", default=["before", "policy"], choices=sorted(SETTINGS))
    parser.add_argument("--loads", nargs="+", default=["quiet", "busy"], choices=["quiet", "busy"])
    parser.add_argument("--data", default=str(SHARED / "imagenet-sample-1k-112.tar"), help="validate's image set")
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    from mambaout.utils.device import cpu_name

    print(f"# {cpu_name()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    results: dict[tuple, float | None] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare(tmp, Path(args.data))
        commands = jobs(tmp, Path(args.data))
        for job in args.jobs:
            for setting in args.settings:
                env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MAMBAOUT_THREADS")}
                env.update(SETTINGS[setting])
                for load in args.loads:
                    before = os.getloadavg()[0]
                    t = run(commands[job], env, load == "busy", args.timeout)
                    results[job, setting, load] = t
                    shown = f"{t:7.1f} s" if t is not None else f">{args.timeout:.0f} s"
                    print(f"{job:<9} {setting:<8} {load:<6} {shown}   load before {before:.2f}", flush=True)
    print("\njob       setting  quiet s  busy s  busy/quiet")
    for job in args.jobs:
        for setting in args.settings:
            q, b = results.get((job, setting, "quiet")), results.get((job, setting, "busy"))
            ratio = f"{b / q:.2f}x" if q and b else "-"
            print(f"{job:<9} {setting:<8} {q or float('nan'):7.1f} {b or float('nan'):7.1f}  {ratio}")


if __name__ == "__main__":
    main()
