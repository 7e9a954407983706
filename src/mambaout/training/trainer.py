"""The training run of any task: `fit(task, loop)` trains a `Task` (`training/classify.py`, `dense/tasks.py`) as the
`Loop` its command resolved says; every rank calls `fit`, only rank 0 writes. What the engine and a task each own:
docs/architecture.md; how a resumed run replays an uninterrupted one: docs/training.md, "Resume".
"""

from __future__ import annotations

import datetime
import math
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from mambaout.training import runfolder as rf
from mambaout.utils import distributed as dist
from mambaout.utils.device import autocast, autocast_setting
from mambaout.utils.interrupt import DeferredInterrupt
from mambaout.utils.optional import require

# --- what the engine needs from a task (`Task`), and how it is told to run it (`Loop`) -------------------------------


@dataclass(frozen=True)
class Loop:
    """How the engine runs a task (`from_settings`: from the command's settings). `epochs` or `steps` gives the run's
    length (`steps` may also cap the epochs); evaluation every `eval_every_epochs` and/or `eval_every_steps`, and at
    the end."""

    output: Path
    epochs: int | None = None
    steps: int | None = None
    max_steps_per_epoch: int | None = None  # smoke tests: shorter epochs
    accum_steps: int = 1
    clip_grad: float | None = None
    amp: str = "auto"
    device: str | None = None
    threads: int | None = None
    compile: bool = False
    seed: int = 0
    eval_every_epochs: int | None = None
    eval_every_steps: int | None = None
    eval_at_start: bool = False
    resume: str | None = None
    overwrite: bool = False
    keep_top_k: int = 0
    tensorboard: bool = False
    progress: bool = True
    log_every: int = 50
    checkpoint_every: int | None = None
    stop_after_steps: int | None = None
    stop_after_epochs: int | None = None

    @classmethod
    def from_settings(cls, settings: dict, **given) -> Loop:
        """The loop of a task's settings: each field from the setting of its name, unless `given`."""
        names = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in settings.items() if k in names}, **given})


class Task:
    """The interface a task implements; the engine calls these, in this order. `name`: the command's task as messages
    name it (`train`, `detect`, `segment`); `metric`: the headline key of `evaluate_run` (higher is better; picks
    best.safetensors); `batch_size`: images per device and micro-batch. `build_data` sets `batches` (a
    `data.loaders.EpochLoader`), `steps_per_epoch` (optimizer steps of one pass) and `train_images`."""

    name: str = "task"
    metric: str = "score"
    batch_size: int = 1

    def config(self) -> dict:
        """The resolved configuration as `config.yaml` and `state.pt` hold it."""
        raise NotImplementedError

    def build_data(self, env, device: torch.device, loop: Loop) -> None:
        raise NotImplementedError

    def build_model(self, device: torch.device) -> nn.Module:
        raise NotImplementedError

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        raise NotImplementedError

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int):
        """A schedule with timm's interface: `step(epoch)`, `step_update(n)`, `state_dict`, `load_state_dict`."""
        raise NotImplementedError

    def ema(self, model: nn.Module):
        """An average of the weights the engine updates after every step (timm's ModelEmaV3), or None."""
        return None

    def prepare(self, batch, device: torch.device) -> tuple:
        """A loader's batch on `device`: `(inputs, targets, images, unreadable)`, the last two counts."""
        raise NotImplementedError

    def loss(self, model: nn.Module, inputs, targets) -> tuple[torch.Tensor, dict]:
        """The loss to minimise (run under autocast) and its named parts (`{}` when it has none)."""
        raise NotImplementedError

    def evaluate_run(self, model: nn.Module, ema, device: torch.device, amp_dtype) -> dict | None:
        """The held-out numbers for summary.csv, `metric` among them (None: no held-out data)."""
        raise NotImplementedError

    def describe(self, metrics: dict) -> str:
        """The numbers of `evaluate_run` as the log shows them."""
        return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())

    def meta(self) -> dict:
        """What the task's weights files carry besides the weights."""
        raise NotImplementedError

    def banner(self, model: nn.Module, world_size: int) -> str:
        """The run's first line: what trains on what."""
        raise NotImplementedError

    def done(self, result: dict, out: Path) -> str:
        """The run's last line."""
        return f"done in {result['wall_s']:.0f}s; weights {out / 'last.safetensors'}"


