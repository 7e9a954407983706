"""Images in, tensors out: the one way every path of the package (training, validate, predict, the demo, export's
metadata) decodes an image and applies an eval transform, so the same file gives the same tensor on every path.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mambaout.utils.files import special_kind
from mambaout.utils.limits import check_eval_config, check_pixels, max_pixels
from mambaout.utils.text import printable

logger = logging.getLogger("mambaout")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The settings that define an eval transform (a `pretrained_cfg` / checkpoint `eval_config` holds them).
EVAL_KEYS = ("input_size", "crop_pct", "interpolation", "mean", "std", "crop_mode")

# Transparent pixels are composited onto white, the background a viewer shows for most transparent photos.
_BACKGROUND = (255, 255, 255)


def load_image(source) -> Image.Image:
    """Any image (a path, a binary file object, encoded bytes, a PIL image or an HWC/HW uint8 array) as 8-bit RGB
    (`to_rgb`), EXIF orientation applied as a photo viewer would. ValueError, naming the source, for what is not a
    decodable image or has more pixels than the decode budget (`mambaout.utils.limits.max_pixels`), which is refused
    from its header, before its pixels are decoded."""
    if isinstance(source, np.ndarray):
        img = Image.fromarray(source)
    elif isinstance(source, Image.Image):
        img = source
    else:
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        name = source_name(source)
        if isinstance(source, (str, os.PathLike)) and special_kind(source):
            # a FIFO would block the read forever, a device read without end: never opened
            raise ValueError(f"{name} is {special_kind(source)}, not an image file: not opened")
        try:
            img = Image.open(fp)  # reads the header only
            check_pixels(*img.size, name)
            if img.format == "JPEG":
                _check_jpeg_size(img, name)
            img.load()  # decode now, so a truncated file fails here and not inside the transform
        except Image.DecompressionBombError as e:  # PIL's own check (2 x MAX_IMAGE_PIXELS) fires inside open()
            raise ValueError(
                f"{name} is over the decode budget of {max_pixels() / 1e6:.0f} Mpx ({e}); downscale it"
            ) from e
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ValueError(f"cannot read {name} as an image ({type(e).__name__}: {e})") from e
    with contextlib.suppress(Exception):  # a broken EXIF block must not lose an otherwise good image
        img = ImageOps.exif_transpose(img)
    return to_rgb(img)


# A Huffman-coded JPEG spends at least one bit on each 8 x 8 block's DC coefficient, so its data holds at least one
# byte per 512 pixels. A file with far fewer bytes than that cannot fill the size its header claims: libjpeg fills
# the rest with grey and says nothing, so the image would be scored as if it were whole.
_JPEG_MAX_PIXELS_PER_BYTE = 1024


def _check_jpeg_size(img: Image.Image, name: str) -> None:
    try:  # the size in bytes of the file PIL reads (opened from a path, or the one given)
        pos, size = img.fp.tell(), img.fp.seek(0, io.SEEK_END)
        img.fp.seek(pos)
    except (OSError, AttributeError, ValueError):
        return  # cannot be told
    if size and img.size[0] * img.size[1] > _JPEG_MAX_PIXELS_PER_BYTE * size:
        msg = "%s claims %d x %d pixels in its header but holds only %d bytes, too few to fill them: it is truncated "
        logger.warning(msg + "or forged, and decodes mostly as grey filler", printable(name), *img.size, size)


def source_name(source) -> str:
    """A path as itself, a file by its name, anything else as `<type>` (`<bytes>`, `<ndarray>`, ...)."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return str(getattr(source, "name", None) or f"<{type(source).__name__}>")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as RGB: palette (with or without transparency), grey, 16-bit and float grey, CMYK, YCbCr, LAB;
    alpha is composited onto white rather than dropped, so transparent pixels do not turn black."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        # a palette may carry transparency in its info; RGBA keeps it for the composite below
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16/32-bit and float grey: stretch the used range onto 8 bits (a plain convert('L') clips at 255)
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.round().astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, _BACKGROUND)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, HSV


@dataclass(frozen=True)
class EvalSettings:
    """How a model's inputs are prepared for evaluation: timm's eval transform (resize to `side / crop_pct`, centre
    crop or squash, normalise). One type for what checkpoints record (`eval_config`), training writes, export
    stores, and validate, predict and the demo apply; `from_dict` checks every field (`mambaout.utils.limits`)."""

    input_size: tuple = (3, 224, 224)
    crop_pct: float = 1.0
    interpolation: str = "bicubic"
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    crop_mode: str = "center"

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "eval_config") -> EvalSettings:
        """The settings among `cfg`'s keys (others ignored; missing ones take the defaults), checked."""
        check_eval_config(cfg, source)
        known = {k: tuple(cfg[k]) if k in ("input_size", "mean", "std") else cfg[k] for k in EVAL_KEYS if k in cfg}
        return cls(**known)

    def to_dict(self) -> dict:
        """As checkpoints and exported files record it (lists, JSON-ready)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(self).items()}

    def transform(self, img_size: int | None = None, crop_pct: float | None = None):
        """timm's eval transform; `img_size` and `crop_pct` override the recorded ones."""
        from timm.data import create_transform

        overrides = dict(
            input_size=img_size or self.input_size, crop_pct=self.crop_pct if crop_pct is None else crop_pct
        )
        return create_transform(is_training=False, **{**vars(self), **overrides})  # the fields are its keywords


def eval_transform(cfg: dict | EvalSettings, img_size: int | None = None, crop_pct: float | None = None):
    """The eval transform of `EvalSettings`, a `pretrained_cfg` or a checkpoint `eval_config`."""
    settings = cfg if isinstance(cfg, EvalSettings) else EvalSettings.from_dict(cfg)
    return settings.transform(img_size, crop_pct)
