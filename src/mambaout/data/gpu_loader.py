"""The `gpu` data pipeline (`data_pipeline: gpu`): uint8 images to the device, `gpu_aug.GpuAugment` there. With
`cache: true` every image is decoded once (`DecodedTrainLoader`), else CPU workers decode and crop
(`DeviceAugmentLoader`); docs/data.md ("Two input pipelines") says how.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import Compose

from mambaout.data.datasets import create_dataset
from mambaout.data.gpu_aug import GpuAugment, normalize
from mambaout.data.loaders import EpochLoader, Loading, ResumableSampler, ShardSampler, eval_loader, train_loader
from mambaout.data.shared_cache import cache_key, machine_shared
from mambaout.data.transforms import AugmentConfig
from mambaout.utils.interrupt import ignore_sigint

logger = logging.getLogger("mambaout")


def pil_to_uint8(img) -> np.ndarray:
    """RGB PIL image -> `[3, H, W]` uint8."""
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def decode_images(dataset, transform=None, workers: int = 0, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Decode every image of `dataset` (an ImageDataset/DigitsDataset without transform) once, through `transform`
    (PIL -> PIL, the eval resize/crop; None keeps the decoded size), into `images` `[N, 3, Hmax, Wmax]` uint8 (each
    image top-left in a canvas as big as the largest one), `sizes` `[N, 2]` (h, w), `targets` `[N]` and `skipped`
    (unreadable files met, replaced by the next one).
    """
    keep = dataset.transform
    dataset.transform = (lambda im: pil_to_uint8(transform(im))) if transform is not None else pil_to_uint8
    try:
        loader = DataLoader(
            dataset, batch_size=batch_size, num_workers=workers, collate_fn=list, worker_init_fn=ignore_sigint
        )
        items = [item for batch in loader for item in batch]
    finally:
        dataset.transform = keep
    sizes = np.array([a.shape[1:] for a, _, _ in items], dtype=np.int64).reshape(-1, 2)
    h, w = sizes.max(0) if len(items) else (1, 1)
    images = np.zeros((len(items), 3, h, w), dtype=np.uint8)
    for i, (a, _, _) in enumerate(items):
        images[i, :, : a.shape[1], : a.shape[2]] = a
    targets = np.array([t for _, t, _ in items], dtype=np.int64)
    skipped = np.array([sum(s for _, _, s in items)], dtype=np.int64)
    return dict(images=images, sizes=sizes, targets=targets, skipped=skipped)


class DecodedImages:
    """A decoded set as tensors: `images` uint8 `[N, 3, H, W]`, `sizes` `[N, 2]`, `targets` `[N]`, batches on
    `device`. On CUDA the images move to the GPU when they take at most `max_device_fraction` of its memory."""

    def __init__(self, arrays: dict[str, np.ndarray], classes, class_to_idx, device=None, max_device_fraction=0.25):
        tensors = (torch.from_numpy(np.asarray(arrays[k])) for k in ("images", "sizes", "targets"))
        self.images, self.sizes, self.targets = tensors
        self.skipped = int(arrays["skipped"][0])
        self.classes, self.class_to_idx = list(classes), dict(class_to_idx)
        device = torch.device(device or "cpu")
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            if self.images.nbytes <= max_device_fraction * total:
                self.images = self.images.to(device)
        self.device = device

    def __len__(self) -> int:
        return len(self.targets)

    def batch(self, idx: torch.Tensor):
        """uint8 images `[B, 3, H, W]` and sizes on the device, targets on the device."""
        images = self.images[idx.to(self.images.device, non_blocking=True)].to(self.device, non_blocking=True)
        sizes = self.sizes[idx].to(self.device, non_blocking=True)
        return images, sizes, self.targets[idx].to(self.device, non_blocking=True)


def decoded_dataset(
    path: str, img_size: int, device, class_to_idx=None, eval_transform=None, workers: int = 0
) -> DecodedImages:
    """Decode `path` once per machine (local rank 0 decodes, every rank maps the result) into `DecodedImages`."""
    ds = create_dataset(path, None, class_to_idx, img_size=img_size)
    # the key must be the same string on every rank: a Compose's repr names its steps, not its address
    key = cache_key("decoded", path, repr(eval_transform), len(ds))
    arrays = machine_shared(key, lambda: decode_images(ds, eval_transform, workers))
    return DecodedImages(arrays, ds.classes, ds.class_to_idx, device)


