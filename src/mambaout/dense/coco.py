"""COCO instances: the dataset (read with pycocotools), the resize-and-flip data path, and box/mask AP. Targets are
torchvision's: `boxes` `[N, 4]` x1 y1 x2 y2 in pixels, `labels` `[N]` from 1 (0 is the background), `masks`
`[N, H, W]` uint8; `CocoInstances.cat_ids[label - 1]` is a label's COCO category id."""

from __future__ import annotations

import contextlib
import copy
import io
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, clip_boxes_to_image
from torchvision.transforms.functional import to_tensor  # a PIL RGB image as [3, H, W] float in [0, 1]

from mambaout.data.image import load_image
from mambaout.utils.checks import is_int, is_number, show
from mambaout.utils.files import regular_file
from mambaout.utils.optional import require

BOX_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _pycocotools():
    return require("pycocotools", "COCO data and evaluation", "'mambaout[dense]' (or: pip install pycocotools)")


def load_coco(ann_file: str | Path):
    """A pycocotools `COCO` index of `ann_file`, quietly (pycocotools prints progress to stdout)."""
    _pycocotools()
    from pycocotools.coco import COCO

    ann_file = regular_file(ann_file, "COCO annotation file")  # a FIFO is never opened: it could block forever
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            return COCO(str(ann_file))
        except (ValueError, KeyError, TypeError, AssertionError) as e:
            raise ValueError(f"{ann_file} is not a COCO instances file ({type(e).__name__}: {e})") from e


IMAGE_ENTRY = "an image is {id: integer, file_name: a path inside the image folder, height, width: positive integers}"
SEGMENTATION = (
    "a segmentation is a list of polygons [x1, y1, x2, y2, ...] (an even count >= 6 of finite numbers, on or near "
    "the image) or an RLE {size: [height, width], counts: run lengths summing to height x width, or COCO's "
    "compressed string of them}"
)


def check_instances(coco, ann_file, segmentations: bool = True, evaluate: bool = False) -> None:
    """Each entry pycocotools would read without a word yet train or score on wrongly, crash or spin on, as one line
    naming the file and the entry; with `evaluate` (COCOeval scores the file) `iscrowd` and `area` too, with
    `segmentations` (masks decoded, here or by COCOeval) each segmentation as `segmentation_problem` wants it."""
    images = coco.dataset.get("images", [])
    for img in images:
        iid = img.get("id")
        for key in ("id", "height", "width"):
            v = img.get(key)
            if not is_int(v) or (key != "id" and v <= 0):
                raise ValueError(f"{ann_file}: image {show(iid)} has {key} {show(v)}; {IMAGE_ENTRY}")
        name = img.get("file_name")
        if not isinstance(name, str) or not name.strip() or "\0" in name:
            raise ValueError(f"{ann_file}: image {iid} has file_name {show(name)}; {IMAGE_ENTRY}")
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(
                f"{ann_file}: image {iid} has file_name {show(name)}, which leads out of the image folder; "
                "file_name is a path relative to it (no leading '/', no '..')"
            )
    if len(coco.imgs) != len(images):
        raise ValueError(f"{ann_file}: image ids are not unique ({len(images)} images, {len(coco.imgs)} ids)")
    categories = coco.dataset.get("categories", [])
    for cat in categories:
        if not is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise ValueError(
                f"{ann_file}: category {show(cat)} is not {{id: integer, name: text}}; category ids are integers "
                "(COCO's 1-90)"
            )
    if len(coco.cats) != len(categories):
        ids = [c["id"] for c in categories]
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(
            f"{ann_file}: category ids {twice[:10]} are given twice; each category has one id (one class each)"
        )
    if "annotations" not in coco.dataset:
        raise ValueError(
            f"{ann_file} has no 'annotations' list (an image-info file?); training and evaluation need the objects: "
            "give an instances file (instances_<split>.json)"
        )
    annotations = coco.dataset["annotations"]
    if len(coco.anns) != len(annotations):
        raise ValueError(
            f"{ann_file}: annotation ids are not unique ({len(annotations)} annotations, {len(coco.anns)} ids); "
            "pycocotools would score one of each pair twice and the other never"
        )
    for a in annotations:
        where = f"{ann_file}: annotation {show(a.get('id'))}"
        if a.get("image_id") not in coco.imgs:
            raise ValueError(f"{where} is of image {show(a.get('image_id'))}, which the file does not list")
        if a.get("category_id") not in coco.cats:
            raise ValueError(
                f"{where} has category_id {show(a.get('category_id'))}, not among the categories "
                f"{sorted(coco.cats)[:10]}"
            )
        box = a.get("bbox")
        if not isinstance(box, list) or len(box) != 4 or not all(is_number(v) for v in box):
            raise ValueError(f"{where} has bbox {show(box)}; a box is [x, y, width, height] of finite numbers")
        if evaluate and ("iscrowd" not in a or "area" not in a):
            missing = " and ".join(k for k in ("iscrowd", "area") if k not in a)
            raise ValueError(f"{where} has no {missing}; COCO's evaluation reads iscrowd (0 or 1) and area of each")
        if a.get("iscrowd", 0) not in (0, 1):
            raise ValueError(f"{where} has iscrowd {show(a['iscrowd'])}; it is 0 or 1")
        if "area" in a and (not is_number(a["area"]) or a["area"] < 0):
            raise ValueError(f"{where} has area {show(a['area'])}; an area is a finite number >= 0")
        if segmentations:
            img = coco.imgs[a["image_id"]]
            if "segmentation" not in a:
                raise ValueError(f"{where} has no segmentation, and masks are trained or scored here; {SEGMENTATION}")
            problem = segmentation_problem(a["segmentation"], img["height"], img["width"])
            if problem:
                raise ValueError(f"{where} has segmentation {show(a['segmentation'])}: {problem}; {SEGMENTATION}")