# --- the step engine: optimizer steps over a loader, the loss sums kept on the device --------------------------------


class LossNotFinite(FloatingPointError, ValueError):
    """The loss became inf or NaN: a setting to change (the commands show it as one line, exit 2)."""


@dataclass
class Sums:
    """Loss sums on the device (the loss, then its parts) since the last summary.csv row (`row`) and progress line
    (`line`); a checkpoint stores them (`as_dict`) for a resumed run to continue (`Sums(**saved)`)."""

    names: list = field(default_factory=list)  # "loss", then the task's loss parts
    row: torch.Tensor | list | None = None
    row_n: int = 0  # micro-batches summed
    line: torch.Tensor | list | None = None
    line_n: int = 0
    skipped: torch.Tensor | int = 0  # unreadable images met since the last row
    images: int = 0  # images trained on since the last row (this rank)
    nonfinite: torch.Tensor | bool = False

    def add(self, loss: torch.Tensor, parts: dict, n_bad, images: int) -> None:
        values = torch.stack([loss.detach(), *(v.detach() for v in parts.values())]).float()
        self.names = self.names or ["loss", *parts]
        self.row = _on(self.row, values) + values
        self.line = _on(self.line, values) + values
        self.nonfinite = self.nonfinite | ~torch.isfinite(values).all()
        self.row_n, self.line_n, self.images = self.row_n + 1, self.line_n + 1, self.images + images
        self.skipped = self.skipped + n_bad

    def read_line(self, since: int, steps: int) -> dict:
        """The means since the last line (one host read); raises if a loss since step `since` was inf or NaN."""
        if not torch.is_tensor(self.line):  # None, or a list from a checkpoint: nothing summed since
            return {}
        flag = torch.as_tensor(self.nonfinite, device=self.line.device).float()[None]
        *values, bad = torch.cat([self.line.float(), flag]).tolist()  # one read
        if bad:
            raise LossNotFinite(
                f"the loss became inf or NaN between steps {since} and {steps}: lower the learning rate, "
                "enable --clip-grad, or use bf16"
            )
        return {k: v / max(self.line_n, 1) for k, v in zip(self.names, values)}

    def take_row(self, device) -> dict:
        """The means since the last row over all ranks (train_loss, its parts), images and skips; then reset."""
        row = [float(v) for v in (self.row.tolist() if torch.is_tensor(self.row) else self.row or [])]
        *sums, n, skipped, images = dist.all_reduce_sum([*row, self.row_n, int(self.skipped), self.images], device)
        out = {("train_loss" if k == "loss" else k): v / max(n, 1) for k, v in zip(self.names, sums)}
        self.row, self.row_n, self.skipped, self.images = None, 0, 0, 0
        return dict(out, skipped=int(skipped), images=int(images))

    def as_dict(self) -> dict:
        """Plain numbers (one host read of the device sums), as `state.pt` holds them."""
        plain = {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in vars(self).items()}
        return dict(plain, nonfinite=False)


def _on(sums, like: torch.Tensor) -> torch.Tensor:
    """Sums as a device tensor shaped as `like` (zeros for none; a list from a checkpoint put on the device)."""
    if sums is None:
        return torch.zeros_like(like)
    return sums if torch.is_tensor(sums) else like.new_tensor(sums)


