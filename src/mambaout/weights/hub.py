"""The Hugging Face Hub / timm folder format: `config.json` + `model.safetensors`, which timm's `hf-hub:` and
`local-dir:` loaders open. `model.safetensors` also carries our metadata, so `mambaout.create_model("hf-hub:ORG/NAME")`
rebuilds the very model, class names included (`huggingface_hub` fetches it, honouring `HF_ENDPOINT`,
`HF_HUB_OFFLINE` and its cache).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from mambaout.data.image import EVAL_KEYS
from mambaout.utils.files import atomic_write_text
from mambaout.utils.optional import require
from mambaout.weights.checkpoint import save_weights

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
BIN_NAME = "pytorch_model.bin"

# our MambaOut arguments that timm's MambaOut takes under the same name and meaning
_SAME_IN_TIMM = ("in_chans", "num_classes", "depths", "dims", "expansion_ratio", "kernel_size", "conv_ratio")
_SAME_IN_TIMM += ("ls_init_value", "stem_mid_norm", "drop_rate", "global_pool")
_IGNORED = ("drop_path_rate",)  # training-time only
# our switches that timm's MambaOut takes as a choice: ours -> (timm's name, its value for True, for False)
_SWITCHES = {
    "downsample_norm_first": ("downsample", "conv_nf", "conv"),
    "head_mlp_norm": ("head_fn", "default", "norm_mlp"),
}
_TIMM_FIXED = {"head_mlp_ratio": 4, "act_layer": "gelu"}  # fixed in timm's MambaOut: not written, others refused
# the pretrained_cfg entries written to config.json: the eval transform and the layer names timm's tools read
_PRETRAINED_CFG_KEYS = EVAL_KEYS + ("first_conv", "classifier")
# timm's own MambaOut models; another model of ours exports as `mambaout_femto` with every argument written out
_TIMM_MAMBAOUTS = ("mambaout_femto", "mambaout_kobe", "mambaout_tiny", "mambaout_small", "mambaout_base")
_TIMM_MAMBAOUTS += ("mambaout_small_rw", "mambaout_base_short_rw", "mambaout_base_tall_rw")
_TIMM_MAMBAOUTS += ("mambaout_base_wide_rw", "mambaout_base_plus_rw")


def timm_model_args(model_kwargs: dict) -> dict:
    """Our `MambaOut` arguments as timm's `MambaOut` arguments; ValueError for an architecture timm's MambaOut cannot
    build (another block, activation or head width)."""
    args, unknown = {}, []
    for key, value in model_kwargs.items():
        if key in _SAME_IN_TIMM:
            args[key] = list(value) if isinstance(value, tuple) else value
        elif key in _SWITCHES:
            name, true, false = _SWITCHES[key]
            args[name] = true if value else false
        elif key not in _IGNORED and (key not in _TIMM_FIXED or value != _TIMM_FIXED[key]):
            unknown.append(f"{key}={value!r}")
    if unknown:
        raise ValueError(f"timm's MambaOut cannot build this model ({', '.join(unknown)}); export it as onnx or pt2")
    return args


def export_hf(
    model: nn.Module, folder: str | os.PathLike, label_names: list[str] | None = None, overwrite: bool = False
) -> Path:
    """Write `model` as `folder/config.json` + `folder/model.safetensors` (timm's hub layout), which opens in timm
    (`local-dir:`), transformers (`AutoModelForImageClassification`, `pipeline("image-classification")`) and here
    (`create_model(folder)`); return `folder`. `label_names`: one per output, as people read them, for transformers'
    `id2label` (default: the class names). Without `overwrite`, a folder holding another model's `config.json` (or
    weights without one) is refused; the same model's export is updated in place."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"--output {folder} is a file, not a folder; hf exports are a folder")
    name = getattr(model, "model_name", None)
    model_kwargs = dict(getattr(model, "model_kwargs", {}) or {})
    if not name or not name.startswith("mambaout"):
        raise ValueError(f"only MambaOut models export to the timm hub format (got {name or type(model).__name__})")
    # the class count is written once, at the top level: timm and transformers pass it to the model themselves, and
    # a second copy inside model_args fails there with "got multiple values for keyword argument 'num_classes'"
    model_args = {k: v for k, v in timm_model_args(model_kwargs).items() if k != "num_classes"}
    eval_cfg = {k: v for k, v in model.pretrained_cfg.items() if k in _PRETRAINED_CFG_KEYS}
    class_names = getattr(model, "class_names", None)
    config = {
        # timm builds `architecture` with `model_args` laid over its defaults: every argument is written out, so a
        # model of our own widths (mambaout_test, a fine-tuned one) builds through timm's mambaout_femto as well
        "architecture": name if name in _TIMM_MAMBAOUTS else "mambaout_femto",
        "mambaout_model": name,  # our registered name, which mambaout.create_model("hf-hub:...") builds
        "num_classes": model.num_classes,
        "num_features": getattr(model, "num_features", None),
        "model_args": model_args,
        "pretrained_cfg": dict(eval_cfg, num_classes=model.num_classes),
    }
    labels = label_names if label_names is not None else class_names
    if labels is not None:
        if len(labels) != model.num_classes:
            raise ValueError(f"got {len(labels)} label names for a classifier of {model.num_classes} classes")
        config["label_names"] = [str(n) for n in labels]
    if not overwrite:
        _check_replaceable(folder, config)
    folder.mkdir(parents=True, exist_ok=True)
    meta_eval = {k: eval_cfg[k] for k in ("input_size", "crop_pct", "interpolation", "mean", "std") if k in eval_cfg}
    metadata = dict(model=name, model_kwargs=model_kwargs, class_names=class_names, eval_config=meta_eval)
    save_weights(model, folder / WEIGHTS_NAME, **metadata)
    atomic_write_text(folder / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return folder


def _check_replaceable(folder: Path, config: dict) -> None:
    """Refuse to write over another model's export: an existing `config.json` must describe the same model."""
    existing, fix = folder / CONFIG_NAME, "pass --overwrite to replace it, or export into another folder"
    if not existing.exists():
        if (folder / WEIGHTS_NAME).exists():
            raise FileExistsError(
                f"{folder} holds {WEIGHTS_NAME} but no {CONFIG_NAME}: it is not an export of this model; {fix}"
            )
        return
    try:
        old = json.loads(existing.read_text())
    except (OSError, ValueError):
        old = None
    if not isinstance(old, dict):
        raise FileExistsError(f"{existing} is not a model config this package wrote; {fix}")
    keys = ("mambaout_model", "architecture", "num_classes", "model_args")
    differ = [k for k in keys if old.get(k) != config.get(k)]
    if differ:
        was = old.get("mambaout_model") or old.get("architecture") or "an unnamed model"
        raise FileExistsError(
            f"{folder} holds another model's export ({was}; {', '.join(differ)} differ from "
            f"{config['mambaout_model']}'s); {fix}"
        )


def from_hub(repo: str) -> tuple[str | None, Path, dict]:
    """(model name, local weights path, metadata from `config.json`) of a Hub repo `ORG/NAME[@revision]`."""
    hf = require("huggingface_hub", "create_model('hf-hub:...')", "huggingface_hub")
    repo_id, _, revision = repo.partition("@")
    config_path = hf.hf_hub_download(repo_id, CONFIG_NAME, revision=revision or None)
    weights = hf.hf_hub_download(repo_id, WEIGHTS_NAME, revision=revision or None)
    return _from_config(Path(config_path), Path(weights))


def from_folder(folder: str | os.PathLike) -> tuple[str | None, Path, dict]:
    """(model name, weights path, metadata from `config.json`) of a local folder in timm's Hub layout."""
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{folder} holds no {CONFIG_NAME}: a model folder in timm's Hub layout has config.json and "
            f"{WEIGHTS_NAME} (or {BIN_NAME}); pass a weights file as checkpoint= instead"
        )
    weights = next((folder / n for n in (WEIGHTS_NAME, BIN_NAME) if (folder / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder} holds {CONFIG_NAME} but neither {WEIGHTS_NAME} nor {BIN_NAME}")
    return _from_config(config_path, weights)


def _from_config(config_path: Path, weights: Path) -> tuple[str | None, Path, dict]:
    """The model name, and what `config.json` says of the model in our metadata's terms (used when the weights file
    carries none of its own: a folder timm wrote)."""
    try:
        config = json.loads(config_path.read_text())
    except ValueError as e:
        raise ValueError(f"{config_path} is not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
    name = config.get("mambaout_model") or config.get("architecture")
    model_args = config.get("model_args") or {}
    kwargs = {k: v for k, v in model_args.items() if k in _SAME_IN_TIMM}
    if set(model_args) - set(kwargs):
        kwargs.update(_from_timm_args(model_args, config_path))
    if "num_classes" in config:
        kwargs["num_classes"] = config["num_classes"]
    meta = {"model_kwargs": kwargs}
    eval_cfg = {k: v for k, v in (config.get("pretrained_cfg") or {}).items() if k in EVAL_KEYS}
    if eval_cfg:
        meta["eval_config"] = eval_cfg
    return name, weights, meta


def _from_timm_args(model_args: dict, source) -> dict:
    """timm's `MambaOut` arguments that have other names here, back to ours (the inverse of `timm_model_args`)."""
    switches = {name: (ours, true, false) for ours, (name, true, false) in _SWITCHES.items()}
    out, unknown = {}, []
    for key, value in model_args.items():
        if key in switches and value in switches[key][1:]:
            out[switches[key][0]] = value == switches[key][1]
        elif key not in _SAME_IN_TIMM:
            unknown.append(f"{key}={value!r}")
    if unknown:
        raise ValueError(f"{source}: model_args {', '.join(unknown)} have no counterpart in mambaout's MambaOut")
    return out
