"""`mambaout data-bench`: its options go through `train`'s resolution and checks, and a bad one is one line."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from mambaout.cli import data_bench


@pytest.fixture
def six(tmp_path):
    """Three classes of two small images each."""
    for c, cls in enumerate(("ant", "bee", "cat")):
        (tmp_path / "six" / cls).mkdir(parents=True)
        for i in range(2):
            arr = np.random.default_rng(10 * c + i).integers(0, 256, (28, 36, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "six" / cls / f"{i}.png")
    return tmp_path / "six"


def _no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def _fifo(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    return tmp_path / "fifo"


def _weights_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    return tmp_path / "model.safetensors"


BASE = ["--only", "cpu", "--workers", "0", "--img-size", "32"]

# (id, extra argv, patch, fragment of the one line): every one was a traceback or the wrong options named
BAD = [
    ("device-tpu", ["--device", "tpu"], None, "unknown device 'tpu'"),
    ("device-cuda-7-without-gpu", ["--device", "cuda:7"], _no_gpu, "torch sees no CUDA device here"),
    ("device-cuda-7-of-one-gpu", ["--device", "cuda:7"], _one_gpu, "only 1 CUDA device(s) here"),
    ("batch-over-the-set", ["-b", "64"], None, "the training set (6 images) is smaller than one batch of 64"),
    ("batch-over-trains-bound", ["-b", "70000"], None, "batch_size=70000: must be an integer in [1, 65,536]"),
    ("workers-over-trains-bound", ["-j", "1000"], None, "workers=1000: must be an integer in [0, 256]"),
    ("img-size-over-the-bound", ["--img-size", "10000"], None, "--img-size must be an integer from"),
]


@pytest.mark.parametrize("extra, patch, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_option_is_one_line(six, extra, patch, message, monkeypatch, capsys):
    if patch is not None:
        patch(monkeypatch)
    try:
        code = data_bench.main(["--data-train", str(six), *BASE, *extra])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    "make, message",
    [
        (_fifo, "is a named pipe (FIFO); pass an ImageFolder directory"),
        (_weights_file, "is a file, not an ImageFolder directory or a .tar of one"),
        (lambda p: p / "nope", "no data at"),
    ],
    ids=["fifo", "safetensors", "missing"],
)
def test_data_that_is_no_data_set_is_one_line(tmp_path, make, message, capsys):
    path = make(tmp_path)
    assert data_bench.main(["--data-train", str(path), *BASE]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and len(err.strip().splitlines()) == 1, err


def test_without_data_names_only_its_own_options(capsys):
    assert data_bench.main(BASE) == 2
    err = capsys.readouterr().err.strip()
    assert "pass --data-train PATH" in err and len(err.splitlines()) == 1, err
    # train's message named --data and --data-val, which data-bench does not take
    assert "--data DIR" not in err and "--data-val" not in err, err


class _Epochs:
    """A loader of `per_epoch` batches of 2 that records each epoch it is asked for (what a real one shuffles by)."""

    def __init__(self, per_epoch: int):
        self.per_epoch, self.epochs = per_epoch, []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __iter__(self):
        return iter([(torch.zeros(2, 3), torch.zeros(2))] * self.per_epoch)


def test_timing_runs_on_into_the_next_epochs():
    """10 batches from a loader of 3 per epoch: four epochs, each started with its own number (it was StopIteration
    from `next(it)` once the first epoch ran out)."""
    loader = _Epochs(3)
    assert data_bench._time(loader, batches=10, warmup=1, device=torch.device("cpu")) > 0
    assert loader.epochs == [0, 1, 2, 3]  # 11 batches: 3 + 3 + 3 + 2


def test_more_batches_than_an_epoch_holds_are_timed_and_said(six, capsys):
    """The probe's case: 6 images, batch 2, 10 timed batches without warm-up."""
    assert data_bench.main(["--data-train", str(six), *BASE, "-b", "2", "--batches", "10", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "6 images make 3 batch(es) of 2 per epoch" in out
    assert float(out.splitlines()[2].split()[-2]) > 0  # the `ours cpu` row has an img/s


def test_odd_batch_is_fine_as_no_pipeline_mixes(six, capsys):
    """batch_size and workers reach the training config, but data-bench leaves mixup out: an odd batch is allowed
    (train refuses it only because mixup pairs images)."""
    assert data_bench.main(["--data-train", str(six), *BASE, "-b", "3", "--batches", "1", "--warmup", "0"]) == 0
    assert "batch 3, 0 workers" in capsys.readouterr().out
