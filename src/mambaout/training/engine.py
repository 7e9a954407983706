"""The model-agnostic engine: one training epoch and one evaluation pass.

Nothing here knows which network it trains: any `nn.Module` mapping `[B, C, H, W]` images to `[B, classes]`
logits works. Distributed details go through `mambaout.utils.distributed`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mambaout.utils import distributed as dist


@dataclass
class StepConfig:
    """How each optimizer step is taken.

    Attributes:
        accum_steps: Micro-batches per optimizer step (global batch / (per-device batch x world size)).
        amp_dtype: `torch.bfloat16`, `torch.float16` or None (full precision).
        clip_grad: Max gradient norm; None or 0 for no clipping.
        channels_last: Feed inputs in channels-last memory format.
    """

    accum_steps: int = 1
    amp_dtype: torch.dtype | None = None
    clip_grad: float | None = None
    channels_last: bool = False


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool):
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


@dataclass
class EpochTotals:
    """An epoch's running sums: the engine adds to them in place; a mid-epoch checkpoint stores them (`as_dict`),
    and a resumed epoch continues from them (`from_dict`), so its summary row covers the whole epoch."""

    loss_sum: torch.Tensor | float = 0.0  # a device tensor while training: read only when stored
    n_micro: int = 0  # micro-batches summed
    skipped: torch.Tensor | int = 0  # unreadable images met

    def as_dict(self) -> dict:
        """Plain numbers (one host read of the device sums), as `state.pt` holds them."""
        return {k: (v.item() if torch.is_tensor(v) else v) for k, v in vars(self).items()}

    @classmethod
    def from_dict(cls, values: dict | None) -> EpochTotals:
        values = values or {}
        return cls(float(values.get("loss_sum", 0.0)), int(values.get("n_micro", 0)), int(values.get("skipped", 0)))


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable,
    device: torch.device,
    step_cfg: StepConfig,
    *,
    mixup_fn: Callable | None = None,
    scaler: torch.amp.GradScaler | None = None,
    ema=None,
    on_step: Callable[[int], bool | None] | None = None,
    on_start: Callable[[], None] | None = None,
    max_steps: int | None = None,
    progress=None,
    refresh_every: int = 20,
    totals: EpochTotals | None = None,
) -> dict:
    """Train for one pass over `loader`.

    Every `accum_steps` micro-batches make one optimizer step; DDP's gradient all-reduce runs only on the last of
    them (`no_sync` on the others), and each micro-loss is divided by `accum_steps` so the summed gradient is the
    mean over the global batch, exactly as one large batch would give.

    Args:
        on_step: Called after every optimizer step with the number of steps taken this epoch (scheduler updates,
            step-granular checkpoints); returning True ends the epoch there.
        on_start: Called once the loader's iterator exists (creating it draws from the RNG), before the first batch.
        max_steps: Stop after this many optimizer steps (smoke tests, step-exact resume tests).
        progress: A tqdm-like bar (`update`, `set_postfix`) or None.
        refresh_every: Read the loss from the device (a host sync) and update `progress` every this many steps;
            a non-finite loss is reported at the first read after it.
        totals: The epoch's running sums, continued from their values (an epoch resumed mid-way) and kept current
            in place (the loss sum as a device tensor, read only when a mid-epoch checkpoint stores it), so the
            epoch's mean loss covers all of its steps.

    Returns:
        `loss` (mean over micro-batches, averaged over ranks), `steps`, `images` (all ranks), `img_s`, `skipped`
        (unreadable images met, all ranks), `seconds`.
    """
    # One loop, its steps in order (micro-batch, backward, optimizer step, host read); the pieces with no loop
    # state of their own (_optimizer_step, _show_progress, _epoch_result) live below.
    model.train()
    accum = step_cfg.accum_steps
    steps_total = len(loader) // accum
    if max_steps is not None:
        steps_total = min(steps_total, max_steps)
    # Loss sums stay on the device: reading a device tensor (`.item()`, `float()`, `if t`) waits for the GPU to
    # finish, which would stall the input pipeline once per step. They are read only every `refresh_every`
    # steps (the progress display) and at the end of the epoch.
    totals = EpochTotals() if totals is None else totals
    loss_sum = torch.full((), float(totals.loss_sum), device=device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    n_micro, skipped = int(totals.n_micro), int(totals.skipped)
    images, steps, checked_steps = 0, 0, 0
    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    batches = iter(loader)
    if on_start is not None:
        on_start()
    for i, (x, y, n_bad) in enumerate(batches):
        if steps >= steps_total:
            break
        x, y = _to_device(x, y, device, step_cfg.channels_last)
        skipped = skipped + n_bad.sum()  # a host tensor (or int) from the loader; converted once, at the end
        if mixup_fn is not None:
            x, y = mixup_fn(x, y)
        last_micro = (i + 1) % accum == 0
        with dist.no_sync(model, skip=not last_micro):
            with autocast(device, step_cfg.amp_dtype):
                loss = loss_fn(model(x), y)
            scaled = loss / accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += loss.detach().float()
        nonfinite |= ~torch.isfinite(loss.detach())
        n_micro += 1
        images += x.shape[0]
        totals.loss_sum, totals.n_micro, totals.skipped = loss_sum, n_micro, skipped
        if not last_micro:
            continue
        _optimizer_step(model, optimizer, scaler, step_cfg.clip_grad)
        steps += 1
        if ema is not None:
            ema.update(dist.unwrap(model))
        stop = on_step(steps) if on_step is not None else False
        if steps % refresh_every == 0 or stop or steps >= steps_total:
            # the one host read per `refresh_every` steps
            loss_mean = _check_finite(loss_sum, nonfinite, n_micro, checked_steps, steps)
            if progress is not None:
                _show_progress(progress, steps - checked_steps, loss_mean, optimizer, images, t0)
            checked_steps = steps
        if stop:
            break
    return _epoch_result(
        _check_finite(loss_sum, nonfinite, n_micro, checked_steps, steps), n_micro, steps, images, skipped, t0, device
    )


def _epoch_result(loss_mean: float, n_micro: int, steps: int, images: int, skipped, t0: float, device) -> dict:
    """The epoch's numbers, summed over ranks: mean loss, steps, images, img/s, unreadable images, seconds."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the epoch's time includes its queued GPU work
    seconds = time.perf_counter() - t0
    loss_total, n_micro, images, skipped = dist.all_reduce_sum(
        [loss_mean * max(n_micro, 1), n_micro, images, int(skipped)], device
    )
    return dict(
        loss=loss_total / max(n_micro, 1),
        steps=steps,
        images=int(images),
        img_s=images / max(seconds, 1e-9),
        skipped=int(skipped),
        seconds=seconds,
    )


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