def train_one_epoch(model: nn.Module, loader, task, parts, device, sums: Sums, hooks) -> int:
    """Train for one pass over `loader` (at most `hooks.max_steps` optimizer steps); returns the steps taken.

    Every `accum_steps` micro-batches, each loss divided by it, make one optimizer step (DDP all-reduces only on the
    last: `no_sync`), so the gradient equals one large batch's. `model` is `parts.model`, maybe in DDP and compile
    wrappers. `sums` stay on the device, read every `hooks.refresh_every` steps (a read waits for the GPU).
    `hooks` is the trainer's `Steps`: its settings, `start()` once the loader's iterator exists (it draws from the
    RNG), `report(n, means)` at each read (a non-finite loss raises there), `after_step(n)` (True ends the pass).
    """
    model.train()
    accum = hooks.accum_steps
    steps_total = min(len(loader) // accum, hooks.max_steps)
    steps = checked = 0
    parts.optimizer.zero_grad(set_to_none=True)
    batches = iter(loader)
    hooks.start()
    for i, batch in enumerate(batches):
        if steps >= steps_total:
            break
        inputs, targets, n_images, n_bad = task.prepare(batch, device)
        last_micro = (i + 1) % accum == 0
        with dist.no_sync(model, skip=not last_micro):
            with autocast(device, hooks.amp_dtype):
                loss, loss_parts = task.loss(model, inputs, targets)
            parts.scaler.scale(loss / accum).backward()  # a no-op scaler but for fp16
        sums.add(loss, loss_parts, n_bad, n_images)
        if not last_micro:
            continue
        _optimizer_step(model, parts.optimizer, parts.scaler, hooks.clip_grad)
        steps += 1
        if parts.ema is not None:
            parts.ema.update(parts.model)  # the plain model inside `model`'s DDP and compile wrappers
        done, every = hooks.first + steps, hooks.line_every
        if done % hooks.refresh_every == 0 or (every and done % every == 0) or steps >= steps_total:
            values = sums.read_line(checked, steps)  # the one host read per `refresh_every` steps
            checked = steps
            hooks.report(steps, values)
        if hooks.after_step(steps):
            sums.read_line(checked, steps)  # a stop inside a refresh interval checks its losses too
            break
    return steps


def _optimizer_step(model: nn.Module, optimizer, scaler, clip_grad: float | None) -> None:
    """One optimizer step on the accumulated gradients (unscaled first, so clipping sees the true ones)."""
    scaler.unscale_(optimizer)
    if clip_grad:
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)  # a disabled scaler (no fp16) only calls optimizer.step()
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


# --- the run ---------------------------------------------------------------------------------------------------------


