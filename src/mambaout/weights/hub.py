"""The Hugging Face Hub / timm folder format: `config.json` + `model.safetensors`.

`export_hf` writes a model in the layout timm's `hf-hub:` and `local-dir:` loaders read (timm's MambaOut takes our
key names as they are), so `timm.create_model("local-dir:DIR", pretrained=True)` or, once uploaded,
`timm.create_model("hf-hub:ORG/NAME", pretrained=True)` open it. `model.safetensors` also carries our metadata,
so `mambaout.create_model("hf-hub:ORG/NAME")` rebuilds the very model, class names included; `from_hub` fetches
the two files through `huggingface_hub` (which honours `HF_ENDPOINT`, `HF_HUB_OFFLINE` and its cache).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from mambaout.utils.files import atomic_write_text

HUB_PREFIX = "hf-hub:"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# our MambaOut arguments that timm's MambaOut takes under the same name and meaning
_SAME_IN_TIMM = ("in_chans", "num_classes", "depths", "dims", "expansion_ratio", "kernel_size", "conv_ratio")
_SAME_IN_TIMM += ("ls_init_value", "stem_mid_norm", "drop_rate", "global_pool")
_IGNORED = ("drop_path_rate",)  # training-time only
# the pretrained_cfg entries written to config.json: the eval transform and the layer names timm's tools read
_PRETRAINED_CFG_KEYS = (
    "input_size",
    "crop_pct",
    "interpolation",
    "mean",
    "std",
    "crop_mode",
    "first_conv",
    "classifier",
)


def timm_model_args(model_kwargs: dict) -> dict:
    """Our `MambaOut` arguments as timm's `MambaOut` arguments.

    Raises:
        ValueError: for an architecture timm's MambaOut cannot build (another block, activation or head width).
    """
    args, unknown = {}, []
    for key, value in model_kwargs.items():
        if key in _SAME_IN_TIMM:
            args[key] = list(value) if isinstance(value, tuple) else value
        elif key == "downsample_norm_first":
            args["downsample"] = "conv_nf" if value else "conv"
        elif key == "head_mlp_norm":
            args["head_fn"] = "default" if value else "norm_mlp"
        elif key == "head_mlp_ratio" and value == 4:
            continue  # timm's heads are 4x wide
        elif key == "act_layer" and value == "gelu":
            continue
        elif key not in _IGNORED:
            unknown.append(f"{key}={value!r}")
    if unknown:
        raise ValueError(f"timm's MambaOut cannot build this model ({', '.join(unknown)}); export it as onnx or pt2")
    return args


def export_hf(model: nn.Module, folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `model` as `folder/config.json` + `folder/model.safetensors` (timm's hub layout) and return `folder`.

    Args:
        overwrite: Replace the export of another model found in `folder`. Without it a folder holding another
            model's `config.json` (or weights without one) is refused; the same model's export is updated in place.

    Raises:
        FileExistsError: `folder` holds another model's export (and `overwrite` is off).
        NotADirectoryError: `folder` is a file.
    """
    from mambaout.weights.checkpoint import save_weights

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"--output {folder} is a file, not a folder; hf exports are a folder")
    name = getattr(model, "model_name", None)
    model_kwargs = dict(getattr(model, "model_kwargs", {}) or {})
    if not name or not name.startswith("mambaout"):
        raise ValueError(f"only MambaOut models export to the timm hub format (got {name or type(model).__name__})")
    model_args = timm_model_args(model_kwargs)
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
    if class_names is not None and len(class_names) == model.num_classes:
        config["label_names"] = list(class_names)
    if not overwrite:
        _check_replaceable(folder, config)
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(
        model,
        folder / WEIGHTS_NAME,
        model=name,
        model_kwargs=model_kwargs,
        class_names=class_names,
        eval_config={
            k: eval_cfg[k] for k in ("input_size", "crop_pct", "interpolation", "mean", "std") if k in eval_cfg
        },
    )
    atomic_write_text(folder / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return folder


def _check_replaceable(folder: Path, config: dict) -> None:
    """Refuse to write over another model's export: an existing `config.json` must describe the same model."""
    existing = folder / CONFIG_NAME
    if not existing.exists():
        if (folder / WEIGHTS_NAME).exists():
            raise FileExistsError(
                f"{folder} holds {WEIGHTS_NAME} but no {CONFIG_NAME}: it is not an export of this model; pass "
                "--overwrite to replace it, or export into another folder"
            )
        return
    try:
        old = json.loads(existing.read_text())
    except (OSError, ValueError):
        old = None
    if not isinstance(old, dict):
        raise FileExistsError(
            f"{existing} is not a model config this package wrote; pass --overwrite to replace it, or export into "
            "another folder"
        )
    keys = ("mambaout_model", "architecture", "num_classes", "model_args")
    differ = [k for k in keys if old.get(k) != config.get(k)]
    if differ:
        was = old.get("mambaout_model") or old.get("architecture") or "an unnamed model"
        raise FileExistsError(
            f"{folder} holds another model's export ({was}; {', '.join(differ)} differ from "
            f"{config['mambaout_model']}'s); pass --overwrite to replace it, or export into another folder"
        )


_TIMM_MAMBAOUTS = (
    "mambaout_femto",
    "mambaout_kobe",
    "mambaout_tiny",
    "mambaout_small",
    "mambaout_base",
    "mambaout_small_rw",
    "mambaout_base_short_rw",
    "mambaout_base_tall_rw",
    "mambaout_base_wide_rw",
    "mambaout_base_plus_rw",
)


def from_hub(repo: str) -> tuple[str | None, Path]:
    """(model name from `config.json`, local path of `model.safetensors`) of a Hub repo `ORG/NAME[@revision]`.

    Raises:
        ImportError: naming `pip install huggingface_hub` when it is not installed.
    """
    from mambaout.utils.optional import require

    hf = require("huggingface_hub", "create_model('hf-hub:...')", "huggingface_hub")
    repo_id, _, revision = repo.partition("@")
    config_path = hf.hf_hub_download(repo_id, CONFIG_NAME, revision=revision or None)
    weights = hf.hf_hub_download(repo_id, WEIGHTS_NAME, revision=revision or None)
    with open(config_path) as f:
        config = json.load(f)
    return config.get("mambaout_model") or config.get("architecture"), Path(weights)
