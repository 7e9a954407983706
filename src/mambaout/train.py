"""The training run: configuration, data, model, optimizer and schedule, the epoch loop, checkpoints and resume.

Configuration resolves as `DEFAULTS` (the official ImageNet-1k recipe) < recipe file < command line; the resolved
result is written to `<run>/config.yaml`. A run folder holds:

- `last.safetensors`, `best.safetensors`, `epoch-NNNN.safetensors` (the `keep_top_k` best epochs): weights with the
  metadata `mambaout.create_model(checkpoint=...)` needs (model, model_kwargs, class_names, eval_config);
- `state.pt`: everything `--resume` needs (weights, optimizer, scheduler, grad scaler, EMA, epoch, step, RNG and
  sampler state, best and top-k bookkeeping). It is self-contained, so a crash between two file writes can never
  pair weights with the wrong optimizer state; every file is written to a temporary name and renamed;
- `config.yaml`, `summary.csv` (one row per epoch), `curves.png`, and TensorBoard events with `tensorboard: true`.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import data as D
from . import distributed as dist
from .engine import StepConfig, evaluate, train_one_epoch

logger = logging.getLogger("mambaout")

# The official recipe (paper Sec. 4.1 and the official training scripts), ImageNet-1k at 224 px.
DEFAULTS: dict = dict(
    # data
    data=None,  # folder holding <train_split>/ and <val_split>/ (folders or .tar files)
    data_train=None,  # or explicit paths: folder or .tar; 'digits' for the embedded dataset
    data_val=None,
    train_split="train",
    val_split="val",
    cache=False,  # keep file bytes in RAM (small datasets)
    workers=8,
    persistent_workers=False,  # true saves worker start-up per epoch, but --resume is then not bit-exact
    # model
    model="mambaout_tiny",
    model_kwargs={},  # extra create_model arguments (kernel_size, conv_ratio, ...)
    drop_path=None,  # None: the variant's recipe value (femto/kobe 0.025, tiny 0.2, small 0.4, base 0.6)
    drop_rate=0.0,
    # batch and optimizer: lr = lr_base * global_batch / lr_base_batch (linear scaling rule)
    batch_size=128,  # per device (per process)
    global_batch=4096,  # None: batch_size x world size (no accumulation)
    lr=None,  # absolute lr; overrides the scaling rule
    lr_base=4e-3,
    lr_base_batch=4096,
    opt="adamw",
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
    mean=list(D.IMAGENET_MEAN),
    std=list(D.IMAGENET_STD),
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
    keep_top_k=3,
    tensorboard=False,
    progress=True,
    max_steps_per_epoch=None,  # cap optimizer steps per epoch (smoke tests)
    stop_after_epochs=None,  # stop after this many epochs of this invocation (resume tests, time-boxed runs)
    stop_after_steps=None,  # stop after this many optimizer steps of this invocation, mid-epoch if need be
    checkpoint_every=0,  # also write state.pt every N optimizer steps inside epochs (0: at epoch ends only)
    recipe=None,
)

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
REPO_RECIPES = Path(__file__).resolve().parents[2] / "recipes"


# --- configuration ---------------------------------------------------------------------------------------------------


def find_recipe(name_or_path: str) -> Path:
    """A recipe path, or a name looked up in ./recipes and the repository's recipes/ folder."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise FileNotFoundError(f"recipe file {p} does not exist")
        return p
    for folder in (Path.cwd() / "recipes", REPO_RECIPES):
        for ext in (".yaml", ".yml"):
            if (folder / f"{name_or_path}{ext}").is_file():
                return folder / f"{name_or_path}{ext}"
    raise FileNotFoundError(f"no recipe named {name_or_path!r}; available: {', '.join(list_recipes()) or 'none'}")


def list_recipes() -> list[str]:
    names = set()
    for folder in (Path.cwd() / "recipes", REPO_RECIPES):
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
        raise ValueError(f"recipe {path} has unknown keys {unknown}; valid keys are the DEFAULTS in mambaout/train.py")
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
    if recipe is not None:
        cfg.update(load_recipe(recipe))
        cfg["recipe"] = recipe
    cfg.update(overrides)
    if cfg["data"] is not None and (cfg["data_train"] is None or cfg["data_val"] is None):
        cfg["data_train"] = cfg["data_train"] or D.resolve_split(cfg["data"], cfg["train_split"])
        cfg["data_val"] = cfg["data_val"] or D.resolve_split(cfg["data"], cfg["val_split"])
    validate_config(cfg)
    return cfg


