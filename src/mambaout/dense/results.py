"""What `validate` and `predict` hand out besides the headline numbers: per-class tables (detectron2's per-category
AP, mmseg's per-class IoU and accuracy), COCO image ids, and class-index label PNGs.

Per-class numbers are percent; a class the mean leaves out is `None` in JSON and `-` in a table.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

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


# --- detection ---------------------------------------------------------------------------------------------------------


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
    """The COCO image id of each input: from `coco_json` by file name when given, else the file's stem when it is
    a number (COCO's `000000000139.jpg` is image 139), else its place in `paths` from 1.

    Raises:
        ValueError: `coco_json` does not list an input's file name.
    """
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
    """Each input's picture in `out`: `<stem>.<suffix>`, numbered where two inputs share a stem (a.jpg and a.png,
    or two folders' 0.png), so no picture replaces another.

    Raises:
        ValueError: a picture would replace one of the input images (`--output` is the input folder).
    """
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
