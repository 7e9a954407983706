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
    """The photo with each detection scoring at least `threshold`: its mask tinted, its box and `name score`."""
    colours = palette(len(class_names) + 1)
    keep = output["scores"] >= threshold
    arr = np.asarray(image, dtype=np.float32).copy()
    if "masks" in output:
        for mask, label in zip(output["masks"][keep], output["labels"][keep]):
            m = (mask[0] > 0.5).numpy()
            arr[m] = 0.5 * arr[m] + 0.5 * colours[int(label)]
    out = Image.fromarray(arr.astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for box, label, score in zip(output["boxes"][keep], output["labels"][keep], output["scores"][keep]):
        colour = tuple(int(c) for c in colours[int(label)])
        x1, y1, x2, y2 = box.tolist()
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=2)
        text = f"{class_names[int(label) - 1]} {score:.2f}"
        tx, ty = x1 + 2, max(0.0, y1 - 12)
        draw.rectangle(draw.textbbox((tx, ty), text), fill=colour)
        draw.text((tx, ty), text, fill=(0, 0, 0))
    return out


def draw_segmentation(image: Image.Image, classes: torch.Tensor, n_classes: int) -> Image.Image:
    """The photo and, to its right, the class map in colour blended over it (one colour per class)."""
    colours = palette(n_classes)
    seg = colours[classes.numpy()]  # [H, W] -> [H, W, 3]
    blend = (0.4 * np.asarray(image, dtype=np.float32) + 0.6 * seg).astype(np.uint8)
    w, h = image.size
    canvas = Image.new("RGB", (2 * w, h))
    canvas.paste(image, (0, 0))
    canvas.paste(Image.fromarray(blend), (w, 0))
    return canvas
