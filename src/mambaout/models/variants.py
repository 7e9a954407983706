"""Registered variants and their published weights: data, each variant setting only the arguments that differ from
`MambaOut`'s defaults (the paper's design). Two groups share the registry: the MambaOut families, and the models of the
paper's comparisons (`group="analysis"`), whose builders are named by import path, imported only when built.
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable
from dataclasses import dataclass

from mambaout.data.image import EVAL_KEYS, IMAGENET_MEAN, IMAGENET_STD

OFFICIAL_URL = "https://github.com/yuweihao/MambaOut/releases/download/model/{name}.pth"
HUB_URL = "https://huggingface.co/timm/{name}.{tag}/resolve/main/model.safetensors"


@dataclass(frozen=True)
class Weights:
    """One set of published weights of a variant.

    Attributes:
        tag: The weight's name after the dot, e.g. `in1k` in `mambaout_tiny.in1k`.
        urls: Where to download it, tried in order (official release first, then timm's hub mirror).
        input_size: `(C, H, W)` the weights were evaluated at.
        crop_pct: Eval centre-crop fraction (1.0: resize the short side to the input size, no border dropped).
        top1: ImageNet-1k top-1 (%) its authors report at `input_size` (None if not), from `top1_source`.
        params_m: Parameters (millions) of the model these weights fit.
        crop_mode: `'center'` or `'squash'` (resize both sides to the input size, no crop).
        test_input_size: A larger size the weights also evaluate well at (timm's `test_input_size`).
        test_crop_pct: Crop fraction at `test_input_size`, where it differs from `crop_pct`.
    """

    tag: str
    urls: tuple[str, ...]
    num_classes: int = 1000
    input_size: tuple[int, int, int] = (3, 224, 224)
    crop_pct: float = 1.0
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    top1: float | None = None
    top1_source: str = ""
    params_m: float | None = None
    crop_mode: str = "center"
    test_input_size: tuple[int, int, int] = (3, 288, 288)
    test_crop_pct: float | None = None

    def eval_config(self) -> dict:
        """The eval transform settings as a plain dict (what checkpoints and `mambaout validate` store)."""
        values = {k: getattr(self, k) for k in EVAL_KEYS}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


@dataclass(frozen=True)
class Variant:
    name: str
    kwargs: dict
    params_m: float | None = None  # parameters in millions as published (paper Table 1 / timm), pinned by tests
    weights: tuple[Weights, ...] = ()
    description: str = ""
    default_drop_path: float = 0.0  # training recipe's stochastic depth (official scripts)
    # The model class or function called with `kwargs`: None for `MambaOut`, or "module:attribute" imported on build.
    builder: Callable | str | None = None
    group: str = "mambaout"  # "mambaout": the families; "analysis": the paper's comparisons (mambaout.analysis)

    def build(self, **kwargs):
        """The model with the variant's arguments, overridden by `kwargs`."""
        builder = self.builder or "mambaout.models.mambaout:MambaOut"
        if isinstance(builder, str):
            module, _, attr = builder.partition(":")
            builder = getattr(importlib.import_module(module), attr)
        return builder(**{**self.kwargs, **kwargs})

    @property
    def default_weights(self) -> Weights | None:
        return self.weights[0] if self.weights else None

    def get_weights(self, tag: str | None) -> Weights:
        if not self.weights:
            raise ValueError(f"{self.name} has no published weights; pass checkpoint=PATH, not a tag or pretrained")
        found = next((w for w in self.weights if tag in (None, w.tag)), None)  # None: the first
        if found is None:
            raise ValueError(f"{self.name} has no weights tagged {tag!r}; available: {[w.tag for w in self.weights]}")
        return found


_REGISTRY: dict[str, Variant] = {}
# Other names of a registered variant. They resolve like it but are not listed, so nothing is counted twice.
_ALIASES: dict[str, str] = {}


def register(variant: Variant) -> Variant:
    if variant.name in _REGISTRY:
        raise ValueError(f"variant {variant.name!r} is already registered")
    _REGISTRY[variant.name] = variant
    return variant


def _paper(name: str, depths, dims, params_m: float, top1: float, drop_path: float, desc: str):
    urls = (OFFICIAL_URL.format(name=name), HUB_URL.format(name=name, tag="in1k"))
    weights = Weights("in1k", urls, top1=top1, top1_source="paper Table 1", params_m=params_m)
    register(Variant(name, dict(depths=depths, dims=dims), params_m, (weights,), desc, default_drop_path=drop_path))


# The paper's five (Table 1; drop path from the official training scripts).
_paper("mambaout_femto", (3, 3, 9, 3), (48, 96, 192, 288), 7.30, 78.9, 0.025, "paper, smallest")
_paper("mambaout_kobe", (3, 3, 15, 3), (48, 96, 192, 288), 9.14, 80.0, 0.025, "paper, Kobe memorial: 24 blocks")
_paper("mambaout_tiny", (3, 3, 9, 3), (96, 192, 384, 576), 26.55, 82.7, 0.2, "paper")
_paper("mambaout_small", (3, 4, 27, 3), (96, 192, 384, 576), 48.49, 84.1, 0.4, "paper")
_paper("mambaout_base", (3, 4, 27, 3), (128, 256, 512, 768), 84.81, 84.2, 0.6, "paper")

# timm's `_rw` family: no stem mid-norm, norm-first downsampling, LayerScale, pool->norm->MLP head.
_RW = dict(stem_mid_norm=False, downsample_norm_first=True, ls_init_value=1e-6, head_mlp_norm=False)
_TIMM_TOP1 = "timm model card (224 px)"
_CROP95 = dict(crop_pct=0.95, test_crop_pct=1.0)
_R384 = dict(input_size=(3, 384, 384), test_input_size=(3, 384, 384), crop_mode="squash")
# name -> its weights: (tag, top-1 on timm's model card or None, eval settings other than the defaults)
_RW_WEIGHTS = {
    "mambaout_small_rw": [("sw_e450_in1k", 84.024, {})],
    "mambaout_base_short_rw": [("sw_e500_in1k", 84.362, _CROP95)],
    "mambaout_base_tall_rw": [("sw_e500_in1k", 84.434, _CROP95)],
    "mambaout_base_wide_rw": [("sw_e500_in1k", 84.454, _CROP95)],
    "mambaout_base_plus_rw": [
        ("sw_e150_in12k_ft_in1k", 86.632, {}),
        ("sw_e150_r384_in12k_ft_in1k", 87.506, _R384),
        ("sw_e150_in12k", None, dict(num_classes=11821)),
    ],
}


def _rw(name: str, params_m: float, desc: str, depths, dims=(128, 256, 512, 768), drop_path=0.6, **kwargs):
    ws = []
    for tag, top1, extra in _RW_WEIGHTS[name]:
        urls = (HUB_URL.format(name=name, tag=tag),)
        ws.append(Weights(tag, urls, top1=top1, top1_source=_TIMM_TOP1 if top1 else "", params_m=params_m, **extra))
    kwargs = dict(_RW, depths=depths, dims=dims, **kwargs)
    register(Variant(name, kwargs, params_m, tuple(ws), desc, default_drop_path=drop_path))


_WIDE = dict(expansion_ratio=3.0, conv_ratio=1.5, act_layer="silu")
_rw("mambaout_small_rw", 48.50, "timm: small with LayerScale", (3, 4, 27, 3), (96, 192, 384, 576), drop_path=0.4)
_rw("mambaout_base_short_rw", 88.83, "timm: shallower, wider", (3, 3, 25, 3), expansion_ratio=3.0, conv_ratio=1.25)
_rw("mambaout_base_tall_rw", 86.48, "timm: deeper", (3, 4, 30, 3), expansion_ratio=2.5, conv_ratio=1.25)
_rw("mambaout_base_wide_rw", 94.45, "timm: wider, SiLU gate", (3, 4, 27, 3), **_WIDE)
_rw("mambaout_base_plus_rw", 101.66, "timm: ImageNet-12k pretrained, SiLU gate", (3, 4, 30, 3), **_WIDE)

# A few-thousand-parameter model of the paper's design: tests, the digits default, the CPU experiments.
_PICO = dict(depths=(1, 1, 2, 1), dims=(16, 32, 48, 64))
_TEST_DESC = "CPU-sized MambaOut: tests, the digits default, the Mamba comparison and kernel ablation"
register(Variant("mambaout_test", dict(_PICO), None, (), _TEST_DESC))
# The same network under its analysis name: the mamba-vs-mambaout and ablation-kernel-* recipes and the
# checkpoints of those runs record `mambaout_pico` (its SSM twin is `mambaout_pico_ssm`).
_ALIASES["mambaout_pico"] = "mambaout_test"


# --- analysis models: the paper's comparisons, built by mambaout.analysis ---------------------------------------------

_VIT = "mambaout.models.vit:VisionTransformer"
_SSM = "mambaout.models.mamba:mamba_out_with_ssm"

# DeiT's Ti and S, fully-visible and causal (paper Fig. 3b); drop path from the DeiT recipe.
_DEIT = {
    "tiny": ("Ti", dict(embed_dim=192, depth=12, num_heads=3), {False: 72.2, True: 70.6}),
    "small": ("S", dict(embed_dim=384, depth=12, num_heads=6), {False: 79.8, True: 78.9}),
}
_DEIT_KWARGS = dict(default_drop_path=0.1, builder=_VIT, group="analysis")
for _size, (_short, _cfg, _top1) in _DEIT.items():
    for _causal in (False, True):
        _name = f"vit_{_size}_deit" + ("_causal" if _causal else "")
        _desc = f"DeiT ViT-{_short}, {'causal' if _causal else 'full'} attention "
        _desc += f"(paper Fig. 3b: {_top1[_causal]} ImageNet top-1)"
        register(Variant(_name, dict(_cfg, causal=_causal), description=_desc, **_DEIT_KWARGS))

# Mamba vs MambaOut: the same CPU-sized network with the SSM in every block (the Mamba block of Fig. 1a), with
# Mamba's d_state 16; they differ ONLY in the block.
for _name, _d_state, _desc in (
    ("mambaout_pico_ssm", 16, "mambaout_pico with the SSM in every block: the Mamba block of Fig. 1a"),
    ("mambaout_test_ssm", 4, "tests only: mambaout_test with the SSM"),
):
    register(Variant(_name, dict(_PICO, d_state=_d_state), description=_desc, builder=_SSM, group="analysis"))


def pretrained_cfg(variant: Variant, weights: Weights | None, num_classes: int | None = None) -> dict:
    """timm's `pretrained_cfg` fields, with timm's values for the same tag (weights-less variants get defaults)."""
    w = weights or variant.default_weights or Weights("", ())
    cfg = dict(
        url="",  # timm's value; where our create_model downloads from, in order, is `urls`
        hf_hub_id=f"timm/{variant.name}.{w.tag}" if any("huggingface.co/" in u for u in w.urls) else None,
        architecture=variant.name,
        tag=w.tag or None,
        custom_load=False,
        **w.eval_config(),
        test_input_size=list(w.test_input_size),
        fixed_input_size=False,
        num_classes=w.num_classes if num_classes is None else num_classes,
        pool_size=[w.input_size[1] // 32, w.input_size[2] // 32],  # the last stage's map: stride 32
        first_conv="stem.conv1",
        classifier="head.fc",
        license="apache-2.0",
        urls=list(w.urls),
    )
    if w.test_crop_pct is not None:
        cfg["test_crop_pct"] = w.test_crop_pct
    return cfg


def get_variant(name: str) -> tuple[Variant, str | None]:
    """Look up `name` or `name.tag`; returns the variant and the weight tag (None if not given)."""
    base, _, tag = name.partition(".")
    base = _ALIASES.get(base, base)
    if base not in _REGISTRY:
        close = fnmatch.filter(_REGISTRY, f"*{base.replace('mambaout_', '')}*")
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(f"unknown model {base!r}.{hint} Known models: {', '.join(_REGISTRY)}")
    return _REGISTRY[base], tag or None


def list_models(pattern: str | None = None, pretrained: bool = False, group: str | None = None) -> list[str]:
    """Registered model names (aliases left out), optionally filtered by a shell-style `pattern`, to those with
    weights, or to one `group` ("mambaout" or "analysis")."""
    names = [n for n, v in _REGISTRY.items() if (v.weights or not pretrained) and group in (None, v.group)]
    return fnmatch.filter(names, pattern) if pattern else names


def list_aliases() -> dict[str, str]:
    """Alias -> the registered name it stands for."""
    return dict(_ALIASES)


def list_pretrained(pattern: str | None = None) -> list[str]:
    """`name.tag` for every published weight."""
    names = [f"{v.name}.{w.tag}" for v in _REGISTRY.values() for w in v.weights]
    return fnmatch.filter(names, pattern) if pattern else names
