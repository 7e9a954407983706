"""The training run, top to bottom: data, model, optimizer and schedule, then epochs.

`fit(cfg)` takes a `TrainConfig` (`mambaout.training.config.resolve_config`) and hands each part its section; the files it writes are described
in `mambaout.training.runfolder`. Under torchrun every rank calls it with the same configuration; only rank 0 writes.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from mambaout.data.datasets import create_dataset
from mambaout.data.loaders import EpochLoader, eval_loader, num_steps, train_loader
from mambaout.data.transforms import build_train_transform
from mambaout.training.config import (
    BatchPlan,
    EmaConfig,
    EvalConfig,
    MixupConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    to_flat,
)
from mambaout.training.engine import EpochTotals, StepConfig, evaluate, train_one_epoch
from mambaout.training.optim import create_optimizer, create_scheduler
from mambaout.training.runfolder import (
    Progress,
    RunFolder,
    Trainable,
    check_output_free,
    load_state,
    resume_path,
    seed_all,
    set_rng_state,
    tensorboard_writer,
)
from mambaout.utils import distributed as dist
from mambaout.utils.files import FileWriteError, jsonable
from mambaout.utils.interrupt import DeferredInterrupt
from mambaout.utils.text import printable


class Interrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C at a step boundary, its state saved (the message says where)."""


def fit(cfg: TrainConfig) -> dict:
    """Run (or resume) training as `cfg` says. Returns the last epoch's metrics, the run folder and the best epoch."""
    env, device = dist.init(cfg.perf.device)
    run = None
    n_epochs = cfg.schedule.total_epochs
    try:
        if cfg.perf.threads:
            torch.set_num_threads(cfg.perf.threads)
        amp, amp_dt = cfg.perf.amp_dtype(device)
        state = load_state(resume_path(cfg.run.resume)) if cfg.run.resume else None
        out = cfg.output_folder()
        if state is not None and _finished(state, n_epochs):
            # nothing left to train: say so and touch nothing (no "epoch 31 of 30", no rewritten config or log)
            _say(_finished_line(state, cfg.run.resume, n_epochs))
            return dict(output=str(out), finished=True, best=state.get("best"))
        plan = cfg.batch.plan(env.world_size)
        if dist.is_main():
            check_output_free(out, cfg.run.resume, cfg.run.overwrite)
            if cfg.run.tensorboard:
                tensorboard_writer(None)  # fail before the data is read, when tensorboard is missing

        # data: the val set takes the train set's class -> index map, so labels agree even with missing folders
        data = Data.build(cfg, env, device, plan.accum_steps)

        # model: every registered model trains through the same factory
        seed_all(cfg.run.seed)
        model, meta = build_model(cfg.model, data.classes, data.eval_config, cfg.data.data_train)
        if cfg.perf.grad_checkpointing:
            model.set_grad_checkpointing(True)
        model.to(device)
        if cfg.perf.channels_last:
            model.to(memory_format=torch.channels_last)

        # optimizer, schedule, grad scaler, EMA; then the state to resume from
        optimizer = create_optimizer(model, cfg.optim, plan.lr)
        scheduler = create_scheduler(optimizer, cfg.schedule, data.steps_per_epoch)
        scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
        parts = Trainable(model, optimizer, scheduler, scaler, create_ema(model, cfg.ema))
        progress = Progress() if state is None else Progress.restore(state, parts)
        if state is not None:
            _say_resumed(cfg.run.resume, n_epochs, progress)
        train_model = dist.wrap(model, device)
        if cfg.perf.compile:
            train_model = torch.compile(train_model)
        mixup_fn, loss_fn = build_loss(cfg.mixup, len(data.classes))

        run = RunFolder(out, to_flat(cfg), meta, dist.is_main(), cfg.run.keep_top_k, cfg.run.tensorboard)
        if dist.is_main():
            _LOG.open(out / "train.log", append=bool(cfg.run.resume))
        _say(_banner(cfg, meta["model"], model, data, env, device, plan, amp, out))
        step_cfg = StepConfig(plan.accum_steps, amp_dt, cfg.optim.clip_grad, cfg.perf.channels_last)
        samples_per_step = plan.accum_steps * cfg.batch.batch_size  # on one rank
        result: dict = {}
        run_start = time.perf_counter()
        epochs_this_call = steps_this_call = 0
        resume_hint = f"continue with --resume {out}"
        # Ctrl-C stops after the optimizer step under way, where the state is consistent and is saved; a second one
        # stops at once. Several processes could not agree on that step: there Ctrl-C stops at once, as usual.
        interrupt = DeferredInterrupt("stopping after this optimizer step, then saving the state", env.world_size == 1)
        with interrupt:
            for epoch in range(progress.start_epoch, n_epochs):
                hook = StepHook(
                    cfg.run,
                    cfg.schedule.sched_on_updates,
                    run,
                    parts,
                    progress,
                    epoch,
                    data.steps_per_epoch,
                    steps_this_call,
                    interrupt,
                )
                hook.begin_epoch(data.loader, env.rank, samples_per_step)
                t0 = time.perf_counter()
                stats = _train_epoch(
                    train_model, data, parts, loss_fn, mixup_fn, device, step_cfg, hook, cfg.run, n_epochs
                )
                progress.global_step += stats["steps"]
                steps_this_call += stats["steps"]
                if hook.stopped_at is not None:
                    if interrupt.asked:
                        raise Interrupted(
                            f"interrupted at step {hook.stopped_at} of epoch {epoch + 1}, state saved; {resume_hint}"
                        )
                    _say(
                        f"stopping at step {hook.stopped_at} of epoch {epoch + 1} as asked (state saved); {resume_hint}"
                    )
                    dist.barrier()
                    result = dict(epoch=epoch, output=str(out), stopped=True)
                    break
                row = dict(epoch=epoch, lr=hook.last_lr, train_loss=stats["loss"], skipped=stats["skipped"])
                row["train_img_s"] = stats["img_s"] * env.world_size
                metrics, ema_metrics = _evaluate_epoch(
                    cfg.eval, n_epochs, parts, data.val_loader, device, amp_dt, cfg.perf.channels_last, row
                )
                row["epoch_s"] = time.perf_counter() - t0
                if dist.is_main():
                    run.save_epoch(parts, progress, row, metrics, ema_metrics)
                    run.save_state(parts, progress, epoch, progress.global_step)
                    _say(_epoch_line(row, n_epochs, metrics, ema_metrics))
                dist.barrier()
                result = dict(row, output=str(out))
                if interrupt.asked and epoch < n_epochs - 1:
                    raise Interrupted(f"interrupted after epoch {epoch + 1}, state saved; {resume_hint}")
                epochs_this_call += 1
                last_epoch = epoch == n_epochs - 1
                stop_after = cfg.run.stop_after_epochs
                if stop_after and epochs_this_call >= stop_after and not last_epoch:
                    _say(f"stopping after {epochs_this_call} epoch(s) as asked; {resume_hint}")
                    result["stopped"] = True
                    break
        result.update(wall_s=time.perf_counter() - run_start, best=progress.best)
        if dist.is_main() and not result.get("stopped") and result:
            _say_done(result, data, out)
        return result
    finally:
        _LOG.close()
        if run is not None:
            run.close()  # also releases the run folder's lock when training fails
        dist.cleanup()


