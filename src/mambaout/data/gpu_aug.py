"""The training augmentation on the device: batched, with every random choice drawn per sample.

The CPU pipeline (`mambaout.data.build_train_transform`: timm's transforms on PIL images in worker processes) is
the definition; this module re-implements the same recipe as tensor ops so that one GPU can augment faster than
it trains. Each op below names the PIL/timm op it reproduces, and `tests/test_gpu_aug.py` holds them equal on the
same image at the same magnitude (within interpolation rounding).

Images travel as float32 tensors `[B, 3, H, W]` holding integer values 0..255 until normalisation: every op that
PIL computes on uint8 rounds (or truncates) exactly where PIL does, so LUT ops (posterize, solarize, equalize, ...)
see the same integers as on the CPU.

No op reads a device tensor on the host: per-sample choices are masks and per-sample parameters, and ops of one
family run as one batched pass with identity parameters for the samples that did not draw them (an identity LUT,
a blend factor of 1, an identity affine matrix), so the pipeline never waits on the GPU.

Pipeline (`GpuAugment`): random resized crop (scale/ratio, random bilinear/bicubic) + horizontal flip as one
per-sample resampling matrix pair; RandAugment (`rand-mM-nN-mstdS-incI-mmaxX-pP`); normalisation; random erasing
(`pixel` mode). Mixup/CutMix stay timm's `Mixup`, which already works on device tensors.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mambaout.data.image import IMAGENET_MEAN, IMAGENET_STD
from mambaout.data.transforms import AugmentConfig


@functools.lru_cache(maxsize=256)
def const(values: tuple, device: torch.device) -> torch.Tensor:
    """A small constant tensor on `device`, made once: `torch.tensor(..., device='cuda')` is a blocking copy that
    waits for the GPU's queue, a host sync per call."""
    return torch.tensor(values, device=device)


# --- RandAugment policy ----------------------------------------------------------------------------------------------

# timm's op lists for `rand-...` (inc0) and `rand-...-inc1`, in timm's order (the op index is drawn uniformly)
RAND_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
_INCREASING = {"Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness"}
RAND_OPS_INCREASING = tuple(f"{op}Increasing" if op in _INCREASING else op for op in RAND_OPS)
# ops that are a per-channel lookup table of the image's own levels
LUT_OPS = ("AutoContrast", "Equalize", "Invert", "Posterize", "Solarize", "SolarizeAdd", "Contrast", "Brightness")
LUT_OPS += tuple(f"{op}Increasing" for op in ("Posterize", "Solarize", "Contrast", "Brightness"))
LEVEL_DENOM = 10.0  # magnitude M maps to the fraction M / 10 of each op's range


@dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed `rand-...` string (timm's format): `m` magnitude, `n` ops per image, `p` probability of each,
    `mstd` magnitude noise (inf: uniform in [0, m]), `mmax` upper clip, `inc` the increasing-severity op set."""

    ops: tuple[str, ...] = RAND_OPS_INCREASING
    magnitude: float = 10.0
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0
    magnitude_max: float = LEVEL_DENOM


def parse_rand_augment(spec: str) -> RandAugmentSpec:
    """`rand-m9-mstd0.5-inc1` -> RandAugmentSpec. Raises ValueError for other policies (AutoAugment, AugMix)."""
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(
            f"the gpu data pipeline implements RandAugment ('rand-...'), not {spec!r}; "
            "use --data-pipeline cpu for AutoAugment/AugMix policies"
        )
    kw: dict = dict(magnitude=10.0, num_layers=2, prob=0.5, magnitude_std=0.0, magnitude_max=LEVEL_DENOM)
    increasing = False
    for part in parts[1:]:
        match = re.fullmatch(r"([a-z]+)([\d.]+)", part)
        key, val = match.groups() if match else (part, "")
        if key == "m":
            kw["magnitude"] = float(int(val))
        elif key == "n":
            kw["num_layers"] = int(val)
        elif key == "p":
            kw["prob"] = float(val)
        elif key == "mstd":
            kw["magnitude_std"] = math.inf if float(val) > 100 else float(val)
        elif key == "mmax":
            kw["magnitude_max"] = float(int(val))
        elif key == "inc":
            increasing = bool(int(val))
        else:
            raise ValueError(f"unsupported RandAugment section {part!r} in {spec!r} (known: m, n, p, mstd, mmax, inc)")
    return RandAugmentSpec(ops=RAND_OPS_INCREASING if increasing else RAND_OPS, **kw)


# --- resampling (random resized crop) --------------------------------------------------------------------------------


def _triangle(d: torch.Tensor) -> torch.Tensor:  # PIL's bilinear filter, support 1
    return (1 - d.abs()).clamp_min(0)


def _cubic(d: torch.Tensor, a: float = -0.5) -> torch.Tensor:  # PIL's bicubic filter (a = -0.5), support 2
    d = d.abs()
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = (((d - 5) * d + 8) * d - 4) * a
    return torch.where(d < 1, near, torch.where(d < 2, far, torch.zeros_like(d)))


def resample_weights(start: torch.Tensor, length: torch.Tensor, out_size: int, in_size: int, bicubic: torch.Tensor):
    """Per-sample 1-D resampling matrices `[B, out_size, in_size]` that crop `[start, start + length)` and resize it
    to `out_size` the way PIL's `Image.resize` does after `crop` (antialiased: the filter widens by the
    downscaling factor; normalised over the pixels inside the crop).

    Args:
        start, length: `[B]` crop offsets and lengths in input pixels.
        bicubic: `[B]` bool, bicubic (PIL's a = -0.5 cubic) where True, bilinear elsewhere.
    """
    start, length = start.float()[:, None, None], length.float()[:, None, None]
    scale = length / out_size  # input pixels per output pixel
    stretch = scale.clamp_min(1.0)  # downscaling widens the filter (antialiasing)
    centers = start + (torch.arange(out_size, device=start.device).float()[None, :, None] + 0.5) * scale
    pos = torch.arange(in_size, device=start.device).float()[None, None, :] + 0.5
    d = (pos - centers) / stretch  # [B, out, in]
    w = only_where(bicubic, _triangle(d), lambda _, i: _cubic(d[i]))
    w = w * ((pos >= start) & (pos < start + length))
    return w / w.sum(-1, keepdim=True).clamp_min(1e-12)


def _round8(x: torch.Tensor) -> torch.Tensor:
    """Round and clip to the uint8 range, as PIL stores every intermediate image."""
    return x.round().clamp_(0, 255)


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], bicubic, flip=None):
    """Crop each image to its box and resize it to `size` (PIL semantics), optionally mirrored.

    Args:
        images: `[B, C, H, W]` 0..255 values (may be a padded canvas: boxes never reach the padding).
        boxes: `[B, 4]` (top, left, height, width) in pixels.
        size: (out_h, out_w).
        bicubic: `[B]` bool, per-sample interpolation.
        flip: `[B]` bool, mirror horizontally (folded into the resampling matrix: free).

    Returns:
        `[B, C, out_h, out_w]` rounded to integers, like PIL's uint8 output.
    """
    _, _, h, w = images.shape
    wy = resample_weights(boxes[:, 0], boxes[:, 2], size[0], h, bicubic)  # [B, out_h, H]
    wx = resample_weights(boxes[:, 1], boxes[:, 3], size[1], w, bicubic)  # [B, out_w, W]
    if flip is not None:
        wx = torch.where(flip[:, None, None], wx.flip(1), wx)
    # PIL resizes horizontally first and stores that pass as uint8, then vertically
    x = _round8(images.float() @ wx.transpose(1, 2)[:, None])  # [B, C, H, out_w]
    return _round8(wy[:, None] @ x)  # [B, C, out_h, out_w]


def random_resized_crop_boxes(sizes: torch.Tensor, scale, ratio, attempts: int = 10) -> torch.Tensor:
    """timm's `RandomResizedCropAndInterpolation.get_params` for a batch: `[B, 2]` (h, w) -> `[B, 4]` boxes.

    Up to `attempts` draws of (area fraction in `scale`, log-uniform aspect in `ratio`); the first that fits is
    kept, else the centre crop clamped to `ratio`. All attempts are drawn at once (no host sync).
    """
    b, dev = sizes.shape[0], sizes.device
    h, w = sizes[:, 0:1].float(), sizes[:, 1:2].float()  # [B, 1]
    area = h * w
    target = area * torch.empty(b, attempts, device=dev).uniform_(scale[0], scale[1])
    log_r = torch.empty(b, attempts, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = log_r.exp()
    tw = (target * aspect).sqrt().round()
    th = (target / aspect).sqrt().round()
    ok = (tw <= w) & (th <= h)  # [B, attempts]
    first = torch.where(ok, torch.arange(attempts, device=dev), attempts).amin(1, keepdim=True)  # [B, 1]
    found = first < attempts
    first = first.clamp_max(attempts - 1)
    th, tw = th.gather(1, first), tw.gather(1, first)
    top = (torch.rand(b, 1, device=dev) * (h - th + 1)).floor()
    left = (torch.rand(b, 1, device=dev) * (w - tw + 1)).floor()
    # fallback: the whole image, clamped to the ratio range, centred
    in_ratio = w / h
    fw = torch.where(in_ratio > max(ratio), (h * max(ratio)).round(), w)
    fh = torch.where(in_ratio < min(ratio), (w / min(ratio)).round(), h)
    th, tw = torch.where(found, th, fh), torch.where(found, tw, fw)
    top = torch.where(found, top, ((h - fh) / 2).floor())
    left = torch.where(found, left, ((w - fw) / 2).floor())
    return torch.cat([top, left, th, tw], 1)


# --- RandAugment ops -------------------------------------------------------------------------------------------------
# Each takes x `[B, C, H, W]` (0..255 integers) and per-sample parameters `[B]`; identity parameters leave a sample
# exactly unchanged, which is how samples that did not draw the op pass through the batched call.


def _gray(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L: (19595 R + 38470 G + 7471 B + 2^15) >> 16 (ITU-R 601-2 luma, fixed point). `[B,1,H,W]`"""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return ((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536).floor()


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's `Image.blend(degenerate, x, factor)` on uint8: degenerate + factor (x - degenerate), clipped, truncated."""
    f = factor.view(-1, 1, 1, 1)
    return (degenerate + f * (x - degenerate)).clamp(0, 255).floor()


def apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-channel lookup: `lut` `[B, C, 256]`."""
    b, c, h, w = x.shape
    idx = x.long().view(b, c, h * w)
    return lut.gather(2, idx).view(b, c, h, w)


def histogram(x: torch.Tensor) -> torch.Tensor:
    """`[B, C, 256]` pixel counts per channel."""
    b, c, h, w = x.shape
    idx = x.long().view(b, c, h * w)
    return torch.zeros(b, c, 256, device=x.device).scatter_add_(2, idx, torch.ones_like(idx, dtype=torch.float))


def lut_autocontrast(hist: torch.Tensor) -> torch.Tensor:
    """`ImageOps.autocontrast`: stretch each channel's [min, max] to [0, 255] (identity when flat)."""
    levels = torch.arange(256, device=hist.device).float()
    present = hist > 0
    lo = torch.where(present, levels, 256.0).amin(-1, keepdim=True)
    hi = torch.where(present, levels, -1.0).amax(-1, keepdim=True)
    scale = 255.0 / (hi - lo).clamp_min(1)
    lut = ((levels - lo) * scale).floor().clamp(0, 255)
    return torch.where(hi > lo, lut, levels)


def lut_equalize(hist: torch.Tensor) -> torch.Tensor:
    """`ImageOps.equalize`: PIL's cumulative-histogram LUT per channel (identity for one-level channels)."""
    levels = torch.arange(256, device=hist.device).float()
    total = hist.sum(-1, keepdim=True)
    last = torch.where(hist > 0, levels, -1.0).amax(-1, keepdim=True)  # the highest level present
    step = ((total - hist.gather(-1, last.long().clamp_min(0))) / 255).floor()
    before = hist.cumsum(-1) - hist
    lut = ((step / 2).floor() + before).div(step.clamp_min(1)).floor().clamp(0, 255)
    return torch.where(step > 0, lut, levels)


def affine_grid_pil(matrix: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Sampling grid for PIL's `Image.transform(AFFINE, (a, b, c, d, e, f))`: output pixel centre (x, y) reads the
    input at (a x + b y + c, d x + e y + f). `matrix` `[B, 6]` -> grid `[B, H, W, 2]` in grid_sample units."""
    ys = torch.arange(h, device=matrix.device).float() + 0.5
    xs = torch.arange(w, device=matrix.device).float() + 0.5
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # [H, W]
    m = matrix[:, :, None, None]
    u = m[:, 0] * xx + m[:, 1] * yy + m[:, 2]  # [B, H, W] input x (pixel-edge units)
    v = m[:, 3] * xx + m[:, 4] * yy + m[:, 5]
    return torch.stack([u / w * 2 - 1, v / h * 2 - 1], -1)


def warp_affine(x: torch.Tensor, matrix: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """PIL's bilinear AFFINE transform with `fillcolor`: a point inside the image interpolates (edge pixels repeat
    near the border), a point outside it takes `fill` `[C]`."""
    b, c, h, w = x.shape
    grid = affine_grid_pil(matrix, h, w)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    u = (grid[..., 0] + 1) * w / 2  # back to pixel-edge units
    v = (grid[..., 1] + 1) * h / 2
    inside = ((u >= 0) & (u < w) & (v >= 0) & (v < h))[:, None]
    return _round8(torch.where(inside, out, fill.view(1, c, 1, 1)))


def rotate_matrix(degrees: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """`Image.rotate(degrees)` (counter-clockwise about the centre) as PIL's inverse affine matrix `[B, 6]`."""
    a = -torch.deg2rad(degrees)
    cos, sin = a.cos(), a.sin()
    cx, cy = w / 2.0, h / 2.0
    c = cos * -cx + sin * -cy + cx
    f = -sin * -cx + cos * -cy + cy
    return torch.stack([cos, sin, c, -sin, cos, f], 1)


def smooth(x: torch.Tensor) -> torch.Tensor:
    """`ImageFilter.SMOOTH` (3x3 kernel [1 1 1; 1 5 1; 1 1 1] / 13), border pixels kept, as PIL's 3x3 filter.

    The kernel is a 3x3 box plus 4x the centre; the box is two separable sums of shifted slices (a grouped conv2d
    is several times slower on CPU)."""
    rows = x[:, :, :-2] + x[:, :, 1:-1] + x[:, :, 2:]  # [B, C, H-2, W]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]  # [B, C, H-2, W-2]
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = _round8((box + 4 * x[:, :, 1:-1, 1:-1]) / 13)
    return out


class RandAugmentGpu:
    """timm's RandAugment, batched: each sample draws `num_layers` ops (uniformly, with replacement), each applied
    with probability `prob` at a magnitude drawn per application (normal around `magnitude`, clipped to
    [0, magnitude_max]) and, for signed ops, a random sign.

    Args:
        spec: A `RandAugmentSpec` or a `rand-...` string.
        fill: `[C]` 0..255 fill colour of rotate/shear/translate (timm: the mean, `round(255 * mean)`).
    """

    def __init__(self, spec: RandAugmentSpec | str, fill=(124, 116, 104)):
        self.spec = parse_rand_augment(spec) if isinstance(spec, str) else spec
        self.fill = tuple(float(v) for v in fill)

    def sample(self, b: int, device) -> dict:
        """Per-sample choices for every layer: op index (-1: none), magnitude and sign, each `[layers, B]`."""
        s, n = self.spec, self.spec.num_layers
        op = torch.randint(len(s.ops), (n, b), device=device)
        op = torch.where(torch.rand(n, b, device=device) < s.prob, op, -1)
        if math.isinf(s.magnitude_std):
            mag = torch.rand(n, b, device=device) * s.magnitude
        else:
            mag = s.magnitude + s.magnitude_std * torch.randn(n, b, device=device)
        mag = mag.clamp(0, s.magnitude_max)
        sign = torch.where(torch.rand(n, b, device=device) > 0.5, -1.0, 1.0)
        return dict(op=op, magnitude=mag, sign=sign)

    def __call__(self, x: torch.Tensor, params: dict | None = None) -> torch.Tensor:
        params = params or self.sample(x.shape[0], x.device)
        for layer in range(params["op"].shape[0]):
            x = self.apply_layer(x, params["op"][layer], params["magnitude"][layer], params["sign"][layer])
        return x

    def apply_layer(self, x: torch.Tensor, op: torch.Tensor, mag: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
        """One op per sample: `op` `[B]` indexes `spec.ops` (-1: none); `mag`, `sign` `[B]`."""
        names = self.spec.ops
        b, c, h, w = x.shape
        level = mag / LEVEL_DENOM

        def drew(*which):
            sel = torch.zeros_like(op, dtype=torch.bool)
            for name in which:
                if name in names:
                    sel |= op == names.index(name)
            return sel

        # Enhance factors (PIL ImageEnhance.*.enhance(factor)); 1.0 is the identity
        enhance = torch.where(
            const(tuple(n.endswith("Increasing") for n in names), x.device)[op.clamp_min(0)],
            (1.0 + sign * level * 0.9).clamp_min(0.1),  # timm: ..Increasing, 1 +- 0.9 level, kept >= 0.1
            level * 1.8 + 0.1,  # timm: plain Color/Contrast/..., 0.1 .. 1.9
        )
        ones = torch.ones_like(mag)

        # 1. ops that are a per-channel lookup table (one gather for all of them)
        levels = torch.arange(256, device=x.device).float().expand(b, c, 256)
        lut = levels.contiguous()
        if any(n in names for n in ("AutoContrast", "Equalize")):
            auto = drew("AutoContrast")

            def from_histogram(luts, i):
                hist = histogram(x[i])
                return torch.where(auto[i][:, None, None], lut_autocontrast(hist), lut_equalize(hist))

            lut = only_where(auto | drew("Equalize"), lut, from_histogram)
        lut = torch.where(drew("Invert")[:, None, None], 255 - levels, lut)
        bits = (level * 4).floor()  # timm: Posterize keeps int(4 level) bits, PosterizeIncreasing 4 - that
        bits = torch.where(drew("PosterizeIncreasing"), 4 - bits, bits).clamp_min(1)  # 0 bits -> 1 (safe_posterize)
        q = (2 ** (8 - bits))[:, None, None]
        lut = torch.where(drew("Posterize", "PosterizeIncreasing")[:, None, None], (levels / q).floor() * q, lut)
        thresh = (level * 256).floor().clamp_max(256)  # timm: Solarize threshold int(256 level), ..Increasing 256 -
        thresh = torch.where(drew("SolarizeIncreasing"), 256 - thresh, thresh)[:, None, None]
        lut = torch.where(drew("Solarize", "SolarizeIncreasing")[:, None, None] & (levels >= thresh), 255 - levels, lut)
        add = (level * 110).floor().clamp_max(128)[:, None, None]  # timm: SolarizeAdd adds int(110 level) below 128
        lut = torch.where(drew("SolarizeAdd")[:, None, None] & (levels < 128), (levels + add).clamp_max(255), lut)
        f = enhance[:, None, None]
        lut = torch.where(
            drew("Brightness", "BrightnessIncreasing")[:, None, None], (f * levels).clamp(0, 255).floor(), lut
        )
        contrast = drew("Contrast", "ContrastIncreasing")

        def contrast_lut(luts, i):
            mean = (_gray(x[i]).mean((1, 2, 3)) + 0.5).floor()[:, None, None]  # PIL: int(mean of L + 0.5)
            return (mean + f[i] * (levels[i] - mean)).clamp(0, 255).floor()

        lut = only_where(contrast, lut, contrast_lut)
        lut_op = drew(*(n for n in names if n in LUT_OPS))
        x = only_where(lut_op, x, lambda xs, i: apply_lut(xs, lut[i]))

        # 2. Color: blend with the grey image
        color = drew("Color", "ColorIncreasing")
        x = only_where(color, x, lambda xs, i: _blend(_gray(xs).expand_as(xs), xs, enhance[i]))

        # 3. Sharpness: blend with the smoothed image
        sharp = drew("Sharpness", "SharpnessIncreasing")
        x = only_where(sharp, x, lambda xs, i: _blend(smooth(xs), xs, enhance[i]))

        # 4. geometry: one affine warp per sample
        eye = const((1.0, 0.0, 0.0, 0.0, 1.0, 0.0), x.device).expand(b, 6)
        matrix = torch.where(drew("Rotate")[:, None], rotate_matrix(sign * level * 30, h, w), eye)
        shear = sign * level * 0.3  # timm: +-0.3 level
        zero = torch.zeros_like(shear)
        matrix = torch.where(drew("ShearX")[:, None], torch.stack([ones, shear, zero, zero, ones, zero], 1), matrix)
        matrix = torch.where(drew("ShearY")[:, None], torch.stack([ones, zero, zero, shear, ones, zero], 1), matrix)
        shift = sign * level * 0.45  # timm: TranslateXRel/YRel, +-0.45 level of the width/height
        tx = torch.stack([ones, zero, shift * w, zero, ones, zero], 1)
        ty = torch.stack([ones, zero, zero, zero, ones, shift * h], 1)
        matrix = torch.where(drew("TranslateXRel")[:, None], tx, matrix)
        matrix = torch.where(drew("TranslateYRel")[:, None], ty, matrix)
        geo = drew("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
        fill = const(self.fill, x.device)
        return only_where(geo, x, lambda xs, i: warp_affine(xs, matrix[i], fill))


SUBSET_ON_CPU = True  # tests switch it off to run the GPU code path on CPU tensors


def only_where(sel: torch.Tensor, x: torch.Tensor, fn) -> torch.Tensor:
    """`fn(x[i], i)` for the samples where `sel` `[B]` is set; the others unchanged.

    On a GPU `fn` runs on the whole batch and `torch.where` keeps the selected rows: picking the rows out would need
    their count on the host, a sync per op. On the CPU that count is free, and computing only the selected rows
    saves most of the work (each op is drawn by about 1/30 of the samples).
    """
    if x.device.type != "cpu" or not SUBSET_ON_CPU:
        return torch.where(sel.view(-1, *[1] * (x.ndim - 1)), fn(x, slice(None)), x)
    idx = sel.nonzero().flatten()
    if idx.numel() == 0:
        return x
    out = x.clone()
    out[idx] = fn(x[idx], idx)
    return out


# --- normalisation and random erasing --------------------------------------------------------------------------------


def random_erasing(
    x: torch.Tensor,
    prob: float,
    area=(0.02, 1 / 3),
    ratio=(0.3, 1 / 0.3),
    attempts: int = 10,
) -> torch.Tensor:
    """timm's `RandomErasing(mode='pixel', count=1)` for a batch: with probability `prob` per sample, one box of
    `area` fraction and log-uniform aspect (first of `attempts` draws that fits) is filled with N(0, 1) noise."""
    b, _, h, w = x.shape
    dev = x.device
    target = torch.empty(b, attempts, device=dev).uniform_(*area) * (h * w)
    aspect = torch.empty(b, attempts, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
    eh = (target * aspect).sqrt().round()
    ew = (target / aspect).sqrt().round()
    ok = (ew < w) & (eh < h)
    first = torch.where(ok, torch.arange(attempts, device=dev), attempts).amin(1, keepdim=True)
    erase = (first[:, 0] < attempts) & (torch.rand(b, device=dev) < prob)
    first = first.clamp_max(attempts - 1)
    eh, ew = eh.gather(1, first), ew.gather(1, first)  # [B, 1]
    top = (torch.rand(b, 1, device=dev) * (h - eh + 1)).floor()
    left = (torch.rand(b, 1, device=dev) * (w - ew + 1)).floor()
    ys = torch.arange(h, device=dev).float()[None, :, None]
    xs = torch.arange(w, device=dev).float()[None, None, :]

    def erased(xb, i):
        t, l_, bh, bw = top[i, :, None], left[i, :, None], eh[i, :, None], ew[i, :, None]
        box = (ys >= t) & (ys < t + bh) & (xs >= l_) & (xs < l_ + bw)  # [b, H, W]
        return torch.where(box[:, None], torch.randn_like(xb), xb)

    return only_where(erase, x, erased)


@dataclass
class GpuAugment:
    """The whole training augmentation of a recipe, on a batch of uint8 images already on the device.

    Call with `images` `[B, C, H, W]` uint8 (a padded canvas) and `sizes` `[B, 2]` (each image's h, w); returns
    normalised float32 `[B, C, img_size, img_size]`. `crop=False` skips the random resized crop and flip (images
    already cropped, e.g. by CPU workers on a streamed data set).
    """

    img_size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    interpolation: str = "random"  # random (bilinear or bicubic per sample), bilinear, bicubic
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    reprob: float = 0.25
    crop: bool = True

    def __post_init__(self):
        if self.interpolation not in ("random", "bilinear", "bicubic"):
            raise ValueError(
                f"gpu pipeline interpolation must be random, bilinear or bicubic, got {self.interpolation!r}"
            )
        fill = tuple(min(255, round(255 * m)) for m in self.mean)  # timm's RandAugment fill colour
        self.rand_augment = RandAugmentGpu(self.auto_augment, fill) if self.auto_augment else None

    @classmethod
    def from_config(cls, aug: AugmentConfig, crop: bool = True) -> GpuAugment:
        """From the same `AugmentConfig` the CPU transform reads; ValueError for what the GPU version lacks."""
        if aug.remode != "pixel" or aug.recount != 1:
            raise ValueError("the gpu data pipeline implements random erasing with remode: pixel, recount: 1")
        if not aug.auto_augment and aug.color_jitter:
            raise ValueError(
                "the gpu data pipeline has no colour jitter (timm applies it only without RandAugment): "
                "set color_jitter: 0, use an auto_augment 'rand-...' policy, or --data-pipeline cpu"
            )
        return cls(
            img_size=aug.img_size,
            scale=aug.scale,
            ratio=aug.ratio,
            hflip=aug.hflip,
            interpolation=aug.train_interpolation,
            auto_augment=aug.auto_augment,
            mean=aug.mean,
            std=aug.std,
            reprob=aug.reprob,
            crop=crop,
        )

    def crop_and_flip(self, images: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        b, dev = images.shape[0], images.device
        boxes = random_resized_crop_boxes(sizes.to(dev), self.scale, self.ratio)
        if self.interpolation == "random":
            bicubic = torch.rand(b, device=dev) < 0.5
        else:
            bicubic = torch.full((b,), self.interpolation == "bicubic", device=dev)
        flip = torch.rand(b, device=dev) < self.hflip
        return resized_crop(images, boxes, (self.img_size, self.img_size), bicubic, flip)

    def __call__(self, images: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
        if self.crop:
            if sizes is None:
                sizes = const(tuple(images.shape[-2:]), images.device).expand(images.shape[0], 2)
            x = self.crop_and_flip(images, sizes)
        else:  # already cropped (CPU workers): only the flip is left
            x = images.float()
            flip = (torch.rand(x.shape[0], device=x.device) < self.hflip).view(-1, 1, 1, 1)
            x = torch.where(flip, x.flip(-1), x)
        if self.rand_augment is not None:
            x = self.rand_augment(x)
        x = normalize(x, self.mean, self.std)
        if self.reprob > 0:
            x = random_erasing(x, self.reprob)
        return x


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """0..255 values -> (x / 255 - mean) / std, as ToTensor + Normalize."""
    m = const(tuple(mean), x.device).view(1, -1, 1, 1)
    s = const(tuple(std), x.device).view(1, -1, 1, 1)
    return (x.float() / 255 - m) / s
