"""Configuration of a dense-prediction run: typed sections, resolved once as defaults < recipe < command line.

A recipe is a YAML file with a `task` (`detect` or `segment`) and up to three sections, each a dataclass here or
in the model modules: `model` (`DetectorConfig` / `SegmenterConfig`), `data` (`DataConfig`), `train`
(`TrainConfig`). Unknown keys are errors. The resolved configuration is written into the run folder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from mambaout.utils import checks as C
from mambaout.utils.device import AMP_DTYPES
from mambaout.utils.files import regular_file
from mambaout.utils.limits import MAX_IMG_SIZE, MAX_NUM_CLASSES, MIN_IMG_SIZE, check_model_kwargs
from mambaout.utils.safe_yaml import load_yaml

from .detection import DetectorConfig
from .upernet import SegmenterConfig

TASKS = ("detect", "segment")
RECIPES = Path(__file__).resolve().parent / "recipes"  # package data


@dataclass
class DataConfig:
    """Where the data is and how it is augmented.

    Detection reads COCO: `<images>/<file_name>` with an instances JSON. Segmentation reads an image folder and a
    folder of class-index PNG masks. `data` (a root) fills whichever of the explicit paths are not given:
    detection `images/<split>` (else `<split>`) and `annotations/instances_<split>.json`; segmentation
    `images/<split>` and `annotations/<split>` (the ADE20K layout).
    """

    data: str | None = None
    train_split: str | None = None  # default train2017 (detect) / training (segment)
    val_split: str | None = None  # default val2017 / validation
    train_images: str | None = None
    train_labels: str | None = None  # detect: instances JSON; segment: mask folder
    val_images: str | None = None
    val_labels: str | None = None
    # segmentation labels (see mambaout.dense.semseg); the class count is model.num_classes
    reduce_zero_label: bool = False
    categories: str | None = None
    # detection training sizes: shorter side drawn from min_sizes, longer side at most max_size (eval: the model's)
    min_sizes: list = field(default_factory=lambda: [800])
    max_size: int = 1333
    # segmentation: resize to scale (long, short) x a ratio in ratio_range, crop crop_size; evaluation at scale
    # (and its mirror image too with eval_flip)
    scale: list = field(default_factory=lambda: [2048, 512])
    ratio_range: list = field(default_factory=lambda: [0.5, 2.0])
    crop_size: int = 512
    eval_flip: bool = False
    hflip: float = 0.5
    batch_size: int = 2
    workers: int = 2
    max_val_images: int | None = None  # evaluate only the first N validation images (said in every result)


@dataclass
class TrainConfig:
    """The optimisation and the run. Exactly one of `epochs` and `steps` sets the length."""

    epochs: int | None = None
    steps: int | None = None
    lr: float = 1e-4
    weight_decay: float = 0.05
    schedule: str = "step"  # step: x gamma at each milestone; poly: (1 - t/T) ** poly_power
    milestones: list = field(default_factory=lambda: [8 / 12, 11 / 12])  # fractions of the run (1x: epochs 8, 11)
    gamma: float = 0.1
    poly_power: float = 1.0
    min_lr: float = 0.0
    warmup_steps: int = 500
    warmup_ratio: float = 0.001
    clip_grad: float | None = None
    pretrained: bool = False  # the backbone's published ImageNet weights
    backbone_checkpoint: str | None = None  # ... or these classification weights
    amp: str = "auto"  # auto: bf16 on CUDA, none on CPU
    device: str | None = None
    threads: int | None = None
    seed: int = 0
    eval_every: int | None = None  # steps; the end is always evaluated
    eval_at_start: bool = True  # the step-0 number, to see what training added
    log_every: int = 20
    checkpoint_every: int | None = None
    stop_after_steps: int | None = None
    output: str | None = None
    resume: str | None = None
    overwrite: bool = False
    progress: bool = True
    keep_top_k: int = 0  # also keep the weights of the k best evaluations (step-NNNNNNN.safetensors)
    tensorboard: bool = False


@dataclass
class RunConfig:
    task: str
    model: DetectorConfig | SegmenterConfig
    data: DataConfig
    train: TrainConfig
    recipe: str | None = None

    def to_dict(self) -> dict:
        return dict(task=self.task, recipe=self.recipe, **{k: dataclasses.asdict(getattr(self, k)) for k in SECTIONS})


SECTIONS = ("model", "data", "train")


def section_types(task: str) -> dict:
    return dict(model=DetectorConfig if task == "detect" else SegmenterConfig, data=DataConfig, train=TrainConfig)


def find_recipe(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        return regular_file(p, "recipe file")  # a FIFO is never opened
    path = RECIPES / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no dense recipe named {name_or_path!r}; available: {', '.join(list_recipes())}")
    return path


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def resolve(task: str, recipe: str | None, overrides: dict) -> RunConfig:
    """Defaults < recipe < `overrides` (`{'section.key': value}`), checked once.

    Raises:
        ValueError: an unknown key, a recipe of the other task, a value of the wrong type or out of range.
    """
    values: dict[str, dict] = {s: {} for s in SECTIONS}
    if recipe is not None:
        path = find_recipe(recipe)
        loaded = load_yaml(path.read_text(errors="replace"), str(path)) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"recipe {path} must be a YAML mapping")
        if loaded.get("task", task) != task:
            raise ValueError(f"recipe {path} is a {loaded['task']!r} recipe; run it with mambaout {loaded['task']}")
        unknown = sorted(set(loaded) - {"task", *SECTIONS})
        if unknown:
            raise ValueError(f"recipe {path} has unknown keys {unknown}; expected task, model, data, train")
        for s in SECTIONS:
            values[s].update(loaded.get(s) or {})
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section not in SECTIONS or not name:
            raise ValueError(f"{key!r}: options are SECTION.KEY with SECTION one of {', '.join(SECTIONS)}")
        values[section][name] = value
    types = section_types(task)
    sections = {}
    for s in SECTIONS:
        known = {f.name for f in dataclasses.fields(types[s])}
        unknown = sorted(set(values[s]) - known)
        if unknown:
            raise ValueError(f"unknown {s} option(s) {unknown}; valid: {', '.join(sorted(known))}")
        sections[s] = types[s](**values[s])
    cfg = RunConfig(task, sections["model"], sections["data"], sections["train"], recipe)
    check(cfg)
    return cfg


SEED_MAX = 2**63 - 1  # torch.manual_seed's signed 64-bit range (as the classification trainer's)
WIDTH_MAX = 8192  # a head or FPN width; the paper's widest is UperNet's 512 and the box head's 1024
COUNT_MAX = 10**9  # steps, epochs, images: bounds that only catch typos


def _model_kwargs(kwargs: dict) -> None:
    if "num_classes" in kwargs:
        raise ValueError("pass --num-classes (model.num_classes), not model.model_kwargs={num_classes: ...}")
    check_model_kwargs(kwargs, name="model.model_kwargs")


def _is_side(v) -> bool:
    return C.is_int(v) and MIN_IMG_SIZE <= v <= MAX_IMG_SIZE


_SIDE = C.Check(
    f"must be an integer from {MIN_IMG_SIZE} to {MAX_IMG_SIZE} pixels (memory grows with its square)",
    lambda v: v if _is_side(v) else C.BAD,
)


_PATH = C.text(optional=True)
_COUNT = C.integer(1, COUNT_MAX, optional=True)
# (section, key) -> what it may hold, for every key of every section (tests/test_dense.py holds that no key is
# missing); NaN and infinities are refused by every number check (mambaout.utils.checks)
_MODEL_RULES = {
    "backbone": C.text(max_len=200),
    "num_classes": C.integer(1, MAX_NUM_CLASSES, optional=True),
    "drop_path_rate": C.number(0, 1, hi_open=True),
    "frozen_stages": C.integer(-1, 8, zero_means="-1: none, 0: the stem, k: the stem and k stages"),
    "model_kwargs": C.mapping(_model_kwargs),
}
_RULES = {
    "detect": {
        **{("model", k): rule for k, rule in _MODEL_RULES.items()},
        ("model", "kind"): C.choice("mask_rcnn", "faster_rcnn"),
        ("model", "min_size"): _SIDE,
        ("model", "max_size"): _SIDE,
        **{("model", k): C.integer(1, WIDTH_MAX) for k in ("fpn_channels", "box_head_dim", "mask_head_channels")},
        ("model", "rois_per_image"): C.integer(1, WIDTH_MAX),
    },
    "segment": {
        **{("model", k): rule for k, rule in _MODEL_RULES.items()},
        ("model", "channels"): C.integer(1, WIDTH_MAX),
        ("model", "aux_channels"): C.integer(0, WIDTH_MAX, zero_means="no aux head"),
        ("model", "aux_weight"): C.number(0, 100),
        ("model", "norm"): C.choice("bn", "gn"),
    },
}
_SHARED_RULES = {
    **{
        ("data", k): _PATH
        for k in ("data", "train_split", "val_split", "train_images", "train_labels", "val_images", "val_labels")
    },
    ("data", "reduce_zero_label"): C.boolean(),
    ("data", "categories"): _PATH,
    ("data", "min_sizes"): C.integers(1, 32, MIN_IMG_SIZE, MAX_IMG_SIZE),
    ("data", "max_size"): _SIDE,
    ("data", "scale"): C.integers(2, 2, MIN_IMG_SIZE, MAX_IMG_SIZE),
    ("data", "ratio_range"): C.number_list(2, 2, 0, 16, lo_open=True, increasing=True),
    ("data", "crop_size"): _SIDE,
    ("data", "eval_flip"): C.boolean(),
    ("data", "hflip"): C.number(0, 1),
    ("data", "batch_size"): C.integer(1, 4096),
    ("data", "workers"): C.integer(0, 256),
    ("data", "max_val_images"): _COUNT,
    ("train", "epochs"): _COUNT,
    ("train", "steps"): _COUNT,
    ("train", "lr"): C.number(0, 1000, lo_open=True),
    ("train", "weight_decay"): C.number(0, 1000),
    ("train", "schedule"): C.choice("step", "poly"),
    ("train", "milestones"): C.number_list(0, 64, 0, 1, lo_open=True, increasing=True),
    ("train", "gamma"): C.number(0, 1),
    ("train", "poly_power"): C.number(0, 100),
    ("train", "min_lr"): C.number(0, 1000),
    ("train", "warmup_steps"): C.integer(0, COUNT_MAX),
    ("train", "warmup_ratio"): C.number(0, 1),
    ("train", "clip_grad"): C.number(0, lo_open=True, optional=True),
    ("train", "pretrained"): C.boolean(),
    ("train", "backbone_checkpoint"): _PATH,
    ("train", "amp"): C.choice("auto", *AMP_DTYPES),
    ("train", "device"): _PATH,
    ("train", "threads"): C.integer(1, 1024, optional=True),
    ("train", "seed"): C.integer(0, SEED_MAX),
    ("train", "eval_every"): _COUNT,
    ("train", "eval_at_start"): C.boolean(),
    ("train", "log_every"): C.integer(1, COUNT_MAX),
    ("train", "checkpoint_every"): _COUNT,
    ("train", "stop_after_steps"): _COUNT,
    ("train", "output"): _PATH,
    ("train", "resume"): _PATH,
    ("train", "overwrite"): C.boolean(),
    ("train", "progress"): C.boolean(),
    ("train", "keep_top_k"): C.integer(0, 1000),
    ("train", "tensorboard"): C.boolean(),
}


def rules(task: str) -> dict:
    """Every (section, key) of a `task` run and the check of its value."""
    return {**_SHARED_RULES, **_RULES[task]}


def check(cfg: RunConfig) -> None:
    """Every value checked against its rule (stored normalised: an integral float as an int), then the values
    that only make sense together; one line each, `section.key=value: what is allowed`."""
    for (section, name), rule in rules(cfg.task).items():
        part = getattr(cfg, section)
        value = getattr(part, name)
        try:
            normalised = rule(value)
        except ValueError as e:
            if str(e).startswith(f"{section}.{name}."):  # a nested check that names its key already
                raise ValueError(str(e)) from None
            raise ValueError(f"{section}.{name}={C.show(value)}: {e}") from None
        setattr(part, name, list(normalised) if isinstance(normalised, tuple) else normalised)
    t, d, m = cfg.train, cfg.data, cfg.model
    if (t.epochs is None) == (t.steps is None):
        raise ValueError("give the run's length as exactly one of --epochs and --steps")
    if t.pretrained and t.backbone_checkpoint:
        raise ValueError("--pretrained and --backbone-checkpoint exclude each other; pass one")
    if cfg.task == "segment" and m.norm == "bn" and d.batch_size < 2:
        raise ValueError("a BatchNorm head needs >= 2 images per device: raise --batch-size or pass --head-norm gn")
    if cfg.task == "detect" and (min(d.min_sizes) < 32 or d.max_size < max(d.min_sizes)):
        raise ValueError(f"min_sizes must be >= 32 and at most max_size, got {d.min_sizes} / {d.max_size}")
    if cfg.task == "segment" and d.crop_size < 32:
        raise ValueError(f"crop_size must be >= 32, got {d.crop_size}")


def from_dict(d: dict) -> RunConfig:
    """A `RunConfig` back from `to_dict` (a run folder's state)."""
    types = section_types(d["task"])
    return RunConfig(d["task"], *(types[s](**d[s]) for s in SECTIONS), recipe=d.get("recipe"))
