"""What MambaOut shares with the other models of the package: the norm, activations, the weight-decay parameter
groups and the classifier API. Stochastic depth and LayerScale are timm's.
"""

# No `from __future__ import annotations`: TorchScript reads these hints at run time (see mambaout.py).

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

# Every norm in MambaOut is a channels-last LayerNorm with eps 1e-6 (official `partial(nn.LayerNorm, eps=1e-6)`).
LayerNorm = partial(nn.LayerNorm, eps=1e-6)

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU}


def get_act_layer(act_layer: str | Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """Resolve an activation given by name (`'gelu'`, `'silu'`, `'relu'`) or as a module class."""
    if isinstance(act_layer, str):
        if act_layer.lower() not in _ACTIVATIONS:
            raise ValueError(f"unknown act_layer {act_layer!r}: use one of {sorted(_ACTIVATIONS)} or a module class")
        return _ACTIVATIONS[act_layer.lower()]
    return act_layer


def init_weights(m: nn.Module) -> None:
    """Linear and conv weights from a normal of std 0.02 truncated at ±2, zero biases (timm's and the official init)."""
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights, none on `model.no_weight_decay()` when it has one, else on 1-D parameters and biases."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else None
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            exempt = name in skip if skip is not None else p.ndim <= 1 or name.endswith(".bias")
            (no_decay if exempt else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


class ClassifierAPI:
    """timm's classifier API as MambaOut and the comparison ViTs share it, so the training pipeline treats them alike:
    the model has `forward_features`, `forward_head`, `no_weight_decay()` and its classifier at `head.fc`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups: weight decay on weights, none on `no_weight_decay()`."""
        return param_groups(self, weight_decay)
