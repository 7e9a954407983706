"""Datasets, transforms and loaders for training and evaluation.

We lean on timm for everything it already does (folder and tar readers, `create_transform` with RandAugment and
random erasing, Mixup/CutMix) and add only what our runs need on top:

- `ImageDataset`: reads timm's random-access readers (ImageNet folder layout, an ImageFolder packed in a `.tar`,
  a Hugging Face dataset as `hfds/NAME:SPLIT`), decodes every image as `mambaout.image.load_image` does (any mode
  to RGB, EXIF-rotated), and skips unreadable files, naming them: training substitutes the next readable image to
  keep batches full (counted, and each named in a warning), evaluation leaves them out (`collate_readable`) so a
  metric counts each readable image exactly once;
- `DigitsDataset`: scikit-learn's 8x8 digits upscaled to RGB, the embedded default that needs no download;
- `safe_posterize`: timm 1.0.31's `inc1` RandAugment can ask Pillow for 0 posterize bits, which Pillow >= 13
  rejects with a `ValueError` mid-epoch; `build_train_transform` swaps in a version that clamps to 1 bit;
- `ShardSampler`: evaluation shards without the padding DistributedSampler adds, so metrics count each image once.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

# Decoding and the eval transform are shared with inference and export: one module owns them.
from .image import IMAGENET_MEAN, IMAGENET_STD, load_image, to_rgb  # noqa: F401  (public names of this module)
from .image import eval_transform as build_eval_transform

logger = logging.getLogger("mambaout")

DIGITS = "digits"  # the name of the embedded dataset
# timm readers with random access, named as `<prefix>/<dataset>`; WebDataset shards (`wds/`) and streaming
# Hugging Face datasets (`hfids/`) are iterable only and go through mambaout.data_wds
MAP_STYLE_READERS = ("hfds/",)
# How many following samples a corrupt one may be replaced by before we give up on the dataset.
MAX_CONSECUTIVE_BAD = 50


# --- datasets --------------------------------------------------------------------------------------------------------


class ImageDataset(Dataset):
    """Labelled images from a timm reader; unreadable files are skipped, counted and named.

    With `substitute` (training) an unreadable file is replaced by the next readable image, which keeps batches
    full: `__getitem__` returns `(image, target, n_skipped)`, the loader sums `n_skipped` so each epoch reports how
    many it met (even in worker processes), and each is named in a warning. Without it (evaluation) an unreadable
    sample is `(None, -1, file name)`; `collate_readable` leaves it out of the batch and names it, so a metric counts
    each readable image exactly once.

    Args:
        root: An ImageFolder directory (`root/<class>/<image>`) or a `.tar` file holding one.
        transform: Applied to the RGB PIL image.
        class_to_idx: Folder name -> label; default sorted folder order. Pass the train set's map to a val set.
        cache: Keep every file's bytes in RAM after the first read (small datasets: no disk or tar seeks).
        substitute: Replace an unreadable sample by the next readable one (training) instead of naming it.
    """

    def __init__(
        self,
        root,
        transform=None,
        class_to_idx: dict[str, int] | None = None,
        cache: bool = False,
        substitute: bool = True,
    ):
        from timm.data.readers import create_reader

        root = str(root)
        # `hfds/NAME[:SPLIT]`: a Hugging Face dataset through timm's reader (needs the `datasets` package)
        name, split = ("", "")
        if root.startswith(MAP_STYLE_READERS):
            name, _, split = root.partition(":")
            root, split = None, split or "train"
        elif not os.path.exists(root):
            raise FileNotFoundError(f"dataset {root} does not exist; pass an ImageFolder directory or a .tar of one")
        self.root = root or name
        try:
            self.reader = create_reader(name, root=root, split=split, class_map=class_to_idx)
        except RuntimeError as e:  # timm's folder reader: "Found 0 images in subfolders of ..."
            raise ValueError(
                f"no images found in {root} ({e}); expected one sub-folder per class holding image files"
            ) from e
        except (tarfile.TarError, OSError, EOFError) as e:  # an empty, truncated or garbage .tar
            raise ValueError(
                f"cannot read {root} as a tar of images ({type(e).__name__}: {e}); the file is empty, truncated or "
                "not a tar: copy it again, or pass the extracted folder"
            ) from e
        mapping = getattr(self.reader, "class_to_idx", None) or getattr(self.reader, "class_name_to_idx", None) or {}
        self.class_to_idx = dict(mapping)
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
            # rank 0 reads and every rank maps (mambaout.shared_cache).
            from .shared_cache import PackedBytes, cache_key, machine_shared

            def build():
                arrays = PackedBytes.pack([self._read(i) for i in range(self._n)])
                arrays["targets"] = np.array([t for _, t in self._read_targets()], dtype=np.int64)
                return arrays

            stamp = os.stat(self.root).st_mtime_ns if os.path.exists(self.root) else 0
            arrays = machine_shared(cache_key("files", os.path.abspath(self.root), stamp, self._n), build)
            self._bytes = PackedBytes.from_arrays(arrays)
            self._targets = arrays["targets"].tolist()
            self._names = [str(self.reader._filename(i)) for i in range(self._n)]
            self.reader = None

    def _read(self, index: int) -> bytes | None:
        try:
            f, _ = self.reader[index]
            data = f.read()
        except OSError as e:
            logger.warning("cannot read sample %d of %s: %s", index, self.root, e)
            return None
        return data

    def _read_targets(self):
        # timm's folder reader keeps (path, target) pairs in `samples`, its tar reader the labels in `targets`
        targets = getattr(self.reader, "targets", None)
        for i in range(self._n):
            yield i, int(targets[i] if targets is not None else self.reader.samples[i][1])

    def __len__(self) -> int:
        return self._n

    def target(self, index: int) -> int:
        return self._targets[index]

    def __getitem__(self, index: int):
        n = len(self)
        for skipped in range(MAX_CONSECUTIVE_BAD if self.substitute else 1):
            i = (index + skipped) % n
            try:
                if self._bytes is not None:
                    data = self._bytes[i]
                    if data is None:
                        raise OSError("unreadable file")
                    img = load_image(io.BytesIO(data))
                    target = self.target(i)
                else:
                    f, target = self.reader[i]
                    img = load_image(f)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                # PIL raises OSError for truncated data, UnidentifiedImageError (an OSError) for non-images,
                # SyntaxError/ValueError from a few broken headers; load_image a ValueError over the pixel budget.
                if not self.substitute:
                    return None, -1, self.filename(i)
                logger.warning("skipping unreadable image %s (replaced by the next one): %s", self.filename(i), e)
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


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits (1,797 8x8 images, 10 classes), upscaled to `size` px RGB.

    Shipped with scikit-learn, so the default `mambaout train` needs no download. A fixed stratified split
    keeps 20% of the images (360) as the held-out set.
    """

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
    from .data_wds import IterableImages, is_streamed

    if is_streamed(path):  # sharded over ranks by train_loader / eval_loader
        return IterableImages(path, transform=transform)
    return ImageDataset(path, transform=transform, class_to_idx=class_to_idx, cache=cache, substitute=substitute)


