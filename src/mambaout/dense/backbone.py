"""The dense-prediction backbone: MambaOut's stage maps (exactly `mambaout.create_model(name, features_only=True)`'s),
each through its own LayerNorm (the authors' dense recipe, following Swin), as NCHW tensors."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mambaout.models.factory import create_model
from mambaout.models.variants import get_variant
from mambaout.utils import checks as C
from mambaout.utils.limits import MAX_IMG_SIZE, MAX_NUM_CLASSES, MIN_IMG_SIZE, check_model_kwargs
from mambaout.weights.checkpoint import read_metadata, run_weights

STRIDE = 32  # the last stage's reduction: inputs are padded to a multiple of it
WIDTH_MAX = 8192  # a head or FPN width; the paper's widest is UperNet's 512 and the box head's 1024
SIDE = C.Check(
    f"must be an integer from {MIN_IMG_SIZE} to {MAX_IMG_SIZE} pixels (memory grows with its square)",
    lambda v: v if C.is_int(v) and MIN_IMG_SIZE <= v <= MAX_IMG_SIZE else C.BAD,
    kind="number",
    bad=["x", MIN_IMG_SIZE - 1, MAX_IMG_SIZE + 1, 100.5],
)


def width(default: int, help_: str, lo: int = 1, **kw):
    """A head or neck width setting (`lo` 0 where 0 leaves the part out)."""
    zero = "0: none" if lo == 0 else ""
    return C.setting(default, C.integer(lo, WIDTH_MAX, zero_means=zero), help_, network=True, **kw)


def _model_kwargs(kwargs: dict) -> None:
    if "num_classes" in kwargs:
        raise ValueError("pass --num-classes (model.num_classes), not model.model_kwargs={num_classes: ...}")
    check_model_kwargs(kwargs, name="model.model_kwargs")


@dataclass
class BackboneConfig:
    """The backbone and class count of a detector or segmenter (their configs extend it)."""

    backbone: str = C.setting(
        "mambaout_tiny",
        C.text(max_len=200),
        "registered MambaOut name (unset, with a backbone checkpoint that records its model: that model)",
        network=True,
    )
    num_classes: int | None = C.setting(
        None, C.integer(1, MAX_NUM_CLASSES, optional=True), "classes (unset: the training data's)", network=True
    )
    drop_path_rate: float = C.setting(
        0.3,
        C.number(0, 1, hi_open=True),
        "backbone stochastic depth (0.3 Tiny, 0.3-0.4 Small, 0.6 Base)",
        flags=("--drop-path",),
    )
    frozen_stages: int = C.setting(
        -1, C.integer(-1, 8, zero_means="-1: none, 0: the stem, k: the stem and k stages"), "stages kept frozen"
    )
    model_kwargs: dict = C.setting(
        None,
        C.mapping(_model_kwargs, bad=[{"dims": [float("nan")]}, {"num_classes": 3}, {"ls_init_value": float("inf")}]),
        "further backbone arguments, e.g. {kernel_size: 5}",
        default_factory=dict,
        network=True,
    )


class DenseBackbone(nn.Module):
    """MambaOut stage maps with a LayerNorm each, for a detection or segmentation neck: `name` (None: the model
    `checkpoint` records), `out_indices` of stages 0-3 (strides 4-32), the published (`pretrained`) or `checkpoint`'s
    classification weights (any layout we read); `frozen_stages` -1 trains all, 0 freezes the stem, k the stem and
    the first k stages; `model_kwargs` go to `MambaOut`."""

    def __init__(
        self,
        name: str | None = "mambaout_tiny",
        out_indices: Sequence[int] = (0, 1, 2, 3),
        pretrained: bool = False,
        checkpoint: str | os.PathLike | None = None,
        drop_path_rate: float = 0.0,
        frozen_stages: int = -1,
        **model_kwargs,
    ):
        super().__init__()
        body = create_model(
            name,
            pretrained=pretrained,
            checkpoint=checkpoint,
            features_only=True,
            out_indices=tuple(out_indices),
            output_fmt="NHWC",  # the norms work on the last dimension; NCHW after them
            drop_path_rate=drop_path_rate,
            **model_kwargs,
        )
        if not -1 <= frozen_stages <= len(body.stages):
            raise ValueError(f"frozen_stages must be -1 (none) to {len(body.stages)}, got {frozen_stages}")
        self.model_name = body.model_name
        self.model_kwargs = dict(body.model_kwargs)
        self.body = body
        self.out_indices = tuple(body.out_indices)
        self.out_channels = list(body.feature_info.channels())
        self.norms = nn.ModuleList(nn.LayerNorm(c, eps=1e-6) for c in self.out_channels)
        self.frozen_stages = frozen_stages
        for module in self._frozen_modules():
            module.requires_grad_(False)
        self.train()

    def _frozen_modules(self) -> list[nn.Module]:
        return [self.body.stem, *self.body.stages[: self.frozen_stages]] if self.frozen_stages >= 0 else []

    def train(self, mode: bool = True) -> DenseBackbone:
        super().train(mode)
        for module in self._frozen_modules():  # frozen stages stay in eval mode: no drop path there
            module.eval()
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """`[B, 3, H, W]` -> one `[B, C_i, ceil(H / s_i), ceil(W / s_i)]` map per returned stage."""
        feats = self.body(pad_to_stride(x))  # list of [B, H_i, W_i, C_i]
        return [norm(f).permute(0, 3, 1, 2).contiguous() for norm, f in zip(self.norms, feats)]


def pad_to_stride(x: torch.Tensor, stride: int = STRIDE) -> torch.Tensor:
    """Zero-pad the bottom and right of `[B, C, H, W]` up to multiples of `stride` (a no-op when they already are)."""
    ph, pw = -x.shape[-2] % stride, -x.shape[-1] % stride
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


def backbone_from(cfg, pretrained: bool = False, checkpoint: str | os.PathLike | None = None) -> DenseBackbone:
    """The backbone a `DetectorConfig` or `SegmenterConfig` names, from published or given classification weights."""
    return DenseBackbone(
        cfg.backbone,
        pretrained=pretrained,
        checkpoint=checkpoint,
        drop_path_rate=cfg.drop_path_rate,
        frozen_stages=cfg.frozen_stages,
        **cfg.model_kwargs,
    )


# what a classification checkpoint records of its training that is not the architecture: the dense run has its own
_NOT_ARCHITECTURE = ("num_classes", "drop_path_rate", "drop_rate")


def checkpoint_backbone(
    checkpoint: str | os.PathLike, backbone: str | None = None, model_kwargs: dict | None = None
) -> tuple[str, str | None, dict]:
    """`(weights file, backbone, model_kwargs)` of `checkpoint` (a weights file, or a `mambaout train` run folder:
    its best, else last): the name given, else the one recorded (None: neither, the config's default), and the
    model_kwargs given, the recorded architecture filling the rest. ValueError (one line): a name or an argument
    given that disagrees with what the checkpoint records."""
    file = run_weights(checkpoint)
    meta = read_metadata(file)
    recorded = meta.get("model")
    given = dict(model_kwargs or {})
    if recorded is None:  # weights without our metadata (official, timm): the user's architecture decides
        return file, backbone, given
    if backbone is not None and get_variant(backbone)[0].name != get_variant(recorded)[0].name:
        raise ValueError(
            f"--backbone-checkpoint {file} holds {recorded} weights, but the backbone is {backbone}: "
            f"pass --backbone {recorded} (or leave --backbone out of the command and the recipe)"
        )
    arch = {k: v for k, v in meta.get("model_kwargs", {}).items() if k not in _NOT_ARCHITECTURE}
    clash = [f"{k}={given[k]} (recorded {v})" for k, v in arch.items() if k in given and given[k] != v]
    if clash:
        raise ValueError(
            f"--backbone-checkpoint {file} records {recorded} with {arch}, but model_kwargs sets {', '.join(clash)}: "
            "leave those out to build the checkpoint's architecture, or pass weights of the one you set"
        )
    return file, backbone or recorded, {**arch, **given}
