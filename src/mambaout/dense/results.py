"""What `validate` and `predict` hand out besides the headline numbers: per-class tables (detectron2's per-category
AP, mmseg's per-class IoU and accuracy), COCO image ids, class-index label PNGs, and pictures of the predictions.

Per-class numbers are percent; a class the mean leaves out is `None` in JSON and `-` in a table.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from mambaout.utils.files import atomic_write
from mambaout.utils.text import printable


def table(headers: Sequence[str], rows: Sequence[Sequence], columns: int = 1) -> str:
    """A plain-text table, its rows laid out in `columns` side-by-side blocks (detectron2 prints three)."""
    rows = [[_cell(v) for v in r] for r in rows]
    per = -(-len(rows) // columns)
    blocks = [b for b in (rows[i * per : (i + 1) * per] for i in range(columns)) if b] or [[]]
    width = [max([len(h)] + [len(r[j]) for b in blocks for r in b]) for j, h in enumerate(headers)]

    def line(cells):
        return " | ".join(c.ljust(width[j]) if j == 0 else c.rjust(width[j]) for j, c in enumerate(cells))

    rule = "-+-".join("-" * w for w in width)
    out = [" || ".join(line(headers) for _ in blocks), " ++ ".join(rule for _ in blocks)]
    for i in range(per):
        out.append(" || ".join(line(b[i]) if i < len(b) else line([""] * len(headers)) for b in blocks).rstrip())
    return "\n".join(out)


def _cell(v) -> str:  # a class name from a file cannot write to the terminal: printable
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else printable(v)


# --- detection --------------------------------------------------------------------------------------------------------


def per_category(ev: dict, cat_ids: Sequence[int], names: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """`{iou type: {category name: AP in percent or None}}` from `coco_evaluate`'s answer, in the model's order."""
    out = {}
    for iou_type, aps in ev["per_category"].items():
        out[iou_type] = {n: None if aps.get(c) is None else 100 * aps[c] for c, n in zip(cat_ids, names)}
    return out


def per_category_text(tables: dict[str, dict[str, float | None]]) -> str:
    """detectron2's `Per-category bbox AP:` tables (three category/AP column pairs a row)."""
    return "\n".join(
        f"Per-category {t} AP:\n" + table(("category", "AP"), list(aps.items()), columns=3) for t, aps in tables.items()
    )


def image_ids(paths: Sequence[Path], coco_json: str | Path | None = None) -> list[int]:
    """Each input's COCO image id: by file name from `coco_json` (ValueError: an input it does not list), else its
    stem when all stems are distinct numbers (COCO's `000000000139.jpg` is 139), else its place from 1."""
    if coco_json is not None:
        from .coco import load_coco

        coco = load_coco(coco_json)
        by_name = {Path(im["file_name"]).name: im["id"] for im in coco.dataset.get("images", [])}
        missing = [p.name for p in paths if p.name not in by_name]
        if missing:
            raise ValueError(f"{coco_json} lists no image named {missing[0]} ({len(missing)} inputs not listed)")
        return [int(by_name[p.name]) for p in paths]
    if all(p.stem.isdigit() for p in paths) and len({int(p.stem) for p in paths}) == len(paths):
        return [int(p.stem) for p in paths]
    return list(range(1, len(paths) + 1))


# --- segmentation --------------------------------------------------------------------------------------------------


