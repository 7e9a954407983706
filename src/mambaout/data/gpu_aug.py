"""The training augmentation on the device, batched, every random choice drawn per sample (`GpuAugment`; the steps
and the CPU ops they reproduce, each held equal by tests/test_gpu_aug.py, are listed in docs/data.md).

Images are float32 `[B, 3, H, W]` holding integers 0..255 until normalisation, rounded where PIL rounds its uint8
images, so LUT ops see the same levels as on the CPU. No op reads a device tensor on the host: a sample that did not
draw an op gets its identity parameters (an identity LUT, a blend factor of 1, an identity affine matrix).
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
    """A small constant tensor on `device`, made once (each `torch.tensor(..., device='cuda')` is a host sync)."""
    return torch.tensor(values, device=device)


# --- RandAugment policy ----------------------------------------------------------------------------------------------

# timm's op lists for `rand-...` (inc0) and `rand-...-inc1`, in timm's order (the op index is drawn uniformly)
RAND_OPS = tuple(
    "AutoContrast Equalize Invert Rotate Posterize Solarize SolarizeAdd Color Contrast Brightness Sharpness ShearX "
    "ShearY TranslateXRel TranslateYRel".split()
)
_INCREASING = {"Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness"}
RAND_OPS_INCREASING = tuple(f"{op}Increasing" if op in _INCREASING else op for op in RAND_OPS)
# ops that are a per-channel lookup table of the image's own levels (and their Increasing variants)
LUT_OPS = ("AutoContrast", "Equalize", "Invert", "Posterize", "Solarize", "SolarizeAdd", "Contrast", "Brightness")
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


# section of a `rand-...` string -> (RandAugmentSpec field, parser of its value)
_RAND_SECTIONS = {
    "m": ("magnitude", lambda v: float(int(v))),
    "n": ("num_layers", int),
    "p": ("prob", float),
    "mstd": ("magnitude_std", lambda v: math.inf if float(v) > 100 else float(v)),
    "mmax": ("magnitude_max", lambda v: float(int(v))),
    "inc": ("ops", lambda v: RAND_OPS_INCREASING if int(v) else RAND_OPS),
}


def parse_rand_augment(spec: str) -> RandAugmentSpec:
    """`rand-m9-mstd0.5-inc1` -> RandAugmentSpec. Raises ValueError for other policies (AutoAugment, AugMix)."""
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(
            f"the gpu data pipeline implements RandAugment ('rand-...'), not {spec!r}; "
            "use --data-pipeline cpu for AutoAugment/AugMix policies"
        )
    kw: dict = dict(ops=RAND_OPS)
    for part in parts[1:]:
        match = re.fullmatch(r"([a-z]+)([\d.]+)", part)
        key, val = match.groups() if match else (part, "")
        if key not in _RAND_SECTIONS:
            raise ValueError(f"unsupported RandAugment section {part!r} in {spec!r} (known: m, n, p, mstd, mmax, inc)")
        field, parse = _RAND_SECTIONS[key]
        kw[field] = parse(val)
    return RandAugmentSpec(**kw)


# --- resampling (random resized crop) --------------------------------------------------------------------------------


def _cubic(d: torch.Tensor, a: float = -0.5) -> torch.Tensor:  # PIL's bicubic filter (a = -0.5), support 2
    d = d.abs()
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = (((d - 5) * d + 8) * d - 4) * a
    return torch.where(d < 1, near, torch.where(d < 2, far, torch.zeros_like(d)))


def resample_weights(start: torch.Tensor, length: torch.Tensor, out_size: int, in_size: int, bicubic: torch.Tensor):
    """Per-sample 1-D matrices `[B, out_size, in_size]` that crop `[start, start + length)` (`[B]` each, in input
    pixels) and resize it to `out_size` as PIL's `crop` + `resize` do: antialiased (the filter widens by the
    downscaling factor), normalised over the pixels inside the crop, bicubic (a = -0.5) where `bicubic` `[B]`."""
    start, length = start.float()[:, None, None], length.float()[:, None, None]
    scale = length / out_size  # input pixels per output pixel
    stretch = scale.clamp_min(1.0)  # downscaling widens the filter (antialiasing)
    centers = start + (torch.arange(out_size, device=start.device).float()[None, :, None] + 0.5) * scale
    pos = torch.arange(in_size, device=start.device).float()[None, None, :] + 0.5
    d = (pos - centers) / stretch  # [B, out, in]
    w = only_where(bicubic, (1 - d.abs()).clamp_min(0), lambda _, i: _cubic(d[i]))  # bilinear: PIL's triangle filter
    w = w * ((pos >= start) & (pos < start + length))
    return w / w.sum(-1, keepdim=True).clamp_min(1e-12)


def _round8(x: torch.Tensor) -> torch.Tensor:
    """Round and clip to the uint8 range, as PIL stores every intermediate image."""
    return x.round().clamp_(0, 255)


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], bicubic, flip=None):
    """Crop `images` `[B, C, H, W]` (0..255; may be a padded canvas: boxes never reach the padding) to `boxes`
    `[B, 4]` (top, left, height, width in pixels) and resize to `size` (out_h, out_w) as PIL does, returning
    `[B, C, out_h, out_w]` rounded like PIL's uint8 output. `bicubic`, `flip`: `[B]` bool, per-sample interpolation
    and horizontal mirror (folded into the matrix: free).
    """
    _, _, h, w = images.shape
    wy = resample_weights(boxes[:, 0], boxes[:, 2], size[0], h, bicubic)  # [B, out_h, H]
    wx = resample_weights(boxes[:, 1], boxes[:, 3], size[1], w, bicubic)  # [B, out_w, W]
    if flip is not None:
        wx = torch.where(flip[:, None, None], wx.flip(1), wx)
    # PIL resizes horizontally first and stores that pass as uint8, then vertically
    x = _round8(images.float() @ wx.transpose(1, 2)[:, None])  # [B, C, H, out_w]
    return _round8(wy[:, None] @ x)  # [B, C, out_h, out_w]


def _first_fit(target: torch.Tensor, ratio, h, w, strict: bool = False):
    """timm's box search, every attempt drawn at once (no host sync): boxes of area `target` `[B, attempts]` and
    log-uniform aspect w/h in `ratio`; the first that fits in (h, w) (`strict`: smaller than it) is kept. Returns
    found, top, left, height, width, each `[B, 1]` (the last attempt's box where none fits)."""
    (b, attempts), dev = target.shape, target.device
    aspect = torch.empty_like(target).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
    bw, bh = (target * aspect).sqrt().round(), (target / aspect).sqrt().round()
    ok = (bw < w) & (bh < h) if strict else (bw <= w) & (bh <= h)  # [B, attempts]
    first = torch.where(ok, torch.arange(attempts, device=dev), attempts).amin(1, keepdim=True)  # [B, 1]
    found, first = first < attempts, first.clamp_max(attempts - 1)
    bh, bw = bh.gather(1, first), bw.gather(1, first)
    top = (torch.rand(b, 1, device=dev) * (h - bh + 1)).floor()
    left = (torch.rand(b, 1, device=dev) * (w - bw + 1)).floor()
    return found, top, left, bh, bw


def random_resized_crop_boxes(sizes: torch.Tensor, scale, ratio, attempts: int = 10) -> torch.Tensor:
    """timm's `RandomResizedCropAndInterpolation.get_params` for a batch: `[B, 2]` (h, w) -> `[B, 4]` boxes, the
    first of `attempts` draws (area fraction in `scale`, aspect in `ratio`) that fits, else the centre crop."""
    h, w = sizes[:, 0:1].float(), sizes[:, 1:2].float()  # [B, 1]
    target = h * w * torch.empty(sizes.shape[0], attempts, device=sizes.device).uniform_(scale[0], scale[1])
    found, top, left, th, tw = _first_fit(target, ratio, h, w)
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


def histogram_lut(x: torch.Tensor, auto: torch.Tensor) -> torch.Tensor:
    """Per-channel LUTs `[B, C, 256]` from each image's histogram: `ImageOps.autocontrast` where `auto` `[B]` (each
    channel's [min, max] stretched to [0, 255]), else `ImageOps.equalize` (PIL's cumulative-histogram LUT); the
    identity for one-level channels."""
    idx = x.long().flatten(2)  # [B, C, H * W]
    hist = torch.zeros(*x.shape[:2], 256, device=x.device).scatter_add_(2, idx, torch.ones_like(idx, dtype=x.dtype))
    levels = torch.arange(256, device=x.device).float()
    lo = torch.where(hist > 0, levels, 256.0).amin(-1, keepdim=True)  # the lowest and highest level present
    hi = torch.where(hist > 0, levels, -1.0).amax(-1, keepdim=True)
    stretch = ((levels - lo) * (255.0 / (hi - lo).clamp_min(1))).floor().clamp(0, 255)
    step = ((hist.sum(-1, keepdim=True) - hist.gather(-1, hi.long().clamp_min(0))) / 255).floor()
    equal = ((step / 2).floor() + hist.cumsum(-1) - hist).div(step.clamp_min(1)).floor().clamp(0, 255)
    return torch.where(auto[:, None, None], torch.where(hi > lo, stretch, levels), torch.where(step > 0, equal, levels))


def warp_affine(x: torch.Tensor, matrix: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """PIL's bilinear `Image.transform(AFFINE, (a, b, c, d, e, f), fillcolor=fill)`, `matrix` `[B, 6]`: output pixel
    centre (x, y) reads the input at (a x + b y + c, d x + e y + f), interpolated (edge pixels repeat near the
    border), or `fill` `[C]` outside the image."""
    b, c, h, w = x.shape
    ys = torch.arange(h, device=x.device).float() + 0.5
    xs = torch.arange(w, device=x.device).float() + 0.5
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # [H, W]
    m = matrix[:, :, None, None]
    u = m[:, 0] * xx + m[:, 1] * yy + m[:, 2]  # [B, H, W] input x (pixel-edge units)
    v = m[:, 3] * xx + m[:, 4] * yy + m[:, 5]
    grid = torch.stack([u / w * 2 - 1, v / h * 2 - 1], -1)  # [B, H, W, 2] in grid_sample units
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
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
    """`ImageFilter.SMOOTH` (3x3 kernel [1 1 1; 1 5 1; 1 1 1] / 13), border pixels kept, as PIL's 3x3 filter: a box
    of separable shifted-slice sums (a grouped conv2d is several times slower on CPU) plus 4x the centre."""
    rows = x[:, :, :-2] + x[:, :, 1:-1] + x[:, :, 2:]  # [B, C, H-2, W]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]  # [B, C, H-2, W-2]
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = _round8((box + 4 * x[:, :, 1:-1, 1:-1]) / 13)
    return out


class RandAugmentGpu:
    """timm's RandAugment, batched: each sample draws `spec.num_layers` ops (uniformly, with replacement), each
    applied with probability `prob` at a magnitude drawn per application and, for signed ops, a random sign. `fill`:
    `[C]` 0..255 fill colour of rotate/shear/translate (timm: the mean, `round(255 * mean)`).
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

        def drew(*which):  # [B] bool: the sample drew one of `which` or (for a plain name) its Increasing variant
            picked = tuple(k for k, n in enumerate(names) if n in which or n.removesuffix("Increasing") in which)
            return torch.isin(op, const(picked, op.device))

        # Enhance factors (PIL ImageEnhance.*.enhance(factor)); 1.0 is the identity
        enhance = torch.where(
            const(tuple(n.endswith("Increasing") for n in names), x.device)[op.clamp_min(0)],
            (1.0 + sign * level * 0.9).clamp_min(0.1),  # timm: ..Increasing, 1 +- 0.9 level, kept >= 0.1
            level * 1.8 + 0.1,  # timm: plain Color/Contrast/..., 0.1 .. 1.9
        )

        # 1. ops that are a per-channel lookup table (one gather for all of them)
        levels = torch.arange(256, device=x.device).float().expand(b, c, 256)
        lut = levels.contiguous()
        if any(n in names for n in ("AutoContrast", "Equalize")):
            auto = drew("AutoContrast")
            lut = only_where(auto | drew("Equalize"), lut, lambda _, i: histogram_lut(x[i], auto[i]))
        lut = torch.where(drew("Invert")[:, None, None], 255 - levels, lut)
        bits = (level * 4).floor()  # timm: Posterize keeps int(4 level) bits, PosterizeIncreasing 4 - that
        bits = torch.where(drew("PosterizeIncreasing"), 4 - bits, bits).clamp_min(1)  # 0 bits -> 1 (safe_posterize)
        q = (2 ** (8 - bits))[:, None, None]
        lut = torch.where(drew("Posterize")[:, None, None], (levels / q).floor() * q, lut)
        thresh = (level * 256).floor().clamp_max(256)  # timm: Solarize threshold int(256 level), ..Increasing 256 -
        thresh = torch.where(drew("SolarizeIncreasing"), 256 - thresh, thresh)[:, None, None]
        lut = torch.where(drew("Solarize")[:, None, None] & (levels >= thresh), 255 - levels, lut)
        add = (level * 110).floor().clamp_max(128)[:, None, None]  # timm: SolarizeAdd adds int(110 level) below 128
        lut = torch.where(drew("SolarizeAdd")[:, None, None] & (levels < 128), (levels + add).clamp_max(255), lut)
        f = enhance[:, None, None]
        lut = torch.where(drew("Brightness")[:, None, None], (f * levels).clamp(0, 255).floor(), lut)

        def contrast_lut(_, i):
            mean = (_gray(x[i]).mean((1, 2, 3)) + 0.5).floor()[:, None, None]  # PIL: int(mean of L + 0.5)
            return (mean + f[i] * (levels[i] - mean)).clamp(0, 255).floor()

        lut = only_where(drew("Contrast"), lut, contrast_lut)
        x = only_where(drew(*LUT_OPS), x, lambda xs, i: lut[i].gather(2, xs.long().flatten(2)).view_as(xs))

        # 2. Color: blend with the grey image
        x = only_where(drew("Color"), x, lambda xs, i: _blend(_gray(xs).expand_as(xs), xs, enhance[i]))

        # 3. Sharpness: blend with the smoothed image
        x = only_where(drew("Sharpness"), x, lambda xs, i: _blend(smooth(xs), xs, enhance[i]))

        # 4. geometry: one affine warp per sample
        shear, shift = sign * level * 0.3, sign * level * 0.45  # timm: +-0.3 level, +-0.45 level of the width/height
        one, zero = torch.ones_like(mag), torch.zeros_like(mag)
        warps = {
            "Rotate": rotate_matrix(sign * level * 30, h, w),
            "ShearX": torch.stack([one, shear, zero, zero, one, zero], 1),
            "ShearY": torch.stack([one, zero, zero, shear, one, zero], 1),
            "TranslateXRel": torch.stack([one, zero, shift * w, zero, one, zero], 1),
            "TranslateYRel": torch.stack([one, zero, zero, zero, one, shift * h], 1),
        }
        matrix = const((1.0, 0.0, 0.0, 0.0, 1.0, 0.0), x.device).expand(b, 6)
        for name, m in warps.items():
            matrix = torch.where(drew(name)[:, None], m, matrix)
        fill = const(self.fill, x.device)
        return only_where(drew(*warps), x, lambda xs, i: warp_affine(xs, matrix[i], fill))


SUBSET_ON_CPU = True  # tests switch it off to run the GPU code path on CPU tensors


def only_where(sel: torch.Tensor, x: torch.Tensor, fn) -> torch.Tensor:
    """`fn(x[i], i)` for the samples where `sel` `[B]` is set; the others unchanged.

    On a GPU `fn` runs on the whole batch and `torch.where` keeps the selected rows (picking them out would need
    their count on the host, a sync per op); on the CPU only the selected rows (about 1/30 per op) are computed.
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


def random_erasing(x: torch.Tensor, prob: float, area=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), attempts: int = 10):
    """timm's `RandomErasing(mode='pixel', count=1)` for a batch: with probability `prob` per sample, one box of
    `area` fraction and log-uniform aspect (first of `attempts` draws that fits) is filled with N(0, 1) noise."""
    b, _, h, w = x.shape
    target = torch.empty(b, attempts, device=x.device).uniform_(*area) * (h * w)
    # timm's erasing draws the aspect as h/w, the crop as w/h: the inverted range gives erasing's distribution
    found, top, left, eh, ew = _first_fit(target, (1 / ratio[1], 1 / ratio[0]), h, w, strict=True)
    erase = found[:, 0] & (torch.rand(b, device=x.device) < prob)
    ys = torch.arange(h, device=x.device).float()[None, :, None]
    xs = torch.arange(w, device=x.device).float()[None, None, :]

    def erased(xb, i):
        t, l_, bh, bw = top[i, :, None], left[i, :, None], eh[i, :, None], ew[i, :, None]
        box = (ys >= t) & (ys < t + bh) & (xs >= l_) & (xs < l_ + bw)  # [b, H, W]
        return torch.where(box[:, None], torch.randn_like(xb), xb)

    return only_where(erase, x, erased)


@dataclass
class GpuAugment:
    """The whole training augmentation of a recipe on uint8 `images` `[B, C, H, W]` (a padded canvas; `sizes`
    `[B, 2]` each image's h, w) already on the device -> normalised float32 `[B, C, img_size, img_size]`.
    `crop=False` skips the random resized crop (images already cropped by CPU workers on a streamed data set)."""

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
        fields = ("img_size", "scale", "ratio", "hflip", "auto_augment", "mean", "std", "reprob")
        return cls(**{f: getattr(aug, f) for f in fields}, interpolation=aug.train_interpolation, crop=crop)

    def __call__(self, images: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
        b, dev = images.shape[0], images.device
        if self.crop:
            sizes = const(tuple(images.shape[-2:]), dev).expand(b, 2) if sizes is None else sizes.to(dev)
            boxes = random_resized_crop_boxes(sizes, self.scale, self.ratio)
            if self.interpolation == "random":
                bicubic = torch.rand(b, device=dev) < 0.5
            else:
                bicubic = torch.full((b,), self.interpolation == "bicubic", device=dev)
            flip = torch.rand(b, device=dev) < self.hflip
            x = resized_crop(images, boxes, (self.img_size, self.img_size), bicubic, flip)
        else:  # already cropped (CPU workers): only the flip is left
            x, flip = images.float(), (torch.rand(b, device=dev) < self.hflip).view(-1, 1, 1, 1)
            x = torch.where(flip, x.flip(-1), x)
        if self.rand_augment is not None:
            x = self.rand_augment(x)
        x = normalize(x, self.mean, self.std)
        return random_erasing(x, self.reprob) if self.reprob > 0 else x


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """0..255 values -> (x / 255 - mean) / std, as ToTensor + Normalize."""
    m, s = (const(tuple(v), x.device).view(1, -1, 1, 1) for v in (mean, std))
    return (x.float() / 255 - m) / s
