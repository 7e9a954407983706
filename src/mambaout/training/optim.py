"""Optimizer and learning-rate schedule of the official recipe: AdamW with decoupled weight decay, timm's cosine."""

from __future__ import annotations

import logging

import torch
from torch import nn

from mambaout.models.layers import param_groups
from mambaout.training.config import OptimConfig, ScheduleConfig


def create_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW (the paper's optimizer) over `param_groups`; other optimizers and layer-wise lr decay (each group's lr
    x d^(layers above it), numbered by the model's `group_matcher`) through timm."""
    if cfg.opt == "adamw" and cfg.layer_decay is None:
        groups = param_groups(model, cfg.weight_decay)
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps)
    from timm.optim import create_optimizer_v2

    adam_like = {"betas": cfg.betas, "eps": cfg.eps} if "adam" in cfg.opt.lower() else {}
    try:
        return create_optimizer_v2(
            model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay, **adam_like
        )
    except ValueError as e:
        raise ValueError(f"opt {cfg.opt!r}: {e} (timm's optimizer names, e.g. adamw, sgd, momentum, lamb)") from e


def create_scheduler(optimizer, cfg: ScheduleConfig, steps_per_epoch: int):
    """timm's schedule `sched` (default cosine): warmup, decay to min_lr over `epochs`, then min_lr (the cooldown)."""
    from timm.scheduler import create_scheduler_v2

    # a one-epoch run scheduled per epoch has nothing to anneal, which timm's cosine warns about on every such start
    # (a smoke run's error would then be two lines): the lr stays at its base value, as the config says
    cosine_log = logging.getLogger("timm.scheduler.cosine_lr")
    level = cosine_log.level
    cosine_log.setLevel(logging.ERROR)
    try:
        return create_scheduler_v2(
            optimizer,
            sched=cfg.sched,
            num_epochs=cfg.epochs,
            min_lr=cfg.min_lr,
            warmup_lr=cfg.warmup_lr,
            warmup_epochs=cfg.warmup_epochs,
            step_on_epochs=not cfg.sched_on_updates,
            updates_per_epoch=steps_per_epoch,
        )[0]
    finally:
        cosine_log.setLevel(level)


class FactorSchedule:
    """The lr of optimizer step n (0-based) as each group's initial lr x `factor(n)`, with timm's scheduler interface;
    a function of the step alone, so a resumed run recomputes it and the state holds nothing."""

    def __init__(self, optimizer: torch.optim.Optimizer, factor):
        self.optimizer, self.factor = optimizer, factor
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.step_update(0)

    def step(self, epoch: int) -> None:
        """Per-epoch stepping: this schedule moves per step only."""

    def step_update(self, num_updates: int) -> None:
        f = self.factor(num_updates)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * f

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