def fit(task: Task, loop: Loop) -> dict:
    """Run (or resume) training as `loop` says. Returns the last row's numbers, the run folder and the best."""
    env, device = dist.init(loop.device)
    run = None
    try:
        if loop.threads:
            torch.set_num_threads(loop.threads)
        amp, amp_dtype = autocast_setting(loop.amp, device)
        state = rf.load_state(rf.resume_path(loop.resume)) if loop.resume else None
        out = Path(loop.output)
        finished = _finished(state, loop, task) if state is not None else None
        if finished:  # nothing left to train: say so and touch nothing (no "epoch 31 of 30", no rewritten files)
            if dist.is_main():
                print(finished, flush=True)
            return dict(output=str(out), finished=True, best=state.get("best"))
        if dist.is_main():
            rf.check_output_free(out, loop.resume, loop.overwrite)
            if loop.tensorboard:
                require("tensorboard", "--tensorboard", "tensorboard")  # fail before the data is read
        task.build_data(env, device, loop)
        if loop.max_steps_per_epoch:
            task.steps_per_epoch = min(task.steps_per_epoch, loop.max_steps_per_epoch)
        total = min(loop.epochs * task.steps_per_epoch if loop.epochs else math.inf, loop.steps or math.inf)
        rf.seed_all(loop.seed)  # the model's initial weights: the same on every rank
        model = task.build_model(device)
        optimizer = task.optimizer(model)
        scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        parts = rf.Trainable(model, optimizer, task.scheduler(optimizer, total), scaler, task.ema(model))
        progress = rf.Progress() if state is None else rf.Progress.restore(state, parts)
        train_model = dist.wrap(model, device)
        train_model = torch.compile(train_model) if loop.compile else train_model
        run = rf.RunFolder(out, task, dist.is_main(), loop.keep_top_k, loop.tensorboard, resumed=state is not None)
        length = f"{loop.epochs} epochs x {task.steps_per_epoch} steps" if loop.epochs else f"{total} steps"
        length += f", ending at step {total}" if loop.epochs and total < loop.epochs * task.steps_per_epoch else ""
        run.say(f"{task.banner(model, env.world_size)} | {length} | amp {amp} | output {out}")
        if state is not None:
            epoch = progress.start_epoch + 1
            after = f" after its step {progress.resume_step}" if progress.resume_step else ""
            run.say(f"resumed from {loop.resume}: epoch {epoch}{after}, global step {progress.global_step}")
        note = "stopping after this optimizer step, then saving the state"  # several processes: Ctrl-C stops at once
        with DeferredInterrupt(note, env.world_size == 1) as interrupt:
            result = Steps(
                task, loop, run, parts, progress, train_model, device, amp_dtype, int(total), interrupt
            ).run()
        if dist.is_main() and not result.get("stopped"):
            run.say(task.done(result, out))
        return dict(result, output=str(out), best=progress.best)
    finally:
        if run is not None:
            run.close()  # also releases the run folder's lock when training fails
        dist.cleanup()