def segmentation_problem(seg, h: int, w: int) -> str | None:
    """What is wrong with a COCO `segmentation` of an `h` x `w` image, or None when pycocotools can rasterise it.
    Its C code trusts its input: a huge or NaN coordinate makes it spin (past Ctrl-C), a short polygon or an RLE that
    does not fill the image is read or written out of bounds; so coordinates must lie within one image size of the
    image, and RLE runs must sum to exactly `h * w`."""
    if isinstance(seg, list):
        if not seg:
            return "an empty list"
        for poly in seg:
            try:
                xy = np.asarray(poly)
            except (ValueError, TypeError, OverflowError):
                xy = None
            if not isinstance(poly, list) or xy is None or xy.ndim != 1 or xy.dtype.kind not in "iuf":
                return f"polygon {show(poly)} is not a list of numbers"
            if len(xy) < 6 or len(xy) % 2:
                return f"a polygon of {len(xy)} numbers"
            if not np.isfinite(xy).all():
                return "a polygon coordinate is not finite"
            xs, ys = xy[0::2].astype(np.float64), xy[1::2].astype(np.float64)
            if xs.min() < -w or xs.max() > 2 * w or ys.min() < -h or ys.max() > 2 * h:
                return f"a polygon coordinate lies far outside the {w}x{h} image"
        return None
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(is_int(v) for v in size)) or size != [h, w]:
            return f"an RLE of size {show(size)} on an image of [height, width] [{h}, {w}]"
        if isinstance(counts, str):
            counts = rle_string_counts(counts)
            if counts is None:
                return "its compressed counts string is cut short or holds characters outside the format"
        elif not isinstance(counts, list) or not all(is_int(c) for c in counts):
            return "RLE counts are neither a list of integers nor a compressed string"
        if any(c < 0 for c in counts):
            return f"a run length is negative ({min(counts)})"
        if sum(counts) != h * w:
            return f"its run lengths sum to {sum(counts)}, not height x width = {h * w}"
        return None
    return "neither a list of polygons nor an RLE dict"


def rle_string_counts(s: str) -> list[int] | None:
    """The run lengths held by a compressed COCO RLE string, or None when the string breaks the format.

    The format (pycocotools' `rleToString`): each count is written as 5-bit groups, least significant first, each
    group a character `48 + bits` with 0x20 set when another group follows; 0x10 of the last group is the sign. From
    the third count on, what is written is the difference to the count two places before.
    """
    counts: list[int] = []
    p = 0
    while p < len(s):
        x = k = 0
        while True:
            if p >= len(s) or k >= 7:  # cut inside a count, or more groups than any run of 2**32 pixels takes
                return None
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            p += 1
            k += 1
            if not c & 0x20:
                if c & 0x10:
                    x |= -1 << (5 * k)
                break
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


