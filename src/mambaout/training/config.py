"""Training configuration: typed sections, validated once, and the flat file format they are read from and written to.

The flat dict (`DEFAULTS`: the official ImageNet-1k recipe) is the format of recipes, `--set`, `config.yaml` and
`state.pt`. `resolve_config` merges DEFAULTS < recipe < command line into a frozen `TrainConfig` (`from_flat`, where
every value is checked once); `from_flat(to_flat(c)) == c`. Each section's docstring names its readers.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from mambaout.data.datasets import DIGITS, MAP_STYLE_READERS, resolve_split
from mambaout.data.image import EvalSettings
from mambaout.data.loaders import Loading
from mambaout.data.transforms import AugmentConfig
from mambaout.training.runfolder import load_state, resume_path
from mambaout.utils import checks as C
from mambaout.utils import recipes as R
from mambaout.utils import schema as S
from mambaout.utils.limits import INTERPOLATIONS, MAX_NUM_CLASSES, check_model_kwargs
from mambaout.utils.safe_yaml import load_yaml

logger = logging.getLogger("mambaout")

SCHEDULES = ("cosine", "tanh", "poly", "constant")
_COUNT = C.integer(1, 10**9, optional=True)  # an optional count
PACKAGE_RECIPES = Path(__file__).resolve().parents[1] / "recipes"  # package data: present in every install
MAX_MODEL_PARAMS = 1_000_000_000  # 12x mambaout_base_plus_rw; model_kwargs asking for more is almost surely a typo


class _Section:
    """A section checks its own keys when it is built; `TrainConfig` checks what spans sections."""

    def __post_init__(self):
        C.validate_fields(self)


@dataclass(frozen=True)
class DataConfig(_Section):
    """Where the images come from and how they are read (read by `ClassifyTask.build_data`)."""

    data: str | None = S.path(
        "folder holding <train_split>/ and <val_split>/ (folders or .tar)", flags=("--data", "--data-dir")
    )
    data_train: str | None = S.path("training set: an image folder or .tar, or 'digits:train'")
    data_val: str | None = S.path("validation set: an image folder or .tar, or 'digits:val'")
    train_split: str = C.setting("train", C.text(), "name of the training split under --data")
    val_split: str = C.setting("val", C.text(), "name of the validation split under --data")
    cache: bool = S.switch(False, "keep image files in RAM (gpu pipeline: decoded)")
    data_pipeline: str = C.setting("cpu", C.choice("cpu", "gpu"), "cpu: augment in loader workers; gpu: on the device")
    workers: int = S.run_setting("workers", 8)
    persistent_workers: bool = S.switch(False, "keep loader workers between epochs (--resume is then not bit-exact)")


def _check_model_kwargs(kwargs: dict) -> None:
    for key, flag in (("pretrained", "--pretrained"), ("num_classes", "--num-classes")):
        if key in kwargs:
            raise ValueError(f"pass {flag} (the config key {key}), not model_kwargs={{{key}: ...}}")
    check_model_kwargs(kwargs)


@dataclass(frozen=True)
class ModelConfig(_Section):
    """The network and where its first weights come from (read by `ClassifyTask.build_model`)."""

    model: str = C.setting("mambaout_tiny", C.text(max_len=200), "registered model name", network=True)
    model_kwargs: dict = C.setting(
        None,
        C.mapping(_check_model_kwargs, bad=[{"num_classes": 3}, {"pretrained": True}, {"dims": [float("nan")]}]),
        "create_model arguments, e.g. {kernel_size: 5}",
        default_factory=dict,
        network=True,
    )
    pretrained: bool = S.run_setting("pretrained")  # the classifier is replaced
    initial_checkpoint: str | None = S.path("start from these weights (official, timm or our layout, timm .pth.tar)")
    use_ema: bool = S.switch(False, "take --initial-checkpoint's EMA weights (state_dict_ema)")
    num_classes: int | None = C.setting(
        None,
        C.integer(1, MAX_NUM_CLASSES, optional=True),
        "classifier outputs (unset: the training data's class count)",
    )
    drop_path: float | None = C.setting(
        None,
        C.number(0.0, 1.0, hi_open=True, optional=True),
        "stochastic depth rate (unset: the variant's recipe value)",
    )
    drop_rate: float = C.setting(
        0.0, C.number(0.0, 1.0, hi_open=True), "dropout before the classifier", flags=("--drop", "--drop-rate")
    )
    head_init_scale: float = C.setting(1.0, C.number(0.0, 1000.0), "scale the classifier's starting weights and bias")

    def __post_init__(self):
        super().__post_init__()
        if self.pretrained and self.initial_checkpoint:
            raise ValueError("pass either --pretrained or --initial-checkpoint PATH, not both")

    def create_kwargs(self) -> dict:
        """`model_kwargs` and the head dropout, only when asked for (not every registered builder takes one)."""
        kwargs = dict(self.model_kwargs)
        if self.drop_rate:
            kwargs.setdefault("drop_rate", self.drop_rate)
        return kwargs


@dataclass(frozen=True)
class BatchPlan:
    """Images per optimizer step over all processes, the accumulation steps that make it up, and the lr."""

    global_batch: int
    accum_steps: int
    lr: float


@dataclass(frozen=True)
class BatchConfig(_Section):
    """Batch sizes and the learning rate: lr = lr_base x global_batch / lr_base_batch (linear scaling rule)."""

    batch_size: int = S.run_setting("batch_size", 128)
    global_batch: int | None = C.setting(
        4096,
        C.integer(1, 2**24, optional=True),
        "images per optimizer step, all processes (accumulates; unset: batch size x processes)",
    )
    lr: float | None = C.setting(
        None, C.number(0.0, 1e3, optional=True), "absolute learning rate, beats the rule (0: frozen; unset: the rule)"
    )
    lr_base: float = C.setting(
        4e-3, C.number(0.0, 1e3, lo_open=True), "learning rate at lr_base_batch images per step (linear scaling rule)"
    )
    lr_base_batch: int = C.setting(
        4096, C.integer(1, 2**24), "the batch lr_base is given for", flags=("--lr-base-batch", "--lr-base-size")
    )

    def plan(self, world_size: int) -> BatchPlan:
        """The plan for `world_size` processes (ValueError: a global batch no multiple of batch x processes)."""
        per_step = self.batch_size * world_size
        global_batch = self.global_batch or per_step
        if global_batch % per_step:
            raise ValueError(
                f"--global-batch {global_batch} is not a multiple of --batch-size {self.batch_size} x {world_size} "
                f"processes = {per_step}; pick a global batch that is, or change --batch-size"
            )
        # Linear scaling rule (Goyal et al. 2017), as the official recipe: 4e-3 at 4096 images per step.
        lr = self.lr if self.lr is not None else self.lr_base * global_batch / self.lr_base_batch
        return BatchPlan(global_batch, global_batch // per_step, lr)


@dataclass(frozen=True)
class OptimConfig(_Section):
    """AdamW (the paper's) or any timm optimizer (read by `optim.create_optimizer`; `clip_grad` by the engine)."""

    opt: str = C.setting(
        "adamw", C.text(max_len=64), "optimizer: adamw, or a timm name (sgd, momentum, adam, lamb, ...)"
    )
    layer_decay: float | None = C.setting(
        None,
        C.number(0.0, 1.0, lo_open=True, optional=True),
        "layer-wise lr decay, e.g. 0.75 (the model's group_matcher)",
    )
    weight_decay: float = S.run_setting("weight_decay")
    betas: tuple = C.setting((0.9, 0.999), C.numbers(2, 0.0, 0.999999), "Adam betas")
    eps: float = C.setting(1e-8, C.number(0.0, 1.0, lo_open=True), "optimizer epsilon")
    clip_grad: float | None = S.run_setting("clip_grad")

    def __post_init__(self):
        super().__post_init__()
        from timm.optim import list_optimizers  # timm >= 1.0.12 (pyproject asks for 1.0.15)

        known, opt = set(list_optimizers()), self.opt.lower()
        if opt not in known:
            near = [n for n in known if n.startswith(opt[:3])][:6]
            hint = f"close: {', '.join(near)}" if near else "e.g. adamw, sgd, momentum, lamb"
            raise ValueError(f"opt={C.show(self.opt)}: not an optimizer timm knows ({hint})")


@dataclass(frozen=True)
class ScheduleConfig(_Section):
    """Warmup, `sched` to min_lr over `epochs`, then `cooldown_epochs` at min_lr (read by `optim.create_scheduler`)."""

    epochs: int = C.setting(
        300, C.integer(1, 100_000), "epochs of the lr schedule (warmup included); cooldown epochs come on top"
    )
    steps: int | None = S.run_setting("steps")
    cooldown_epochs: int = C.setting(10, C.integer(0, 100_000), "epochs at min_lr after the schedule")
    warmup_epochs: int = C.setting(20, C.integer(0, 100_000), "epochs of linear warmup from warmup_lr")
    warmup_lr: float = C.setting(1e-6, C.number(0.0, 1e3), "lr at the start of the warmup")
    min_lr: float = S.run_setting("min_lr", 1e-5)
    sched: str = C.setting("cosine", C.choice(*SCHEDULES), "lr schedule")
    sched_on_updates: bool = S.switch(False, "change the lr every optimizer step (official: once per epoch)")

    @property
    def total_epochs(self) -> int:
        return self.epochs + self.cooldown_epochs


@dataclass(frozen=True)
class MixupConfig(_Section):
    """Mixup / CutMix (timm's `Mixup`) and label smoothing (read by `classify.build_loss`)."""

    mixup: float = C.setting(0.8, C.number(0.0, 100.0), "mixup alpha (0: off)")
    cutmix: float = C.setting(1.0, C.number(0.0, 100.0), "cutmix alpha (0: off)")
    mixup_prob: float = C.setting(1.0, C.number(0.0, 1.0), "probability of mixing a batch")
    mixup_switch_prob: float = C.setting(
        0.5, C.number(0.0, 1.0), "probability of cutmix instead of mixup when both are on"
    )
    mixup_mode: str = C.setting("batch", C.choice("batch", "pair", "elem"), "mix per batch, pair or element")
    smoothing: float = C.setting(0.1, C.number(0.0, 1.0, hi_open=True), "label smoothing")

    @property
    def active(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


@dataclass(frozen=True)
class EvalConfig(_Section):
    """Held-out evaluation; crop and interpolation go into the checkpoints (read by `eval_settings`, `classify`)."""

    eval_crop_pct: float = C.setting(
        1.0, C.number(0.05, 1.0), "center crop fraction at evaluation (written into the checkpoints)"
    )
    eval_interpolation: str = C.setting(
        "bicubic", C.choice(*(i for i in INTERPOLATIONS if i != "random")), "resize interpolation at evaluation"
    )
    eval_batch_size: int | None = C.setting(
        None,
        C.integer(1, 65536, optional=True),
        "evaluation batch size (unset: 2 x batch size)",
        flags=("--eval-batch-size", "--validation-batch-size"),
    )
    eval_every: int = C.setting(1, C.integer(1, 100_000), "evaluate every N epochs (and always after the last)")


@dataclass(frozen=True)
class PerfConfig(_Section):
    """Where and how fast; the same numbers either way, up to rounding (read by `ClassifyTask` and `trainer.fit`)."""

    device: str | None = S.run_setting("device")
    amp: str = S.run_setting("amp")
    channels_last: bool = S.switch(False, "channels-last memory layout")
    compile: bool = S.switch(False, "torch.compile the model", flags=("--compile", "--torchcompile"))
    grad_checkpointing: bool = S.switch(False, "recompute activations in backward (less memory)")
    threads: int | None = S.run_setting("threads")


@dataclass(frozen=True)
class EmaConfig(_Section):
    """An average of the weights, evaluated beside the model (timm's ModelEmaV3; read by `ClassifyTask.ema`)."""

    model_ema: bool = S.switch(False, "keep and evaluate an EMA of the weights")
    model_ema_decay: float = C.setting(0.9999, C.number(0.0, 1.0), "EMA decay per optimizer step")


@dataclass(frozen=True)
class RunConfig(_Section):
    """The run folder, logging, seed and the stops that time-box or test a run (read by `trainer.Loop`)."""

    seed: int = S.run_setting("seed")
    output: str | None = S.run_setting("output")
    resume: str | None = S.run_setting("resume")
    overwrite: bool = S.run_setting("overwrite")
    keep_top_k: int = S.run_setting("keep_top_k", 3)
    tensorboard: bool = S.run_setting("tensorboard")
    progress: bool = S.run_setting("progress")
    log_every: int = S.run_setting("log_every", 50)
    max_steps_per_epoch: int | None = C.setting(None, _COUNT, "cap optimizer steps per epoch (smoke tests)")
    stop_after_epochs: int | None = C.setting(None, _COUNT, "stop after N epochs of this call (resume later)")
    stop_after_steps: int | None = S.run_setting("stop_after_steps")
    checkpoint_every: int = S.run_setting("checkpoint_every", 0)
    recipe: str | None = S.path("recipe name (--list-recipes) or path to a YAML file")


@dataclass(frozen=True)
class TrainConfig:
    """The whole training configuration as typed sections; each section's docstring says who reads it."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)  # the CPU transform, GPU augmentation
    mixup: MixupConfig = dataclasses.field(default_factory=MixupConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    batch: BatchConfig = dataclasses.field(default_factory=BatchConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    perf: PerfConfig = dataclasses.field(default_factory=PerfConfig)
    ema: EmaConfig = dataclasses.field(default_factory=EmaConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)

    def __post_init__(self):
        if self.mixup.active and self.batch.batch_size % 2:
            raise ValueError(
                f"batch_size={self.batch.batch_size}: mixup/cutmix pair images within a batch, so it must be even "
                "(or set mixup: 0, cutmix: 0)"
            )
        if self.data.data_pipeline == "gpu":
            # what the device augmentation cannot do, said before any device or data is touched
            from mambaout.data.gpu_aug import GpuAugment

            GpuAugment.from_config(self.augment, crop=self.data.cache)

    @property
    def loading(self) -> Loading:
        b, d = self.batch, self.data
        eval_batch = self.eval.eval_batch_size or 2 * b.batch_size
        return Loading(b.batch_size, eval_batch, d.workers, self.run.seed, d.cache, d.persistent_workers)

    def eval_settings(self) -> EvalSettings:
        """The eval transform of the run, written into its checkpoints (what `create_model` reads back)."""
        a, e = self.augment, self.eval
        return EvalSettings((3, a.img_size, a.img_size), e.eval_crop_pct, e.eval_interpolation, a.mean, a.std)

    def output_folder(self) -> Path:
        """The run folder: `output` (set at resolve time for a recipe run with another model), else the resumed
        run's folder, else `runs/<recipe or model>`."""
        if self.run.output:
            return Path(self.run.output)
        if self.run.resume:
            return resume_path(self.run.resume).parent
        return Path("runs") / recipe_name(self.run.recipe or self.model.model)


SECTIONS = {f.name: f.default_factory for f in fields(TrainConfig)}
KEY_SECTION = {f.name: section for section, cls in SECTIONS.items() for f in fields(cls)}
SCHEMA = S.Schema(SECTIONS)  # the parser, --set, recipe keys and docs/settings.md come from these declarations


def from_flat(flat: dict) -> TrainConfig:
    """The `TrainConfig` of a flat dict (missing keys: defaults); a ValueError names the first bad or unknown key."""
    unknown = sorted(set(flat) - set(KEY_SECTION))
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; the keys are those `mambaout train --print-config` prints")
    parts = {name: {} for name in SECTIONS}
    for key, value in flat.items():
        parts[KEY_SECTION[key]][key] = value
    return TrainConfig(**{name: SECTIONS[name](**values) for name, values in parts.items()})


def to_flat(cfg: TrainConfig) -> dict:
    """The flat dict of a typed configuration, as files hold it (tuples as lists), in DEFAULTS' key order."""
    return {
        k: list(v) if isinstance(v, tuple) else v for part in dataclasses.asdict(cfg).values() for k, v in part.items()
    }


# The official recipe (paper Sec. 4.1 and the official training scripts), ImageNet-1k at 224 px, as the flat file
# format: every key a recipe, --set or config.yaml may hold.
DEFAULTS: dict = to_flat(TrainConfig())


def _recipe_folders() -> list[Path]:
    return [Path.cwd() / "recipes", PACKAGE_RECIPES]


def find_recipe(name_or_path: str) -> Path:
    """A recipe path, or a name looked up in ./recipes, then among the recipes shipped with the package."""
    return R.find_recipe(name_or_path, _recipe_folders())


def list_recipes() -> list[str]:
    return R.list_recipes(_recipe_folders())


def recipes_table() -> str:
    """The recipes with the hardware, wall time and result their headers state (`--list-recipes`)."""
    return R.recipe_table(_recipe_folders(), "classify")


def load_recipe(name_or_path: str) -> dict:
    """A recipe's settings as flat keys (a recipe may also write them as `section.key`); ValueError for YAML that is
    no plain mapping, or an unknown key (one line naming it and the close ones)."""
    path = find_recipe(name_or_path)
    recipe = load_yaml(path.read_text(errors="replace"), str(path)) or {}  # a YamlError is a ValueError
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe {path} must be a YAML mapping of option: value")
    return SCHEMA.recipe_items(path, recipe)


def resolve_config(overrides: dict, require_data: bool = True) -> TrainConfig:
    """DEFAULTS < recipe (`overrides['recipe']`, or 'digits' when no data is given) < `overrides` (flat keys),
    typed; `require_data`: refuse a configuration without training data (off for `--print-config`)."""
    for key in overrides:
        if key not in DEFAULTS:
            SCHEMA.find(str(key))  # the unknown key, and the close ones, in one line
            raise ValueError(f"{key!r}: give settings to resolve_config by their flat name")
    RunConfig(recipe=overrides.get("recipe"), resume=overrides.get("resume"))  # paths, checked before they are opened
    if overrides.get("resume"):
        # A resumed run continues with the configuration it was started with; options given now still win.
        state = resume_path(overrides["resume"])
        saved = load_state(state).get("config", {})
        SCHEMA.refuse_network_changes(overrides["resume"], overrides, saved, flat=True)
        flat = {**DEFAULTS, **{k: v for k, v in saved.items() if k in DEFAULTS}}
        flat.update(stop_after_epochs=None, stop_after_steps=None, output=str(state.parent))
        return _typed({**flat, **overrides}, require_data)
    flat = dict(DEFAULTS)
    recipe = overrides.get("recipe")
    no_data = not any(overrides.get(k) for k in ("data", "data_train"))
    if recipe is None and no_data:
        recipe = "digits"  # the embedded default: no download, a few minutes on a laptop CPU
    model_named = "model" in overrides
    if recipe is not None:
        loaded = load_recipe(recipe)
        model_named = model_named or "model" in loaded
        flat.update(loaded, recipe=recipe)
    if overrides.get("initial_checkpoint") and not model_named:  # the model a `mambaout train` weights file records
        from mambaout.weights.checkpoint import read_checkpoint

        SCHEMA.checked("initial_checkpoint", overrides["initial_checkpoint"])  # a path, before it is opened
        flat["model"] = read_checkpoint(overrides["initial_checkpoint"])[1].get("model") or flat["model"]
    if overrides.get("data") is not None:
        # --data on the command line beats the recipe's data_train/data_val (only its own --data-train/-val beat it)
        flat.update(data_train=None, data_val=None)
    flat.update(overrides)
    if recipe is not None and loaded.get("model") not in (None, flat["model"]):
        _another_model(flat, loaded, recipe, overrides)
    DataConfig(**{f.name: flat[f.name] for f in fields(DataConfig)})  # the paths checked before they are looked into
    if isinstance(flat["data"], str) and (flat["data_train"] is None or flat["data_val"] is None):
        flat["data_train"] = flat["data_train"] or resolve_split(flat["data"], flat["train_split"])
        flat["data_val"] = flat["data_val"] or resolve_split(flat["data"], flat["val_split"])
    for key in ("data", "data_train", "data_val"):
        if isinstance(flat[key], str):
            flat[key] = _absolute(flat[key])  # stored resolved, so --resume works from any working directory
    return _typed(flat, require_data)


SHAPE_KWARGS = ("depths", "dims", "expansion_ratio", "head_mlp_ratio")  # what makes a recipe's model another network


def _another_model(flat: dict, recipe_values: dict, recipe: str, overrides: dict) -> None:
    """A recipe run with another `--model`: the recipe's model_kwargs that shape its network (depths, dims, ...) are
    left out, others (an ablation's kernel_size) kept; the run goes beside the recipe's model-specific folder
    (`runs/mamba-vs-mambaout/gated-cnn` -> `<that folder>/../<model>`), or in `runs/<recipe>-<model>`."""
    kwargs = flat.get("model_kwargs")
    if "model_kwargs" not in overrides and isinstance(kwargs, dict):
        dropped = [k for k in SHAPE_KWARGS if k in kwargs]
        if dropped:
            flat["model_kwargs"] = {k: v for k, v in kwargs.items() if k not in dropped}
            logger.warning(
                f"recipe {recipe_name(recipe)} shapes its model {recipe_values['model']} with model_kwargs "
                f"{', '.join(dropped)}; left out for {flat['model']} (--set model_kwargs=... to give them)"
            )
    if "output" not in overrides and isinstance(flat["model"], str):
        parent = Path(recipe_values["output"]).parent if recipe_values.get("output") else Path("runs")
        name = flat["model"] if parent != Path("runs") else f"{recipe_name(recipe)}-{flat['model']}"
        flat["output"] = str(parent / name)


def _typed(flat: dict, require_data: bool) -> TrainConfig:
    cfg = from_flat(flat)
    if require_data and cfg.data.data_train is None:
        named = f"recipe {cfg.run.recipe!r} names no data" if cfg.run.recipe else "no training data"
        raise ValueError(
            f"{named}: pass --data DIR (holding {cfg.data.train_split}/ and {cfg.data.val_split}/, folders or .tar) "
            "or --data-train PATH [--data-val PATH]"
        )
    check_model_size(cfg.model)
    sched = cfg.schedule
    if sched.warmup_epochs > sched.epochs:
        logger.warning(
            f"warmup_epochs={sched.warmup_epochs} is more than epochs={sched.epochs}: the lr never leaves its warmup"
        )
    return cfg


def check_model_size(model: ModelConfig) -> None:
    """Build the model on the meta device (no memory) to check its name and arguments and bound its size."""
    from mambaout.models.factory import create_model
    from mambaout.models.variants import get_variant

    try:
        variant = get_variant(model.model)[0] if model.pretrained else None
    except (KeyError, ValueError):
        variant = None  # an unknown name is said below, by the factory
    if variant is not None and not variant.weights:
        raise ValueError(
            f"pretrained=true: {variant.name} has no published weights; leave --pretrained out to train "
            "from random weights, or pass a weights file as --initial-checkpoint PATH"
        )
    try:
        with torch.device("meta"):
            probe = create_model(model.model, num_classes=model.num_classes or 1000, **model.create_kwargs())
    except (TypeError, ValueError, KeyError, OverflowError, ZeroDivisionError) as e:
        raise ValueError(f"model={model.model!r} with model_kwargs={C.show(model.model_kwargs)}: {e}") from None
    n = sum(p.numel() for p in probe.parameters())
    if n > MAX_MODEL_PARAMS:
        raise ValueError(
            f"model_kwargs={C.show(model.model_kwargs)}: {model.model} would have {n / 1e6:,.0f}M parameters, over "
            f"the bound of {MAX_MODEL_PARAMS / 1e6:,.0f}M; check depths/dims"
        )


def _absolute(path: str | None) -> str | None:
    """An existing local data path made absolute; `digits:...`, `hfds/...` and missing paths stay as given."""
    if not path or str(path).startswith((DIGITS, *MAP_STYLE_READERS)) or not Path(path).exists():
        return path
    return str(Path(path).resolve())


def recipe_name(recipe: str) -> str:
    """A recipe's name: itself, or the stem of a recipe given as a file path (`path/to/digits.yaml` -> `digits`)."""
    p = Path(recipe)
    return p.stem if p.suffix in (".yaml", ".yml") else recipe
