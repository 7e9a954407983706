"""The training augmentation: its settings (`AugmentConfig`, read by this CPU transform and by
`gpu_aug.GpuAugment.from_config` alike), timm's `create_transform` with them, and the Posterize fix: timm 1.0.31's
`inc1` RandAugment can ask Pillow for 0 posterize bits, which Pillow >= 13 rejects mid-epoch; `safe_posterize`
clamps to 1 bit.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from PIL import Image, ImageOps

from mambaout.data.image import IMAGENET_MEAN, IMAGENET_STD
from mambaout.utils import checks as C
from mambaout.utils.limits import INTERPOLATIONS, MAX_IMG_SIZE, MIN_IMG_SIZE

_AUTO_AUGMENT = C.text(optional=True, max_len=200)
_AUTO_AUGMENT.bad = tuple(v for v in _AUTO_AUGMENT.bad if v != "")  # '' means none, as 'none' does


@dataclass(frozen=True)
class AugmentConfig:
    """The training augmentation of the official recipe (paper Sec. 4.1: RandAugment, random erasing; timm's
    random resized crop), at `img_size` px. Mixup/CutMix live in the trainer's `MixupConfig`."""

    img_size: int = C.setting(224, C.integer(MIN_IMG_SIZE, MAX_IMG_SIZE), "training and eval resolution (px)")
    scale: tuple = C.setting(
        (0.08, 1.0), C.numbers(2, 0.0, 1.0, lo_open=True, increasing=True), "random resized crop: area fraction range"
    )
    ratio: tuple = C.setting(
        (3 / 4, 4 / 3),
        C.numbers(2, 0.0, 100.0, lo_open=True, increasing=True),
        "random resized crop: aspect ratio range",
    )
    hflip: float = C.setting(0.5, C.number(0.0, 1.0), "horizontal flip probability")
    color_jitter: float | None = C.setting(
        0.4, C.number(0.0, 10.0, optional=True), "color jitter strength (timm ignores it under RandAugment)"
    )
    auto_augment: str | None = C.setting(
        "rand-m9-mstd0.5-inc1",
        _AUTO_AUGMENT,
        "timm RandAugment string, e.g. rand-m9-mstd0.5-inc1; none to disable",
        flags=("--auto-augment", "--aa"),
    )
    train_interpolation: str = C.setting(
        "random", C.choice(*INTERPOLATIONS), "resize interpolation in training (random: one per image)"
    )
    reprob: float = C.setting(0.25, C.number(0.0, 1.0), "random erasing probability")
    remode: str = C.setting("pixel", C.choice("const", "rand", "pixel"), "random erasing fill")
    recount: int = C.setting(1, C.integer(1, 100), "random erasing: regions per image")
    mean: tuple = C.setting(tuple(IMAGENET_MEAN), C.numbers(3, -1e3, 1e3), "normalisation mean (RGB)")
    std: tuple = C.setting(tuple(IMAGENET_STD), C.numbers(3, 0.0, 1e3, lo_open=True), "normalisation std (RGB)")

    def __post_init__(self):
        if isinstance(self.auto_augment, str) and self.auto_augment.lower() in ("none", ""):
            object.__setattr__(self, "auto_augment", None)
        C.validate_fields(self)
        if self.auto_augment:
            # build the augmentation once now, so a bad RandAugment string fails here and not in the first batch
            try:
                build_train_transform(self)
            except Exception as e:  # timm raises AssertionError/KeyError/ValueError for strings it cannot parse
                raise ValueError(
                    f"auto_augment={C.show(self.auto_augment)}: not a timm augmentation string "
                    f"({type(e).__name__}: {C.show(str(e))}); use e.g. rand-m9-mstd0.5-inc1, augmix-m5-w3, original "
                    "or none"
                ) from None


def safe_posterize(img: Image.Image, bits_to_keep: int, **__) -> Image.Image:
    """Posterize that accepts RandAugment's full magnitude range: 0 bits (rejected by Pillow >= 13) becomes 1."""
    bits = int(bits_to_keep)
    return img if bits >= 8 else ImageOps.posterize(img, max(1, bits))


def fix_posterize(transform) -> int:
    """Swap `safe_posterize` into every Posterize op of the RandAugment/AutoAugment inside `transform`; returns how
    many ops were patched (0 when the transform has no auto-augmentation)."""
    patched, stack = 0, [transform]
    while stack:
        t = stack.pop()
        stack.extend(getattr(t, "transforms", []) or [])
        # RandAugment holds a list of ops, AutoAugment a list of sub-policies of ops
        ops = list(getattr(t, "ops", []) or []) + [op for sub in getattr(t, "policy", []) or [] for op in sub]
        for op in ops:
            if "Posterize" in getattr(op, "name", ""):
                op.aug_fn = safe_posterize
                patched += 1
    return patched


# AugmentConfig fields that timm's keyword arguments name otherwise (the rest keep their names)
_TIMM_NAMES = dict(train_interpolation="interpolation", reprob="re_prob", remode="re_mode", recount="re_count")


def timm_augment_kwargs(aug: AugmentConfig) -> dict:
    """Every field but `img_size` as keyword arguments of timm's `create_transform` / `create_loader`."""
    kw = {_TIMM_NAMES.get(f.name, f.name): getattr(aug, f.name) for f in fields(aug) if f.name != "img_size"}
    return {**kw, "color_jitter": kw["color_jitter"] or 0.0}  # timm wants 0 for none


def build_train_transform(aug: AugmentConfig):
    """The training augmentation (timm's `create_transform`), with the Posterize fix applied."""
    from timm.data import create_transform

    tf = create_transform(input_size=aug.img_size, is_training=True, **timm_augment_kwargs(aug))
    fix_posterize(tf)
    return tf