def validate_config(cfg: dict) -> None:
    if cfg["data_train"] is None:
        raise ValueError("no training data: pass --data DIR, --data-train PATH, or a --recipe that names its data")
    if cfg["amp"] not in ("auto", *AMP_DTYPES):
        raise ValueError(f"amp must be one of auto, none, bf16, fp16; got {cfg['amp']!r}")
    for key in ("epochs", "batch_size"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"{key} must be a positive integer, got {cfg[key]!r}")
    if cfg["warmup_epochs"] < 0 or cfg["cooldown_epochs"] < 0:
        raise ValueError("warmup_epochs and cooldown_epochs must be >= 0")
    if (cfg["mixup"] > 0 or cfg["cutmix"] > 0) and cfg["batch_size"] % 2:
        raise ValueError(f"mixup/cutmix pair images within a batch: use an even --batch-size (got {cfg['batch_size']})")
    if cfg["opt"] != "adamw":
        raise ValueError(f"only opt: adamw is supported (the paper's optimizer), got {cfg['opt']!r}")


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


# --- pieces ----------------------------------------------------------------------------------------------------------


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The model's own groups when it defines them, else: no weight decay on 1-D parameters (norms) and biases."""
    if hasattr(model, "param_groups"):
        return model.param_groups(weight_decay)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def create_scheduler(optimizer, cfg: dict, steps_per_epoch: int):
    """timm's cosine schedule: warmup, cosine to min_lr over `epochs`, then min_lr through the cooldown epochs."""
    from timm.scheduler import CosineLRScheduler

    unit = steps_per_epoch if cfg["sched_on_updates"] else 1
    return CosineLRScheduler(
        optimizer,
        t_initial=cfg["epochs"] * unit,
        lr_min=cfg["min_lr"],
        warmup_t=cfg["warmup_epochs"] * unit,
        warmup_lr_init=cfg["warmup_lr"],
        cycle_limit=1,
        t_in_epochs=not cfg["sched_on_updates"],
    )


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = dict(
        torch=torch.get_rng_state(),
        numpy=[np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        python=list(random.getstate()),
    )
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy(), *n[2:]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _umask_mode() -> int:
    # mkstemp creates files 0600; a run folder's files should get the mode any other file would (0644 usually)
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_torch_save(obj, path: Path) -> None:
    """`torch.save` to a temporary file in the same folder, then rename (a crash never leaves a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, _umask_mode())
    os.replace(tmp, path)


def resume_path(path: str | os.PathLike) -> Path:
    """`--resume` accepts a run folder or its `state.pt`."""
    p = Path(path)
    if p.is_dir():
        p = p / "state.pt"
    if not p.is_file():
        raise FileNotFoundError(f"--resume {path}: no training state found (expected a run folder holding state.pt)")
    return p


def load_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read training state {path} ({type(e).__name__}: {e})") from e


# --- the run ---------------------------------------------------------------------------------------------------------


class Run:
    """Files of one run folder, written by rank 0 only."""

    FIELDS = [
        "epoch",
        "lr",
        "train_loss",
        "val_loss",
        "top1",
        "top5",
        "ema_top1",
        "train_img_s",
        "epoch_s",
        "skipped",
    ]

    def __init__(self, out: Path, cfg: dict, meta: dict, write: bool):
        self.out, self.cfg, self.meta, self.write = out, cfg, meta, write
        self.tb = None
        if write:
            out.mkdir(parents=True, exist_ok=True)
            import yaml

            atomic_write_text(out / "config.yaml", yaml.safe_dump(_plain(cfg), sort_keys=False))
            if cfg["tensorboard"]:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))

    def rows(self) -> list[dict]:
        path = self.out / "summary.csv"
        if not path.is_file():
            return []
        with open(path) as f:
            return list(csv.DictReader(f))

    def log_epoch(self, row: dict) -> None:
        if not self.write:
            return
        # keep rows of epochs before this one only: a resumed run rewrites the epochs it redoes
        rows = [r for r in self.rows() if int(r["epoch"]) < row["epoch"]] + [row]
        lines = [",".join(self.FIELDS)]
        for r in rows:
            lines.append(",".join(_fmt(r.get(k)) for k in self.FIELDS))
        atomic_write_text(self.out / "summary.csv", "\n".join(lines) + "\n")
        if self.tb is not None:
            for k in self.FIELDS[1:]:
                if row.get(k) not in (None, ""):
                    self.tb.add_scalar(k, float(row[k]), row["epoch"])
            self.tb.flush()
        try:
            plot_curves(self.out / "summary.csv", self.out / "curves.png")
        except Exception as e:  # a plotting problem must never stop training
            logger.warning("could not draw curves.png: %s", e)

    def save_weights(self, model: nn.Module, name: str, **extra) -> Path:
        from .checkpoint import save_weights

        return save_weights(model, self.out / name, **self.meta, **extra)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _fmt(v) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def plot_curves(summary_csv: Path, png: Path) -> None:
    """Loss, top-1 and learning rate per epoch from `summary.csv` into one PNG (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(summary_csv) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return

    def col(k):
        return [float(r[k]) if r.get(k) else math.nan for r in rows]

    ep = [int(r["epoch"]) + 1 for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(ep, col("train_loss"), label="train")
    axes[0].plot(ep, col("val_loss"), label="val")
    axes[0].set_title("loss")
    axes[1].plot(ep, col("top1"), label="top-1")
    if any(not math.isnan(v) for v in col("ema_top1")):
        axes[1].plot(ep, col("ema_top1"), label="EMA top-1")
    axes[1].set_title("val accuracy (%)")
    axes[2].plot(ep, col("lr"))
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, png)


def _say(msg: str) -> None:
    if dist.is_main():
        print(msg, flush=True)


def train(cfg: dict) -> dict:
    """Run (or resume) training as `cfg` says. Returns the final metrics and the run folder.

    The caller resolves `cfg` with `resolve_config`; under torchrun every rank calls this with the same config.
    """
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    import mambaout

    env, device = dist.init(cfg["device"])
    try:
        if cfg["threads"]:
            torch.set_num_threads(int(cfg["threads"]))
        amp = cfg["amp"]
        if amp == "auto":
            amp = "bf16" if device.type == "cuda" else "none"
        amp_dtype = AMP_DTYPES[amp]

        state = None
        if cfg["resume"]:
            state = load_state(resume_path(cfg["resume"]))
            if cfg["output"] is None:
                cfg["output"] = str(resume_path(cfg["resume"]).parent)
        out = Path(cfg["output"] or Path("runs") / (cfg["recipe"] or cfg["model"]))

        # data: the val set takes the train set's class -> index map, so labels agree even with missing folders
        global_batch, accum, lr = batch_plan(cfg, env.world_size)
        train_tf = D.build_train_transform(cfg)
        eval_config = dict(
            input_size=[3, cfg["img_size"], cfg["img_size"]],
            crop_pct=cfg["eval_crop_pct"],
            interpolation=cfg["eval_interpolation"],
            mean=list(cfg["mean"]),
            std=list(cfg["std"]),
            crop_mode="center",
        )
        eval_tf = D.build_eval_transform(eval_config)
        train_set = D.create_dataset(cfg["data_train"], train_tf, cache=cfg["cache"], img_size=cfg["img_size"])
        val_set = None
        if cfg["data_val"]:
            val_set = D.create_dataset(
                cfg["data_val"], eval_tf, train_set.class_to_idx, cache=cfg["cache"], img_size=cfg["img_size"]
            )
        classes = list(train_set.classes)
        workers = cfg["workers"]
        pin = device.type == "cuda"
        loader = D.train_loader(
            train_set, cfg["batch_size"], env.rank, env.world_size, cfg["seed"], workers, pin, cfg["persistent_workers"]
        )
        steps_per_epoch = D.num_steps(len(loader), accum)
        if cfg["max_steps_per_epoch"]:
            steps_per_epoch = min(steps_per_epoch, cfg["max_steps_per_epoch"])
        if steps_per_epoch == 0:
            raise ValueError(
                f"an epoch has {len(loader)} batches, fewer than the {accum} accumulation steps of one optimizer "
                f"step (global batch {global_batch}); lower --global-batch or use more data"
            )
        eval_bs = cfg["eval_batch_size"] or 2 * cfg["batch_size"]
        val_loader = D.eval_loader(val_set, eval_bs, env.rank, env.world_size, workers, pin) if val_set else None

        # model: every registered model trains through the same factory
        seed_all(cfg["seed"])
        kwargs = dict(cfg["model_kwargs"] or {})
        if cfg["drop_rate"]:  # only when asked: not every registered builder takes a head dropout
            kwargs.setdefault("drop_rate", cfg["drop_rate"])
        variant, _ = mambaout.get_variant(cfg["model"])
        drop_path = cfg["drop_path"] if cfg["drop_path"] is not None else variant.default_drop_path
        model = mambaout.create_model(cfg["model"], num_classes=len(classes), drop_path_rate=drop_path, **kwargs)
        if cfg["grad_checkpointing"]:
            model.set_grad_checkpointing(True)
        model.to(device)
        if cfg["channels_last"]:
            model.to(memory_format=torch.channels_last)
        # What create_model(checkpoint=...) needs to rebuild this model with no other argument.
        model_kwargs = {k: v for k, v in kwargs.items() if _jsonable(v)}
        model_kwargs.update(num_classes=len(classes))
        if drop_path:
            model_kwargs["drop_path_rate"] = drop_path
        meta = dict(model=variant.name, model_kwargs=model_kwargs, class_names=classes, eval_config=eval_config)

        optimizer = torch.optim.AdamW(
            param_groups(model, cfg["weight_decay"]), lr=lr, betas=tuple(cfg["betas"]), eps=cfg["eps"]
        )
        scheduler = create_scheduler(optimizer, cfg, steps_per_epoch)
        scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
        ema = None
        if cfg["model_ema"]:
            from timm.utils import ModelEmaV3

            ema = ModelEmaV3(model, decay=cfg["model_ema_decay"])

        start_epoch, global_step, best, top_k = 0, 0, None, []
        resume_step, resume_rng = 0, None  # a mid-epoch state: steps already done in `start_epoch`, and its RNG
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            if ema is not None and state.get("ema"):
                ema.module.load_state_dict(state["ema"])
            start_epoch, global_step = state["epoch"] + 1, state["step"]
            best, top_k = state.get("best"), [tuple(t) for t in state.get("top_k", [])]
            resume_step = state.get("epoch_step", 0)
            resume_rng = state["rng"] if resume_step else None
            _say(
                f"resumed from {cfg['resume']}: epoch {start_epoch + 1} of {total_epochs(cfg)}"
                + (f" after its step {resume_step}" if resume_step else "")
                + f", global step {global_step}"
            )

        train_model = dist.wrap(model, device)
        if cfg["compile"]:
            train_model = torch.compile(train_model)

        mixup_fn = None
        if cfg["mixup"] > 0 or cfg["cutmix"] > 0:
            mixup_fn = Mixup(
                mixup_alpha=cfg["mixup"],
                cutmix_alpha=cfg["cutmix"],
                prob=cfg["mixup_prob"],
                switch_prob=cfg["mixup_switch_prob"],
                mode=cfg["mixup_mode"],
                label_smoothing=cfg["smoothing"],
                num_classes=len(classes),
            )
            loss_fn = SoftTargetCrossEntropy()  # the smoothing is already in the mixed soft targets
        elif cfg["smoothing"] > 0:
            loss_fn = LabelSmoothingCrossEntropy(smoothing=cfg["smoothing"])
        else:
            loss_fn = nn.CrossEntropyLoss()

        run = Run(out, cfg, meta, write=dist.is_main())
        lr_note = (
            "(set explicitly)"
            if cfg["lr"] is not None
            else f"(linear scaling: {cfg['lr_base']:g} x {global_batch} / {cfg['lr_base_batch']})"
        )
        n_epochs = total_epochs(cfg)
        _say(
            f"training {variant.name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) on "
            f"{len(train_set)} images, {len(classes)} classes, {cfg['img_size']} px | {env.world_size} process(es) "
            f"on {device.type} | global batch {global_batch} = {cfg['batch_size']} x {env.world_size} x {accum} "
            f"accumulation | lr {lr:.3g} {lr_note} | {n_epochs} epochs x {steps_per_epoch} steps "
            f"| amp {amp} | output {out}"
        )
        step_cfg = StepConfig(accum, amp_dtype, cfg["clip_grad"], cfg["channels_last"])
        result: dict = {}
        run_start = time.perf_counter()
        epochs_this_call = steps_this_call = 0

        def save_state(completed_epoch: int, step: int, epoch_step: int = 0) -> None:
            """state.pt: everything --resume needs; `epoch_step` > 0 marks a checkpoint inside the next epoch."""
            if not dist.is_main():
                return
            atomic_torch_save(
                dict(
                    model=model.state_dict(),
                    optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(),
                    scaler=scaler.state_dict() if scaler is not None else None,
                    ema=ema.module.state_dict() if ema is not None else None,
                    epoch=completed_epoch,
                    step=step,
                    epoch_step=epoch_step,
                    best=best,
                    top_k=[list(t) for t in top_k],
                    rng=rng_state(),
                    sampler=dict(
                        seed=cfg["seed"],
                        epoch=completed_epoch + (1 if epoch_step else 0),
                        samples_done=epoch_step * accum * cfg["batch_size"],
                        world_size=env.world_size,
                    ),
                    config=_plain(cfg),
                    meta=meta,
                ),
                out / "state.pt",
            )

        for epoch in range(start_epoch, n_epochs):
            # Seeding per epoch makes an epoch's randomness a function of (seed, epoch, rank) only, so a resumed
            # run replays exactly what an uninterrupted one would have done.
            seed_all(cfg["seed"] + 1000 * epoch + env.rank)
            loader.sampler.set_epoch(epoch)
            # resuming a mid-epoch checkpoint: leave out the batches it had trained on
            skip_steps = resume_step if epoch == start_epoch else 0
            loader.sampler.skip = skip_steps * accum * cfg["batch_size"]
            if not cfg["sched_on_updates"]:
                scheduler.step(epoch)
            else:
                scheduler.step_update(global_step)
            lr_now = optimizer.param_groups[0]["lr"]

            def on_start(_skip=skip_steps):
                # Mid-epoch resume: continue the RNG where the checkpoint left it (after the loader's iterator has
                # drawn its seed, as it had in the interrupted run), so with workers=0 the rest of the epoch
                # is bit-identical; with worker processes the data order is, their augmentation draws are not.
                if _skip and resume_rng is not None:
                    set_rng_state(resume_rng)

            stopped_mid = []

            def on_step(
                n, _base=global_step, _skip=skip_steps, _epoch=epoch, _called=steps_this_call, _out=stopped_mid
            ):
                step_now, done = _base + n, _skip + n
                if cfg["sched_on_updates"]:
                    scheduler.step_update(step_now)
                inside = done < steps_per_epoch  # the epoch-end checkpoint covers the last step
                stop = bool(cfg["stop_after_steps"]) and _called + n >= cfg["stop_after_steps"] and inside
                every = cfg["checkpoint_every"]
                if inside and (stop or (every and step_now % every == 0)):
                    save_state(_epoch - 1, step_now, epoch_step=done)
                if stop:
                    _out.append(done)
                return stop

            bar = None
            if cfg["progress"] and dist.is_main():
                from tqdm import tqdm

                bar = tqdm(
                    total=steps_per_epoch,
                    initial=skip_steps,
                    desc=f"epoch {epoch + 1}/{n_epochs}",
                    leave=False,
                    file=sys.stderr,
                )
            t0 = time.perf_counter()
            stats = train_one_epoch(
                train_model,
                loader,
                optimizer,
                loss_fn,
                device,
                step_cfg,
                mixup_fn=mixup_fn,
                scaler=scaler,
                ema=ema,
                on_step=on_step,
                on_start=on_start,
                max_steps=steps_per_epoch - skip_steps,
                progress=bar,
            )
            if bar is not None:
                bar.close()
            global_step += stats["steps"]
            steps_this_call += stats["steps"]
            if stopped_mid:
                _say(
                    f"stopping at step {stopped_mid[0]} of epoch {epoch + 1} as asked (state saved); "
                    f"continue with --resume {out}"
                )
                dist.barrier()
                result = dict(epoch=epoch, output=str(out), stopped=True)
                break
            row = dict(
                epoch=epoch,
                lr=lr_now,
                train_loss=stats["loss"],
                train_img_s=stats["img_s"] * env.world_size,
                skipped=stats["skipped"],
            )
            last_epoch = epoch == n_epochs - 1
            metrics = ema_metrics = None
            if val_loader is not None and ((epoch + 1) % cfg["eval_every"] == 0 or last_epoch):
                metrics = evaluate(model, val_loader, device, amp_dtype, cfg["channels_last"])
                row.update(val_loss=metrics["loss"], top1=metrics["top1"], top5=metrics["top5"])
                row["skipped"] += metrics["skipped"]
                if ema is not None:
                    ema_metrics = evaluate(ema.module, val_loader, device, amp_dtype, cfg["channels_last"])
                    row["ema_top1"] = ema_metrics["top1"]
            row["epoch_s"] = time.perf_counter() - t0

            if dist.is_main():
                _save_epoch(run, model, ema, row, metrics, ema_metrics, epoch, cfg, top_k)
                if metrics is not None:
                    score = max(metrics["top1"], ema_metrics["top1"] if ema_metrics else -1)
                    if best is None or score > best["top1"]:
                        use_ema = ema_metrics is not None and ema_metrics["top1"] > metrics["top1"]
                        best = dict(epoch=epoch, top1=score, source="ema" if use_ema else "model")
                        run.save_weights(ema.module if use_ema else model, "best.safetensors", epoch=epoch, top1=score)
                save_state(epoch, global_step)
                msg = (
                    f"epoch {epoch + 1}/{n_epochs}  lr {lr_now:.3g}  train loss {stats['loss']:.4f}  "
                    f"{row['train_img_s']:.0f} img/s  {row['epoch_s']:.0f}s"
                )
                if metrics is not None:
                    msg += (
                        f"  val loss {metrics['loss']:.4f}  top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%"
                    )
                if ema_metrics is not None:
                    msg += f"  EMA top-1 {ema_metrics['top1']:.2f}%"
                if row["skipped"]:
                    msg += f"  skipped {row['skipped']} unreadable images"
                _say(msg)
            dist.barrier()
            result = dict(row, output=str(out))
            epochs_this_call += 1
            if cfg["stop_after_epochs"] and epochs_this_call >= cfg["stop_after_epochs"] and not last_epoch:
                _say(f"stopping after {epochs_this_call} epoch(s) as asked; continue with --resume {out}")
                result["stopped"] = True
                break
        result["wall_s"] = time.perf_counter() - run_start
        result["best"] = best
        run.close()
        if dist.is_main() and not result.get("stopped") and result:
            top1 = f"{result['top1']:.2f}%" if result.get("top1") is not None else "n/a"
            _say(
                f"done in {result['wall_s']:.0f}s: held-out top-1 {top1} ({len(val_set) if val_set else 0} images); "
                f"weights {out / 'last.safetensors'} (best: {out / 'best.safetensors'})"
            )
        return result
    finally:
        dist.cleanup()


def _jsonable(v) -> bool:  # the metadata is JSON: module classes and callables cannot be recorded
    return isinstance(v, (int, float, str, bool, type(None), list, tuple))


def _save_epoch(run: Run, model, ema, row, metrics, ema_metrics, epoch: int, cfg: dict, top_k: list) -> None:
    """last.safetensors every epoch, the k best epochs as epoch-NNNN.safetensors, and the summary row."""
    extra = dict(epoch=epoch)
    if metrics is not None:
        extra["top1"] = metrics["top1"]
    run.save_weights(model, "last.safetensors", **extra)
    if ema is not None:
        run.save_weights(ema.module, "last_ema.safetensors", **extra)
    if metrics is not None and cfg["keep_top_k"]:
        name = f"epoch-{epoch:04d}.safetensors"
        top_k.append((metrics["top1"], epoch, name))
        top_k.sort(key=lambda t: (-t[0], t[1]))
        if any(t[2] == name for t in top_k[: cfg["keep_top_k"]]):
            run.save_weights(model, name, **extra)
        for _, _, dropped in top_k[cfg["keep_top_k"] :]:
            (run.out / dropped).unlink(missing_ok=True)
        del top_k[cfg["keep_top_k"] :]
    run.log_epoch(row)
