"""Classifying images with a MambaOut (usage: docs/inference.md): any image decoded to RGB, the model's own eval
transform (`pretrained_cfg`, built by timm, so predictions match `mambaout validate` and timm), top-k with names.
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from mambaout.data.image import eval_transform, load_image, source_name, to_rgb  # noqa: F401  (to_rgb: re-exported)
from mambaout.inference.precision import resolve_dtype, with_dtype
from mambaout.models.factory import create_model
from mambaout.utils.device import resolve_device
from mambaout.utils.interrupt import ignore_sigint
from mambaout.utils.text import printable

# Suffixes picked up when a folder is given; single files are tried whatever their name.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif"}
)

_SYNSET = re.compile(r"n\d{8}")  # a WordNet noun id, ImageNet's class folder names


def find_images(inputs: Iterable) -> list:
    """Expand folders (recursively, sorted, image suffixes only) and keep files (as `Path`s) and other items (PIL
    images, arrays, bytes) as given, in input order.

    A folder's entries with an image suffix are all kept, FIFOs, devices and dangling links included: the predictor
    names each of them as unreadable (without opening a FIFO or a device) rather than leaving them out unsaid.
    """
    paths = []
    for item in inputs:
        p = Path(item) if isinstance(item, (str, os.PathLike)) else None
        if p is not None and p.is_dir():
            paths += sorted(f for f in p.rglob("*") if not f.is_dir() and f.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            paths.append(item if p is None else p)  # missing or unreadable files are reported per file by the predictor
    return paths


@dataclass(frozen=True)
class ClassNames:
    """Names (and ImageNet synsets when known) of a classifier's outputs, by index."""

    names: tuple[str, ...]
    synsets: tuple[str, ...] | None = None

    def label(self, index: int) -> str:
        """A display label unique among the classes: the name, with the synset added where names repeat."""
        name = self.names[index]
        if self.synsets is not None and self.names.count(name) > 1:
            return f"{name} ({self.synsets[index]})"
        return name


def class_names_for(model: nn.Module) -> ClassNames:
    """The names of `model`'s outputs: those our trainer stores in a checkpoint (`model.class_names`; WordNet synsets,
    as an ImageFolder of Imagenette stores, shown as their ImageNet names); else ImageNet-1k (or -12k/-22k) names and
    synsets from timm when the head has that many classes; else the index as text."""
    stored = getattr(model, "class_names", None)
    num_classes = model.num_classes
    from timm.data import ImageNetInfo, infer_imagenet_subset

    if stored is not None and len(stored) == num_classes:
        synsets = tuple(str(n) for n in stored)
        if not all(_SYNSET.fullmatch(n) for n in synsets):
            return ClassNames(synsets)
        info = ImageNetInfo("imagenet-22k")
    elif (subset := infer_imagenet_subset({"num_classes": num_classes})) is not None:
        info = ImageNetInfo(subset)
        synsets = tuple(info.label_names())
    else:
        return ClassNames(tuple(str(i) for i in range(num_classes)))
    try:  # the first of WordNet's comma-separated lemmas is the common name ('tench', 'English springer')
        return ClassNames(tuple(info.label_name_to_description(s).split(",")[0].strip() for s in synsets), synsets)
    except (KeyError, ValueError):  # not all WordNet ids ImageNet knows: keep them as they are
        return ClassNames(synsets)


@dataclass
class Prediction:
    """Top-k of one image, or why it could not be read."""

    source: str
    indices: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    synsets: list[str] | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        if self.error is not None:
            return {"path": self.source, "error": self.error}
        top = [dict(index=i, label=name, prob=round(p, 6)) for i, p, name in zip(self.indices, self.probs, self.labels)]
        for entry, synset in zip(top, self.synsets or ()):
            entry["synset"] = synset
        return {"path": self.source, "top": top}


