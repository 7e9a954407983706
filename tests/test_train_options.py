"""Training options that change how a step is computed: each one's effect is observed, not just the exit code.

Spies watch a run from outside the engine: the inputs and weights the model's forward sees, how often a block
runs with gradients on (checkpointing replays each block in the backward pass), the gradient norm each optimizer
step receives (torch's global step hooks) and the weights after every step, from which the EMA is recomputed by
hand.
"""

import contextlib
import csv
import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import mambaout
from mambaout.cli import train as train_cmd
from mambaout.data import DigitsDataset, eval_transform
from mambaout.models.mambaout import GatedCNNBlock, MambaOut
from mambaout.training.classify import evaluate
from mambaout.weights.checkpoint import read_checkpoint

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
STEPS = 2
CLIP = 0.01  # far below the unclipped gradient norm of this model and data (checked on the plain run)


class Spy:
    """What one run did, seen from outside the engine."""

    def __init__(self):
        self.model = None
        self.train_inputs_channels_last: list[bool] = []
        self.conv_weights_channels_last: list[bool] = []
        self.autocast: list[tuple[bool, torch.dtype]] = []
        self.block_calls_with_grad = 0
        self.grad_norms: list[float] = []  # at each optimizer step, after any clipping
        self.weights_before_first_step: dict | None = None
        self.weights_after_step: list[dict] = []
        self.unscale_calls = 0

    def _snapshot(self) -> dict:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    @contextlib.contextmanager
    def watching(self):
        spy = self
        forward, block_forward, unscale = MambaOut.forward, GatedCNNBlock.forward, torch.amp.GradScaler.unscale_

        def model_forward(model, x):
            if torch.is_grad_enabled():  # a training step, not validation
                spy.model = model
                spy.train_inputs_channels_last.append(x.is_contiguous(memory_format=torch.channels_last))
                convs = [p for p in model.parameters() if p.dim() == 4]
                spy.conv_weights_channels_last.append(
                    all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
                )
                spy.autocast.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            return forward(model, x)

        def counted_block_forward(block, x):
            if torch.is_grad_enabled():
                spy.block_calls_with_grad += 1
            return block_forward(block, x)

        def counted_unscale(scaler, optimizer):
            spy.unscale_calls += scaler.is_enabled()  # without fp16 the scaler is there, disabled
            return unscale(scaler, optimizer)

        def before_step(optimizer, args, kwargs):
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            spy.grad_norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
            if spy.weights_before_first_step is None:
                spy.weights_before_first_step = spy._snapshot()

        def after_step(optimizer, args, kwargs):
            spy.weights_after_step.append(spy._snapshot())

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(MambaOut, "forward", model_forward)
            mp.setattr(GatedCNNBlock, "forward", counted_block_forward)
            mp.setattr(torch.amp.GradScaler, "unscale_", counted_unscale)
            hooks = [
                register_optimizer_step_pre_hook(before_step),
                register_optimizer_step_post_hook(after_step),
            ]
            try:
                yield self
            finally:
                for h in hooks:
                    h.remove()


def _run(out, *extra) -> tuple[dict, Spy]:
    spy = Spy()
    with spy.watching():
        assert train_cmd.main([*TINY, "--output", str(out), *extra]) == 0
    with open(out / "summary.csv") as f:
        row = list(csv.DictReader(f))[-1]
    assert math.isfinite(float(row["train_loss"])) and math.isfinite(float(row["val_loss"]))
    assert len(spy.grad_norms) == len(spy.weights_after_step)
    return row, spy


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The same run without any of the options: what each option's effect is measured against."""
    row, spy = _run(tmp_path_factory.mktemp("plain") / "run")
    assert len(spy.weights_after_step) == STEPS
    return row, spy


