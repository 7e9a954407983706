"""Training configuration: the defaults (the official recipe), recipe files, validation and the resolved config.

Configuration resolves as `DEFAULTS` (the official ImageNet-1k recipe) < recipe file < command line; the trainer
writes the result into `<run>/config.yaml`, and `state.pt` carries it so `--resume` continues with it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from mambaout.data.datasets import DIGITS, MAP_STYLE_READERS, resolve_split
from mambaout.data.image import IMAGENET_MEAN, IMAGENET_STD
from mambaout.training.runfolder import load_state, resume_path
from mambaout.utils.limits import check_img_size

# The official recipe (paper Sec. 4.1 and the official training scripts), ImageNet-1k at 224 px.
DEFAULTS: dict = dict(
    # data
    data=None,  # folder holding <train_split>/ and <val_split>/ (folders or .tar files)
    data_train=None,  # or explicit paths: folder or .tar; 'digits' for the embedded dataset
    data_val=None,
    train_split="train",
    val_split="val",
    cache=False,  # keep file bytes in RAM (small datasets); with data_pipeline gpu: decoded images, decoded once
    data_pipeline="cpu",  # cpu: decode + augment in loader workers; gpu: uint8 to the device, augment there
    workers=8,
    persistent_workers=False,  # true saves worker start-up per epoch, but --resume is then not bit-exact
    # model
    model="mambaout_tiny",
    model_kwargs={},  # extra create_model arguments (kernel_size, conv_ratio, ...)
    pretrained=False,  # start from the variant's published weights (fine-tuning); the classifier is replaced
    initial_checkpoint=None,  # or from a weights file (official, timm or our layout); its classifier likewise
    num_classes=None,  # None: the number of classes in the training data
    drop_path=None,  # None: the variant's recipe value (femto/kobe 0.025, tiny 0.2, small 0.4, base 0.6)
    drop_rate=0.0,
    # batch and optimizer: lr = lr_base * global_batch / lr_base_batch (linear scaling rule)
    batch_size=128,  # per device (per process)
    global_batch=4096,  # None: batch_size x world size (no accumulation)
    lr=None,  # absolute lr; overrides the scaling rule
    lr_base=4e-3,
    lr_base_batch=4096,
    opt="adamw",  # adamw (the paper's), or any timm optimizer name (sgd, momentum, adam, lamb, ...)
    layer_decay=None,  # e.g. 0.75: lr x decay^(depth from the head), depths from the model's group_matcher
    weight_decay=0.05,
    betas=[0.9, 0.999],
    eps=1e-8,
    clip_grad=None,
    # schedule: warmup from warmup_lr, cosine to min_lr over `epochs`, then `cooldown_epochs` at min_lr
    epochs=300,
    cooldown_epochs=10,
    warmup_epochs=20,
    warmup_lr=1e-6,
    min_lr=1e-5,
    sched="cosine",  # cosine, tanh, poly or constant (timm's schedulers)
    sched_on_updates=False,  # official: the lr changes once per epoch; true: every optimizer step
    # augmentation
    img_size=224,
    scale=[0.08, 1.0],
    ratio=[3 / 4, 4 / 3],
    hflip=0.5,
    color_jitter=0.4,  # ignored by timm while RandAugment is on
    auto_augment="rand-m9-mstd0.5-inc1",
    train_interpolation="random",  # random bilinear / bicubic
    reprob=0.25,
    remode="pixel",
    recount=1,
    mixup=0.8,
    cutmix=1.0,
    mixup_prob=1.0,
    mixup_switch_prob=0.5,
    mixup_mode="batch",
    smoothing=0.1,
    mean=list(IMAGENET_MEAN),
    std=list(IMAGENET_STD),
    # evaluation (written into the checkpoints as their eval_config)
    eval_crop_pct=1.0,
    eval_interpolation="bicubic",
    eval_batch_size=None,  # default: 2 x batch_size
    eval_every=1,
    # performance
    device=None,  # cpu / cuda; None: cuda when available
    amp="auto",  # none, bf16, fp16; auto: bf16 on CUDA, none on CPU
    channels_last=False,
    compile=False,
    grad_checkpointing=False,
    threads=None,  # torch CPU threads per process
    # EMA
    model_ema=False,
    model_ema_decay=0.9999,
    # run
    seed=0,
    output=None,  # default runs/<recipe or model>
    resume=None,
    overwrite=False,  # allow writing into a run folder that already holds a run (otherwise an error)
    keep_top_k=3,
    tensorboard=False,
    progress=True,  # a progress bar when stderr is a terminal; otherwise a line every `log_every` steps
    log_every=50,  # optimizer steps between progress lines when not on a terminal (0: none)
    max_steps_per_epoch=None,  # cap optimizer steps per epoch (smoke tests)
    stop_after_epochs=None,  # stop after this many epochs of this invocation (resume tests, time-boxed runs)
    stop_after_steps=None,  # stop after this many optimizer steps of this invocation, mid-epoch if need be
    checkpoint_every=0,  # also write state.pt every N optimizer steps inside epochs (0: at epoch ends only)
    recipe=None,
)

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SCHEDULES = ("cosine", "tanh", "poly", "constant")
PACKAGE_RECIPES = Path(__file__).resolve().parents[1] / "recipes"  # package data: present in every install


def find_recipe(name_or_path: str) -> Path:
    """A recipe path, or a name looked up in ./recipes, then among the recipes shipped with the package."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise FileNotFoundError(f"recipe file {p} does not exist")
        return p
    for folder in (Path.cwd() / "recipes", PACKAGE_RECIPES):
        for ext in (".yaml", ".yml"):
            if (folder / f"{name_or_path}{ext}").is_file():
                return folder / f"{name_or_path}{ext}"
    raise FileNotFoundError(f"no recipe named {name_or_path!r}; available: {', '.join(list_recipes()) or 'none'}")


