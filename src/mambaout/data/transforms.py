"""The training augmentation: timm's `create_transform` with the recipe's settings, and the Posterize fix.

timm 1.0.31's `inc1` RandAugment can ask Pillow for 0 posterize bits, which Pillow >= 13 rejects with a
`ValueError` mid-epoch; `build_train_transform` swaps in `safe_posterize`, which clamps to 1 bit.
"""

from __future__ import annotations

from PIL import Image, ImageOps


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
