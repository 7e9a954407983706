"""Data: decoding, datasets, the training transform, samplers and loaders, streaming and the GPU pipeline (imported
only when used). These re-exports are for users; the package's own modules import the submodule owning a name.
"""

from mambaout.data.datasets import (
    DIGITS,
    DigitsDataset,
    ImageDataset,
    create_dataset,
    folder_classes,
    imagenet_class_map,
    resolve_split,
)
from mambaout.data.image import IMAGENET_MEAN, IMAGENET_STD, eval_transform, load_image, to_rgb
from mambaout.data.loaders import ShardSampler, collate_readable, eval_loader, num_steps, train_loader
from mambaout.data.transforms import build_train_transform, fix_posterize, safe_posterize

__all__ = [
    "DIGITS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DigitsDataset",
    "ImageDataset",
    "ShardSampler",
    "build_train_transform",
    "collate_readable",
    "create_dataset",
    "eval_loader",
    "eval_transform",
    "fix_posterize",
    "folder_classes",
    "imagenet_class_map",
    "load_image",
    "num_steps",
    "resolve_split",
    "safe_posterize",
    "to_rgb",
    "train_loader",
]
