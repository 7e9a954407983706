"""Pictures of predictions: boxes, labels and masks over the photo; a colour-coded segmentation beside it."""

from __future__ import annotations

import colorsys

import numpy as np
import torch
from PIL import Image, ImageDraw


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
