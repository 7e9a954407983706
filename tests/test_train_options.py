"""Training options that change how a step is computed: mixed precision, channels-last, checkpointing, compile."""

import csv
import math

import pytest

from mambaout.cli import train as train_cmd

TINY = [
    "--model",
    "mambaout_test",
    "--epochs",
    "1",
    "--batch-size",
    "16",
    "--max-steps-per-epoch",
    "2",
    "--workers",
    "0",
    "--threads",
    "1",
    "--no-progress",
    "--device",
    "cpu",
]


def _run(tmp_path, *extra) -> dict:
    out = tmp_path / "run"
    assert train_cmd.main([*TINY, "--output", str(out), *extra]) == 0
    with open(out / "summary.csv") as f:
        row = list(csv.DictReader(f))[-1]
    assert math.isfinite(float(row["train_loss"])) and math.isfinite(float(row["val_loss"]))
    return row


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision(tmp_path, amp):
    _run(tmp_path, "--amp", amp)  # fp16 also goes through the grad scaler (unscale, clip, step, update)


def test_channels_last_grad_checkpointing_clip_ema(tmp_path):
    row = _run(tmp_path, "--channels-last", "--grad-checkpointing", "--clip-grad", "1.0", "--model-ema")
    assert row["ema_top1"] != ""


def test_tensorboard(tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard is optional (pip install 'mambaout[dev]')")
    _run(tmp_path, "--tensorboard")
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_compile(tmp_path):
    _run(tmp_path, "--compile")
