"""Classification as a training task: `train(cfg)` runs a `TrainConfig` through the engine (`trainer.fit`) as a
`ClassifyTask` (image folders or the embedded digits in; mixup/cutmix and smoothing; held-out top-1 and top-5)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mambaout.data.datasets import create_dataset
from mambaout.data.loaders import eval_loader, num_steps, train_loader
from mambaout.data.transforms import build_train_transform
from mambaout.training.config import MixupConfig, TrainConfig, to_flat
from mambaout.training.optim import create_optimizer, create_scheduler
from mambaout.training.trainer import Loop, Task, fit
from mambaout.utils import distributed as dist
from mambaout.utils.device import autocast
from mambaout.utils.files import jsonable
from mambaout.utils.text import printable


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) classification training as `cfg` says. Returns the last row, the run folder and the best."""
    loop = Loop.from_settings(
        to_flat(cfg),
        output=cfg.output_folder(),
        epochs=cfg.schedule.total_epochs,
        eval_every_epochs=cfg.eval.eval_every,
        accum_steps=cfg.batch.plan(dist.detect().world_size).accum_steps,
    )
    return fit(ClassifyTask(cfg), loop)


class ClassifyTask(Task):
    """Image classification: cross-entropy (soft targets under mixup), top-1 and top-5 on the held-out set."""

    name = "train"
    metric = "top1"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.batch_size = cfg.batch.batch_size

    def config(self) -> dict:
        return to_flat(self.cfg)

    def build_data(self, env, device: torch.device, loop: Loop) -> None:
        """The datasets and loaders of the run, and what the model needs to know about them."""
        paths, aug, loading, ev = self.cfg.data, self.cfg.augment, self.cfg.loading, self.cfg.eval_settings()
        self.plan = self.cfg.batch.plan(env.world_size)
        eval_tf, pin, rank, world = ev.transform(), device.type == "cuda", env.rank, env.world_size
        val_set = val_loader = None
        if paths.data_pipeline == "gpu":  # uint8 batches to the device, augmented there (mambaout.data.gpu_loader)
            from mambaout.data.gpu_loader import gpu_loaders

            train_set, val_set, loader, val_loader = gpu_loaders(
                paths.data_train, paths.data_val, aug, loading, rank, world, device, eval_tf
            )
        else:
            size = dict(cache=loading.cache, img_size=aug.img_size)
            train_set = create_dataset(paths.data_train, build_train_transform(aug), **size)
            if paths.data_val:  # substitute=False: held-out metrics count each readable image once
                val_set = create_dataset(paths.data_val, eval_tf, train_set.class_to_idx, substitute=False, **size)
            batch, seed, workers = loading.batch_size, loading.seed, loading.workers
            loader = train_loader(train_set, batch, rank, world, seed, workers, pin, loading.persistent_workers)
        accum = self.plan.accum_steps
        self.steps_per_epoch = num_steps(len(loader), accum)  # the engine applies max_steps_per_epoch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"an epoch has {len(loader)} batches, fewer than the {accum} accumulation steps of one optimizer "
                f"step (global batch {loading.batch_size * world * accum}); lower --global-batch or use more data"
            )
        if val_set is not None and val_loader is None:
            val_loader = eval_loader(val_set, loading.eval_batch_size, rank, world, loading.workers, pin)
        self.train_set, self.val_set, self.batches, self.val_loader = train_set, val_set, loader, val_loader
        self.classes, self.eval_config, self.train_images = list(train_set.classes), ev.to_dict(), len(train_set)
        self.mixup_fn, self.loss_fn = build_loss(self.cfg.mixup, len(self.classes))

    def build_model(self, device: torch.device) -> nn.Module:
        """The model to train, and (`meta`) what `create_model(checkpoint=...)` needs to rebuild it."""
        from mambaout.models.factory import create_model
        from mambaout.models.variants import get_variant

        cfg, classes = self.cfg.model, self.classes
        num_classes = cfg.num_classes or len(classes)
        if num_classes != len(classes):
            raise ValueError(
                f"--num-classes {num_classes} does not match the {len(classes)} classes of the training data "
                f"({self.cfg.data.data_train}); leave it out to take the data's"
            )
        kwargs = cfg.create_kwargs()
        variant, _ = get_variant(cfg.model)
        drop_path = cfg.drop_path if cfg.drop_path is not None else variant.default_drop_path
        model = create_model(
            cfg.model,
            pretrained=cfg.pretrained,
            checkpoint=cfg.initial_checkpoint,
            use_ema=cfg.use_ema,
            num_classes=num_classes,
            drop_path_rate=drop_path,
            **kwargs,
        )
        if cfg.head_init_scale != 1.0:
            with torch.no_grad():
                for p in model.get_classifier().parameters():
                    p.mul_(cfg.head_init_scale)
        # What create_model(checkpoint=...) needs to rebuild this model with no other argument: the architecture the
        # model was built with (an initial checkpoint's own widths included), never where its first weights came from.
        model_kwargs = {k: v for k, v in kwargs.items() if jsonable(v)}
        model_kwargs.update(getattr(model, "model_kwargs", {}))
        model_kwargs.update(num_classes=num_classes)
        if drop_path:
            model_kwargs["drop_path_rate"] = drop_path
        self._meta = dict(
            model=variant.name, model_kwargs=model_kwargs, class_names=classes, eval_config=self.eval_config
        )
        if cfg.pretrained or cfg.initial_checkpoint:
            origin = f"{variant.name} published weights" if cfg.pretrained else str(cfg.initial_checkpoint)
            self._meta["fine_tuned_from"] = origin
        if self.cfg.perf.grad_checkpointing:
            model.set_grad_checkpointing(True)
        model.to(device)
        if self.cfg.perf.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return create_optimizer(model, self.cfg.optim, self.plan.lr)

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int):
        return create_scheduler(optimizer, self.cfg.schedule, self.steps_per_epoch)

    def ema(self, model: nn.Module):
        if not self.cfg.ema.model_ema:
            return None
        from timm.utils import ModelEmaV3

        return ModelEmaV3(model, decay=self.cfg.ema.model_ema_decay)

    def prepare(self, batch, device: torch.device) -> tuple:
        x, y, n_bad = batch
        x, y = _to_device(x, y, device, self.cfg.perf.channels_last)
        if self.mixup_fn is not None:
            x, y = self.mixup_fn(x, y)
        return x, y, x.shape[0], n_bad.sum()  # the skip count: a host tensor from the loader

    def loss(self, model: nn.Module, inputs, targets) -> tuple[torch.Tensor, dict]:
        return self.loss_fn(model(inputs), targets), {}

    def evaluate_run(self, model: nn.Module, ema, device: torch.device, amp_dtype) -> dict | None:
        loader, channels_last = self.val_loader, self.cfg.perf.channels_last
        if loader is None:
            return None
        m = evaluate(model, loader, device, amp_dtype, channels_last)
        row = dict(val_loss=m["loss"], **{k: m[k] for k in ("top1", "top5", "skipped", "skipped_files")})
        if ema is not None:
            row["ema_top1"] = evaluate(ema, loader, device, amp_dtype, channels_last)["top1"]
        return row

    def describe(self, metrics: dict) -> str:
        msg = "  ".join(
            f"{label} {metrics[k]:.4f}" if k == "val_loss" else f"{label} {metrics[k]:.2f}%"
            for k, label in (("val_loss", "val loss"), ("top1", "top-1"), ("top5", "top-5"), ("ema_top1", "EMA top-1"))
            if metrics.get(k) is not None
        )
        if metrics.get("skipped"):
            names = metrics.get("skipped_files") or []
            more = f" (+{len(names) - 5} more)" if len(names) > 5 else ""
            named = f" (held-out, not counted: {printable(', '.join(names[:5]))}{more})" if names else ""
            msg += f"  skipped {metrics['skipped']} unreadable images{named}"
        return msg

    def meta(self) -> dict:
        return self._meta

    def banner(self, model: nn.Module, world_size: int) -> str:
        b, plan = self.cfg.batch, self.plan
        rule = f"(linear scaling: {b.lr_base:g} x {plan.global_batch} / {b.lr_base_batch})"
        lr_note = "(set explicitly)" if b.lr is not None else rule
        return (
            f"training {self._meta['model']} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) on "
            f"{len(self.train_set)} images, {len(self.classes)} classes, {self.cfg.augment.img_size} px | "
            f"{world_size} process(es) on {next(model.parameters()).device.type} | global batch {plan.global_batch} = "
            f"{b.batch_size} x {world_size} x {plan.accum_steps} accumulation | lr {plan.lr:.3g} {lr_note}"
        )

    def done(self, result: dict, out: Path) -> str:
        top1 = f"{result['top1']:.2f}%" if result.get("top1") is not None else "n/a"
        n_val = len(self.val_set) if self.val_set else 0
        return (
            f"done in {result['wall_s']:.0f}s: held-out top-1 {top1} ({n_val} images); "
            f"weights {out / 'last.safetensors'} (best: {out / 'best.safetensors'})"
        )