# --- building the pieces ---------------------------------------------------------------------------------------------


@dataclass
class Data:
    """The datasets and loaders of a run, and what the model needs to know about them."""

    train_set: object
    val_set: object | None
    loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader | None
    classes: list[str]
    eval_config: dict
    steps_per_epoch: int

    @classmethod
    def build(cls, cfg: TrainConfig, env, device: torch.device, accum: int) -> Data:
        paths, aug, loading = cfg.data, cfg.augment, cfg.loading
        ev = cfg.eval_settings()
        eval_tf = ev.transform()
        pin = device.type == "cuda"
        val_loader = None
        if paths.data_pipeline == "gpu":  # uint8 batches to the device, augmented there (mambaout.data.gpu_loader)
            from mambaout.data.gpu_loader import gpu_loaders

            train_set, val_set, loader, val_loader = gpu_loaders(
                paths.data_train, paths.data_val, aug, loading, env.rank, env.world_size, device, eval_tf
            )
        else:
            train_set = create_dataset(
                paths.data_train, build_train_transform(aug), cache=loading.cache, img_size=aug.img_size
            )
            val_set = None
            if paths.data_val:
                val_set = create_dataset(
                    paths.data_val,
                    eval_tf,
                    train_set.class_to_idx,
                    cache=loading.cache,
                    img_size=aug.img_size,
                    substitute=False,  # held-out metrics count each readable image once
                )
            loader = train_loader(
                train_set,
                loading.batch_size,
                env.rank,
                env.world_size,
                loading.seed,
                loading.workers,
                pin,
                loading.persistent_workers,
            )
        steps_per_epoch = num_steps(len(loader), accum)
        if cfg.run.max_steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, cfg.run.max_steps_per_epoch)
        if steps_per_epoch == 0:
            raise ValueError(
                f"an epoch has {len(loader)} batches, fewer than the {accum} accumulation steps of one optimizer "
                f"step (global batch {loading.batch_size * env.world_size * accum}); lower --global-batch or use "
                "more data"
            )
        if val_set is not None and val_loader is None:
            val_loader = eval_loader(val_set, loading.eval_batch_size, env.rank, env.world_size, loading.workers, pin)
        return cls(train_set, val_set, loader, val_loader, list(train_set.classes), ev.to_dict(), steps_per_epoch)


