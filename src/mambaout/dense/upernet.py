"""UperNet (Xiao et al., ECCV 2018) on the dense MambaOut backbone, the paper's ADE20K setting (Table 3): PSPNet's
pyramid pooling on the stride-32 map, an FPN top-down path over the others, every level fused at stride 4; an
auxiliary FCN head on stage 2 (loss weight 0.4, as Swin). Written here: mmseg would bring mmcv and mmengine."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation

from mambaout.data.image import IMAGENET_MEAN, IMAGENET_STD
from mambaout.utils import checks as C

from .backbone import STRIDE, BackboneConfig, DenseBackbone, backbone_from, width

IGNORE_INDEX = 255


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":  # groups of >= 4 channels: the PPM's 1x1 maps still give each group several values
        return nn.GroupNorm(max(1, min(32, channels // 4)), channels)
    raise ValueError(f"head norm must be 'bn' or 'gn', got {kind!r}")


def _block(in_ch: int, out_ch: int, kernel_size: int, norm: str) -> nn.Module:
    """Conv ("same" padding, no bias: the norm has one), norm, ReLU."""
    return Conv2dNormActivation(in_ch, out_ch, kernel_size, norm_layer=functools.partial(_norm, norm))


def _classifier(channels: int, num_classes: int) -> nn.Conv2d:
    """The 1x1 class conv as mmseg's `conv_seg` (normal, std 0.01, bias 0): every class starts near the same logit."""
    conv = nn.Conv2d(channels, num_classes, 1)
    nn.init.normal_(conv.weight, mean=0.0, std=0.01)
    nn.init.zeros_(conv.bias)
    return conv


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class PyramidPooling(nn.Module):
    """PSPNet's PPM: the map average-pooled to each scale, projected, upsampled back and concatenated with itself."""

    def __init__(self, in_ch: int, channels: int, scales: Sequence[int] = (1, 2, 3, 6), norm: str = "bn"):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), _block(in_ch, channels, 1, norm)) for s in scales
        )
        self.bottleneck = _block(in_ch + len(scales) * channels, channels, 3, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C_in, h, w] -> [B, channels, h, w]
        pooled = [_resize(branch(x), x.shape[-2:]) for branch in self.branches]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class UperNetHead(nn.Module):
    """PPM + FPN fusion over stage maps of strides 4-32; returns class logits at stride 4."""

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        norm: str = "bn",
    ):
        super().__init__()
        self.ppm = PyramidPooling(in_channels[-1], channels, pool_scales, norm)
        self.lateral = nn.ModuleList(_block(c, channels, 1, norm) for c in in_channels[:-1])
        self.smooth = nn.ModuleList(_block(channels, channels, 3, norm) for _ in in_channels[:-1])
        self.fuse = _block(len(in_channels) * channels, channels, 3, norm)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = _classifier(channels, num_classes)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        levels = [lat(f) for lat, f in zip(self.lateral, feats[:-1])] + [self.ppm(feats[-1])]
        for i in range(len(levels) - 2, -1, -1):  # top-down: each level adds the coarser one, upsampled
            levels[i] = levels[i] + _resize(levels[i + 1], levels[i].shape[-2:])
        outs = [smooth(level) for smooth, level in zip(self.smooth, levels[:-1])] + [levels[-1]]
        size = outs[0].shape[-2:]  # stride 4
        fused = self.fuse(torch.cat([outs[0], *(_resize(o, size) for o in outs[1:])], dim=1))
        return self.classifier(self.dropout(fused))


class FCNHead(nn.Module):
    """The auxiliary head: one conv block and a classifier on a single stage map."""

    def __init__(self, in_ch: int, num_classes: int, channels: int = 256, dropout: float = 0.1, norm: str = "bn"):
        super().__init__()
        self.conv = _block(in_ch, channels, 3, norm)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = _classifier(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.conv(x)))


@dataclass
class SegmenterConfig(BackboneConfig):
    """What builds a segmenter; written into its checkpoints so `validate` and `predict` rebuild it."""

    channels: int = width(512, "UperNet's width (the paper's 512)", flags=("--head-channels",))
    aux_channels: int = width(256, "auxiliary FCN head width", lo=0)
    aux_weight: float = C.setting(0.4, C.number(0, 100), "weight of the auxiliary loss")
    norm: str = C.setting(
        "bn",
        C.choice("bn", "gn"),
        "head norm: bn (Swin's SyncBN) or gn (batch-size independent)",
        flags=("--head-norm",),
    )

    def check_data(self, d) -> None:
        """The data settings (`mambaout.dense.config.DataConfig`) that only make sense with this segmenter's."""
        if self.norm == "bn" and d.batch_size < 2:
            raise ValueError("a BatchNorm head needs >= 2 images per device: raise --batch-size or pass --head-norm gn")
        if d.crop_size < 32:
            raise ValueError(f"crop_size must be >= 32, got {d.crop_size}")


class Segmenter(nn.Module):
    """Backbone + UperNet (+ auxiliary FCN). `model(images)` gives logits `[B, K, H, W]` at the input size;
    `model(images, masks)` gives the losses (`{'loss_seg', 'loss_aux'}`), as torchvision's detectors do.
    Images are RGB in [0, 1], normalised here (as the detectors' transform does)."""

    def __init__(self, backbone: DenseBackbone, cfg: SegmenterConfig):
        super().__init__()
        if len(backbone.out_indices) != 4:
            raise ValueError(f"UperNet needs all four stages, got out_indices={backbone.out_indices}")
        self.backbone = backbone
        self.head = UperNetHead(backbone.out_channels, cfg.num_classes, cfg.channels, norm=cfg.norm)
        aux_in = backbone.out_channels[2]
        self.aux = FCNHead(aux_in, cfg.num_classes, cfg.aux_channels, norm=cfg.norm) if cfg.aux_channels else None
        self.aux_weight = cfg.aux_weight
        self.num_classes = cfg.num_classes
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None):
        h, w = images.shape[-2:]
        images = (images - self.mean) / self.std
        feats = self.backbone(images)  # the backbone pads to a multiple of 32 at the bottom and right
        padded = (-(-h // STRIDE) * STRIDE, -(-w // STRIDE) * STRIDE)
        logits = _resize(self.head(feats), padded)[..., :h, :w]  # crop the padding away: [B, K, H, W]
        if masks is None:
            return logits
        losses = {"loss_seg": pixel_cross_entropy(logits, masks)}
        if self.aux is not None:
            aux = _resize(self.aux(feats[2]), padded)[..., :h, :w]
            losses["loss_aux"] = self.aux_weight * pixel_cross_entropy(aux, masks)
        return losses


def pixel_cross_entropy(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the labelled pixels and divided by all pixels, ignored ones included: mmseg's
    default average (`avg_non_ignore=False`), which the Swin and MambaOut configs keep."""
    return F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX, reduction="sum") / masks.numel()


def create_segmenter(cfg: SegmenterConfig, pretrained: bool = False, checkpoint: str | None = None) -> Segmenter:
    """UperNet on a dense MambaOut; `pretrained`/`checkpoint` are the backbone's classification weights."""
    if cfg.num_classes is None or not 1 <= cfg.num_classes < IGNORE_INDEX:
        raise ValueError(f"num_classes must be in 1..{IGNORE_INDEX - 1} (the ignore index), got {cfg.num_classes}")
    return Segmenter(backbone_from(cfg, pretrained, checkpoint), cfg)
