"""The engine reads device tensors (a host sync on a GPU) only when the progress display refreshes, not per step;
the classification evaluation reads its sums once."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import nn

from mambaout.training import classify, trainer
from mambaout.training.classify import evaluate
from mambaout.training.runfolder import Trainable
from mambaout.training.trainer import Sums, Task, train_one_epoch

# every way a tensor's value reaches the host
SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


@pytest.fixture
def engine_syncs(monkeypatch):
    """Count host reads of tensors made by code in training/trainer.py or training/classify.py (library internals are
    not counted)."""
    calls: list[str] = []
    for name in SYNC_METHODS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            if sys._getframe(1).f_code.co_filename in (trainer.__file__, classify.__file__):
                calls.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


class Bar:
    """The engine's hooks: a progress display recording what the engine reports."""

    first, line_every, max_steps, refresh_every = 0, 0, math.inf, 20
    accum_steps, amp_dtype, clip_grad = 1, None, None

    def __init__(self):
        self.n, self.postfixes = 0, []

    def start(self):
        pass

    def report(self, steps, values):
        self.n = steps
        self.postfixes.append(values)

    def after_step(self, steps):
        return False


class CrossEntropy(Task):
    """A task as simple as can be: images and labels, cross-entropy."""

    def prepare(self, batch, device):
        x, y, n_bad = batch
        return x, y, x.shape[0], n_bad.sum()

    def loss(self, model, inputs, targets):
        return nn.CrossEntropyLoss()(model(inputs), targets), {}


def _batches(n, bad_after=None):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        x = torch.randn(4, 3, 8, 8, generator=g)
        if bad_after is not None and i >= bad_after:
            x = x * float("inf")
        out.append((x, torch.randint(0, 3, (4,), generator=g), torch.zeros(4, dtype=torch.long)))
    return out


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))


def _epoch(loader, refresh_every, bar=None):
    model = _model()
    parts = Trainable(model, torch.optim.SGD(model.parameters(), lr=0.1), None, torch.amp.GradScaler(enabled=False))
    sums = Sums()
    bar = bar or Bar()
    bar.refresh_every = refresh_every
    steps = train_one_epoch(model, loader, CrossEntropy(), parts, torch.device("cpu"), sums, bar)
    return dict(steps=steps, **sums.take_row("cpu"))


def test_train_reads_the_loss_only_at_refreshes(engine_syncs):
    bar = Bar()
    stats = _epoch(_batches(12), refresh_every=5, bar=bar)
    assert stats["steps"] == 12 and bar.n == 12
    assert len(bar.postfixes) == 3  # steps 5, 10 and the last one (12)
    # one read per refresh (3) + the sums and the (host) skipped count read for the row: not one per step
    assert len(engine_syncs) <= 5, engine_syncs
    # the counter does see the reads: refreshing every step costs a read every step
    engine_syncs.clear()
    _epoch(_batches(12), refresh_every=1, bar=Bar())
    assert len(engine_syncs) >= 12


def test_train_loss_equals_the_mean_of_step_losses():
    """Accumulating on the device gives the same mean loss as reading each step's loss."""
    batches = _batches(6)
    stats = _epoch(batches, refresh_every=100)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for x, y, _ in batches:
        loss = nn.CrossEntropyLoss()(model(x), y)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert stats["train_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_non_finite_loss_still_stops_training():
    with pytest.raises(FloatingPointError, match="between steps 0 and 4"):
        _epoch(_batches(12, bad_after=2), refresh_every=4)


def test_evaluate_reads_device_sums_once(engine_syncs):
    model = _model().eval()
    batches = _batches(7)
    stats = evaluate(model, batches, torch.device("cpu"))
    assert len(engine_syncs) <= 2, engine_syncs  # the sums once (+ the skipped count)
    assert stats["count"] == 28
    with torch.no_grad():
        want = sum((model(x).argmax(1) == y).sum().item() for x, y, _ in batches)
    assert stats["top1"] == pytest.approx(100 * want / 28)