def _show_progress(progress, new_steps: int, loss_mean: float, optimizer, images: int, t0: float) -> None:
    elapsed = time.perf_counter() - t0
    progress.update(new_steps)
    progress.set_postfix(
        loss=f"{loss_mean:.4f}",
        lr=f"{optimizer.param_groups[0]['lr']:.2e}",
        img_s=f"{images * dist.get_world_size() / max(elapsed, 1e-9):.0f}",
        refresh=False,
    )


def _check_finite(loss_sum: torch.Tensor, nonfinite: torch.Tensor, n_micro: int, since: int, steps: int) -> float:
    """Read the device-side loss sum (a host sync) and raise if any loss since the last check was inf/NaN."""
    total, bad = torch.stack([loss_sum.float(), nonfinite.float()]).tolist()  # one read
    if bad:
        raise FloatingPointError(
            f"the loss became inf or NaN between steps {since} and {steps}: lower the learning rate, "
            "enable --clip-grad, or use bf16"
        )
    return total / max(n_micro, 1)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress=None,
) -> dict:
    """Top-1, top-5 (top-k with k = min(5, classes)), mean cross-entropy and throughput over `loader`.

    With several ranks each evaluates its shard and the sums are all-reduced, so every rank returns the metrics
    of the whole set. Images whose label is outside the model's classes count as errors and are excluded
    from the loss. Unreadable images are not counted: a batch from `data.collate_readable` leaves them out and
    names them (its third element is the list of their names; other loaders give a count).

    Returns:
        `top1`, `top5` (percent), `loss`, `count` (readable images), `img_s`, `seconds`, `skipped` (all ranks),
        `skipped_files` (their names, all ranks, where the loader names them).
    """
    model.eval()
    # sums on the device (read once at the end: no host sync per batch); counts known on the host
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss_sum, n_loss
    count = skipped = 0
    skipped_files: list[str] = []
    t0 = time.perf_counter()
    for x, y, bad in loader:
        if isinstance(bad, list):  # names of the files left out of this batch
            skipped += len(bad)
            skipped_files += bad
        else:
            skipped = skipped + bad.sum()  # a host tensor from the loader
        if x is None:  # every image of the batch was unreadable
            continue
        x, y = _to_device(x, y, device, channels_last)
        with autocast(device, amp_dtype):
            logits = model(x)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices  # [B, k]
        hits = top == y[:, None]
        valid = (y >= 0) & (y < logits.shape[1])
        # out-of-range labels (any value) are masked out of the loss instead of indexed away (no sync)
        safe_y = torch.where(valid, y, torch.zeros_like(y))
        losses = F.cross_entropy(logits, safe_y, reduction="none") * valid
        sums += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), losses.sum(), valid.sum()]).double()
        count += x.shape[0]
        if progress is not None:
            progress.update(1)
    correct1, correct5, loss_sum, n_loss = sums.tolist()  # the one host sync of the pass
    skipped = int(skipped)
    seconds = time.perf_counter() - t0
    correct1, correct5, loss_sum, count, n_loss, skipped = dist.all_reduce_sum(
        [correct1, correct5, loss_sum, count, n_loss, skipped], device
    )
    return dict(
        top1=100.0 * correct1 / max(count, 1),
        top5=100.0 * correct5 / max(count, 1),
        loss=loss_sum / max(n_loss, 1),
        count=int(count),
        img_s=count / max(seconds, 1e-9),
        seconds=seconds,
        skipped=int(skipped),
        skipped_files=sorted(dist.all_gather_lists(skipped_files)),
    )