# --- transforms ------------------------------------------------------------------------------------------------------


def safe_posterize(img: Image.Image, bits_to_keep: int, **__) -> Image.Image:
    """Posterize that accepts RandAugment's full magnitude range: 0 bits (rejected by Pillow >= 13) becomes 1."""
    bits = int(bits_to_keep)
    if bits >= 8:
        return img
    return ImageOps.posterize(img, max(1, bits))


def fix_posterize(transform) -> int:
    """Swap `safe_posterize` into every Posterize op of the RandAugment/AutoAugment inside `transform`.

    Returns:
        How many ops were patched (0 when the transform has no auto-augmentation).
    """
    patched = 0
    stack = [transform]
    while stack:
        t = stack.pop()
        stack.extend(getattr(t, "transforms", []) or [])
        for op in getattr(t, "ops", []) or []:
            if "Posterize" in getattr(op, "name", ""):
                op.aug_fn = safe_posterize
                patched += 1
        for sub in getattr(t, "policy", []) or []:  # AutoAugment: a list of sub-policies of ops
            for op in sub:
                if "Posterize" in getattr(op, "name", ""):
                    op.aug_fn = safe_posterize
                    patched += 1
    return patched


def timm_augment_kwargs(cfg: dict) -> dict:
    """The recipe's training augmentation as keyword arguments of timm's `create_transform` / `create_loader`."""
    return dict(
        scale=tuple(cfg["scale"]),
        ratio=tuple(cfg["ratio"]),
        hflip=cfg["hflip"],
        color_jitter=cfg["color_jitter"],
        auto_augment=cfg["auto_augment"] or None,
        interpolation=cfg["train_interpolation"],
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        re_prob=cfg["reprob"],
        re_mode=cfg["remode"],
        re_count=cfg["recount"],
    )