class CocoInstances(torch.utils.data.Dataset):
    """Images of a folder (`file_name` relative to it) with their COCO instances, polygons or RLE (crowd regions left
    to the evaluator): `(image [3, H, W] in [0, 1], target)`, through `transform(image, target)` (`ResizeFlip`).
    `masks`: decode the instance masks (Mask R-CNN); `evaluate`: the IoU types (`bbox`, `segm`) COCOeval will score
    against this file (checked for them); `filter_empty`: leave out images without annotations or with a side under
    32 px, as mmdetection's training does (`left_out` counts them)."""

    def __init__(
        self,
        images: str | Path,
        ann_file: str | Path,
        transform=None,
        masks: bool = True,
        evaluate: Sequence[str] = (),
        filter_empty: bool = False,
    ):
        self.root = Path(images)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.coco = load_coco(ann_file)
        check_instances(self.coco, ann_file, segmentations=masks or "segm" in evaluate, evaluate=bool(evaluate))
        self.ids = sorted(self.coco.getImgIds())
        if not self.ids:
            raise ValueError(f"{ann_file} lists no images")
        self.left_out = 0  # images filter_empty leaves out
        if filter_empty:
            size = {i: min(im["height"], im["width"]) for i, im in self.coco.imgs.items()}
            kept = [i for i in self.ids if self.coco.imgToAnns[i] and size[i] >= 32]
            self.left_out, self.ids = len(self.ids) - len(kept), kept
        self.cat_ids = sorted(self.coco.getCatIds())
        self.class_names = [self.coco.cats[c]["name"] for c in self.cat_ids]
        self.label_of = {cid: i + 1 for i, cid in enumerate(self.cat_ids)}
        self.transform = transform
        self.masks = masks

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = self.root / info["file_name"]
        image = to_tensor(load_image(path))
        h, w = image.shape[-2:]
        if (h, w) != (info["height"], info["width"]):
            raise ValueError(
                f"{path} is {w}x{h} but its annotation says {info['width']}x{info['height']}; the annotations "
                "do not belong to this image"
            )
        target = self.target(image_id, h, w)
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target

    def target(self, image_id: int, h: int, w: int) -> dict:
        """The image's non-crowd instances, as torchvision's detectors take them: boxes clamped to the image (as
        torchvision's COCO reference does), and those of no size, before or after clamping, left out."""
        anns = [a for a in self.coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        boxes = box_convert(torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4), "xywh", "xyxy")
        # a box past the border (1e30 in a broken file: a loss of 1e27) trains on its part inside the image; sizes
        # tested in float32, where a box of 1e-12 px would be flat
        boxes = clip_boxes_to_image(boxes, (h, w)).float()
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        anns = [a for a, k in zip(anns, keep.tolist()) if k]
        labels = torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64)
        target = dict(boxes=boxes[keep], labels=labels, image_id=image_id)
        if self.masks:
            masks = [self.coco.annToMask(a) for a in anns]
            target["masks"] = torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, h, w, dtype=torch.uint8)
        return target


def collate(batch):
    """Detection batches are lists: images differ in size (the model's transform pads them)."""
    return tuple(zip(*batch))


# --- the data path: resize keeping the aspect ratio, horizontal flip -------------------------------------------------


def resize_scale(h: int, w: int, min_size: int, max_size: int) -> float:
    """The scale that brings the shorter side to `min_size` unless the longer side would pass `max_size`
    (the rule of torchvision's detection transform, so training and evaluation see objects at one scale)."""
    return min(min_size / min(h, w), max_size / max(h, w))


def resize(image: torch.Tensor, target: dict, scale: float):
    """Resize `[3, H, W]` by `scale` (bilinear; masks nearest), moving the boxes with the pixels; `target` a copy."""
    h, w = image.shape[-2:]
    nh, nw = int(h * scale), int(w * scale)  # floor, as torchvision's resize
    image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
    target = dict(target, boxes=target["boxes"] * torch.tensor([nw / w, nh / h, nw / w, nh / h]))
    if "masks" in target:
        masks = target["masks"]
        if len(masks):  # pixel centres map onto pixel centres ("nearest-exact"), as in the bilinear image resize
            masks = F.interpolate(masks[None].float(), size=(nh, nw), mode="nearest-exact")[0].to(masks.dtype)
        target["masks"] = masks if len(masks) else masks.new_zeros(0, nh, nw)
    return image, target


@dataclass
class ResizeFlip:
    """Training augmentation: resize to a shorter side drawn from `min_sizes` (longer side at most `max_size`),
    then flip with probability `hflip`. Boxes and masks move with the image."""

    min_sizes: Sequence[int]
    max_size: int
    hflip: float = 0.5

    def __call__(self, image: torch.Tensor, target: dict):
        short = random.choice(list(self.min_sizes))
        image, target = resize(image, target, resize_scale(*image.shape[-2:], short, self.max_size))
        if random.random() < self.hflip:  # a box (x1, x2) becomes (W - x2, W - x1)
            image, boxes = image.flip(-1), target["boxes"][:, [2, 1, 0, 3]]
            boxes[:, [0, 2]] = image.shape[-1] - boxes[:, [0, 2]]
            target["boxes"] = boxes
            if "masks" in target:
                target["masks"] = target["masks"].flip(-1)
        return image, target


