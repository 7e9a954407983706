"""Semantic segmentation: data (an image folder beside a folder of class-index PNG masks, the ADE20K / mmseg
layout), mmseg's training augmentation, metrics, and test-time inference."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms.v2.functional import adjust_hue

from mambaout.data.image import IMAGENET_MEAN, load_image
from mambaout.utils.device import autocast
from mambaout.utils.files import regular_file, special_kind
from mambaout.utils.limits import check_pixels

from .coco import resize_scale, to_tensor
from .upernet import IGNORE_INDEX

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass
class LabelMap:
    """Mask value -> class index (or the ignore index), and the class names. Values are classes as they are (0..K-1,
    255 ignored); with `reduce_zero_label` (ADE20K) 0 is ignored and v is class v - 1; with a categories file (a JSON
    list of `{"id", "name"}`) the listed ids are 0..K-1 in order (id 0 ignored with `reduce_zero_label`). Any other
    value is an error naming the file, never a silent class."""

    lut: np.ndarray  # [256] uint8; 254 marks a value that maps to nothing
    class_names: list[str]

    UNMAPPED = 254

    @classmethod
    def build(cls, num_classes: int | None, reduce_zero_label: bool, categories: str | Path | None) -> LabelMap:
        lut = np.full(256, cls.UNMAPPED, dtype=np.uint8)
        lut[IGNORE_INDEX] = IGNORE_INDEX
        if categories is not None:
            entries = _read_categories(categories)
            if reduce_zero_label:
                entries = [e for e in entries if e["id"] != 0]
                lut[0] = IGNORE_INDEX
            if num_classes is not None and num_classes != len(entries):
                raise ValueError(
                    f"--num-classes {num_classes} disagrees with the {len(entries)} classes of {categories}"
                )
            for i, e in enumerate(entries):
                lut[e["id"]] = i
            return cls(lut, [e["name"] for e in entries])
        if num_classes is None:
            raise ValueError("the number of classes is unknown: pass --num-classes K or --categories FILE")
        if not 1 <= num_classes <= IGNORE_INDEX - 1 - int(reduce_zero_label):
            raise ValueError(f"--num-classes must be 1 to 253, got {num_classes}")
        first = int(reduce_zero_label)  # value 0 ignored: v is class v - 1
        lut[:first] = IGNORE_INDEX
        lut[first : num_classes + first] = np.arange(num_classes)
        return cls(lut, [str(i) for i in range(num_classes)])

    def __call__(self, values: np.ndarray, name: str) -> np.ndarray:
        out = self.lut[values]
        if (out == self.UNMAPPED).any():
            bad = sorted(set(np.unique(values[out == self.UNMAPPED]).tolist()))
            raise ValueError(
                f"{name} holds mask values {bad[:8]} that are neither a class nor ignored ({len(self.class_names)} "
                "classes); check --num-classes, --reduce-zero-label or --categories"
            )
        return out


def _read_categories(path: str | Path) -> list[dict]:
    path = regular_file(path, "categories file")  # a FIFO is never opened: the read would block forever
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read categories file {path} ({e})") from e
    if isinstance(entries, dict):
        entries = entries.get("categories", [])
    ok = isinstance(entries, list) and entries and all(isinstance(e, dict) and "id" in e for e in entries)
    if not ok or not all(type(e["id"]) is int and 0 <= e["id"] < IGNORE_INDEX for e in entries):
        raise ValueError(f"{path} must be a JSON list of {{'id': 0-254, 'name': ...}} entries")
    ids = [e["id"] for e in entries]
    twice = next((i for k, i in enumerate(ids) if i in ids[:k]), None)
    if twice is not None:  # the later entry would take the value and leave an earlier class that nothing maps to
        raise ValueError(f"{path} lists id {twice} twice; each mask value is one class: list each id once")
    return [dict(id=e["id"], name=str(e.get("name", e["id"]))) for e in entries]


class SegmentationFolder(torch.utils.data.Dataset):
    """`(image [3, H, W] in [0, 1], mask [H, W] int64)` pairs matched by file stem; `transform` takes both."""

    def __init__(self, images: str | Path, masks: str | Path, label_map: LabelMap, transform=None):
        images, masks = Path(images), Path(masks)
        for folder, what in ((images, "image"), (masks, "mask")):
            if not folder.is_dir():
                raise FileNotFoundError(f"{what} folder {folder} does not exist")
        mask_of = {p.stem: p for p in masks.iterdir() if p.suffix.lower() == ".png"}
        pairs = [(p, mask_of.get(p.stem)) for p in sorted(images.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        missing = [p.name for p, m in pairs if m is None]
        if missing:
            raise ValueError(f"{len(missing)} images of {images} have no mask in {masks} (e.g. {missing[0]})")
        if not pairs:
            raise ValueError(f"no images in {images}")
        self.pairs = pairs
        self.label_map = label_map
        self.class_names = label_map.class_names
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        image_path, mask_path = self.pairs[index]
        image = to_tensor(load_image(image_path))
        if special_kind(mask_path):  # a FIFO would block the read forever: never opened (as load_image does)
            raise ValueError(f"{mask_path} is {special_kind(mask_path)}, not a mask file: not opened")
        try:
            with Image.open(mask_path) as m:
                check_pixels(*m.size, str(mask_path))  # the decode budget images have, from the header
                if m.mode not in ("L", "P"):
                    raise ValueError(f"{mask_path} is a {m.mode} image; class-index masks are 8-bit (mode L or P)")
                values = np.asarray(m)
        except (OSError, SyntaxError) as e:  # PIL says "image file is truncated" without the file's name
            raise ValueError(
                f"cannot read the mask {mask_path} ({type(e).__name__}: {e}); replace the file with a whole PNG"
            ) from e
        if values.shape != tuple(image.shape[-2:]):
            raise ValueError(f"{mask_path} is {values.shape[::-1]} but its image is {tuple(image.shape[:0:-1])}")
        mask = torch.from_numpy(self.label_map(values, str(mask_path)).astype(np.int64))
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image, mask


def resize_pair(image: torch.Tensor, mask: torch.Tensor | None, scale, ratio: float = 1.0):
    """Resize an image (bilinear) and its mask (nearest) to fit `scale` (long, short) times `ratio`, aspect kept."""
    h, w = image.shape[-2:]
    s = resize_scale(h, w, int(scale[1] * ratio), int(scale[0] * ratio))
    size = (max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5)))
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    if mask is not None:
        mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
    return image, mask


CAT_MAX_RATIO = 0.75  # mmseg's RandomCrop in the ADE20K configs: no class may fill more of a crop than this
CROP_TRIES = 10  # mmseg draws up to this many crops looking for one that passes the check


@dataclass
class RandomResizeCrop:
    """mmseg's training path: resize to `scale` (long, short) times a ratio in `ratio_range` keeping the aspect
    ratio, crop `crop_size` (a smaller image padded at the bottom and right with the mean colour, which normalises
    to 0 as mmseg pads after normalising, and the ignore index), flip, then mmseg's `PhotoMetricDistortion`. The crop
    is drawn up to `CROP_TRIES` times while it fails mmseg's category-ratio check (`crop_passes`; the last draw
    kept); `cat_max_ratio` 1 turns the check off."""

    scale: tuple[int, int]
    crop_size: int
    ratio_range: tuple[float, float] = (0.5, 2.0)
    hflip: float = 0.5
    cat_max_ratio: float = CAT_MAX_RATIO
    photometric: bool = True

    def __call__(self, image: torch.Tensor, mask: torch.Tensor):
        image, mask = resize_pair(image, mask, self.scale, random.uniform(*self.ratio_range))
        c = self.crop_size
        h, w = image.shape[-2:]
        ph, pw = max(c - h, 0), max(c - w, 0)
        if ph or pw:
            padded = torch.tensor(IMAGENET_MEAN, dtype=image.dtype).view(3, 1, 1).repeat(1, h + ph, w + pw)
            padded[:, :h, :w] = image
            image = padded
            mask = F.pad(mask, (0, pw, 0, ph), value=IGNORE_INDEX)
            h, w = image.shape[-2:]
        for _ in range(CROP_TRIES):
            y, x = random.randint(0, h - c), random.randint(0, w - c)
            if self.cat_max_ratio >= 1 or crop_passes(mask[y : y + c, x : x + c], self.cat_max_ratio):
                break
        image, mask = image[:, y : y + c, x : x + c], mask[y : y + c, x : x + c]
        if random.random() < self.hflip:
            image, mask = image.flip(-1), mask.flip(-1)
        if self.photometric:
            image = random_photometric(image)
        return image, mask


# --- mmseg's photometric distortion ----------------------------------------------------------------------------------


def random_photometric(image: torch.Tensor) -> torch.Tensor:
    """mmseg's `PhotoMetricDistortion` draws: each of brightness (a shift of up to 32/255), contrast (x 0.5-1.5),
    saturation (x 0.5-1.5) and hue (a turn of up to 18/180 of the circle) with probability 1/2, contrast before or
    after the colour changes with probability 1/2. mmseg rounds to 8 bits after each step; here they stay float."""
    brightness = random.uniform(-32 / 255, 32 / 255) if random.randint(0, 1) else 0.0
    contrast_first = random.randint(0, 1) == 1
    contrast = random.uniform(0.5, 1.5) if random.randint(0, 1) else 1.0
    saturation = random.uniform(0.5, 1.5) if random.randint(0, 1) else 1.0
    hue = random.randint(-18, 18) / 180 if random.randint(0, 1) else 0.0
    return photometric(image, brightness, contrast, saturation, hue, contrast_first)


def photometric(
    image: torch.Tensor, brightness: float, contrast: float, saturation: float, hue: float, contrast_first: bool
) -> torch.Tensor:
    """`image` `[3, H, W]` RGB in [0, 1] with `brightness` added, values times `contrast`, HSV saturation times
    `saturation`, the hue turned by `hue` (a fraction of the circle); clipped to [0, 1] after each step."""
    x = (image + brightness).clamp(0, 1)
    if contrast_first:
        x = (x * contrast).clamp(0, 1)
    if saturation != 1.0:
        # HSV saturation (chroma / max) times `saturation`, clipped at 1, hue and value kept: each channel's
        # distance below the max scaled by min(saturation, max / chroma)
        v = x.amax(0)
        x = v - (v - x) * (v / (v - x.amin(0)).clamp_min(1e-12)).clamp(max=saturation)
    if hue != 0.0:
        x = adjust_hue(x, hue)
    if not contrast_first:
        x = (x * contrast).clamp(0, 1)
    return x


def crop_passes(mask: torch.Tensor, max_ratio: float) -> bool:
    """mmseg's `cat_max_ratio` check of a crop's mask: it holds two or more classes (the ignore index not counted)
    and none covers `max_ratio` or more of the labelled pixels. A crop of one class, or of ignored pixels only,
    fails, as in mmseg."""
    counts = torch.bincount(mask[mask != IGNORE_INDEX])
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max().item() / counts.sum().item() < max_ratio


# --- metrics ---------------------------------------------------------------------------------------------------------


class ConfusionMatrix:
    """Pixel counts `[true class, predicted class]` over the non-ignored pixels; mIoU and pixel accuracy from it."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a prediction `[..., H, W]` (class indices) against its target (same shape; the ignore index skipped)."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        keep = target != IGNORE_INDEX
        k = self.num_classes
        idx = target[keep].long().cpu() * k + pred[keep].long().cpu()
        self.counts += torch.bincount(idx, minlength=k * k).reshape(k, k)

    def metrics(self) -> dict:
        """mIoU over the classes present in the targets or predictions (IoU = TP / (TP + FP + FN)), pixel accuracy
        (aAcc), mean class accuracy over the classes present in the targets (mAcc; a class's accuracy is TP / its
        target pixels), all in percent, how many classes and pixels they count, and each class's `iou` and `acc`
        (by class index; mmseg's nan, a class the mean leaves out, is left out here)."""
        c = self.counts.double()
        tp = c.diag()
        truth = c.sum(1)
        union = c.sum(0) + truth - tp
        present, labelled = union > 0, truth > 0
        iou = tp[present] / union[present]
        acc = tp[labelled] / truth[labelled]
        total = c.sum()
        return dict(
            mIoU=100 * iou.mean().item() if present.any() else 0.0,
            aAcc=100 * (tp.sum() / total).item() if total > 0 else 0.0,
            mAcc=100 * acc.mean().item() if labelled.any() else 0.0,
            classes=int(present.sum()),
            pixels=int(total),
            iou={i: 100 * v for i, v in zip(present.nonzero().flatten().tolist(), iou.tolist())},
            acc={i: 100 * v for i, v in zip(labelled.nonzero().flatten().tolist(), acc.tolist())},
        )


