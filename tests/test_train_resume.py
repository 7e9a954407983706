"""Checkpoints and resume: bit-identical continuation, SIGKILL mid-run, atomic state writes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import FAST, _same, _weights

from mambaout.cli import train as train_cmd
from mambaout.utils import files


def test_resume_is_bit_identical(tmp_path):
    """4 epochs straight == 2 epochs, stop, --resume, 2 more (weights compared bit for bit)."""
    args = ["--epochs", "4", "--warmup-epochs", "1", "--model-ema", "--set", "model_ema_decay=0.9", *FAST]
    assert train_cmd.main([*args, "--output", str(tmp_path / "straight")]) == 0
    assert train_cmd.main([*args, "--output", str(tmp_path / "split"), "--stop-after-epochs", "2"]) == 0
    state = torch.load(tmp_path / "split" / "state.pt", weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 6
    assert not _same(_weights(tmp_path / "straight/last.safetensors"), _weights(tmp_path / "split/last.safetensors"))
    assert train_cmd.main(["--resume", str(tmp_path / "split"), "--no-progress"]) == 0
    for f in ("last.safetensors", "last_ema.safetensors"):
        assert _same(_weights(tmp_path / "straight" / f), _weights(tmp_path / "split" / f)), f
    straight = (tmp_path / "straight/summary.csv").read_text()
    split = (tmp_path / "split/summary.csv").read_text()
    # same losses and accuracies per epoch (the timing columns differ)
    assert [r.split(",")[:7] for r in straight.splitlines()] == [r.split(",")[:7] for r in split.splitlines()]


# `mambaout train` that, after its STOP_AT_STEP-th optimizer step, says so in STOP_MARKER and waits to be killed:
# the test's SIGKILL lands at a known step, however loaded the machine (no race between the kill and the run).
STOPPING_TRAIN = """
import os, sys, time
from pathlib import Path
from mambaout.cli import main
from mambaout.training import trainer

stop_at, marker, real, steps = int(os.environ["STOP_AT_STEP"]), Path(os.environ["STOP_MARKER"]), trainer._optimizer_step, []

def step(*args, **kwargs):
    real(*args, **kwargs)
    steps.append(1)
    if len(steps) == stop_at:
        marker.write_text(str(stop_at))
        time.sleep(10**6)

trainer._optimizer_step = step
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.multiprocess  # three trainings, two at once: 45 s of the default run's 10 minutes
@pytest.mark.timeout(900)
def test_sigkill_loses_at_most_the_current_epoch(tmp_path):
    """SIGKILL a run in the middle of its second epoch; --resume finishes it with the uninterrupted run's weights."""
    args = ["train", "--epochs", "5", "--warmup-epochs", "1", *FAST]
    args[args.index("3")] = "6"  # 6 steps per epoch: the kill lands after step 9, 3 steps into epoch 2
    straight, killed, marker = tmp_path / "straight", tmp_path / "killed", tmp_path / "stopped"
    env = dict(os.environ, OMP_NUM_THREADS="1", STOP_AT_STEP="9", STOP_MARKER=str(marker))
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", STOPPING_TRAIN, *args, "--output", str(killed)], env=env, stdout=log, stderr=log
        )
        try:  # the uninterrupted run, meanwhile
            subprocess.run([sys.executable, "-m", "mambaout", *args, "--output", str(straight)], check=True, env=env)
            deadline = time.monotonic() + 600
            while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert marker.exists(), "the run never reached step 9:\n" + (tmp_path / "killed.log").read_text()[-3000:]
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state = torch.load(killed / "state.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (0, 6)  # the first epoch's checkpoint; epoch 2's 3 steps are lost
    assert len((killed / "summary.csv").read_text().splitlines()) == 1 + 1
    resumed = subprocess.run(
        [sys.executable, "-m", "mambaout", "train", "--resume", str(killed), "--no-progress"], env=env
    )
    assert resumed.returncode == 0
    assert _same(_weights(straight / "last.safetensors"), _weights(killed / "last.safetensors"))
    assert len((killed / "summary.csv").read_text().splitlines()) == 1 + 5


def test_state_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    files.atomic_torch_save({"epoch": 1}, path)

    def crash(obj, f, *a, **k):
        Path(f).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        files.atomic_torch_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temp file left behind


def test_mid_epoch_resume_is_bit_identical(tmp_path):
    """Stop inside epoch 1, resume, stop inside epoch 2, resume: same weights as 2 uninterrupted epochs (workers=0)."""
    args = ["--epochs", "2", "--warmup-epochs", "1", "--model-ema", *FAST, "--max-steps-per-epoch", "6"]
    assert train_cmd.main([*args, "--output", str(tmp_path / "straight")]) == 0
    split = tmp_path / "split"
    assert train_cmd.main([*args, "--output", str(split), "--stop-after-steps", "4"]) == 0
    state = torch.load(split / "state.pt", weights_only=True)
    assert (state["epoch"], state["epoch_step"], state["step"]) == (-1, 4, 4)  # inside the first epoch
    assert train_cmd.main(["--resume", str(split), "--stop-after-steps", "4", "--no-progress"]) == 0
    state = torch.load(split / "state.pt", weights_only=True)
    assert (state["epoch"], state["epoch_step"], state["step"]) == (0, 2, 8)  # inside the second
    assert train_cmd.main(["--resume", str(split), "--no-progress"]) == 0
    for f in ("last.safetensors", "last_ema.safetensors"):
        assert _same(_weights(tmp_path / "straight" / f), _weights(split / f)), f
    # each epoch's summary row covers the whole epoch (its lr, and the mean loss over all its steps)
    straight = (tmp_path / "straight/summary.csv").read_text().splitlines()
    resumed = (split / "summary.csv").read_text().splitlines()
    assert [r.split(",")[:7] for r in straight] == [r.split(",")[:7] for r in resumed]


def test_checkpoint_every_steps(tmp_path):
    out = tmp_path / "run"
    args = ["--epochs", "1", *FAST, "--max-steps-per-epoch", "5", "--set", "checkpoint_every=2", "--output", str(out)]
    saved = []
    real = files.atomic_torch_save

    def spy(obj, path):
        saved.append((obj["epoch"], obj["epoch_step"], obj["step"]))
        real(obj, path)

    mp = pytest.MonkeyPatch()
    mp.setattr(files, "atomic_torch_save", spy)
    try:
        assert train_cmd.main(args) == 0
    finally:
        mp.undo()
    assert saved == [(-1, 2, 2), (-1, 4, 4), (0, 0, 5)]  # steps 2 and 4 inside the epoch, then its end


def test_resume_with_worker_processes(tmp_path):
    """Fresh workers each epoch take their seeds from the per-epoch seeded main process: resume stays exact."""
    args = ["--epochs", "3", "--warmup-epochs", "1", *FAST, "--workers", "1"]
    assert train_cmd.main([*args, "--output", str(tmp_path / "straight")]) == 0
    assert train_cmd.main([*args, "--output", str(tmp_path / "split"), "--stop-after-epochs", "1"]) == 0
    assert train_cmd.main(["--resume", str(tmp_path / "split"), "--no-progress"]) == 0
    assert _same(_weights(tmp_path / "straight/last.safetensors"), _weights(tmp_path / "split/last.safetensors"))