def build_train_transform(cfg: dict):
    """The training augmentation (timm's `create_transform`), with the Posterize fix applied."""
    from timm.data import create_transform

    tf = create_transform(input_size=cfg["img_size"], is_training=True, **timm_augment_kwargs(cfg))
    fix_posterize(tf)
    return tf


# --- loaders ---------------------------------------------------------------------------------------------------------


class ShardSampler(Sampler):
    """Indices `rank, rank + world, ...`: every image exactly once over all ranks (no padding duplicates)."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way, after `skip` of this rank's samples (mid-epoch resume).

    The epoch's order is the same permutation as ever (seeded by seed + epoch); only its head is left out.
    """

    skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip :])

    def __len__(self) -> int:
        return self.num_samples - self.skip


def _seed_worker(worker_id: int) -> None:
    # torch seeds python's `random` and itself per worker; numpy (used by RandAugment and Mixup) it does not.
    np.random.seed(torch.initial_seed() % 2**32)


def train_loader(
    dataset,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    workers: int,
    pin: bool = False,
    persistent: bool = False,
):
    """Shuffled, sharded (DistributedSampler, also at world size 1 so 1 and N processes see the same order).

    Args:
        persistent: Keep worker processes between epochs (saves their start-up on short GPU epochs). Off by
            default: fresh workers take their seeds from the per-epoch seeded main process, which is what makes
            `--resume` bit-exact; persistent workers carry their RNG state across epochs instead.
    """
    from .data_wds import IterableImages, StreamLoader

    if isinstance(dataset, IterableImages):
        dataset.training, dataset.rank, dataset.world_size, dataset.seed = True, rank, world_size, seed
        return StreamLoader(dataset, batch_size, workers, pin, drop_last=True)
    sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
        pin_memory=pin,
        worker_init_fn=_seed_worker,
        persistent_workers=persistent and workers > 0,
    )
    if len(loader) == 0:
        raise ValueError(
            f"the training set ({len(dataset)} images over {world_size} processes) is smaller than one batch of "
            f"{batch_size}; lower --batch-size"
        )
    return loader


def collate_readable(batch):
    """Collate `(image or None, target, skipped)` samples into `(images or None, targets or None, skipped names)`.

    Samples whose image is None (unreadable, from a dataset that does not substitute) are left out of the batch
    and only named, so an evaluation counts each readable image once.
    """
    from torch.utils.data import default_collate

    good = [(x, y) for x, y, _ in batch if x is not None]
    names = [name for x, _, name in batch if x is None]
    if not good:
        return None, None, names
    x, y = default_collate(good)
    return x, y, names


def eval_loader(dataset, batch_size: int, rank: int = 0, world_size: int = 1, workers: int = 0, pin: bool = False):
    from .data_wds import IterableImages, StreamLoader

    if isinstance(dataset, IterableImages):
        dataset.training, dataset.rank, dataset.world_size = False, rank, world_size
        return StreamLoader(dataset, batch_size, workers, pin, drop_last=False)
    if getattr(dataset, "substitute", False):
        raise ValueError("an evaluation set must not substitute unreadable images: build it with substitute=False")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), rank, world_size),
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0,
        collate_fn=collate_readable,
    )


def num_steps(n_batches: int, accum_steps: int) -> int:
    """Optimizer steps per epoch: trailing micro-batches that cannot fill a whole accumulation are dropped."""
    return n_batches // accum_steps


def imagenet_class_map(classes: Sequence[str]) -> dict[str, int] | None:
    """Synset folder names -> ImageNet-1k indices (for evaluating 1000-class weights on an ImageNet subset)."""
    try:
        from timm.data import ImageNetInfo
    except ImportError:  # pragma: no cover - older timm
        return None
    synsets = ImageNetInfo().label_names()
    index = {s: i for i, s in enumerate(synsets)}
    if not classes or not all(c in index for c in classes):
        return None
    return {c: index[c] for c in classes}


def folder_classes(path: str) -> list[str]:
    """The class folder names of an ImageFolder directory or tar, sorted (cheap: no image is decoded)."""
    ds = ImageDataset(path)
    return ds.classes


__all__ = [
    "DigitsDataset",
    "ImageDataset",
    "ShardSampler",
    "build_eval_transform",
    "build_train_transform",
    "collate_readable",
    "create_dataset",
    "eval_loader",
    "fix_posterize",
    "folder_classes",
    "imagenet_class_map",
    "num_steps",
    "resolve_split",
    "safe_posterize",
    "to_rgb",
    "train_loader",
]
