"""Test-time augmentation for segmentation: mmseg's multi-scale test (the paper's "MS" mIoU, Table 3: class
probabilities averaged over scales and their mirror images) and sliding-window inference (ConvNeXt's and Swin's
ADE20K configs: logits averaged where windows overlap).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mambaout.utils.device import autocast

from .coco import resize_scale
from .semseg import resize_pair

MULTI_SCALE_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # mmseg's ADE20K aug test, the paper's multi-scale column


def windows(size: int, window: int, stride: int) -> list[tuple[int, int]]:
    """`(start, end)` of each window along one side of `size` pixels (mmseg's `slide_inference`): starts every
    `stride` pixels, the last window moved back to end at the border, one window of the whole side when it fits."""
    ends = [min(i * stride + window, size) for i in range(max(size - window + stride - 1, 0) // stride + 1)]
    return [(max(end - window, 0), end) for end in ends]


@dataclass
class SegmentInference:
    """How a segmenter is run on one image to give its class probabilities.

    Attributes:
        scale: Evaluation scale (long, short), times each of `ratios` (`MULTI_SCALE_RATIOS`: the paper's MS).
        flip: Also run the mirror image of each scale.
        window, stride: Sliding windows (None: the whole image at once; stride default 2/3 of the window).
    """

    scale: tuple[int, int]
    ratios: Sequence[float] = (1.0,)
    flip: bool = False
    window: int | None = None
    stride: int | None = None

    def __post_init__(self):
        if not self.ratios or not all(math.isfinite(r) and r > 0 for r in self.ratios):
            raise ValueError(f"--ratios must be positive numbers, got {list(self.ratios)}")
        if self.window is not None:
            if self.window < 32:
                raise ValueError(f"--slide window must be >= 32 px (the network's stride), got {self.window}")
            self.stride = self.stride if self.stride is not None else max(1, self.window * 2 // 3)
            if not 1 <= self.stride <= self.window:
                raise ValueError(f"--slide stride must be 1 to the window ({self.window}), got {self.stride}")
        elif self.stride is not None:
            raise ValueError("a stride needs a window: --slide WINDOW STRIDE")

    def describe(self) -> str:
        """The name of this setting in validate's output: `single-scale`, `flip`, `multi-scale+flip`, `... slide`."""
        name = "single-scale" if list(self.ratios) == [1.0] else "multi-scale"
        name = ("flip" if name == "single-scale" else name + "+flip") if self.flip else name
        return name + (f" slide {self.window}/{self.stride}" if self.window else "")

    @torch.no_grad()
    def __call__(self, model: nn.Module, image: torch.Tensor, amp_dtype=None) -> torch.Tensor:
        """Class probabilities `[K, H, W]` of `image` `[3, H, W]` at its own resolution."""
        h, w = image.shape[-2:]
        total = None
        for ratio in self.ratios:
            long, short = int(self.scale[0] * ratio), int(self.scale[1] * ratio)
            x, _ = resize_pair(image, None, resize_scale(h, w, short, long))
            x = x[None]  # [1, 3, h', w']
            probs = self._probs(model, x, amp_dtype)
            if self.flip:  # the mirror's probabilities, mirrored back, averaged at this scale
                probs = (probs + self._probs(model, x.flip(-1), amp_dtype).flip(-1)) / 2
            probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)[0]
            total = probs if total is None else total + probs
        return total / len(self.ratios)

    def _probs(self, model, x: torch.Tensor, amp_dtype) -> torch.Tensor:
        with autocast(x.device, amp_dtype):
            if self.window is None:
                return model(x).float().softmax(1)
            h, w = x.shape[-2:]
            logits = count = None
            for y1, y2 in windows(h, self.window, self.stride):
                for x1, x2 in windows(w, self.window, self.stride):
                    out = model(x[..., y1:y2, x1:x2]).float()  # [1, K, y2 - y1, x2 - x1]
                    if logits is None:
                        logits = out.new_zeros(*out.shape[:2], h, w)
                        count = out.new_zeros(1, 1, h, w)
                    logits[..., y1:y2, x1:x2] += out
                    count[..., y1:y2, x1:x2] += 1
            return (logits / count).softmax(1)


def slide_argument(p) -> None:
    """`--slide WINDOW [STRIDE]` on the argparse parser `p` (`segment validate` and `predict`)."""
    p.add_argument(
        "--slide",
        type=int,
        nargs="+",
        metavar=("WINDOW", "STRIDE"),
        help="sliding-window inference: square windows of WINDOW px every STRIDE px (default 2/3 of the window; "
        "ConvNeXt's ADE20K setting: 512 341)",
    )


def from_options(args, scale, flip: bool, ratios=(1.0,)) -> SegmentInference:
    """The `SegmentInference` of `--slide` (`args.slide`) at `scale`."""
    slide = args.slide or [None]
    if len(slide) > 2:
        raise ValueError(f"--slide takes WINDOW [STRIDE], got {len(slide)} numbers")
    return SegmentInference(tuple(scale), tuple(ratios), flip, slide[0], slide[1] if len(slide) > 1 else None)