def list_recipes() -> list[str]:
    names = set()
    for folder in (Path.cwd() / "recipes", PACKAGE_RECIPES):
        if folder.is_dir():
            names.update(p.stem for p in folder.glob("*.y*ml"))
    return sorted(names)


def load_recipe(name_or_path: str) -> dict:
    import yaml

    path = find_recipe(name_or_path)
    with open(path) as f:
        recipe = yaml.safe_load(f) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe {path} must be a YAML mapping of option: value")
    recipe = {k: coerce(v) for k, v in recipe.items()}
    unknown = sorted(set(recipe) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"recipe {path} has unknown keys {unknown}; valid keys are the DEFAULTS in mambaout/config.py")
    return recipe


def coerce(value):
    """YAML 1.1 reads `2e-5` (no dot) as a string; numbers written that way are meant as numbers."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def resolve_config(overrides: dict) -> dict:
    """DEFAULTS < recipe (`overrides['recipe']`, or 'digits' when no data is given) < `overrides`."""
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown options {unknown}")
    if overrides.get("resume"):
        # A resumed run continues with the configuration it was started with; options given now still win.
        saved = load_state(resume_path(overrides["resume"])).get("config", {})
        for key in ("model", "model_kwargs"):
            if key in overrides and saved.get(key) is not None and overrides[key] != saved[key]:
                raise ValueError(
                    f"--resume {overrides['resume']}: that run trains {key} {saved[key]!r}, not {overrides[key]!r}; "
                    "drop the option to continue it, or start a new run in another --output folder"
                )
        cfg = copy.deepcopy(DEFAULTS)
        cfg.update({k: v for k, v in saved.items() if k in DEFAULTS})
        cfg.update(stop_after_epochs=None, stop_after_steps=None, output=str(resume_path(overrides["resume"]).parent))
        cfg.update(overrides)
        validate_config(cfg)
        return cfg
    cfg = copy.deepcopy(DEFAULTS)
    recipe = overrides.get("recipe")
    no_data = not any(overrides.get(k) for k in ("data", "data_train"))
    if recipe is None and no_data:
        recipe = "digits"  # the embedded default: no download, a few minutes on a laptop CPU
    model_named = "model" in overrides
    if recipe is not None:
        loaded = load_recipe(recipe)
        model_named = model_named or "model" in loaded
        cfg.update(loaded)
        cfg["recipe"] = recipe
    if overrides.get("initial_checkpoint") and not model_named:
        cfg["model"] = checkpoint_model(overrides["initial_checkpoint"]) or cfg["model"]
    if overrides.get("data") is not None:
        # --data on the command line beats the recipe's data_train/data_val (only its own --data-train/-val beat it)
        cfg.update(data_train=None, data_val=None)
    cfg.update(overrides)
    if cfg["data"] is not None and (cfg["data_train"] is None or cfg["data_val"] is None):
        cfg["data_train"] = cfg["data_train"] or resolve_split(cfg["data"], cfg["train_split"])
        cfg["data_val"] = cfg["data_val"] or resolve_split(cfg["data"], cfg["val_split"])
    for key in ("data", "data_train", "data_val"):
        cfg[key] = _absolute(cfg[key])  # stored resolved, so --resume works from any working directory
    validate_config(cfg)
    return cfg


def checkpoint_model(path) -> str | None:
    """The model a weights file written by `mambaout train` records (None for official/timm files)."""
    from mambaout.weights.checkpoint import read_checkpoint

    return read_checkpoint(path)[1].get("model")


def _absolute(path: str | None) -> str | None:
    """An existing local data path made absolute; `digits:...`, `hfds/...` and missing paths stay as given."""
    if not path or str(path).startswith(DIGITS) or str(path).startswith(MAP_STYLE_READERS) or not Path(path).exists():
        return path
    return str(Path(path).resolve())


def validate_config(cfg: dict) -> None:
    """Reject settings that would crash late (after an epoch), silently do something else, or exhaust memory."""
    if cfg["data_train"] is None:
        named = f"recipe {cfg['recipe']!r} names no data" if cfg.get("recipe") else "no training data"
        raise ValueError(
            f"{named}: pass --data DIR (holding {cfg['train_split']}/ and {cfg['val_split']}/, folders or .tar) "
            "or --data-train PATH [--data-val PATH]"
        )
    if cfg["amp"] not in ("auto", *AMP_DTYPES):
        raise ValueError(f"amp must be one of auto, none, bf16, fp16; got {cfg['amp']!r}")
    for key in ("epochs", "batch_size", "eval_every"):
        if not _is_int(cfg[key]) or cfg[key] < 1:
            raise ValueError(f"{key} must be a positive integer, got {cfg[key]!r}")
    for key in ("warmup_epochs", "cooldown_epochs", "checkpoint_every", "keep_top_k", "workers"):
        if not _is_int(cfg[key]) or cfg[key] < 0:
            raise ValueError(f"{key} must be an integer >= 0 (0: off), got {cfg[key]!r}")
    for key in ("threads", "max_steps_per_epoch", "stop_after_epochs", "stop_after_steps", "global_batch"):
        if cfg[key] is not None and (not _is_int(cfg[key]) or cfg[key] < 1):
            raise ValueError(f"{key} must be a positive integer (or unset), got {cfg[key]!r}")
    check_img_size(cfg["img_size"], "img_size")
    _in_range(cfg, "weight_decay", 0.0, 10.0)
    _in_range(cfg, "smoothing", 0.0, 1.0, top_open=True)
    _in_range(cfg, "reprob", 0.0, 1.0)
    _in_range(cfg, "mixup", 0.0, 100.0)
    _in_range(cfg, "cutmix", 0.0, 100.0)
    _in_range(cfg, "model_ema_decay", 0.0, 1.0)
    _in_range(cfg, "eval_crop_pct", 0.05, 1.0)
    for key in ("lr", "lr_base", "clip_grad", "drop_path"):
        if cfg[key] is not None:
            _in_range(cfg, key, 0.0, 1e3)
    if (cfg["mixup"] > 0 or cfg["cutmix"] > 0) and cfg["batch_size"] % 2:
        raise ValueError(f"mixup/cutmix pair images within a batch: use an even --batch-size (got {cfg['batch_size']})")
    if cfg["data_pipeline"] not in ("cpu", "gpu"):
        raise ValueError(f"data_pipeline must be cpu or gpu, got {cfg['data_pipeline']!r}")
    if cfg["sched"] not in SCHEDULES:
        raise ValueError(f"sched must be one of {', '.join(SCHEDULES)}; got {cfg['sched']!r}")
    if cfg["pretrained"] and cfg["initial_checkpoint"]:
        raise ValueError("pass either --pretrained or --initial-checkpoint PATH, not both")
    if cfg["layer_decay"] is not None and not 0 < cfg["layer_decay"] <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {cfg['layer_decay']!r}")
    if "pretrained" in (cfg["model_kwargs"] or {}):
        raise ValueError("pass --pretrained (the config key pretrained), not model_kwargs={pretrained: ...}")
    _check_auto_augment(cfg)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _in_range(cfg: dict, key: str, lo: float, hi: float, top_open: bool = False) -> None:
    v = cfg[key]
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v and (v < hi if top_open else v <= hi)
    if not ok:
        raise ValueError(f"{key} must be a number in [{lo:g}, {hi:g}{')' if top_open else ']'}, got {v!r}")


def _check_auto_augment(cfg: dict) -> None:
    """Build the augmentation once now, so a bad RandAugment string fails here and not in the first batch."""
    from mambaout.data.transforms import build_train_transform

    if not cfg["auto_augment"]:
        return
    try:
        build_train_transform(cfg)
    except Exception as e:  # timm raises AssertionError/KeyError/ValueError for strings it cannot parse
        raise ValueError(
            f"auto_augment {cfg['auto_augment']!r} is not a timm augmentation string ({type(e).__name__}: {e}); "
            "use e.g. rand-m9-mstd0.5-inc1, augmix-m5-w3, original, or none"
        ) from e


def batch_plan(cfg: dict, world_size: int) -> tuple[int, int, float]:
    """(global batch, accumulation steps, learning rate) from the per-device batch and the world size.

    Raises:
        ValueError: when the global batch is not a multiple of per-device batch x world size.
    """
    per_step = cfg["batch_size"] * world_size
    global_batch = cfg["global_batch"] or per_step
    if global_batch % per_step:
        raise ValueError(
            f"--global-batch {global_batch} is not a multiple of --batch-size {cfg['batch_size']} x {world_size} "
            f"processes = {per_step}; pick a global batch that is, or change --batch-size"
        )
    # Linear scaling rule (Goyal et al. 2017), as the official recipe: 4e-3 at 4096 images per step.
    lr = cfg["lr"] if cfg["lr"] is not None else cfg["lr_base"] * global_batch / cfg["lr_base_batch"]
    return global_batch, global_batch // per_step, lr


def total_epochs(cfg: dict) -> int:
    return cfg["epochs"] + cfg["cooldown_epochs"]


def amp_dtype(cfg: dict, device: torch.device) -> tuple[str, torch.dtype | None]:
    """The autocast setting (`auto`: bf16 on CUDA, none on CPU) as its name and dtype."""
    amp = cfg["amp"]
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    return amp, AMP_DTYPES[amp]


def eval_config(cfg: dict) -> dict:
    """The eval transform settings of a run, written into its checkpoints (what `create_model` reads back)."""
    return dict(
        input_size=[3, cfg["img_size"], cfg["img_size"]],
        crop_pct=cfg["eval_crop_pct"],
        interpolation=cfg["eval_interpolation"],
        mean=list(cfg["mean"]),
        std=list(cfg["std"]),
        crop_mode="center",
    )


def output_folder(cfg: dict) -> Path:
    """The run folder: `output`, else the resumed run's folder, else `runs/<recipe or model>`."""
    if cfg["output"] is None and cfg["resume"]:
        cfg["output"] = str(resume_path(cfg["resume"]).parent)
    return Path(cfg["output"] or Path("runs") / recipe_name(cfg["recipe"] or cfg["model"]))


def recipe_name(recipe: str) -> str:
    """A recipe's name: itself, or the stem of a recipe given as a file path (`path/to/digits.yaml` -> `digits`)."""
    p = Path(recipe)
    return p.stem if p.suffix in (".yaml", ".yml") else recipe
