"""The gpu data pipeline: each op equals its CPU definition (timm/PIL) on the same image and magnitude, and every
random choice is drawn per sample. All on CPU tensors (the same code runs on a GPU)."""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from mambaout.data import gpu_aug as G

FILL = (124, 116, 104)  # timm's RandAugment fill for the ImageNet mean


@pytest.fixture(scope="module")
def image():
    """A 52x40 photo-like RGB image: smooth colour regions plus noise (odd size, not square)."""
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)).resize((52, 40), Image.BICUBIC)
    arr = np.clip(np.asarray(small).astype(int) + rng.integers(-20, 20, (40, 52, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def _t(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float()  # [1, 3, H, W]


def _timm_op(name: str, img, magnitude: float, seed: int):
    """timm's op at `magnitude`, its random sign drawn from `seed`; returns (image, sign it drew)."""
    import timm.data.auto_augment as A

    random.seed(seed)
    level_fn = A.LEVEL_TO_ARG[name]
    args = level_fn(magnitude, dict(translate_const=100, img_mean=FILL)) if level_fn else ()
    enhance = name.endswith("Increasing") and name[: -len("Increasing")] in (
        "Color",
        "Contrast",
        "Brightness",
        "Sharpness",
    )
    sign = -1.0 if args and args[0] < (1.0 if enhance else 0.0) else 1.0
    return A.NAME_TO_OP[name](img, *args, fillcolor=FILL, resample=Image.BILINEAR), sign


@pytest.mark.parametrize("increasing", [True, False])
@pytest.mark.parametrize("seed", [0, 1])  # seed 0 draws a negative sign, seed 1 a positive one
@pytest.mark.parametrize("magnitude", [9.0, 4.3])
def test_rand_augment_ops_match_timm(image, increasing, seed, magnitude):
    ra = G.RandAugmentGpu(f"rand-m9-mstd0.5-inc{int(increasing)}", FILL)
    x = _t(image)
    for k, name in enumerate(ra.spec.ops):
        want, sign = _timm_op(name, image, magnitude, seed)
        got = ra.apply_layer(x.clone(), torch.tensor([k]), torch.tensor([magnitude]), torch.tensor([sign]))
        diff = (got - _t(want)).abs()
        # PIL rounds in fixed point; we agree to one grey level everywhere
        assert diff.max() <= 1, (name, sign, diff.max().item())
        assert diff.mean() < 0.5, (name, sign, diff.mean().item())


def test_rand_augment_spec_is_the_official_one():
    spec = G.parse_rand_augment("rand-m9-mstd0.5-inc1")
    assert spec.ops == G.RAND_OPS_INCREASING and len(spec.ops) == 15
    assert (spec.magnitude, spec.num_layers, spec.prob, spec.magnitude_std) == (9, 2, 0.5, 0.5)
    from timm.data.auto_augment import rand_augment_transform

    timm_ra = rand_augment_transform("rand-m9-mstd0.5-inc1", {})
    assert tuple(op.name for op in timm_ra.ops) == spec.ops and timm_ra.num_layers == spec.num_layers
    assert all(op.prob == spec.prob and op.magnitude == spec.magnitude for op in timm_ra.ops)
    with pytest.raises(ValueError, match="RandAugment"):
        G.parse_rand_augment("augmix-m5")


@pytest.mark.parametrize("bicubic", [False, True])
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize(
    "box, size",
    [((3, 5, 30, 41), (64, 64)), ((0, 0, 40, 52), (24, 24)), ((7, 2, 17, 33), (20, 20)), ((0, 0, 40, 52), (40, 52))],
)
def test_resized_crop_matches_pil(image, box, size, bicubic, flip):
    """Crop then resize (upsampling and antialiased downsampling), as torchvision's resized_crop on PIL images."""
    top, left, h, w = box
    want = image.crop((left, top, left + w, top + h)).resize(size[::-1], Image.BICUBIC if bicubic else Image.BILINEAR)
    if flip:
        want = want.transpose(Image.FLIP_LEFT_RIGHT)
    got = G.resized_crop(_t(image), torch.tensor([box]), size, torch.tensor([bicubic]), torch.tensor([flip]))
    assert (got - _t(want)).abs().max() <= 1


def test_resized_crop_ignores_canvas_padding(image):
    """Images of several sizes share one padded canvas: the padding never leaks into a crop."""
    x = _t(image)
    canvas = torch.full((1, 3, 60, 70), 255.0)
    canvas[:, :, :40, :52] = x
    box = torch.tensor([[0, 0, 40, 52]])
    args = (box, (33, 33), torch.tensor([True]), torch.tensor([False]))
    assert torch.equal(G.resized_crop(canvas, *args), G.resized_crop(x, *args))


def test_crop_boxes_follow_timm_distribution():
    from timm.data.transforms import RandomResizedCropAndInterpolation

    scale, ratio, n = (0.08, 1.0), (3 / 4, 4 / 3), 4000
    torch.manual_seed(0)
    boxes = G.random_resized_crop_boxes(torch.tensor([[40, 52]]).expand(n, 2), scale, ratio)
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 40).all() and (left + w <= 52).all()
    random.seed(0)
    ref = torch.tensor(
        [RandomResizedCropAndInterpolation.get_params(Image.new("RGB", (52, 40)), scale, ratio) for _ in range(n)]
    )
    for ours, theirs in ((h * w, ref[:, 2] * ref[:, 3]), ((w / h).log(), (ref[:, 3] / ref[:, 2]).log())):
        assert ours.float().mean().item() == pytest.approx(theirs.float().mean().item(), rel=0.05, abs=0.02)
        assert ours.float().std().item() == pytest.approx(theirs.float().std().item(), rel=0.08)


def test_random_erasing_follows_timm():
    from timm.data.random_erasing import RandomErasing

    n = 2000
    torch.manual_seed(0)
    ours = G.random_erasing(torch.zeros(n, 3, 32, 48), 0.25) != 0
    random.seed(0)
    re = RandomErasing(0.25, mode="pixel", device="cpu")
    theirs = torch.stack([re(torch.zeros(3, 32, 48)) for _ in range(n)]) != 0
    frac_ours, frac_theirs = ours.any((1, 2, 3)).float().mean().item(), theirs.any((1, 2, 3)).float().mean().item()
    assert frac_ours == pytest.approx(0.25, abs=0.03) and frac_theirs == pytest.approx(0.25, abs=0.03)
    area_ours = ours[ours.any((1, 2, 3))].float().mean().item()
    area_theirs = theirs[theirs.any((1, 2, 3))].float().mean().item()
    assert area_ours == pytest.approx(area_theirs, rel=0.1)
    assert (ours.float().mean(1) % 1 == 0).all()  # the same box in every channel


def test_pipeline_equals_cpu_transform_when_nothing_is_random(image):
    """With the random parts switched off, GpuAugment equals build_train_transform (resize, ToTensor, Normalize)."""
    from mambaout.data import build_train_transform
    from mambaout.data.transforms import AugmentConfig

    square = image.crop((0, 0, 40, 40))
    cfg = AugmentConfig(img_size=64, scale=[1.0, 1.0], ratio=[1.0, 1.0], hflip=0.0, auto_augment=None, color_jitter=0)
    cfg = dataclasses.replace(cfg, train_interpolation="bicubic", reprob=0.0)
    want = build_train_transform(cfg)(square)
    got = G.GpuAugment.from_config(cfg)(_t(square).to(torch.uint8))[0]
    assert (got - want).abs().max() <= 1.01 / 255 / min(cfg.std)


def test_every_random_choice_is_per_sample(image):
    torch.manual_seed(0)
    b = 64
    ra = G.RandAugmentGpu("rand-m9-mstd0.5-inc1", FILL)
    params = ra.sample(b, "cpu")
    assert len(set(params["op"][0].tolist())) >= 12  # ops differ between samples (16 outcomes: 15 ops or none)
    assert len(set(params["magnitude"][0].tolist())) == b and set(params["sign"][0].tolist()) == {-1.0, 1.0}
    x = _t(image).expand(b, -1, -1, -1).contiguous()
    out = ra(x, params)
    # samples that drew different first ops (and no second op) come out different
    single = (params["op"][1] < 0) & (params["op"][0] >= 0)
    firsts = params["op"][0][single]
    outs = out[single]
    for i in range(len(firsts)):
        for j in range(i + 1, len(firsts)):
            if firsts[i] != firsts[j]:
                assert not torch.equal(outs[i], outs[j]), (firsts[i].item(), firsts[j].item())
    # the whole pipeline: every one of 64 copies of one image comes out different (crop, flip, ops, erasing)
    aug = G.GpuAugment(img_size=48)
    y = aug(_t(image).to(torch.uint8).expand(b, -1, -1, -1))
    assert y.shape == (b, 3, 48, 48)
    flat = y.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(b) * 1e9).min() > 0


def test_augment_keeps_integer_levels_until_normalised(image):
    torch.manual_seed(1)
    x = _t(image).expand(16, -1, -1, -1).contiguous()
    out = G.RandAugmentGpu("rand-m9-mstd0.5-inc1", FILL)(x)
    assert torch.equal(out, out.round()) and out.min() >= 0 and out.max() <= 255
    assert not math.isnan(out.sum().item())


def test_gpu_code_path_equals_the_cpu_subset_path(image, monkeypatch):
    """On a GPU each op family runs on the whole batch and `where` keeps the rows that drew it; on CPU only those
    rows are computed. Both give the same images."""
    ra = G.RandAugmentGpu("rand-m9-mstd0.5-inc1", FILL)
    torch.manual_seed(3)
    x = G.resized_crop(
        _t(image).expand(48, -1, -1, -1),
        G.random_resized_crop_boxes(torch.tensor([[40, 52]]).expand(48, 2), (0.3, 1), (3 / 4, 4 / 3)),
        (32, 32),
        torch.rand(48) < 0.5,
    )
    params = ra.sample(48, "cpu")
    subset = ra(x, params)
    monkeypatch.setattr(G, "SUBSET_ON_CPU", False)
    assert torch.equal(ra(x, params), subset)


@pytest.mark.gpu
def test_no_host_sync_on_cuda(image):
    """On a GPU the whole augmentation queues kernels without once waiting for the device."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from mambaout.data.gpu_loader import DecodedImages, DecodedTrainLoader

    arr = np.asarray(image).transpose(2, 0, 1)[None].repeat(64, 0)
    arrays = dict(images=arr, sizes=np.array([[40, 52]] * 64), targets=np.arange(64) % 2, skipped=np.zeros(1, int))
    data = DecodedImages(arrays, ["a", "b"], {"a": 0, "b": 1}, device="cuda")
    loader = DecodedTrainLoader(data, G.GpuAugment(img_size=48), 16)
    next(iter(loader))  # warm-up: the constants are made once per device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y, _ in loader:
            assert x.is_cuda and y.is_cuda
    finally:
        torch.cuda.set_sync_debug_mode(0)
