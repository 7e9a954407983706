"""`create_model`: one entry point from a name (and optionally weights) to a ready model."""

from __future__ import annotations

import os
from collections.abc import Sequence

from torch import nn

from .checkpoint import CheckpointError, download, load_into, read_checkpoint
from .files import jsonable
from .model import MambaOut, MambaOutFeatures
from .variants import Weights, get_variant


def create_model(
    name: str | None = None,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    features_only: bool = False,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    output_fmt: str = "NCHW",
    **kwargs,
) -> nn.Module:
    """Build a registered MambaOut, optionally with weights.

    Args:
        name: A registered name (`mambaout_tiny`), optionally with a weight tag (`mambaout_tiny.in1k`).
            May be None when `checkpoint` is one written by `mambaout train`, which records its model.
        pretrained: Download (or take from the cache) the variant's published weights.
        checkpoint: A path or URL of weights in the official, timm or our layout.
        features_only: Return a backbone giving the stage maps of `out_indices` (strides 4, 8, 16, 32).
        out_indices: Stages returned by a `features_only` backbone.
        output_fmt: `'NCHW'` or `'NHWC'` for a `features_only` backbone.
        **kwargs: `MambaOut` arguments overriding the variant's (`num_classes`, `in_chans`, `kernel_size`,
            `drop_path_rate`, `drop_rate`, `ls_init_value`, ...). A `num_classes` other than the weights'
            re-initialises the classifier; an `in_chans` other than 3 adapts the first conv.

    Returns:
        A `MambaOut` (or `MambaOutFeatures`), with `pretrained_cfg` holding the eval transform settings.
    """
    if pretrained and checkpoint is not None:
        raise ValueError("pass either pretrained=True or checkpoint=..., not both")
    state_dict, meta = (None, {})
    if checkpoint is not None:
        state_dict, meta = read_checkpoint(checkpoint)
    if name is None:
        name = meta.get("model")
        if name is None:
            raise ValueError(
                "name is required unless the checkpoint was written by mambaout train (it records its model)"
            )
    variant, tag = get_variant(name)
    weights: Weights | None = variant.get_weights(tag) if (pretrained or tag) and variant.weights else None
    if tag and not variant.weights:
        raise ValueError(f"{variant.name} has no published weights (asked for {name!r})")

    model_kwargs = dict(variant.kwargs)
    model_kwargs.update(meta.get("model_kwargs", {}))  # a trained checkpoint's own architecture, widths included
    if weights is not None and pretrained:
        model_kwargs["num_classes"] = weights.num_classes
    model_kwargs.update(kwargs)
    model = variant.build(**model_kwargs)
    model.model_name = variant.name
    model.model_kwargs = {k: v for k, v in model_kwargs.items() if jsonable(v)}
    model.pretrained_cfg = dict(
        (weights or variant.default_weights or Weights("", ())).eval_config(),
        **meta.get("eval_config", {}),
        num_classes=model.num_classes,
        first_conv="stem.conv1",
        classifier="head.fc",
    )
    model.class_names = meta.get("class_names")

    if pretrained:
        path = download(weights.urls)
        try:
            state_dict, _ = read_checkpoint(path)
        except CheckpointError as e:
            raise CheckpointError(
                f"{e} (downloaded from {weights.urls[0]} to {path}; delete it to download again)"
            ) from e
    if state_dict is not None:
        load_into(model, state_dict, name=variant.name)
        if model.class_names is not None and len(model.class_names) != model.num_classes:
            model.class_names = None  # the classifier was replaced, so its names no longer apply

    if features_only:
        if not isinstance(model, MambaOut):
            raise ValueError(f"features_only needs a MambaOut backbone; {variant.name} is a {type(model).__name__}")
        return MambaOutFeatures(model, out_indices, output_fmt)
    return model