def build_model(cfg: ModelConfig, classes: list[str], eval_cfg: dict, data_train: str) -> tuple[nn.Module, dict]:
    """The model to train, and the metadata its checkpoints carry (what `create_model(checkpoint=...)` needs).

    With `pretrained` or `initial_checkpoint` the weights come from there (fine-tuning); a classifier of another
    class count than the data's is replaced by a fresh one.
    """
    from mambaout.models.factory import create_model
    from mambaout.models.variants import get_variant

    num_classes = cfg.num_classes or len(classes)
    if num_classes != len(classes):
        raise ValueError(
            f"--num-classes {num_classes} does not match the {len(classes)} classes of the training data "
            f"({data_train}); leave it out to take the data's"
        )
    kwargs = dict(cfg.model_kwargs)
    if cfg.drop_rate:  # only when asked: not every registered builder takes a head dropout
        kwargs.setdefault("drop_rate", cfg.drop_rate)
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
    # What create_model(checkpoint=...) needs to rebuild this model with no other argument: the architecture the
    # model was built with (an initial checkpoint's own widths included), never where its first weights came from.
    model_kwargs = {k: v for k, v in kwargs.items() if jsonable(v)}
    model_kwargs.update(getattr(model, "model_kwargs", {}))
    model_kwargs.update(num_classes=num_classes)
    if drop_path:
        model_kwargs["drop_path_rate"] = drop_path
    meta = dict(model=variant.name, model_kwargs=model_kwargs, class_names=classes, eval_config=eval_cfg)
    if cfg.pretrained or cfg.initial_checkpoint:
        meta["fine_tuned_from"] = f"{variant.name} published weights" if cfg.pretrained else str(cfg.initial_checkpoint)
    return model, meta


def create_ema(model: nn.Module, cfg: EmaConfig):
    """timm's ModelEmaV3 of the weights (evaluated beside the model), or None when `model_ema` is off."""
    if not cfg.model_ema:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=cfg.model_ema_decay)


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


# --- one epoch -------------------------------------------------------------------------------------------------------


