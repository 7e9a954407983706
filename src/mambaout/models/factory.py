"""`create_model`: one entry point from a name (and optionally weights) to a ready model."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Sequence

import torch
from torch import nn

from mambaout.models.mambaout import MambaOut, MambaOutFeatures
from mambaout.models.variants import Weights, get_variant, pretrained_cfg
from mambaout.utils.files import jsonable
from mambaout.utils.limits import check_eval_config, check_model_kwargs
from mambaout.weights.checkpoint import CheckpointError, check_finite, download, fit_state_dict, read_checkpoint
from mambaout.weights.hub import from_folder, from_hub

# timm's create_model arguments for features_only models: what each means here.
_FEATURE_CLS = (None, "getter")  # our backbone calls the stages in order and taps their outputs: timm's "getter"
_IGNORED = ("flatten_sequential",)  # meaningful only for timm's hook-based feature wrappers; harmless here
# what a checkpoint's recorded arguments pass on when it is loaded as another model than the one it records
_CARRY_OVER = ("num_classes", "in_chans")

logger = logging.getLogger("mambaout")


def create_model(
    name: str | None = None,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    features_only: bool = False,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    output_fmt: str = "NCHW",
    feature_cls: str | None = None,
    feature_cfg: dict | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    pretrained_cfg_overlay: dict | None = None,
    use_ema: bool = False,
    replace_head: bool | None = None,
    **kwargs,
) -> nn.Module:
    """Build a registered MambaOut, optionally with weights; its `pretrained_cfg` holds the eval transform settings.

    Args:
        name: A registered name (`mambaout_tiny`), optionally with a weight tag (`mambaout_tiny.in1k`); a Hugging
            Face Hub repo in timm's layout, `hf-hub:ORG/NAME` (needs `huggingface_hub`); or a local folder in that
            layout (`config.json` + `model.safetensors` or `pytorch_model.bin`), as `local-dir:PATH` or its path, as
            timm opens them. None when `checkpoint` was written by `mambaout train`, which records its model.
        pretrained: Download (or take from the cache) the variant's published weights.
        checkpoint: A path or URL of weights in the official, timm or our layout, or a training checkpoint of timm's
            `train.py` (`.pth.tar`: its `state_dict`, or `state_dict_ema` with `use_ema`).
        features_only: Return a `MambaOutFeatures` backbone giving the stage maps of `out_indices` (strides 4, 8, 16,
            32) in `output_fmt`. timm's `feature_cls` may be `'getter'` (or None), what is built here; `feature_cfg`
            is timm's dict of these feature arguments.
        device: Where to build the model (and load its weights); `dtype` applies after loading.
        pretrained_cfg_overlay: Entries merged into `pretrained_cfg`; `file` names local weights (as in timm).
        use_ema: Take a training checkpoint's EMA weights rather than its weights (timm's `--use-ema`).
        replace_head: Whether a checkpoint classifier of another width than `num_classes` is replaced by a fresh one
            (fine-tuning). Default: when `num_classes` is given. False: `num_classes` states the weights' own width
            (weights without our metadata), and a classifier of another width is an error.
        **kwargs: `MambaOut` arguments overriding the variant's (`num_classes`, `in_chans`, `kernel_size`,
            `drop_path_rate`, `drop_rate`, `ls_init_value`, ...). Without `num_classes`, weights whose classifier does
            not fit the model (metadata that disagrees with the tensors) raise `CheckpointError`. An `in_chans` other
            than 3 adapts the first conv.
    """
    out_indices, output_fmt = _feature_args(out_indices, output_fmt, feature_cls, feature_cfg, kwargs)
    overlay = dict(pretrained_cfg_overlay or {})
    name, checkpoint, pretrained, folder_meta = _weights_source(name, checkpoint, pretrained, overlay)
    if pretrained and checkpoint is not None:
        raise ValueError("pass either pretrained=True or checkpoint=..., not both")
    if use_ema and checkpoint is None:
        raise ValueError("use_ema=True picks the EMA weights of a checkpoint file: pass checkpoint=PATH too")
    state_dict, meta = (None, {})
    if checkpoint is not None:
        state_dict, meta = read_checkpoint(checkpoint, use_ema=use_ema)
        meta = meta or folder_meta  # weights we wrote carry their own; a folder timm wrote has only its config.json
        _check_metadata(meta, str(checkpoint))
        check_finite(state_dict, str(checkpoint))
    recorded = meta.get("model")
    if name is None and recorded is None:
        raise ValueError("name is required unless the checkpoint was written by mambaout train (it records its model)")
    variant, tag = get_variant(name if name is not None else recorded)
    other_model = name is not None and recorded is not None and _variant_name(recorded) != variant.name
    if other_model:
        # the name asked for wins only where the tensors fit it: the recorded architecture (another model's widths)
        # must not be built under this name, so only the classifier's width and the input channels carry over
        meta = dict(meta, model_kwargs={k: v for k, v in meta.get("model_kwargs", {}).items() if k in _CARRY_OVER})
    weights: Weights | None = variant.get_weights(tag) if pretrained or tag else None

    # the user asked for a classifier of their own width: only then may a checkpoint's classifier be replaced
    new_head = "num_classes" in kwargs if replace_head is None else replace_head
    model_kwargs = {**variant.kwargs, **meta.get("model_kwargs", {})}  # a trained checkpoint's own architecture
    if weights is not None:  # a tag (or pretrained) fixes the classifier width: 11821 for ...in12k, as timm does
        model_kwargs["num_classes"] = weights.num_classes
    model_kwargs.update(kwargs)
    if state_dict is not None:
        _check_fit(variant, model_kwargs, meta, state_dict, new_head, checkpoint, name if other_model else None)
    model = _instantiate(variant, weights, meta, model_kwargs, device)
    model.pretrained_cfg.update(overlay)
    if pretrained:
        path = download(weights.urls)
        try:
            state_dict = read_checkpoint(path)[0]
        except CheckpointError as e:
            raise CheckpointError(
                f"{e} (downloaded from {weights.urls[0]} to {path}; delete it to download again)"
            ) from e
        check_finite(state_dict, weights.urls[0])
    if state_dict is not None:
        _load_weights(model, state_dict, variant.name, new_head, checkpoint)
    if dtype is not None:
        model = model.to(dtype)
    if features_only:
        if not isinstance(model, MambaOut):
            raise ValueError(f"features_only needs a MambaOut backbone; {variant.name} is a {type(model).__name__}")
        return MambaOutFeatures(model, out_indices, output_fmt)
    return model


def _weights_source(name, checkpoint, pretrained: bool, overlay: dict):
    """Where the weights come from: `overlay['file']`, a Hub repo or model folder given as the name (its config names
    the model, its file holds the weights), or the arguments as given. Returns (name, checkpoint, pretrained, the
    folder's metadata)."""
    if overlay.get("file"):
        if checkpoint is not None:
            raise ValueError("pass either checkpoint=... or pretrained_cfg_overlay={'file': ...}, not both")
        checkpoint, pretrained = overlay["file"], False
    folder = name is not None and os.path.isdir(name) and _variant_name(name) is None  # not a registered name
    if name is None or not (name.startswith(("hf-hub:", "local-dir:")) or folder):
        return name, checkpoint, pretrained, {}
    if checkpoint is not None:
        raise ValueError(f"{name} brings its own weights: pass it without checkpoint=")
    if name.startswith("hf-hub:"):
        name, checkpoint, folder_meta = from_hub(name[len("hf-hub:") :])
    else:
        name, checkpoint, folder_meta = from_folder(name.removeprefix("local-dir:"))
    return name, checkpoint, False, folder_meta


def _check_fit(variant, model_kwargs: dict, meta: dict, state_dict: dict, new_head: bool, checkpoint, asked):
    """Check the weights fit before allocating (metadata may describe a far larger model than the tensors), on the
    meta device. `asked`: the name asked for when the checkpoint records another model."""
    recorded = meta.get("model")
    with torch.device("meta"):
        try:
            probe = _build(variant, model_kwargs)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{checkpoint}: cannot build {variant.name} from its metadata ({e})") from e
        try:
            fit_state_dict(probe, state_dict, variant.name, new_head, warn=False)
        except CheckpointError:
            if asked is None:
                raise
            raise CheckpointError(
                f"{checkpoint} holds {recorded} weights, but {asked} was asked for and its tensors do not fit "
                f"{variant.name}; pass the model it records ({recorded}), or leave the model name out"
            ) from None
    if asked is not None:
        logger.warning("%s records %s; loading it as %s, as asked (its tensors fit)", checkpoint, recorded, asked)


def _load_weights(model: nn.Module, state_dict: dict, name: str, new_head: bool, checkpoint) -> None:
    model.load_state_dict(fit_state_dict(model, state_dict, name, new_head), strict=True)
    if model.class_names is not None and len(model.class_names) != model.num_classes:
        if not new_head:
            raise CheckpointError(
                f"{checkpoint}: its metadata names {len(model.class_names)} classes but the classifier has "
                f"{model.num_classes}; the file's metadata does not match its weights"
            )
        model.class_names = None  # the classifier was replaced, so its names no longer apply


def _variant_name(name: str) -> str | None:
    """The registered name behind `name` (aliases and weight tags resolved), None for a name not registered here."""
    try:
        return get_variant(name)[0].name
    except ValueError:
        return None


def _feature_args(out_indices, output_fmt, feature_cls, feature_cfg: dict | None, kwargs: dict):
    """timm's features-factory arguments, given directly or in `feature_cfg`; returns (out_indices, output_fmt)."""
    for key in _IGNORED:
        kwargs.pop(key, None)
    args = dict(out_indices=out_indices, output_fmt=output_fmt, feature_cls=feature_cls)
    for key, value in (feature_cfg or {}).items():  # timm spells the feature arguments either way
        if key in args:
            args[key] = value
        elif key not in _IGNORED:
            raise ValueError(f"feature_cfg[{key!r}] is not supported; supported keys: {', '.join(args)}")
    if args["feature_cls"] not in _FEATURE_CLS:
        raise ValueError(
            f"feature_cls={args['feature_cls']!r} is not supported: features_only builds a 'getter' backbone (stage "
            "outputs in order); leave feature_cls unset or pass 'getter'"
        )
    return args["out_indices"], args["output_fmt"]


def _instantiate(variant, weights: Weights | None, meta: dict, model_kwargs: dict, device) -> nn.Module:
    """The variant's network from `model_kwargs`, with `pretrained_cfg`, `model_kwargs` and `class_names` set."""
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = _build(variant, model_kwargs)
    model.model_name = variant.name
    model.model_kwargs = {k: v for k, v in model_kwargs.items() if jsonable(v)}
    cfg = dict(pretrained_cfg(variant, weights, model.num_classes), **meta.get("eval_config", {}))
    cfg["pool_size"] = [side // 32 for side in cfg["input_size"][1:]]  # a trained checkpoint's own size, too
    model.pretrained_cfg = cfg
    model.class_names = meta.get("class_names")
    return model


def _build(variant, model_kwargs: dict) -> nn.Module:
    """Build the variant; an argument its builder does not take is a one-line error naming it."""
    try:
        return variant.build(**model_kwargs)
    except TypeError as e:
        bad = re.search(r"unexpected keyword argument '([^']*)'", str(e))
        if bad is None:
            raise
        raise ValueError(
            f"{variant.name} does not take {bad.group(1)!r}: create_model passes keyword arguments it does not know "
            "to the model (help(mambaout.MambaOut) lists them)"
        ) from None


def _check_metadata(meta: dict, source: str) -> None:
    """Bounds on what a checkpoint's metadata may ask of this process (see `mambaout.utils.limits`)."""
    try:
        if "eval_config" in meta:
            check_eval_config(meta["eval_config"], source)
        if "model_kwargs" in meta:
            check_model_kwargs(meta["model_kwargs"], source)
        if meta.get("model") is not None and not isinstance(meta["model"], str):
            raise ValueError(f"{source}: metadata 'model' must be a model name, got {meta['model']!r}")
        names = meta.get("class_names")
        if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
            raise ValueError(f"{source}: metadata 'class_names' must be a list of strings")
    except ValueError as e:
        raise CheckpointError(f"{e}; the file's metadata is damaged or was not written by mambaout") from e
