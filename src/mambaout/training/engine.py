"""The task-agnostic step engine: one pass of optimizer steps over a loader, and the loss sums it keeps.

A `task.Task` turns a batch into inputs and a loss; this module takes the optimizer steps (autocast, gradient
accumulation, clipping, the grad scaler, the EMA) and keeps the loss sums on the device, read only when asked.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from mambaout.utils import distributed as dist


@dataclass
class StepConfig:
    """How each optimizer step is taken."""

    accum_steps: int = 1  # micro-batches per optimizer step (global batch / (per-device batch x world size))
    amp_dtype: torch.dtype | None = None  # autocast's dtype; None: full precision
    clip_grad: float | None = None  # max gradient norm; None or 0: no clipping


def autocast(device: torch.device, dtype: torch.dtype | None):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


class LossNotFinite(FloatingPointError, ValueError):
    """The loss became inf or NaN: a setting to change (the commands show it as one line, exit 2)."""


@dataclass
class Sums:
    """Loss sums on the device (the loss, then its named parts), since the last row of summary.csv (`row`) and
    since the last progress line (`line`). A checkpoint stores them (`as_dict`), a resumed run continues them
    (`Sums(**saved)`), so the numbers it logs equal an uninterrupted run's."""

    names: list = field(default_factory=list)  # "loss", then the task's loss parts
    row: torch.Tensor | list | None = None
    row_n: int = 0  # micro-batches summed
    line: torch.Tensor | list | None = None
    line_n: int = 0
    skipped: torch.Tensor | int = 0  # unreadable images met since the last row
    images: int = 0  # images trained on since the last row (this rank)
    nonfinite: torch.Tensor | bool = False

    def add(self, loss: torch.Tensor, parts: dict, n_bad, images: int) -> None:
        values = torch.stack([loss.detach(), *(v.detach() for v in parts.values())]).float()
        self.names = self.names or ["loss", *parts]
        self.row = _on(self.row, values) + values
        self.line = _on(self.line, values) + values
        self.nonfinite = self.nonfinite | ~torch.isfinite(values).all()
        self.row_n, self.line_n, self.images = self.row_n + 1, self.line_n + 1, self.images + images
        self.skipped = self.skipped + n_bad

    def read_line(self, since: int, steps: int) -> dict:
        """The means since the last line (one host read); raises if a loss since step `since` was inf or NaN."""
        if self.line is None or not torch.is_tensor(self.line):
            return {}
        flag = torch.as_tensor(self.nonfinite, device=self.line.device).float()[None]
        *values, bad = torch.cat([self.line.float(), flag]).tolist()  # one read
        if bad:
            raise LossNotFinite(
                f"the loss became inf or NaN between steps {since} and {steps}: lower the learning rate, "
                "enable --clip-grad, or use bf16"
            )
        return {k: v / max(self.line_n, 1) for k, v in zip(self.names, values)}

    def reset_line(self) -> None:
        self.line, self.line_n = None, 0

    def take_row(self, device) -> dict:
        """The means since the last row over all ranks (train_loss, its parts), images and skips; then reset."""
        row = [float(v) for v in (self.row.tolist() if torch.is_tensor(self.row) else self.row or [])]
        *sums, n, skipped, images = dist.all_reduce_sum([*row, self.row_n, int(self.skipped), self.images], device)
        out = {("train_loss" if k == "loss" else k): v / max(n, 1) for k, v in zip(self.names, sums)}
        self.row, self.row_n, self.skipped, self.images = None, 0, 0, 0
        return dict(out, skipped=int(skipped), images=int(images))

    def as_dict(self) -> dict:
        """Plain numbers (one host read of the device sums), as `state.pt` holds them."""
        plain = {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in vars(self).items()}
        return dict(plain, nonfinite=False)


def _on(sums, like: torch.Tensor) -> torch.Tensor:
    """Sums as a device tensor shaped as `like` (zeros for none; a list from a checkpoint put on the device)."""
    if sums is None:
        return torch.zeros_like(like)
    return sums if torch.is_tensor(sums) else like.new_tensor(sums)


def train_one_epoch(model: nn.Module, loader, task, parts, device, step_cfg: StepConfig, sums: Sums, hooks) -> int:
    """Train for one pass over `loader` (at most `hooks.max_steps` optimizer steps); returns the steps taken.

    Every `accum_steps` micro-batches make one optimizer step; DDP's gradient all-reduce runs only on the last of
    them (`no_sync` on the others), and each micro-loss is divided by `accum_steps` so the summed gradient is the
    mean over the global batch, exactly as one large batch would give.

    Args:
        task: A `task.Task`: turns a batch into inputs (`prepare`) and a loss with its parts (`loss`).
        parts: The `runfolder.Trainable` the step updates: optimizer, grad scaler (or None), EMA (or None).
        sums: The loss sums, kept on the device: reading a device tensor waits for the GPU, which would stall the
            input pipeline once per step, so they are read only every `hooks.refresh_every` steps.
        hooks: The trainer's `Steps`: `start()` is called once the loader's iterator exists (creating it draws from
            the RNG), before the first batch; `report(n, means)` every `refresh_every` and every `line_every` (0:
            never) steps of the run (`first`: the steps taken before this pass), and at a stop or the end, with the
            steps taken and the means since the last line, a non-finite loss raised at the first read after it;
            `after_step(n)` after every optimizer step with the steps taken, True ending the pass there.
    """
    model.train()
    accum = step_cfg.accum_steps
    steps_total = min(len(loader) // accum, hooks.max_steps)
    steps = checked = 0
    parts.optimizer.zero_grad(set_to_none=True)
    batches = iter(loader)
    hooks.start()
    for i, batch in enumerate(batches):
        if steps >= steps_total:
            break
        inputs, targets, n_images, n_bad = task.prepare(batch, device)
        last_micro = (i + 1) % accum == 0
        with dist.no_sync(model, skip=not last_micro):
            with autocast(device, step_cfg.amp_dtype):
                loss, loss_parts = task.loss(model, inputs, targets)
            scaled = loss / accum
            (parts.scaler.scale(scaled) if parts.scaler is not None else scaled).backward()
        sums.add(loss, loss_parts, n_bad, n_images)
        if not last_micro:
            continue
        _optimizer_step(model, parts.optimizer, parts.scaler, step_cfg.clip_grad)
        steps += 1
        if parts.ema is not None:
            parts.ema.update(dist.unwrap(model))
        done, every = hooks.first + steps, hooks.line_every
        if done % hooks.refresh_every == 0 or (every and done % every == 0) or steps >= steps_total:
            values = sums.read_line(checked, steps)  # the one host read per `refresh_every` steps
            checked = steps
            hooks.report(steps, values)
        if hooks.after_step(steps):
            sums.read_line(checked, steps)  # a stop inside a refresh interval checks its losses too
            break
    return steps


def _optimizer_step(model: nn.Module, optimizer, scaler, clip_grad: float | None) -> None:
    """One optimizer step on the accumulated gradients (unscaled first, so clipping sees the true ones)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_grad:
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