def per_class(metrics: dict, names: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """`{class name: {IoU, Acc}}` in percent from `ConfusionMatrix.metrics()` (mmseg's per-class table)."""
    iou, acc = metrics["iou"], metrics["acc"]
    return {n: dict(IoU=iou.get(i), Acc=acc.get(i)) for i, n in enumerate(names)}


def per_class_text(classes: dict[str, dict[str, float | None]]) -> str:
    """mmseg's per-class results: class, IoU, Acc; `-` where the class is in neither truth nor prediction."""
    rows = [(n, v["IoU"], v["Acc"]) for n, v in classes.items()]
    return "per-class results:\n" + table(("class", "IoU", "Acc"), rows, columns=2)


def write_label_png(path: Path, classes: torch.Tensor) -> Path:
    """A class map `[H, W]` (indices 0..K-1, K <= 255) as an 8-bit greyscale PNG, the value of a pixel its class."""
    values = classes.cpu().numpy()
    if values.size and (values.min() < 0 or values.max() > 255):
        raise ValueError(f"class indices {values.min()}..{values.max()} do not fit an 8-bit label PNG")
    picture = Image.fromarray(values.astype(np.uint8), mode="L")
    return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def dataset_paths(dataset) -> list[Path]:
    """The image path of each item of a `SegmentationFolder`, through any `Subset`s around it, in order."""
    indices = list(range(len(dataset)))
    while isinstance(dataset, torch.utils.data.Subset):
        indices = [dataset.indices[i] for i in indices]
        dataset = dataset.dataset
    return [Path(dataset.pairs[i][0]) for i in indices]


def picture_paths(paths: list[Path], out: Path, suffix: str) -> dict[Path, Path]:
    """Each input's picture in `out`: `<stem>.<suffix>`, numbered where two inputs share a stem (a.jpg and a.png, or
    two folders' 0.png); ValueError where a picture would replace an input image (`--output` the input folder)."""
    pictures: dict[Path, Path] = {}
    used: set[str] = set()
    for p in paths:
        name, n = f"{p.stem}.{suffix}", 0
        while name in used:
            n += 1
            name = f"{p.stem}-{n}.{suffix}"
        used.add(name)
        pictures[p] = out / name
    inputs = {q.resolve() for q in paths if q.is_file()}
    clash = next((q for q in pictures.values() if q.resolve() in inputs), None)
    if clash is not None:
        raise ValueError(f"the picture {clash} would replace that input image; pass another --output folder")
    return pictures


# --- pictures: boxes, labels and masks over the photo; a colour-coded segmentation beside it ------------------------


def palette(n: int) -> np.ndarray:
    """`n` well-separated RGB colours (golden-ratio hues), the same for a class in every picture."""
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    rgb = [colorsys.hsv_to_rgb(h, 0.75 if i % 2 else 0.95, 0.95 if i % 3 else 0.8) for i, h in enumerate(hues)]
    return (np.array(rgb) * 255).astype(np.uint8).reshape(n, 3)


def draw_detections(image: Image.Image, output: dict, class_names: list[str], threshold: float) -> Image.Image:
    """The photo with each detection scoring at least `threshold`: its mask tinted, its box and `name score`
    (labels placed so that none covers another: `place_labels`)."""
    colours = palette(len(class_names) + 1)
    fills = [tuple(c) for c in colours.tolist()]
    keep = output["scores"] >= threshold
    arr = np.asarray(image, dtype=np.float32).copy()
    if "masks" in output:
        for mask, label in zip(output["masks"][keep], output["labels"][keep]):
            m = (mask[0] > 0.5).numpy()
            arr[m] = 0.5 * arr[m] + 0.5 * colours[int(label)]
    out = Image.fromarray(arr.astype(np.uint8))
    draw = ImageDraw.Draw(out)
    boxes, labels, scores = output["boxes"][keep].tolist(), output["labels"][keep].tolist(), output["scores"][keep]
    texts = [f"{class_names[int(lab) - 1]} {s:.2f}" for lab, s in zip(labels, scores.tolist())]
    extents = [draw.textbbox((0, 0), text) for text in texts]  # (left, top, right, bottom)
    sizes = [(right - left + 2, bottom - top + 2) for left, top, right, bottom in extents]
    for box, label in zip(boxes, labels):
        draw.rectangle(box, outline=fills[int(label)], width=2)
    corners = place_labels(boxes, sizes, out.size)
    for (tx, ty), (tw, th), text, label, (left, top, _, _) in zip(corners, sizes, texts, labels, extents):
        draw.rectangle((tx, ty, tx + tw - 1, ty + th - 1), fill=fills[int(label)])
        draw.text((tx + 1 - left, ty + 1 - top), text, fill=(0, 0, 0))
    return out


def place_labels(boxes, sizes, image_size) -> list[tuple[int, int]]:
    """Top-left corners for label rectangles of `sizes` (w, h), one per box (x1, y1, x2, y2), in order: above the
    box if there is room, else inside its top edge, moved down a label's height at a time until it covers no label
    placed before it; all inside the image where the image is large enough."""
    width, height = image_size
    placed: list[tuple[int, int, int, int]] = []
    for (x1, y1, _, _), (w, h) in zip(boxes, sizes):
        x = int(min(max(x1, 0), max(width - w, 0)))
        y = int(y1 - h) if y1 - h >= 0 else int(max(y1, 0))
        y = min(y, max(height - h, 0))
        candidates = [y + k * h for k in range(max(1, (height - y) // max(h, 1)))]
        candidates += [y - k * h for k in range(1, y // max(h, 1) + 1)]  # then upwards from where it wanted to be
        for cy in candidates:
            rect = (x, cy, x + w, cy + h)
            if not any(_overlap(rect, r) for r in placed):
                break
        else:
            rect = (x, y, x + w, y + h)  # no free place: where it wanted to be
        placed.append(rect)
    return [rect[:2] for rect in placed]


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def draw_segmentation(image: Image.Image, classes: torch.Tensor, class_names: list[str]) -> Image.Image:
    """The photo and, to its right, the class map in colour blended over it (one colour per class), with a legend
    below them: a swatch of each class the map shows, with its name, the most frequent first."""
    colours = palette(len(class_names))
    seg = colours[classes.numpy()]  # [H, W] -> [H, W, 3]
    blend = (0.4 * np.asarray(image, dtype=np.float32) + 0.6 * seg).astype(np.uint8)
    w, h = image.size
    counts = torch.bincount(classes.flatten(), minlength=len(class_names)).tolist()
    shown = sorted((k for k, c in enumerate(counts) if c), key=lambda k: -counts[k])
    entries = legend_layout([class_names[k] for k in shown], 2 * w)
    rows = max((y for _, y, _ in entries), default=-LEGEND_ROW) + LEGEND_ROW
    canvas = Image.new("RGB", (2 * w, h + rows + 2), (255, 255, 255))
    canvas.paste(image, (0, 0))
    canvas.paste(Image.fromarray(blend), (w, 0))
    draw = ImageDraw.Draw(canvas)
    for k, (x, y, name) in zip(shown, entries):
        y += h + 2
        draw.rectangle((x, y + 1, x + LEGEND_SWATCH - 1, y + LEGEND_SWATCH), fill=tuple(colours[k].tolist()))
        draw.text((x + LEGEND_SWATCH + 3, y + 1), name, fill=(0, 0, 0))
    return canvas


LEGEND_ROW, LEGEND_SWATCH = 14, 12  # pixels: a legend line, the side of a colour swatch


def legend_layout(names: list[str], width: int) -> list[tuple[int, int, str]]:
    """`(x, y, name)` of each legend entry, left to right, wrapping at `width` (one entry a line at the least)."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    out, x, y = [], 0, 0
    for name in names:
        left, _, right, _ = draw.textbbox((0, 0), name)
        entry = LEGEND_SWATCH + 3 + (right - left) + 10
        if x and x + entry > width:
            x, y = 0, y + LEGEND_ROW
        out.append((x, y, name))
        x += entry
    return out