def _to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool):
    layout = torch.channels_last if channels_last else torch.preserve_format
    return x.to(device, non_blocking=True, memory_format=layout), y.to(device, non_blocking=True)


def build_loss(cfg: MixupConfig, num_classes: int):
    """(mixup function or None, loss): soft-target cross-entropy under mixup/cutmix, else (smoothed) cross-entropy."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if cfg.active:
        mixup_fn = Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            prob=cfg.mixup_prob,
            switch_prob=cfg.mixup_switch_prob,
            mode=cfg.mixup_mode,
            label_smoothing=cfg.smoothing,
            num_classes=num_classes,
        )
        return mixup_fn, SoftTargetCrossEntropy()  # the smoothing is already in the mixed soft targets
    if cfg.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return None, nn.CrossEntropyLoss()


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, device: torch.device, amp_dtype=None, channels_last=False, progress=None
) -> dict:
    """Top-1 and top-5 (k = min(5, classes), percent), mean cross-entropy (`loss`), `count` (readable images),
    `img_s`, `seconds`, `skipped` and `skipped_files` over `loader`, all ranks' shards summed (autocast to `amp_dtype`;
    None: full precision). A label outside the model's classes is an error, kept out of the loss. Unreadable images
    are not counted: a batch's third element names them (`data.collate_readable`) or counts them."""
    model.eval()
    # sums on the device (read once at the end: no host sync per batch); counts known on the host
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss_sum, n_loss
    count = skipped = 0
    skipped_files: list[str] = []
    t0 = time.perf_counter()
    for x, y, bad in loader:
        if isinstance(bad, list):  # names of the files left out of this batch
            skipped += len(bad)
            skipped_files += bad
        else:
            skipped = skipped + bad.sum()  # a host tensor from the loader
        if x is None:  # every image of the batch was unreadable
            continue
        x, y = _to_device(x, y, device, channels_last)
        with autocast(device, amp_dtype):
            logits = model(x).float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]  # [B, k]
        valid = (y >= 0) & (y < logits.shape[1])
        # out-of-range labels (any value) are masked out of the loss (ignored: 0) instead of indexed away (no sync)
        losses = F.cross_entropy(logits, y.masked_fill(~valid, -100), reduction="none", ignore_index=-100)
        sums += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), losses.sum(), valid.sum()]).double()
        count += x.shape[0]
        if progress is not None:
            progress.update(1)
    seconds = time.perf_counter() - t0
    # sums.tolist(): the one host sync of the pass
    correct1, correct5, loss_sum, n_loss, count, skipped = dist.all_reduce_sum(
        [*sums.tolist(), count, int(skipped)], device
    )
    return dict(
        top1=100.0 * correct1 / max(count, 1),
        top5=100.0 * correct5 / max(count, 1),
        loss=loss_sum / max(n_loss, 1),
        count=int(count),
        img_s=count / max(seconds, 1e-9),
        seconds=seconds,
        skipped=int(skipped),
        skipped_files=sorted(dist.all_gather_lists(skipped_files)),
    )
