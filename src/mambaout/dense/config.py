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
from mambaout.utils.limits import check_img_size, check_model_kwargs
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
        if not p.is_file():
            raise FileNotFoundError(f"recipe file {p} does not exist")
        return p
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

# (section, key) -> what it may hold; NaN and infinities are refused by every number check (mambaout.utils.checks)
_RULES = {
    ("train", "lr"): C.number(0, lo_open=True),
    ("train", "weight_decay"): C.number(0),
    ("train", "clip_grad"): C.number(0, lo_open=True, optional=True),
    ("train", "gamma"): C.number(0, 1),
    ("train", "min_lr"): C.number(0),
    ("train", "warmup_ratio"): C.number(0, 1),
    ("train", "threads"): C.integer(1, optional=True),
    ("train", "seed"): C.integer(0, SEED_MAX),
    ("data", "batch_size"): C.integer(1),
    ("data", "workers"): C.integer(0),
    ("data", "hflip"): C.number(0, 1),
    ("model", "drop_path_rate"): C.number(0, 1, hi_open=True),
}
_DETECT_WIDTHS = ("fpn_channels", "box_head_dim", "mask_head_channels", "rois_per_image")


def _check_value(section: str, name: str, value, rule) -> None:
    try:
        rule(value)
    except ValueError as e:
        raise ValueError(f"{section}.{name}={C.show(value)}: {e}") from None


def check(cfg: RunConfig) -> None:
    """Values a run cannot start with, as one line each."""
    t, d = cfg.train, cfg.data
    for (section, name), rule in _RULES.items():
        _check_value(section, name, getattr(getattr(cfg, section), name), rule)
    widths = _DETECT_WIDTHS if cfg.task == "detect" else ("channels",)
    for name in widths:
        _check_value("model", name, getattr(cfg.model, name), C.integer(1, WIDTH_MAX))
    if cfg.task == "segment":
        _check_value("model", "aux_channels", cfg.model.aux_channels, C.integer(0, WIDTH_MAX, zero_means="no aux head"))
    # image sides bounded as the classification commands bound --img-size: memory grows with their square
    m = cfg.model
    if cfg.task == "detect":
        sides = [("model.min_size", m.min_size), ("model.max_size", m.max_size), ("data.max_size", d.max_size)]
        lists = {"data.min_sizes": d.min_sizes}
    else:
        sides, lists = [("data.crop_size", d.crop_size)], {"data.scale": d.scale}
    for name, values in lists.items():
        if not isinstance(values, (list, tuple)) or not values or (name == "data.scale" and len(values) != 2):
            raise ValueError(
                f"{name}={C.show(values)}: must be a list of image sides" + " (long, short)" * (name == "data.scale")
            )
        sides += [(name, v) for v in values]
    for name, value in sides:
        check_img_size(value, name)
    check_model_kwargs(cfg.model.model_kwargs, "model.model_kwargs")
    if (t.epochs is None) == (t.steps is None):
        raise ValueError("give the run's length as exactly one of --epochs and --steps")
    for name in ("epochs", "steps", "eval_every", "checkpoint_every", "stop_after_steps", "max_val_images"):
        section = d if name == "max_val_images" else t
        v = getattr(section, name)
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not t.lr > 0 or t.weight_decay < 0 or t.warmup_steps < 0 or t.log_every < 1:
        raise ValueError("lr must be > 0, weight_decay >= 0, warmup_steps >= 0 and log_every >= 1")
    if t.schedule not in ("step", "poly"):
        raise ValueError(f"schedule must be 'step' or 'poly', got {t.schedule!r}")
    if t.amp not in ("auto", "none", "bf16", "fp16"):
        raise ValueError(f"amp must be auto, none, bf16 or fp16, got {t.amp!r}")
    if t.pretrained and t.backbone_checkpoint:
        raise ValueError("--pretrained and --backbone-checkpoint exclude each other; pass one")
    if d.batch_size < 1 or d.workers < 0 or not 0 <= d.hflip <= 1:
        raise ValueError("batch_size must be >= 1, workers >= 0 and hflip in [0, 1]")
    if not 0.0 <= cfg.model.drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {cfg.model.drop_path_rate}")
    if cfg.task == "segment" and cfg.model.norm == "bn" and d.batch_size < 2:
        raise ValueError("a BatchNorm head needs >= 2 images per device: raise --batch-size or pass --head-norm gn")
    if cfg.task == "detect" and (not d.min_sizes or min(d.min_sizes) < 32 or d.max_size < max(d.min_sizes)):
        raise ValueError(f"min_sizes must be >= 32 and at most max_size, got {d.min_sizes} / {d.max_size}")
    if cfg.task == "segment" and d.crop_size < 32:
        raise ValueError(f"crop_size must be >= 32, got {d.crop_size}")


def from_dict(d: dict) -> RunConfig:
    """A `RunConfig` back from `to_dict` (a run folder's state)."""
    types = section_types(d["task"])
    return RunConfig(d["task"], *(types[s](**d[s]) for s in SECTIONS), recipe=d.get("recipe"))
