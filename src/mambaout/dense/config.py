"""Configuration of a dense-prediction run, resolved once as defaults < recipe < command line. A recipe is a YAML
file with a `task` (`detect` or `segment`) and up to three sections of `setting`s: `model` (`DetectorConfig` /
`SegmenterConfig`), `data` (`DataConfig`), `train` (`TrainConfig`); unknown keys are errors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from mambaout.utils import checks as C
from mambaout.utils import recipes as R
from mambaout.utils import schema as S
from mambaout.utils.limits import MAX_IMG_SIZE, MIN_IMG_SIZE
from mambaout.utils.safe_yaml import load_yaml

from .backbone import SIDE, checkpoint_backbone
from .detection import DetectorConfig
from .upernet import SegmenterConfig

RECIPES = Path(__file__).resolve().parent / "recipes"  # package data
COUNT_MAX = 10**9  # steps, epochs, images: bounds that only catch typos

_COUNT = C.integer(1, COUNT_MAX, optional=True)


@dataclass
class DataConfig:
    """Where the data is and how it is augmented; a root (`data`) fills the paths not given, in COCO's or ADE20K's
    layout (`DetectTask.layout`, `SegmentTask.layout`)."""

    data: str | None = S.path("dataset root (detect: COCO layout; segment: images/ and annotations/)")
    train_split: str | None = S.path("training split under data (unset: train2017 / training)")
    val_split: str | None = S.path("validation split under data (unset: val2017 / validation)")
    train_images: str | None = S.path("training image folder")
    train_labels: str | None = S.path("training labels: COCO instances JSON, or a mask folder")
    val_images: str | None = S.path("validation image folder")
    val_labels: str | None = S.path("validation labels: COCO instances JSON, or a mask folder")
    reduce_zero_label: bool = S.switch(False, "segment: mask value 0 is ignored (ADE20K), v is class v-1")
    categories: str | None = S.path("segment: JSON list of {id, name}, the mask values that are classes")
    min_sizes: list = C.setting(
        None,
        C.integers(1, 32, MIN_IMG_SIZE, MAX_IMG_SIZE),
        "detect: training shorter sides, one drawn per image (--img-size sets one)",
        default_factory=lambda: [800],
        flags=(),
    )
    max_size: int = C.setting(1333, SIDE, "detect: cap on the longer side, training and evaluation")
    scale: list = C.setting(
        None,
        C.integers(2, 2, MIN_IMG_SIZE, MAX_IMG_SIZE),
        "segment: resize scale (long, short) for training and evaluation",
        default_factory=lambda: [2048, 512],
        metavar=("LONG", "SHORT"),
    )
    ratio_range: list = C.setting(
        None,
        C.number_list(2, 2, 0, 16, lo_open=True, increasing=True),
        "segment: training resize ratio range",
        default_factory=lambda: [0.5, 2.0],
    )
    crop_size: int = C.setting(512, SIDE, "segment: training crop (the paper's 512)")
    eval_flip: bool = S.switch(False, "segment: evaluate with the mirror image too")
    hflip: float = C.setting(0.5, C.number(0, 1), "flip probability in training")
    batch_size: int = S.run_setting("batch_size", 2)
    workers: int = S.run_setting("workers", 2)
    max_val_images: int | None = C.setting(
        None, _COUNT, "evaluate only the first N validation images (said in results)"
    )


@dataclass
class TrainConfig:
    """The optimisation and the run. Exactly one of `epochs` and `steps` sets the length."""

    epochs: int | None = C.setting(None, _COUNT, "passes over the training set (or steps)")
    steps: int | None = S.run_setting("steps")
    lr: float = C.setting(1e-4, C.number(0, 1000, lo_open=True), "learning rate (AdamW)")
    weight_decay: float = S.run_setting("weight_decay")
    schedule: str = C.setting(
        "step", C.choice("step", "poly"), "step: x gamma at each milestone; poly: (1 - t/T)^power"
    )
    milestones: list = C.setting(
        None,
        C.number_list(0, 64, 0, 1, lo_open=True, increasing=True),
        "step schedule: fractions of the run (1x: epochs 8 and 11 of 12)",
        default_factory=lambda: [8 / 12, 11 / 12],
    )
    gamma: float = C.setting(0.1, C.number(0, 1), "step schedule: lr factor at each milestone")
    poly_power: float = C.setting(1.0, C.number(0, 100), "poly schedule: power")
    min_lr: float = S.run_setting("min_lr", 0.0)
    warmup_steps: int = C.setting(500, C.integer(0, COUNT_MAX), "linear warmup steps")
    warmup_ratio: float = C.setting(0.001, C.number(0, 1), "lr factor at the start of the warmup")
    clip_grad: float | None = S.run_setting("clip_grad")
    pretrained: bool = S.run_setting("pretrained")
    backbone_checkpoint: str | None = S.path(
        "or from these classification weights (any layout we read), or a `mambaout train` run folder's best (else "
        "last); its recorded model and model_kwargs fill those not set",
    )
    amp: str = S.run_setting("amp")
    device: str | None = S.run_setting("device")
    threads: int | None = S.run_setting("threads")
    seed: int = S.run_setting("seed")
    eval_every: int | None = C.setting(None, _COUNT, "evaluate every N steps (and always at the end)")
    eval_at_start: bool = S.switch(True, "evaluate before training: the step-0 number")
    log_every: int = S.run_setting("log_every", 20)
    checkpoint_every: int | None = S.run_setting("checkpoint_every", None)
    stop_after_steps: int | None = S.run_setting("stop_after_steps")
    output: str | None = S.run_setting("output")
    resume: str | None = S.run_setting("resume")
    overwrite: bool = S.run_setting("overwrite")
    progress: bool = S.run_setting("progress")
    keep_top_k: int = S.run_setting("keep_top_k", 0)
    tensorboard: bool = S.run_setting("tensorboard")


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
    return dict(model={"detect": DetectorConfig, "segment": SegmenterConfig}[task], data=DataConfig, train=TrainConfig)


def recipes_table(task: str) -> str:
    """The `task` recipes with the hardware, wall time and result their headers state (`--list-recipes`)."""
    return R.recipe_table([RECIPES], task, _recipe_task)


def _recipe_task(path: Path) -> str:
    loaded = load_yaml(path.read_text(errors="replace"), str(path)) or {}
    return loaded.get("task", "?") if isinstance(loaded, dict) else "?"


def schema(task: str) -> S.Schema:
    """The settings of a `task` run: its parser, `--set` and docs table come from them."""
    return S.Schema(section_types(task))


def resolve(task: str, recipe: str | None, overrides: dict, base: RunConfig | None = None) -> RunConfig:
    """Defaults < recipe < `overrides` (`{'section.key': value}`), checked once; or, for a resumed run, the run's
    own configuration `base` < `overrides`, which may not change the network. ValueError: an unknown key, a recipe
    of the other task, a value of the wrong type or out of range."""
    values: dict[str, dict] = {s: {} for s in SECTIONS}
    sch = schema(task)
    if base is not None:
        if base.task != task:
            where = overrides.get("train.resume")
            raise ValueError(f"--resume {where} holds a {base.task} run; continue it with mambaout {base.task} train")
        saved = base.to_dict()
        flat = {f"{s}.{k}": v for s in SECTIONS for k, v in saved[s].items()}
        sch.refuse_network_changes(overrides.get("train.resume"), overrides, flat)
        values = {s: dict(saved[s]) for s in SECTIONS}
        values["train"]["stop_after_steps"] = None
        if {"train.steps", "train.epochs"} & set(overrides):  # a new length replaces the run's, in either unit
            values["train"].update(steps=None, epochs=None)
        recipe = base.recipe
    elif recipe is not None:
        path = R.find_recipe(recipe, [RECIPES], "dense recipe")
        loaded = load_yaml(path.read_text(errors="replace"), str(path)) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"recipe {path} must be a YAML mapping")
        if loaded.get("task", task) != task:
            raise ValueError(f"recipe {path} is a {loaded['task']!r} recipe; run it with mambaout {loaded['task']}")
        unknown = sorted(set(loaded) - {"task", *SECTIONS})
        if unknown:
            raise ValueError(f"recipe {path} has unknown keys {unknown}; expected task, model, data, train")
        for s in SECTIONS:
            part = loaded.get(s) or {}
            if not isinstance(part, dict):
                raise ValueError(f"recipe {path}: {s} must be a mapping of key: value")
            values[s].update(sch.recipe_items(path, part, f"{s}."))
    for key, value in overrides.items():
        setting = sch.find(key)
        values[setting.section][setting.name] = value
    if base is None and values["train"].get("backbone_checkpoint") is not None:
        _follow_checkpoint(task, values)
    cfg = from_dict(dict(values, task=task, recipe=recipe))
    check(cfg)
    return cfg


def _follow_checkpoint(task: str, values: dict[str, dict]) -> None:
    """`train.backbone_checkpoint` as the weights file it names (a run folder's best, else last), and the backbone
    it records wherever the recipe and the command line leave it unset; written so into the run's config, which
    then rebuilds the network without the checkpoint (validate, predict, export)."""
    s, m, t = schema(task), values["model"], values["train"]
    given = {k: s.checked(f"model.{k}", m[k]) for k in ("backbone", "model_kwargs") if k in m}
    file = s.checked("train.backbone_checkpoint", t["backbone_checkpoint"])
    t["backbone_checkpoint"], backbone, model_kwargs = checkpoint_backbone(
        file, given.get("backbone"), given.get("model_kwargs")
    )
    if backbone is not None:
        m["backbone"] = backbone
    if model_kwargs:
        m["model_kwargs"] = model_kwargs


def check(cfg: RunConfig) -> None:
    """Every value checked against its setting (stored normalised: an integral float as an int), then the values
    that only make sense together; one line each, `section.key=value: what is allowed`."""
    for section in SECTIONS:
        C.validate_fields(getattr(cfg, section), prefix=f"{section}.", lists=True)
    t, d, m = cfg.train, cfg.data, cfg.model
    if (t.epochs is None) == (t.steps is None):
        raise ValueError("give the run's length as exactly one of --epochs and --steps")
    if t.pretrained and t.backbone_checkpoint:
        raise ValueError("--pretrained and --backbone-checkpoint exclude each other; pass one")
    m.check_data(d)  # what the task's network needs of its data


def from_dict(d: dict) -> RunConfig:
    """A `RunConfig` back from `to_dict` (a run folder's state)."""
    types = section_types(d["task"])
    return RunConfig(d["task"], *(types[s](**d[s]) for s in SECTIONS), recipe=d.get("recipe"))