# --- inference: scales, flip, sliding windows ---------------------------------------------------------------------

MULTI_SCALE_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # mmseg's ADE20K aug test, the paper's multi-scale column


def windows(size: int, window: int, stride: int) -> list[tuple[int, int]]:
    """`(start, end)` of each window along one side of `size` pixels (mmseg's `slide_inference`): starts every
    `stride` pixels, the last window moved back to end at the border, one window of the whole side when it fits."""
    ends = [min(i * stride + window, size) for i in range(max(size - window + stride - 1, 0) // stride + 1)]
    return [(max(end - window, 0), end) for end in ends]


@dataclass
class SegmentInference:
    """How a segmenter is run on one image to give its class probabilities: at `scale` (long, short) times each of
    `ratios` (`MULTI_SCALE_RATIOS`: mmseg's multi-scale test, the paper's "MS" mIoU, Table 3), with the mirror image
    too (`flip`), probabilities averaged; whole, or in sliding windows of `window` px every `stride` (default 2/3 of
    the window; ConvNeXt's and Swin's ADE20K configs), logits averaged where windows overlap."""

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

    @classmethod
    def of(cls, args, scale, flip: bool, ratios=(1.0,)) -> SegmentInference:
        """The inference of `--slide WINDOW [STRIDE]` (`args.slide`) at `scale`."""
        slide = args.slide or [None]
        if len(slide) > 2:
            raise ValueError(f"--slide takes WINDOW [STRIDE], got {len(slide)} numbers")
        return cls(tuple(scale), tuple(ratios), flip, slide[0], slide[1] if len(slide) > 1 else None)

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
            x = resize_pair(image, None, self.scale, ratio)[0][None]  # [1, 3, h', w']
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
            logits, count = None, torch.zeros(1, 1, h, w, device=x.device)
            for y1, y2 in windows(h, self.window, self.stride):
                for x1, x2 in windows(w, self.window, self.stride):
                    out = model(x[..., y1:y2, x1:x2]).float()  # [1, K, y2 - y1, x2 - x1]
                    if logits is None:
                        logits = out.new_zeros(*out.shape[:2], h, w)
                    logits[..., y1:y2, x1:x2] += out
                    count[..., y1:y2, x1:x2] += 1
            return (logits / count).softmax(1)
