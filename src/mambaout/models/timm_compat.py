"""Opt-in: make `timm.create_model("mambaout_tiny", ...)` build this package's MambaOut (for detection or segmentation
stacks that create their backbone through timm). timm's own `build_model_with_cfg` builds it, so timm's pretrained
configs, weight resolution and `features_only` wrappers apply unchanged; only the model class (so the kernels) is ours.
"""

from __future__ import annotations

from collections.abc import Iterable

import timm
from timm.layers import register_notrace_module
from timm.models import _registry, build_model_with_cfg

from mambaout.models.mambaout import LEAF_MODULES, MambaOut, _check_output_fmt
from mambaout.models.variants import get_variant, list_models
from mambaout.weights.checkpoint import fit_state_dict, unwrap_state_dict

__all__ = ["register_timm", "unregister_timm"]

_ORIGINAL: dict = {}  # model name -> timm's own entrypoint, while ours is registered


def _filter(state_dict: dict, model) -> dict:
    """timm's `pretrained_filter_fn`: any of the layouts we read, mapped onto the model's keys."""
    return fit_state_dict(model, unwrap_state_dict(state_dict), name=getattr(model, "model_name", "mambaout"))


def _entrypoint(name: str):
    def create(pretrained: bool = False, **kwargs):
        variant, _ = get_variant(name)
        feature_cfg = dict(out_indices=(0, 1, 2, 3), flatten_sequential=True)
        output_fmt = kwargs.pop("output_fmt", None)
        if output_fmt is not None:
            feature_cfg.update(_feature_format(output_fmt, kwargs))
        model_kwargs = dict(variant.kwargs, **kwargs)
        model = build_model_with_cfg(
            MambaOut, name, pretrained, pretrained_filter_fn=_filter, feature_cfg=feature_cfg, **model_kwargs
        )
        model.model_name = name
        return model

    create.__name__ = name
    create.__module__ = "timm.models.mambaout"  # timm files models by module; keep the listing where it was
    return create


def _feature_format(output_fmt: str, kwargs: dict) -> dict:
    """The feature config honouring timm's `output_fmt` (which timm's own MambaOut rejects): timm's default wrapper
    taps the stage modules, whose maps are NHWC whatever it says, so it goes through the `getter` wrapper, which asks
    `forward_intermediates` for that layout."""
    _check_output_fmt(str(output_fmt))
    if not kwargs.get("features_only"):
        raise ValueError("output_fmt applies to features_only=True models (the classifier takes NCHW images)")
    feature_cls = kwargs.setdefault("feature_cls", "getter")
    if feature_cls != "getter" and str(output_fmt) != "NHWC":
        raise ValueError(
            f"feature_cls={feature_cls!r} taps the stage modules, whose maps are NHWC; for output_fmt={output_fmt!r} "
            "leave feature_cls unset (timm's 'getter' wrapper)"
        )
    return {"output_fmt": str(output_fmt)}


def register_timm(names: Iterable[str] | None = None) -> list[str]:
    """Route timm's MambaOut entrypoints (all of them, or `names`) to this package's model; returns the names.

    Also registers `LEAF_MODULES` (the block, the stem, the downsampling layer, the head) with timm's FX tracer as
    leaves, so timm's feature extraction calls them as modules: the traced graph then runs the same code as eager, bit
    for bit.
    """
    wanted = list(names) if names is not None else [n for n in list_models("mambaout_*") if timm.is_model(n)]
    missing = [n for n in wanted if not timm.is_model(n)]
    if missing:
        raise ValueError(
            f"timm {timm.__version__} has no model(s) {missing} to replace; see timm.list_models('mambaout*')"
        )
    for leaf in LEAF_MODULES:
        register_notrace_module(leaf)
    for name in wanted:
        _ORIGINAL.setdefault(name, _registry._model_entrypoints[name])
        _registry._model_entrypoints[name] = _entrypoint(name)
    return wanted


def unregister_timm() -> None:
    """Give timm its own MambaOut entrypoints back."""
    while _ORIGINAL:
        name, fn = _ORIGINAL.popitem()
        _registry._model_entrypoints[name] = fn
