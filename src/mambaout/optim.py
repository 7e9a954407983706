"""Optimizer and learning-rate schedule of the official recipe: AdamW with decoupled weight decay, timm's cosine."""

from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights, none on `model.no_weight_decay()` when it has one, else on 1-D parameters and biases."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else None
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            exempt = name in skip if skip is not None else p.ndim <= 1 or name.endswith(".bias")
            (no_decay if exempt else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def create_optimizer(model: nn.Module, cfg: dict, lr: float) -> torch.optim.Optimizer:
    """AdamW (the paper's optimizer) over `param_groups`."""
    groups = param_groups(model, cfg["weight_decay"])
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg["betas"]), eps=cfg["eps"])


def create_scheduler(optimizer, cfg: dict, steps_per_epoch: int):
    """timm's cosine schedule: warmup, cosine to min_lr over `epochs`, then min_lr through the cooldown epochs."""
    from timm.scheduler import CosineLRScheduler

    unit = steps_per_epoch if cfg["sched_on_updates"] else 1
    return CosineLRScheduler(
        optimizer,
        t_initial=cfg["epochs"] * unit,
        lr_min=cfg["min_lr"],
        warmup_t=cfg["warmup_epochs"] * unit,
        warmup_lr_init=cfg["warmup_lr"],
        cycle_limit=1,
        t_in_epochs=not cfg["sched_on_updates"],
    )