# --- evaluation: COCO box and mask AP through pycocotools -------------------------------------------------------------


def to_coco_results(output: dict, image_id: int, cat_ids: Sequence[int]) -> list[dict]:
    """One image's detections as COCO result entries (boxes as x, y, w, h; masks as RLE; label l is category
    `cat_ids[l - 1]`). `output`: `boxes` `[N, 4]` xyxy, `labels`, `scores`, optional `masks`, `[N, 1, H, W]`
    probabilities (Mask R-CNN's, thresholded at 0.5) or `[N, H, W]` binary."""
    _pycocotools()
    from pycocotools import mask as mask_util  # a submodule: not loaded until imported (predict reads no COCO file)

    xywh = box_convert(output["boxes"].detach().float().cpu(), "xyxy", "xywh").tolist()
    labels, scores = output["labels"].long().tolist(), output["scores"].float().tolist()
    rles = [None] * len(labels)
    if "masks" in output:
        masks = output["masks"].detach().cpu().flatten(0, -3)  # [N, 1, H, W] or [N, H, W] -> [N, H, W]
        binary = (masks.float() > 0.5).numpy().astype(np.uint8)
        rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))  # [N, H, W] -> [H, W, N]
        for rle in rles:
            rle["counts"] = rle["counts"].decode("ascii")  # JSON-able
    return [
        dict(image_id=int(image_id), category_id=int(cat_ids[label - 1]), bbox=box, score=float(score))
        | ({} if rle is None else dict(segmentation=rle))
        for box, label, score, rle in zip(xywh, labels, scores, rles)
    ]


def coco_evaluate(coco_gt, results: list[dict], image_ids: Sequence[int], iou_types=("bbox", "segm")) -> dict:
    """COCO AP of `results` on the images `image_ids` of `coco_gt` by pycocotools' `COCOeval`: `{'bbox': {'AP': ...},
    'segm': ..., 'summary': text, 'per_category': {'bbox': {category id: AP}}}`, the twelve `BOX_STATS` (fractions;
    -1 where no object of that size), pycocotools' printed summary and `per_category_ap`."""
    _pycocotools()
    from pycocotools.cocoeval import COCOeval

    out: dict = {"per_category": {}}
    text = []
    for iou_type in iou_types:
        key, other = ("bbox", "segmentation") if iou_type == "bbox" else ("segmentation", "bbox")
        dets = [{k: v for k, v in r.items() if k != other} for r in copy.deepcopy(results) if key in r]
        if not dets:  # pycocotools cannot load an empty result list: nothing detected scores zero
            out[iou_type] = {name: 0.0 for name in BOX_STATS}
            present = {a["category_id"] for i in image_ids for a in coco_gt.imgToAnns[i] if not a.get("iscrowd", 0)}
            out["per_category"][iou_type] = {c: 0.0 if c in present else None for c in sorted(coco_gt.getCatIds())}
            text.append(f"{iou_type}: no detections")
            continue
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            coco_dt = coco_gt.loadRes(dets)
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            ev.params.imgIds = list(image_ids)  # each evaluated image counts once, the others not at all
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        out[iou_type] = {name: float(v) for name, v in zip(BOX_STATS, ev.stats)}
        out["per_category"][iou_type] = per_category_ap(ev)
        text.append(f"{iou_type}:\n" + "\n".join(line for line in buf.getvalue().splitlines() if "Average" in line))
    out["summary"] = "\n".join(text)
    return out


def per_category_ap(ev) -> dict[int, float | None]:
    """Each category's AP from an accumulated `COCOeval`: precision at IoU 0.50:0.95, every recall level, all
    areas, 100 detections, averaged over the entries that exist (detectron2's per-category table), as a fraction;
    None where no threshold has an entry (no object of the category in the evaluated images)."""
    precision = ev.eval["precision"]  # [IoU thresholds T, recall levels R, categories K, areas A, max dets M]
    ps = {int(cat_id): precision[:, :, k, 0, -1] for k, cat_id in enumerate(ev.params.catIds)}
    return {cat_id: float(p[p > -1].mean()) if (p > -1).any() else None for cat_id, p in ps.items()}
