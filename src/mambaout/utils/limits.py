"""Sane bounds on what a user or a file can ask of the process: image sizes, decoding, checkpoint metadata, so a
typo (`--img-size 10000`) or a hostile file (an `eval_config.input_size` of 20000, a 15000 x 15000 PNG) ends in one
clear message instead of an out-of-memory kill."""

from __future__ import annotations

import math
import os

from mambaout.utils import checks

# Network input side in pixels. MambaOut downsamples by 32: at 16 px the last two stages see one pixel each. 2048 is
# 9x the pixels of 672, the largest resolution backbones are commonly fine-tuned at; more is almost surely a typo.
MIN_IMG_SIZE = 16
MAX_IMG_SIZE = 2048
# Decode budget: larger images are refused before decoding. 64 Mpx (8000 x 8000) is 192 MB of RGB, above phone and
# DSLR photos; raise it with MAMBAOUT_MAX_PIXELS for gigapixel scans.
DEFAULT_MAX_PIXELS = 64_000_000

SEED_MAX = 2**63 - 1  # torch.manual_seed's signed 64-bit range
MAX_NUM_CLASSES = 100_000  # ImageNet-22k has 21,841; more than this is not a classifier anyone trains here
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos", "random")


def max_pixels() -> int:
    """The decode budget in pixels: `$MAMBAOUT_MAX_PIXELS` when set, else `DEFAULT_MAX_PIXELS`."""
    value = os.environ.get("MAMBAOUT_MAX_PIXELS")
    if not value:
        return DEFAULT_MAX_PIXELS
    try:
        pixels = int(float(value))
    except ValueError:
        raise ValueError(f"MAMBAOUT_MAX_PIXELS must be a number of pixels, got {value!r}") from None
    if pixels < 1:
        raise ValueError(f"MAMBAOUT_MAX_PIXELS must be positive, got {value!r}")
    return pixels


def check_pixels(width: int, height: int, name: str) -> None:
    """Raise ValueError when a `width x height` image is over the decode budget (checked before decoding)."""
    budget = max_pixels()
    if width * height > budget:
        raise ValueError(
            f"{name} is {width} x {height} = {width * height / 1e6:.0f} Mpx, over the decode budget of "
            f"{budget / 1e6:.0f} Mpx; downscale it, or raise MAMBAOUT_MAX_PIXELS"
        )


def check_img_size(value, what: str = "--img-size") -> int:
    """`value` as an int in [MIN_IMG_SIZE, MAX_IMG_SIZE], else ValueError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_IMG_SIZE <= value <= MAX_IMG_SIZE:
        raise ValueError(
            f"{what} must be an integer from {MIN_IMG_SIZE} to {MAX_IMG_SIZE} pixels, got {value!r} "
            "(MambaOut downsamples by 32; memory grows with the square of the side)"
        )
    return value


def check_crop_pct(value, what: str = "--crop-pct") -> float:
    """A centre-crop fraction in (0, 1]: the eval resize is `img_size / crop_pct`, so 0 divides by zero."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.05 <= value <= 1.0:
        raise ValueError(f"{what} must be a fraction in [0.05, 1] (e.g. 0.875 or 1.0), got {value!r}")
    return float(value)


def check_eval_config(cfg: dict, source: str) -> dict:
    """Check a checkpoint's `eval_config` (input size, crop, interpolation, mean/std) before anything is allocated;
    a ValueError names `source` (a checkpoint path), the field, the value and the bound."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{source}: eval_config must be a mapping, got {type(cfg).__name__}")
    where = f"{source}: eval_config"
    if "input_size" in cfg:
        size = cfg["input_size"]
        if not isinstance(size, (list, tuple)) or len(size) != 3 or size[0] not in (1, 3, 4):
            raise ValueError(f"{where}.input_size must be [channels (1, 3 or 4), height, width], got {size!r}")
        for side in size[1:]:
            check_img_size(side, f"{where}.input_size")
    if "crop_pct" in cfg:
        check_crop_pct(cfg["crop_pct"], f"{where}.crop_pct")
    if "interpolation" in cfg and cfg["interpolation"] not in INTERPOLATIONS:
        raise ValueError(
            f"{where}.interpolation must be one of {', '.join(INTERPOLATIONS)}, got {cfg['interpolation']!r}"
        )
    for key in ("mean", "std"):
        v = cfg.get(key, [1.0])  # absent: nothing to check
        ok = isinstance(v, (list, tuple)) and len(v) in (1, 3, 4)
        ok = ok and all(isinstance(x, (int, float)) and math.isfinite(x) and abs(x) <= 1e3 for x in v)
        if not ok or (key == "std" and not all(x > 0 for x in v)):
            raise ValueError(f"{where}.{key} must be 3 finite numbers{' > 0' if key == 'std' else ''}, got {v!r}")
    return cfg


def _odd_kernel(v):
    return v if checks.is_int(v) and 1 <= v <= 31 and v % 2 else checks.BAD


# MambaOut's architecture arguments as a config or a checkpoint's metadata may give them (plain data only), with
# what each may hold. Keys not listed go to the model, which refuses what it does not take in one line.
MODEL_KWARGS = {
    "depths": checks.integers(1, 8, 0, 128),
    "dims": checks.integers(1, 8, 1, 16384),
    "in_chans": checks.integer(1, 64),
    "expansion_ratio": checks.number(0, 16, lo_open=True),
    "kernel_size": checks.Check("must be an odd integer in [1, 31]", _odd_kernel),
    "conv_ratio": checks.number(0, 1),
    "ls_init_value": checks.number(0, 100, optional=True),
    "stem_mid_norm": checks.boolean(),
    "downsample_norm_first": checks.boolean(),
    "head_mlp_ratio": checks.number(0, 16),
    "head_mlp_norm": checks.boolean(),
    "drop_path_rate": checks.number(0, 1, hi_open=True),
    "drop_rate": checks.number(0, 1, hi_open=True),
    "global_pool": checks.choice("avg", ""),
    "act_layer": checks.text(max_len=40),
}
CALLABLE_KWARGS = ("norm_layer", "block_layer")  # Python callables: no file or config can hold one


def check_model_kwargs(kwargs, source: str = "", name: str = "model_kwargs") -> dict:
    """Bounds and types of the architecture a config or a checkpoint's metadata asks for, checked before a module
    is built (a hostile `depths`/`dims` would build millions of modules first): one line
    `[source: ]name.key=value: what is allowed`."""
    where = f"{source}: " if source else ""
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ValueError(f"{where}{name} must be a mapping of argument: value, got {type(kwargs).__name__}")
    n = kwargs.get("num_classes", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_NUM_CLASSES:
        raise ValueError(f"{where}{name}: num_classes must be an integer from 1 to {MAX_NUM_CLASSES}, got {n!r}")
    for key, value in kwargs.items():
        if key in CALLABLE_KWARGS:
            raise ValueError(f"{where}{name}.{key}: a Python callable, which a config or a weights file cannot give")
        check = MODEL_KWARGS.get(key)
        if check is not None:
            try:
                check(value)
            except ValueError as e:
                raise ValueError(f"{where}{name}.{key}={checks.show(value)}: {e}") from None
    return kwargs