class Predictor:
    """A model with its eval transform and class names, ready to classify images.

    Args:
        model: A registered name (`mambaout_femto`, optionally `.tag`), or a built `nn.Module` with
            `pretrained_cfg` (eval transform settings) and `num_classes`. May be None with `checkpoint`.
        checkpoint: Weights to load (ours record the model name, class names and eval settings).
        pretrained: Download the variant's published weights (ignored with `checkpoint` or a module).
        topk: How many classes to return per image (capped at the number of classes).
        device: Where to run; defaults to CUDA when available.
        dtype: `'fp32'` or `'bf16'` (mambaout.inference.precision). A CPU that only emulates bf16 runs fp32, with a
            warning, unless `allow_emulated` (slower; to check its accuracy); `self.dtype` is what runs.
    """

    def __init__(
        self,
        model: str | nn.Module | None = None,
        checkpoint: str | os.PathLike | None = None,
        pretrained: bool = False,
        topk: int = 5,
        device: str | torch.device | None = None,
        dtype: str = "fp32",
        allow_emulated: bool = False,
    ):
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        if isinstance(model, nn.Module):
            if checkpoint is not None:
                raise ValueError("pass checkpoint= with a model name (or None), not with a built model")
        else:
            model = create_model(model, pretrained=pretrained and checkpoint is None, checkpoint=checkpoint)
        self.device = resolve_device(str(device) if device is not None else None)
        self.dtype, message = resolve_dtype(dtype, self.device, allow_emulated)
        if message:
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        self.model = with_dtype(model.eval().to(self.device), self.dtype)
        self.cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        if "input_size" not in self.cfg:
            raise ValueError("the model has no pretrained_cfg with input_size/mean/std; build it with create_model")
        self.transform = eval_transform(self.cfg)
        self.class_names = class_names_for(model)
        self.topk = min(topk, model.num_classes)

    def preprocess(self, source) -> torch.Tensor:
        """One image (anything `load_image` takes) -> `[3, H, W]` normalised tensor."""
        return self.transform(load_image(source))

    @torch.inference_mode()
    def predict_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[B, 3, H, W]` -> (probs `[B, k]`, indices `[B, k]`), highest first."""
        probs = self.model(batch.to(self.device)).float().softmax(dim=-1)  # [B, num_classes]
        top = probs.topk(self.topk, dim=-1)
        return top.values.cpu(), top.indices.cpu()

    def _prediction(self, source: str, probs: torch.Tensor, indices: torch.Tensor) -> Prediction:
        idx = indices.tolist()
        synsets = [self.class_names.synsets[i] for i in idx] if self.class_names.synsets else None
        return Prediction(source, idx, probs.tolist(), [self.class_names.label(i) for i in idx], synsets)

    def __call__(self, image) -> Prediction:
        """Classify one image (a path, bytes, PIL image or array). Raises ValueError if it cannot be read."""
        probs, indices = self.predict_batch(self.preprocess(image)[None])
        return self._prediction(source_name(image), probs[0], indices[0])

    def iter_predict(
        self, inputs: Sequence | str | os.PathLike, batch_size: int = 32, num_workers: int = 0, progress: bool = False
    ) -> Iterator[Prediction]:
        """Classify `inputs` (paths, folders searched recursively, PIL images, arrays; or a single one), yielding one
        `Prediction` per image in input order. A file that cannot be read yields a `Prediction` with `error` set and
        does not stop the rest. `num_workers` decoding processes (0: decode in this process), `batch_size` images
        per forward pass, `progress` bar on stderr."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(inputs, (str, os.PathLike, Image.Image, np.ndarray, bytes)):
            inputs = [inputs]
        items = find_images(inputs)
        loader = torch.utils.data.DataLoader(
            items, batch_size=batch_size, num_workers=num_workers, collate_fn=self._decode, worker_init_fn=ignore_sigint
        )
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(items), unit="img", file=sys.stderr, desc="predict", dynamic_ncols=True, disable=not progress
        )
        for batch in loader:
            sources, tensors, errors = zip(*batch)
            ok = [t for t in tensors if t is not None]
            rows = zip(*self.predict_batch(torch.stack(ok))) if ok else iter(())  # (probs, indices) of each read image
            for source, tensor, error in zip(sources, tensors, errors):
                yield Prediction(source, error=error) if tensor is None else self._prediction(source, *next(rows))
            bar.update(len(sources))
        bar.close()

    def _decode(self, items: list) -> list[tuple]:
        """(source, tensor or None, error or None) of each item: a bad file becomes an error entry, not an exception.
        The loader's collate function, so the decoding runs in its workers."""
        out = []
        for item in items:
            try:
                out.append((source_name(item), self.preprocess(item), None))
            except (ValueError, OSError) as e:
                out.append((source_name(item), None, str(e)))
        return out

    def predict(self, inputs, batch_size: int = 32, num_workers: int = 0, progress: bool = False) -> list[dict]:
        """`iter_predict` as a list of JSON-ready dicts: `{'path', 'top': [{'index', 'label', 'prob', 'synset'?}]}`
        or `{'path', 'error'}` for an image that could not be read."""
        return [p.to_dict() for p in self.iter_predict(inputs, batch_size, num_workers, progress)]


def predict(
    inputs,
    model: str | nn.Module | None = "mambaout_femto",
    checkpoint: str | os.PathLike | None = None,
    pretrained: bool = True,
    topk: int = 5,
    batch_size: int = 32,
) -> list[dict]:
    """Classify images in one call: `mambaout.predict(["cat.jpg"], checkpoint="best.safetensors")` (`model` may be
    None with `checkpoint`: ours record it). See `Predictor.predict` for the output."""
    if checkpoint is not None and model == "mambaout_femto":
        model = None  # the default name must not override the name a checkpoint records
    return Predictor(model, checkpoint=checkpoint, pretrained=pretrained, topk=topk).predict(inputs, batch_size)


def format_text(pred: dict) -> str:
    """One image's top-k as readable lines (the CLI's default output), control characters escaped (`printable`): a
    file name or a checkpoint's class name cannot start a forged line or send escape sequences to the terminal."""
    lines = [printable(pred["path"])]
    for t in pred["top"]:
        synset = f"  {printable(t['synset'])}" if "synset" in t else ""
        lines.append(f"  {100 * t['prob']:6.2f}%  {t['index']:>5}  {printable(t['label'])}{synset}")
    return "\n".join(lines)


def dumps(preds: list[dict]) -> str:
    """The `--json` document."""
    return json.dumps(preds, indent=2, ensure_ascii=False)