class DecodedTrainLoader(EpochLoader):
    """Training batches `(x, y, n_bad)` of a `DecodedImages`, augmented on its device, in the order of the same
    `ResumableSampler` as the CPU loader, so sharding over ranks and mid-epoch resume work unchanged."""

    def __init__(self, data: DecodedImages, augment: GpuAugment, batch_size: int, rank=0, world_size=1, seed=0):
        self.data, self.augment, self.batch_size = data, augment, batch_size
        self.sampler = ResumableSampler(
            data, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self._require_a_batch(len(data), world_size, batch_size)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        order = torch.tensor(list(self.sampler), dtype=torch.long)
        for idx in order[: len(self) * self.batch_size].split(self.batch_size):
            images, sizes, y = self.data.batch(idx)
            yield self.augment(images, sizes), y, torch.zeros(len(idx), dtype=torch.long)


class DecodedEvalLoader(DecodedTrainLoader):
    """Evaluation batches of a `DecodedImages` decoded with the eval transform, normalised on the device: each image
    once over the ranks (`ShardSampler`), the last batch kept."""

    def __init__(self, data: DecodedImages, batch_size: int, mean, std, rank=0, world_size=1):
        self.data, self.batch_size = data, batch_size
        self.augment = lambda images, _: normalize(images, mean, std)
        self.sampler = ShardSampler(len(data), rank, world_size)

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)


def crop_transform(aug: AugmentConfig):
    """The CPU half of the streamed gpu pipeline: timm's random resized crop to uint8 (flip and the rest run on the
    device)."""
    from timm.data.transforms import RandomResizedCropAndInterpolation

    rrc = RandomResizedCropAndInterpolation(
        aug.img_size, scale=aug.scale, ratio=aug.ratio, interpolation=aug.train_interpolation
    )
    return lambda img: torch.from_numpy(pil_to_uint8(rrc(img)))


class DeviceAugmentLoader:
    """Wraps a CPU loader of uint8 crops: moves each batch to `device` and augments it there (flip, RandAugment,
    normalisation, random erasing)."""

    def __init__(self, loader, augment: GpuAugment, device):  # augment: built with crop=False
        self.loader, self.augment, self.device = loader, augment, torch.device(device)

    def __getattr__(self, name: str):  # set_epoch, skip_samples: the CPU loader's
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y, n_bad in self.loader:
            yield self.augment(x.to(self.device, non_blocking=True)), y.to(self.device, non_blocking=True), n_bad


def pil_part(transform) -> Compose:
    """The PIL steps of a torchvision Compose (everything before ToTensor): the eval resize and centre crop."""
    return Compose(list(itertools.takewhile(lambda t: "ToTensor" not in type(t).__name__, transform.transforms)))


def gpu_loaders(
    train: str, val: str | None, aug: AugmentConfig, loading: Loading, rank: int, world_size: int, device, eval_tf
):
    """(train set, val set or None, train loader, val loader or None) of the gpu pipeline, as `train` uses them:
    with `loading.cache` both sets decoded once into memory, else CPU workers decode and crop per batch."""
    augment = GpuAugment.from_config(aug, crop=loading.cache)
    bs, workers, val_set, val_loader = loading.batch_size, loading.workers, None, None
    if loading.cache:
        train_set = decoded_dataset(train, aug.img_size, device, workers=workers)
        if train_set.skipped:  # decoded once, so each epoch's summary cannot count them: say it here
            logger.warning("%d unreadable training images skipped while decoding", train_set.skipped)
        loader = DecodedTrainLoader(train_set, augment, bs, rank, world_size, loading.seed)
        if val:
            val_set = decoded_dataset(val, aug.img_size, device, train_set.class_to_idx, pil_part(eval_tf), workers)
            val_loader = DecodedEvalLoader(val_set, loading.eval_batch_size, aug.mean, aug.std, rank, world_size)
    else:
        pin = torch.device(device).type == "cuda"
        train_set = create_dataset(train, crop_transform(aug), img_size=aug.img_size)
        cpu = train_loader(train_set, bs, rank, world_size, loading.seed, workers, pin, loading.persistent_workers)
        loader = DeviceAugmentLoader(cpu, augment, device)
        if val:
            val_set = create_dataset(val, eval_tf, train_set.class_to_idx, img_size=aug.img_size, substitute=False)
            val_loader = eval_loader(val_set, loading.eval_batch_size, rank, world_size, workers, pin)
    return train_set, val_set, loader, val_loader