class StepHook:
    """What happens at the start of an epoch and after each of its optimizer steps.

    `engine.train_one_epoch` calls `start()` once the loader's iterator exists and `step(n)` after its n-th
    optimizer step; `step` updates a per-step schedule, writes mid-epoch checkpoints (`checkpoint_every`) and asks
    to stop (`stop_after_steps`), recording where in `stopped_at`.
    """

    def __init__(
        self,
        cfg: RunConfig,
        per_update: bool,
        run: RunFolder,
        parts: Trainable,
        progress: Progress,
        epoch,
        steps_per_epoch,
        called,
        interrupt: DeferredInterrupt | None = None,
    ):
        self.run, self.parts, self.progress = run, parts, progress
        self.interrupt = interrupt  # Ctrl-C asks to stop after the step under way (its state then saved)
        self.seed, self.per_update = cfg.seed, per_update  # per_update: the schedule steps every optimizer step
        self.stop_after, self.every = cfg.stop_after_steps, cfg.checkpoint_every
        self.epoch, self.steps_per_epoch = epoch, steps_per_epoch
        self.base_step = progress.global_step  # optimizer steps before this epoch
        self.called = called  # optimizer steps this invocation took before this epoch
        # resuming a mid-epoch checkpoint: leave out the steps it had trained
        self.skip = progress.resume_step if epoch == progress.start_epoch else 0
        self.stopped_at: int | None = None
        self.last_lr = 0.0  # the lr of the epoch's latest optimizer step (the classifier's, under layer decay)
        # the epoch's running sums, continued from a mid-epoch checkpoint and stored with the next one
        self.totals = EpochTotals.from_dict(progress.resume_totals if self.skip else None)

    def lr(self) -> float:
        return max(group["lr"] for group in self.parts.optimizer.param_groups)

    def begin_epoch(self, loader: EpochLoader, rank: int, samples_per_step: int) -> float:
        """Seed the epoch, position the loader, set the epoch's learning rate; returns it."""
        # Seeding per epoch makes an epoch's randomness a function of (seed, epoch, rank) only, so a resumed
        # run replays exactly what an uninterrupted one would have done.
        seed_all(self.seed + 1000 * self.epoch + rank)
        loader.set_epoch(self.epoch)
        loader.skip_samples(self.skip * samples_per_step)
        if not self.per_update:
            self.parts.scheduler.step(self.epoch)
        else:
            self.parts.scheduler.step_update(self.progress.global_step)
        self.last_lr = self.lr()
        return self.last_lr

    def start(self) -> None:
        # Mid-epoch resume: continue the RNG where the checkpoint left it (after the loader's iterator has
        # drawn its seed, as it had in the interrupted run), so with workers=0 the rest of the epoch
        # is bit-identical; with worker processes the data order is, their augmentation draws are not.
        if self.skip and self.progress.resume_rng is not None:
            set_rng_state(self.progress.resume_rng)

    def step(self, n: int) -> bool:
        """After the n-th optimizer step of this call of the epoch; True asks the engine to stop."""
        step_now, done = self.base_step + n, self.skip + n
        self.last_lr = self.lr()  # the lr step n used, before the schedule moves on
        if self.per_update:
            self.parts.scheduler.step_update(step_now)
        inside = done < self.steps_per_epoch  # the epoch-end checkpoint covers the last step
        stop = bool(self.stop_after) and self.called + n >= self.stop_after and inside
        stop = stop or (self.interrupt is not None and self.interrupt.asked and inside)
        if inside and (stop or (self.every and step_now % self.every == 0)):
            totals = self.totals.as_dict()  # a host read
            self.run.save_state(self.parts, self.progress, self.epoch - 1, step_now, epoch_step=done, totals=totals)
        if stop:
            self.stopped_at = done
        return stop


def _train_epoch(
    train_model, data: Data, parts: Trainable, loss_fn, mixup_fn, device, step_cfg, hook, run: RunConfig, n_epochs: int
) -> dict:
    bar = None
    desc = f"epoch {hook.epoch + 1}/{n_epochs}"
    if run.progress and dist.is_main() and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=data.steps_per_epoch, initial=hook.skip, desc=desc, leave=False, file=sys.stderr)
    elif run.progress and dist.is_main() and run.log_every:
        bar = StepLines(desc, data.steps_per_epoch, hook.skip, run.log_every)  # logs and SLURM files: no bar
    stats = train_one_epoch(
        train_model,
        data.loader,
        parts.optimizer,
        loss_fn,
        device,
        step_cfg,
        mixup_fn=mixup_fn,
        scaler=parts.scaler,
        ema=parts.ema,
        on_step=hook.step,
        on_start=hook.start,
        max_steps=data.steps_per_epoch - hook.skip,
        progress=bar,
        # progress lines read the loss from the device: at most every 20 steps unless asked for more often
        refresh_every=min(20, run.log_every) if isinstance(bar, StepLines) else 20,
        totals=hook.totals,
    )
    if bar is not None:
        bar.close()
    return stats


def _evaluate_epoch(
    cfg: EvalConfig, n_epochs: int, parts: Trainable, val_loader, device, amp_dt, channels_last: bool, row: dict
):
    """Evaluate the model (and its EMA) when this epoch is due; adds the numbers to `row`."""
    epoch = row["epoch"]
    due = (epoch + 1) % cfg.eval_every == 0 or epoch == n_epochs - 1
    if val_loader is None or not due:
        return None, None
    metrics = evaluate(parts.model, val_loader, device, amp_dt, channels_last)
    row.update(val_loss=metrics["loss"], top1=metrics["top1"], top5=metrics["top5"])
    row["skipped"] += metrics["skipped"]
    row["skipped_files"] = metrics["skipped_files"]
    ema_metrics = None
    if parts.ema is not None:
        ema_metrics = evaluate(parts.ema.module, val_loader, device, amp_dt, channels_last)
        row["ema_top1"] = ema_metrics["top1"]
    return metrics, ema_metrics


# --- what the run prints ---------------------------------------------------------------------------------------------