class Steps:
    """The run's optimizer steps, epoch by epoch, and what follows each: schedule, progress, rows, states, stops."""

    refresh_every = 20  # the loss is read from the device (a host sync) every 20 steps, and for each progress line

    def __init__(self, task, loop, run, parts, progress, train_model, device, amp_dtype, total, interrupt):
        self.task, self.loop, self.folder, self.parts, self.progress = task, loop, run, parts, progress
        self.train_model, self.device, self.total = train_model, device, total
        # a step: micro-batches per step, autocast's dtype (None: full precision), max gradient norm (None, 0: none)
        self.accum_steps, self.amp_dtype, self.clip_grad = loop.accum_steps, amp_dtype, loop.clip_grad
        self.interrupt, self.line_every = interrupt, loop.log_every if loop.progress else 0
        self.spe = task.steps_per_epoch
        self.n_epochs = math.ceil(total / self.spe)
        self.sums = Sums(**(progress.sums or {}))
        self.called = self.epochs_called = 0  # optimizer steps and whole epochs this call took
        self.resume_hint = f"continue with --resume {run.out}"
        self.result: dict = {}
        self.t_start = self.t_row = time.perf_counter()
        self.epoch = self.skip = self.epoch_steps = 0
        self.last_lr = self.lr()
        self.bar = self.stopped_at = None

    def lr(self) -> float:
        return max(group["lr"] for group in self.parts.optimizer.param_groups)

    def run(self) -> dict:
        if self.progress.global_step == 0 and self.loop.eval_at_start:
            self.row(evaluate=True, epoch_end=False)
        for epoch in range(self.progress.start_epoch, self.n_epochs):
            stop = self.train_epoch(epoch)
            if self.stopped_at is None and not stop:
                continue
            where = f"at step {self.stopped_at} of epoch {epoch + 1}" if self.stopped_at else f"after epoch {epoch + 1}"
            if self.interrupt.asked:
                raise KeyboardInterrupt(f"interrupted {where}, state saved; {self.resume_hint}")  # the CLI prints it
            self.folder.say(f"stopping {where} as asked (state saved); {self.resume_hint}")
            dist.barrier()
            return dict(self.result, stopped=True)
        return dict(self.result, wall_s=time.perf_counter() - self.t_start)

    def train_epoch(self, epoch: int) -> bool:
        """One epoch (or what is left of it); True when the run stops at its end."""
        task, loader = self.task, self.task.batches
        self.epoch = epoch
        self.skip = self.progress.resume_step if epoch == self.progress.start_epoch else 0
        self.epoch_steps = min(self.spe, self.total - epoch * self.spe)
        # an epoch's randomness a function of (seed, epoch, rank) only: a resumed run replays it exactly
        rf.seed_all(self.loop.seed + 1000 * epoch + dist.get_rank())
        loader.set_epoch(epoch)
        loader.skip_samples(self.skip * self.accum_steps * task.batch_size)
        self.parts.scheduler.step(epoch)  # a schedule per epoch moves here, one per step in `after_step`
        self.parts.scheduler.step_update(self.progress.global_step)
        self.last_lr = self.lr()
        self.bar = None
        if self.loop.progress and dist.is_main() and sys.stderr.isatty():
            from tqdm import tqdm

            desc = f"epoch {epoch + 1}/{self.n_epochs}"
            self.bar = tqdm(total=self.epoch_steps, initial=self.skip, desc=desc, leave=False, file=sys.stderr)
        self.stop_at_end, self.printed, self.t_line = False, self.skip, time.perf_counter()
        self.first = self.progress.global_step  # optimizer steps before this call of the epoch
        self.max_steps = self.epoch_steps - self.skip
        train_one_epoch(self.train_model, loader, task, self.parts, self.device, self.sums, self)
        if self.bar is not None:
            self.bar.close()
        return self.stop_at_end

    def start(self) -> None:  # the engine's hooks: start, report, after_step
        """Mid-epoch resume: continue this rank's RNG where the checkpoint left it (after the loader's iterator has
        drawn its seed, as it had in the interrupted run)."""
        if self.skip and self.progress.resume_rng is not None:
            rf.set_rng_state(self.progress.resume_rng)
            self.progress.resume_rng = None

    def after_step(self, n: int) -> bool:
        """After the n-th optimizer step of this epoch's call; True ends the epoch there (a stop)."""
        p, loop = self.progress, self.loop
        p.global_step += 1
        self.called += 1
        step, done = p.global_step, self.skip + n
        self.last_lr = self.lr()  # the lr step n used, before the schedule moves on
        self.parts.scheduler.step_update(step)
        epoch_end, end = done >= self.spe, step >= self.total  # a steps cap may end the run inside an epoch
        evaluate = end or bool(loop.eval_every_steps and step % loop.eval_every_steps == 0)
        evaluate |= epoch_end and bool(loop.eval_every_epochs and (self.epoch + 1) % loop.eval_every_epochs == 0)
        if evaluate or (epoch_end and loop.epochs):  # a row per evaluation, and per epoch in a run of epochs
            self.row(evaluate, epoch_end)
        stop = bool(loop.stop_after_steps) and self.called >= loop.stop_after_steps
        stop = (stop or self.interrupt.asked) and not end
        if epoch_end:  # stopping here: the epoch ends as any does (its state), then the run stops
            self.epochs_called += 1
            stop |= bool(loop.stop_after_epochs) and self.epochs_called >= loop.stop_after_epochs and not end
            self.stop_at_end, stop = stop, False
        every = bool(loop.checkpoint_every) and step % loop.checkpoint_every == 0
        if epoch_end or stop or every or evaluate:
            completed, epoch_step = (self.epoch, 0) if epoch_end else (self.epoch - 1, done)
            self.folder.save_state(self.parts, p, completed, epoch_step, self.sums.as_dict())
        if stop:
            self.stopped_at = done
        return stop

    def row(self, evaluate: bool, epoch_end: bool) -> None:
        """A summary.csv row and log line (training numbers since the last row, held-out ones), and weights files."""
        step = self.progress.global_step
        train = self.sums.take_row(self.device) if self.sums.row_n else {}
        images, skipped = train.pop("images", 0), train.pop("skipped", 0)
        epoch = self.epoch + 1 if epoch_end else round(step / self.spe, 4)
        row = dict(epoch=epoch, step=step, lr=self.last_lr, **train)
        metrics = {}
        if evaluate:
            rng = rf.rng_state()  # evaluating draws random numbers (a loader's seed): training's must not depend on it
            try:
                ema = self.parts.ema.module if self.parts.ema is not None else None
                metrics = self.task.evaluate_run(self.parts.model, ema, self.device, self.amp_dtype) or {}
            finally:
                rf.set_rng_state(rng)
                self.train_model.train()
        row.update({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "skipped"})
        seconds = time.perf_counter() - self.t_row
        row.update(train_img_s=images / max(seconds, 1e-9), seconds=seconds)
        row["skipped"] = skipped + metrics.get("skipped", 0)
        name = f"epoch-{epoch:04d}.safetensors" if epoch_end else f"step-{step:07d}.safetensors"
        self.folder.save_row(self.parts, self.progress, row, name)
        where = f"epoch {epoch}/{self.n_epochs}" if epoch_end else f"step {step}/{self.total}"
        msg = f"{where}  lr {row['lr']:.3g}"
        if train:
            msg += f"  train loss {row['train_loss']:.4f}  {row['train_img_s']:.0f} img/s  {seconds:.0f}s"
        if metrics:
            msg += "  " + self.task.describe(metrics)
        if skipped and not metrics.get("skipped"):
            msg += f"  skipped {skipped} unreadable images"
        self.folder.say(msg)
        self.result = row
        self.t_row = time.perf_counter()

    def report(self, n: int, values: dict) -> None:
        """Progress after step n of this epoch's call: a bar on a terminal, else a line every `log_every` steps."""
        done = self.skip + n
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix(loss=f"{values.get('loss', math.nan):.4f}", lr=f"{self.lr():.2e}", refresh=False)
        elif self.line_every:
            if (self.first + n) % self.line_every:
                return  # a line every `every` steps of the run: its sums go on (over an epoch's end too)
            self.folder.say(self._line(done, values))
            self.printed, self.t_line = done, time.perf_counter()
        self.sums.line, self.sums.line_n = None, 0  # the next line's means start here

    def _line(self, done: int, values: dict) -> str:
        """`epoch e/E  step s/S  loss ...  <the loss's parts>  lr ...  ETA h:mm:ss  N img/s`."""
        now, step = time.perf_counter(), self.progress.global_step + 1
        eta = (self.total - step) * (now - self.t_start) / (self.called + 1)
        images = (done - self.printed) * self.accum_steps * self.task.batch_size * dist.get_world_size()
        numbers = "  ".join(f"{k} {v:.4f}" for k, v in values.items())
        return (
            f"epoch {self.epoch + 1}/{self.n_epochs}  step {done}/{self.epoch_steps}  {numbers}  lr {self.lr():.3g}  "
            f"ETA {datetime.timedelta(seconds=round(eta))}  {images / max(now - self.t_line, 1e-9):.1f} img/s"
        )


def _finished(state: dict, loop: Loop, task: Task) -> str | None:
    """The line to print when a training state has the whole run done (no mid-epoch step pending), else None."""
    if not (loop.steps and state["step"] >= loop.steps):
        if not loop.epochs or state.get("epoch_step") or state["epoch"] + 1 < loop.epochs:
            return None
    done = f"all {loop.epochs} epochs" if loop.epochs and not loop.steps else f"all {loop.steps} steps"
    best = state.get("best") or {}
    shown = f"; best {task.describe({task.metric: best[task.metric]})} at epoch {best['epoch']}" if best else ""
    return (
        f"{loop.resume}: the run is finished ({done} done){shown}; nothing to resume. "
        "Its weights are last.safetensors and best.safetensors"
    )