@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_mixed_precision(tmp_path, plain, amp, dtype):
    _, spy = _run(tmp_path / "run", "--amp", amp)
    assert spy.autocast == [(True, dtype)] * STEPS
    assert not any(enabled for enabled, _ in plain[1].autocast)
    # fp16 goes through the grad scaler: unscaled before each step (so clipping sees true gradients), and a step
    # whose scaled gradients overflow is skipped (here the first, at the initial scale 2**16); bf16 needs neither
    assert spy.unscale_calls == (STEPS if amp == "fp16" else 0)
    steps_taken = len(spy.weights_after_step)
    assert (0 < steps_taken <= STEPS) if amp == "fp16" else steps_taken == STEPS


@pytest.fixture(scope="module")
def optioned(tmp_path_factory):
    """One run with channels-last, gradient checkpointing, clipping and a fast EMA (decay 0.5) all on."""
    out = tmp_path_factory.mktemp("options") / "run"
    args = ["--channels-last", "--grad-checkpointing", "--clip-grad", str(CLIP), "--model-ema"]
    row, spy = _run(out, *args, "--set", "model_ema_decay=0.5")
    assert len(spy.weights_after_step) == STEPS
    return out, row, spy


def test_channels_last_reaches_weights_and_inputs(optioned, plain):
    _, _, spy = optioned
    assert spy.train_inputs_channels_last == [True] * STEPS
    assert spy.conv_weights_channels_last == [True] * STEPS
    # without the option neither is (the stem's 3-channel conv and a 3-channel image differ in the two layouts)
    assert plain[1].train_inputs_channels_last == [False] * STEPS
    assert plain[1].conv_weights_channels_last == [False] * STEPS


def test_grad_checkpointing_replays_each_block_in_the_backward_pass(optioned, plain):
    _, _, spy = optioned
    assert plain[1].block_calls_with_grad > 0
    assert spy.block_calls_with_grad == 2 * plain[1].block_calls_with_grad
    assert all(stage.grad_checkpointing for stage in spy.model.stages)


def test_clip_grad_bounds_the_norm_the_optimizer_sees(optioned, plain):
    _, _, spy = optioned
    assert min(plain[1].grad_norms) > 10 * CLIP  # unclipped, the bound would bind
    assert max(spy.grad_norms) <= CLIP * (1 + 1e-4), spy.grad_norms


def test_ema_weights_are_the_running_average_of_the_steps(optioned):
    out, row, spy = optioned
    ema, _ = read_checkpoint(out / "last_ema.safetensors")
    last, _ = read_checkpoint(out / "last.safetensors")
    init, (w1, w2) = spy.weights_before_first_step, spy.weights_after_step
    assert ema.keys() == last.keys() == w2.keys()
    # decay 0.5, updated after each step from the initial weights: 0.25 init + 0.25 w1 + 0.5 w2, written out
    for k in ema:
        torch.testing.assert_close(last[k], w2[k], rtol=0, atol=0)
        want = 0.25 * init[k].float() + 0.25 * w1[k].float() + 0.5 * w2[k].float()
        torch.testing.assert_close(ema[k].float(), want, rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(ema[k], last[k]) for k in ema)
    # summary.csv's EMA top-1 is the EMA weights' top-1, reproduced from the file
    model = mambaout.create_model(checkpoint=out / "last_ema.safetensors").eval()
    ds = DigitsDataset("val", transform=eval_transform(model.pretrained_cfg))
    top1 = evaluate(model, torch.utils.data.DataLoader(ds, batch_size=512), torch.device("cpu"))["top1"]
    assert float(row["ema_top1"]) == pytest.approx(top1, abs=1e-3)


def test_tensorboard(tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard is optional (pip install 'mambaout[dev]')")
    _run(tmp_path / "run", "--tensorboard")
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.heavy
def test_compile(tmp_path, monkeypatch):
    compiled = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, *a, **k: compiled.append(model) or real(model, *a, **k))
    _run(tmp_path / "run", "--compile")
    assert len(compiled) == 1 and isinstance(compiled[0], MambaOut)
