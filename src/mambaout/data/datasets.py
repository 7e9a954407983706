"""Datasets for training and evaluation: `ImageDataset` (folders, tars, Hugging Face; unreadable files skipped and
named), `DigitsDataset` (the embedded default, no download), and `create_dataset`, which also builds the streamed
sets of `mambaout.data.streaming`.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from mambaout.data.folders import FolderReader
from mambaout.data.image import load_image
from mambaout.data.streaming import IterableImages, is_streamed
from mambaout.utils.files import special_kind
from mambaout.utils.text import printable

logger = logging.getLogger("mambaout")

DIGITS = "digits"  # the name of the embedded dataset
# timm readers with random access, named as `<prefix>/<dataset>`; WebDataset shards (`wds/`) and streaming
# Hugging Face datasets (`hfids/`) are iterable only and go through mambaout.data.streaming
MAP_STYLE_READERS = ("hfds/",)
# How many following samples a corrupt one may be replaced by before we give up on the dataset.
MAX_CONSECUTIVE_BAD = 50


class ImageDataset(Dataset):
    """Labelled images of a folder, a tar or a Hugging Face dataset; unreadable files are skipped, counted and named.

    `__getitem__` returns `(image, target, n_skipped)`: with `substitute` (training) an unreadable file is named in
    a warning and replaced by the next readable image, and the loader sums `n_skipped` for the epoch's report.
    Without it (evaluation) an unreadable sample is `(None, -1, file name)`, which `collate_readable` leaves out and
    names, so a metric counts each readable image exactly once.

    `root` is an ImageFolder directory (`root/<class>/<image>`), a `.tar` of one or `hfds/NAME[:SPLIT]`;
    `class_to_idx` folder name -> label (default: sorted folder order; a val set takes the train set's map); `cache`
    keeps every file's bytes in RAM after the first read (small data sets: no disk or tar seeks).
    """

    def __init__(
        self,
        root,
        transform=None,
        class_to_idx: dict[str, int] | None = None,
        cache: bool = False,
        substitute: bool = True,
    ):
        root = str(root)
        # `hfds/NAME[:SPLIT]`: a Hugging Face dataset through timm's reader (needs the `datasets` package)
        name, split = ("", "")
        if root.startswith(MAP_STYLE_READERS):
            name, _, split = root.partition(":")
            root, split = None, split or "train"
        elif not os.path.exists(root):
            raise FileNotFoundError(f"dataset {root} does not exist; pass an ImageFolder directory or a .tar of one")
        elif special_kind(root):  # a FIFO would block the reader forever: never opened
            raise ValueError(f"dataset {root} is {special_kind(root)}; pass an ImageFolder directory or a .tar of one")
        elif os.path.isfile(root) and not root.endswith(".tar"):
            # timm would walk it as a folder and find nothing ("Found 0 images in subfolders of model.safetensors")
            raise ValueError(
                f"dataset {root} is a file, not an ImageFolder directory or a .tar of one; pass the folder holding one "
                "sub-folder per class, or an uncompressed .tar of it"
            )
        self.root = root or name
        # the map-less listing first: with a map, timm's readers drop a class the map lacks without a word
        self.reader = _reader(name, root, split, class_to_idx if root is None else None)
        if class_to_idx is not None and root is not None:
            # a metric would leave out a whole class: name it instead
            extra = sorted(set(_class_map(self.reader)) - set(class_to_idx))
            if extra:
                more = f" (+{len(extra) - 5} more)" if len(extra) > 5 else ""
                raise ValueError(
                    f"{root} holds class(es) {', '.join(map(repr, extra[:5]))}{more} that are not among the "
                    f"{len(class_to_idx)} classes of the model or training set ({', '.join(list(class_to_idx)[:3])}"
                    "...); their images cannot be scored: remove those folders, or use the matching model"
                )
            if isinstance(self.reader, FolderReader):
                self.reader.label(class_to_idx)
            else:
                self.reader = _reader(name, root, split, class_to_idx)
        self.class_to_idx = _class_map(self.reader)
        self.classes = [c for c, _ in sorted(self.class_to_idx.items(), key=lambda kv: kv[1])]
        if len(self.reader) == 0:
            raise ValueError(f"no images found in {root}; expected one sub-folder per class holding image files")
        self.transform = transform
        self.substitute = substitute
        self._n = len(self.reader)
        self._bytes: list[bytes | None] | None = None
        if cache:
            # Read every file once; afterwards the reader (and its open tar handles, which cannot be pickled
            # into worker processes) is dropped and samples come from RAM: one copy per machine, which local
            # rank 0 reads and every rank maps (mambaout.data.shared_cache).
            from mambaout.data.shared_cache import PackedBytes, cache_key, machine_shared

            def build():
                read = [self._read(i) for i in range(self._n)]
                arrays = PackedBytes.pack([data for data, _ in read])
                arrays["targets"] = np.array([target for _, target in read], dtype=np.int64)
                return arrays

            stamp = os.stat(self.root).st_mtime_ns if os.path.exists(self.root) else 0
            arrays = machine_shared(cache_key("files", os.path.abspath(self.root), stamp, self._n), build)
            self._bytes = PackedBytes(arrays)
            self._targets = arrays["targets"].tolist()
            self._names = [str(self.reader._filename(i)) for i in range(self._n)]
            self.reader = None

    def _open(self, index: int):
        """(file object, target) of a sample; OSError for one that cannot be opened (skipped and named)."""
        if self._bytes is not None:
            data = self._bytes[index]
            if data is None:
                raise OSError("unreadable file")
            return io.BytesIO(data), self._targets[index]
        return self.reader[index]

    def _read(self, index: int) -> tuple[bytes | None, int]:
        """(bytes, target) of a sample; (None, -1) for one that cannot be read, named in a warning."""
        try:
            f, target = self._open(index)
            return f.read(), int(target)
        except OSError as e:
            logger.warning("cannot read sample %d of %s: %s", index, printable(self.root), printable(e))
            return None, -1

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int):
        n = len(self)
        for skipped in range(MAX_CONSECUTIVE_BAD if self.substitute else 1):
            i = (index + skipped) % n
            try:
                f, target = self._open(i)
                img = load_image(f)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                # PIL raises OSError for truncated data, UnidentifiedImageError (an OSError) for non-images,
                # SyntaxError/ValueError from a few broken headers; load_image a ValueError over the pixel budget.
                if not self.substitute:
                    return None, -1, self.filename(i)
                logger.warning(
                    "skipping unreadable image %s (replaced by the next one): %s",
                    printable(self.filename(i)),
                    printable(e),
                )
                continue
            if self.transform is not None:
                img = self.transform(img)
            return img, int(target), skipped
        raise ValueError(
            f"{MAX_CONSECUTIVE_BAD} consecutive unreadable images from index {index} in {self.root}; "
            "the dataset looks corrupt: check the files or re-extract it"
        )

    def filename(self, index: int) -> str:
        return self._names[index] if self.reader is None else str(self.reader._filename(index))


def _class_map(reader) -> dict[str, int]:
    """Class name -> index of a timm reader (the folder reader calls it `class_to_idx`, the tar reader
    `class_name_to_idx`)."""
    return dict(getattr(reader, "class_to_idx", None) or getattr(reader, "class_name_to_idx", None) or {})


def _reader(name: str, root: str | None, split: str, class_map: dict[str, int] | None = None):
    """The reader of a folder (`folders.FolderReader`: each real file once), or timm's of a tar or a Hugging Face
    dataset; what it raises for no images or a bad tar, as one ValueError."""
    from timm.data.readers import create_reader

    if root is not None and os.path.isdir(root):
        return FolderReader(root)
    try:
        return create_reader(name, root=root, split=split, class_map=class_map)
    except (tarfile.TarError, OSError, EOFError) as e:  # an empty, truncated or garbage .tar
        raise ValueError(
            f"cannot read {root} as a tar of images ({type(e).__name__}: {e}); the file is empty, truncated or "
            "not a tar: copy it again, or pass the extracted folder"
        ) from e


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits (1,797 8x8 images, 10 classes), upscaled to `size` px RGB: the default
    `mambaout train` needs no download. A fixed stratified split keeps 20% of the images (360) as the held-out set."""

    def __init__(self, split: str = "train", size: int = 32, transform=None, holdout: float = 0.2):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if split not in ("train", "val"):
            raise ValueError(f"digits split must be 'train' or 'val', got {split!r}")
        digits = load_digits()
        idx = np.arange(len(digits.target))
        train_idx, val_idx = train_test_split(idx, test_size=holdout, random_state=0, stratify=digits.target)
        keep = train_idx if split == "train" else val_idx
        # 0..16 grey levels -> 0..255, dark digits on white like ink on paper
        images = (255 - digits.images[keep] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        # [N, 8, 8] grey -> N RGB PIL images of size x size (bicubic upscaling keeps strokes smooth)
        self.images = [Image.fromarray(im).resize((size, size), Image.BICUBIC).convert("RGB") for im in images]
        self.targets = digits.target[keep].astype(int).tolist()
        self.classes = [str(c) for c in range(10)]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        img = self.images[index]
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index], 0


def resolve_split(data: str | None, split: str) -> str:
    """`--data ROOT` + split name -> `ROOT/<split>` (a folder) or `ROOT/<split>.tar`."""
    if data is None:
        raise ValueError("no dataset given: pass --data DIR (with train/ and val/) or --data-train/--data-val")
    root = Path(data)
    if root.is_file():
        raise ValueError(
            f"--data {data} is a file; pass --data-train TRAIN.tar --data-val VAL.tar for tar files, "
            "or --data DIR holding train/ and val/"
        )
    for cand in (root / split, root / f"{split}.tar"):
        if cand.exists():
            return str(cand)
    raise FileNotFoundError(f"no '{split}' split in {data}: expected {root / split}/ or {root / split}.tar")


def create_dataset(
    path: str, transform=None, class_to_idx=None, cache: bool = False, img_size: int = 32, substitute: bool = True
):
    """A dataset from a path (folder or tar) or the embedded `digits[:train|:val]`; `substitute=False` for
    evaluation (see `ImageDataset`)."""
    if path.startswith(DIGITS):
        split = path.partition(":")[2] or "train"
        return DigitsDataset(split, size=img_size if img_size <= 64 else 32, transform=transform)
    if is_streamed(path):  # sharded over ranks by train_loader / eval_loader
        return IterableImages(path, transform=transform)
    return ImageDataset(path, transform=transform, class_to_idx=class_to_idx, cache=cache, substitute=substitute)


def imagenet_class_map(classes: Sequence[str]) -> dict[str, int] | None:
    """Synset folder names -> ImageNet-1k indices (for evaluating 1000-class weights on an ImageNet subset)."""
    from timm.data import ImageNetInfo

    index = {s: i for i, s in enumerate(ImageNetInfo().label_names())}
    return {c: index[c] for c in classes} if classes and all(c in index for c in classes) else None


def folder_classes(path: str) -> list[str]:
    """The class folder names of an ImageFolder directory or tar, sorted (cheap: no image is decoded; what the
    listing leaves out is said when the data set itself is built)."""
    if os.path.isdir(path):
        reader = FolderReader(path, report=False)
        if not len(reader):
            raise ValueError(f"no images found in {path}; expected one sub-folder per class holding image files")
        return list(reader.class_to_idx)
    return ImageDataset(path).classes
