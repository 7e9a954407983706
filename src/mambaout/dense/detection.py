"""Mask R-CNN and Faster R-CNN with FPN on the dense MambaOut backbone: torchvision's detectors on `MambaOutFPN`,
the backbone-plus-neck module their `GeneralizedRCNN` expects (an ordered dict of maps, `out_channels`)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from mambaout.data.image import IMAGENET_MEAN, IMAGENET_STD
from mambaout.utils import checks as C

from .backbone import SIDE, WIDTH_MAX, BackboneConfig, DenseBackbone, backbone_from, width


class MambaOutFPN(nn.Module):
    """Dense MambaOut stages 0-3 through an FPN, plus the max-pooled P6 the RPN's largest anchors use: maps '0'-'3'
    (strides 4-32) and 'pool' (stride 64), the names torchvision's RoI pooler expects."""

    def __init__(self, backbone: DenseBackbone, out_channels: int = 256):
        super().__init__()
        if len(backbone.out_indices) != 4:
            raise ValueError(f"the FPN detector needs all four stages, got out_indices={backbone.out_indices}")
        self.backbone = backbone
        self.fpn = FeaturePyramidNetwork(backbone.out_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.backbone(x)  # the transform batches images padded to a multiple of 32, so no extra padding
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


@dataclass
class DetectorConfig(BackboneConfig):
    """What builds a detector; written into its checkpoints so `validate` and `predict` rebuild it."""

    kind: str = C.setting("mask_rcnn", C.choice("mask_rcnn", "faster_rcnn"), "mask_rcnn: boxes and masks", network=True)
    min_size: int = C.setting(800, SIDE, "shorter image side for training and evaluation", flags=("--img-size",))
    max_size: int = C.setting(1333, SIDE, "cap on the longer side at evaluation (training: data.max_size)", flags=())
    fpn_channels: int = width(256, "FPN width (the paper's 256); the RPN and RoI heads take it")
    box_head_dim: int = width(1024, "width of the box head's two fully connected layers")
    mask_head_channels: int = width(256, "width of the mask head's four convs")
    rois_per_image: int = C.setting(512, C.integer(1, WIDTH_MAX), "RoIs sampled per training image for the losses")

    def check_data(self, d) -> None:
        """The data settings (`mambaout.dense.config.DataConfig`) that only make sense with this detector's."""
        if min(d.min_sizes) < 32 or d.max_size < max(d.min_sizes):
            raise ValueError(f"min_sizes must be >= 32 and at most max_size, got {d.min_sizes} / {d.max_size}")


def create_detector(cfg: DetectorConfig, pretrained: bool = False, checkpoint: str | None = None) -> nn.Module:
    """torchvision's Mask R-CNN or Faster R-CNN on a dense MambaOut; `pretrained`/`checkpoint`: the backbone's."""
    if cfg.kind not in ("mask_rcnn", "faster_rcnn"):
        raise ValueError(f"detector kind must be 'mask_rcnn' or 'faster_rcnn', got {cfg.kind!r}")
    if cfg.num_classes is None or cfg.num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {cfg.num_classes}")
    neck = MambaOutFPN(backbone_from(cfg, pretrained, checkpoint), cfg.fpn_channels)
    classes = cfg.num_classes + 1  # torchvision counts the background as class 0
    c, dim, mc = cfg.fpn_channels, cfg.box_head_dim, cfg.mask_head_channels
    heads = dict(box_head=TwoMLPHead(c * 7 * 7, dim), box_predictor=FastRCNNPredictor(dim, classes))  # 7x7 RoIs
    if cfg.kind == "mask_rcnn":
        heads.update(mask_head=MaskRCNNHeads(c, [mc] * 4, 1), mask_predictor=MaskRCNNPredictor(mc, mc, classes))
    return (MaskRCNN if cfg.kind == "mask_rcnn" else FasterRCNN)(
        neck,
        box_batch_size_per_image=cfg.rois_per_image,
        **heads,
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        # training images arrive resized (and flipped) by our data path, which handles boxes and masks with them;
        # evaluation images arrive as they are and the transform resizes them, then maps the outputs back
        _skip_resize=True,
    )