class RunLog:
    """Where rank 0's messages go besides stdout: the run folder's `train.log`, once the folder exists."""

    def __init__(self):
        self.file = None

    def open(self, path, append: bool) -> None:
        self.close()
        self.file = open(path, "a" if append else "w")

    def write(self, msg: str) -> None:
        if self.file is not None:
            try:
                self.file.write(msg + "\n")
                self.file.flush()
            except OSError as e:  # a full disk: one line naming the file
                raise FileWriteError(e.errno, f"cannot write {self.file.name}: {e.strerror}") from e

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:  # what did not fit on a full disk was reported by `write`
                pass
            self.file = None


_LOG = RunLog()


def _say(msg: str) -> None:
    if dist.is_main():
        print(msg, flush=True)
        _LOG.write(msg)


class StepLines:
    """The progress bar's stand-in when stderr is not a terminal: one line every `every` optimizer steps.

    It takes the calls `engine.train_one_epoch` makes on a tqdm bar (`update`, `set_postfix`, `close`).
    """

    def __init__(self, desc: str, total: int, done: int, every: int):
        self.desc, self.total, self.n, self.every = desc, total, done, every
        self.printed = done

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, refresh: bool = False, **values) -> None:
        # the engine reports every few steps (one host sync each time): print when a multiple of `every` was passed
        due = self.n // self.every > self.printed // self.every
        if due and self.n < self.total:  # the epoch line covers the last step
            self.printed = self.n
            _say(f"{self.desc} step {self.n}/{self.total}  " + "  ".join(f"{k} {v}" for k, v in values.items()))

    def close(self) -> None:
        pass


def _banner(cfg: TrainConfig, name, model, data: Data, env, device, plan: BatchPlan, amp, out) -> str:
    b = cfg.batch
    lr_note = (
        "(set explicitly)"
        if b.lr is not None
        else f"(linear scaling: {b.lr_base:g} x {plan.global_batch} / {b.lr_base_batch})"
    )
    return (
        f"training {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) on "
        f"{len(data.train_set)} images, {len(data.classes)} classes, {cfg.augment.img_size} px | {env.world_size} "
        f"process(es) on {device.type} | global batch {plan.global_batch} = {b.batch_size} x {env.world_size} x "
        f"{plan.accum_steps} accumulation | lr {plan.lr:.3g} {lr_note} | {cfg.schedule.total_epochs} epochs x "
        f"{data.steps_per_epoch} steps | amp {amp} | output {out}"
    )


def _finished(state: dict, n_epochs: int) -> bool:
    """Whether a training state has all `n_epochs` epochs done (no mid-epoch step pending)."""
    return not state.get("epoch_step") and state["epoch"] + 1 >= n_epochs


def _finished_line(state: dict, resume: str, n_epochs: int) -> str:
    best = state.get("best") or {}
    top1 = f"; best top-1 {best['top1']:.2f}% at epoch {best['epoch'] + 1}" if best.get("top1") is not None else ""
    return (
        f"{resume}: the run is finished (all {n_epochs} epochs done{top1}); nothing to resume. "
        "Its weights are last.safetensors and best.safetensors"
    )


def _say_resumed(resume: str, n_epochs: int, progress: Progress) -> None:
    _say(
        f"resumed from {resume}: epoch {progress.start_epoch + 1} of {n_epochs}"
        + (f" after its step {progress.resume_step}" if progress.resume_step else "")
        + f", global step {progress.global_step}"
    )


def _epoch_line(row: dict, n_epochs: int, metrics, ema_metrics) -> str:
    msg = (
        f"epoch {row['epoch'] + 1}/{n_epochs}  lr {row['lr']:.3g}  train loss {row['train_loss']:.4f}  "
        f"{row['train_img_s']:.0f} img/s  {row['epoch_s']:.0f}s"
    )
    if metrics is not None:
        msg += f"  val loss {metrics['loss']:.4f}  top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%"
    if ema_metrics is not None:
        msg += f"  EMA top-1 {ema_metrics['top1']:.2f}%"
    if row["skipped"]:
        names = row.get("skipped_files") or []
        more = f" (+{len(names) - 5} more)" if len(names) > 5 else ""
        named = f" (held-out, not counted: {printable(', '.join(names[:5]))}{more})" if names else ""
        msg += f"  skipped {row['skipped']} unreadable images{named}"
    return msg


def _say_done(result: dict, data: Data, out) -> None:
    top1 = f"{result['top1']:.2f}%" if result.get("top1") is not None else "n/a"
    _say(
        f"done in {result['wall_s']:.0f}s: held-out top-1 {top1} ({len(data.val_set) if data.val_set else 0} images); "
        f"weights {out / 'last.safetensors'} (best: {out / 'best.safetensors'})"
    )
