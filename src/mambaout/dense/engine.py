"""Training a detector or segmenter, step by step: `fit(cfg)` from a resolved `RunConfig`.

The run folder holds `config.yaml`, `state.pt` (what `--resume` needs to replay the run exactly: weights, optimizer,
schedule, grad scaler, step, every rank's RNG state, the loss sums behind the next logged numbers),
`last.safetensors` (weights plus what `validate`/`predict` need to rebuild the model), `summary.csv` (one row per
evaluation, step 0 included) and `train.log` (what the run printed). Only rank 0 writes; a second trainer on the
same folder is refused (the classification trainer's lock).

A resumed run sees the batches an uninterrupted one would have: each epoch's order comes from (seed, epoch), its
randomness is seeded per epoch, a resumed epoch skips the batches already trained and continues the saved RNG
state (bit-identical with `workers: 0`; with worker processes the order is, their augmentation draws are not).
"""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path

import torch
import yaml

from mambaout.models.layers import param_groups
from mambaout.training.runfolder import (
    RunLock,
    check_output_free,
    rng_state,
    seed_all,
    set_rng_state,
)
from mambaout.training.trainer import Interrupted
from mambaout.utils import distributed as dist
from mambaout.utils.device import autocast_setting
from mambaout.utils.files import atomic_torch_save, atomic_write_text
from mambaout.utils.interrupt import DeferredInterrupt
from mambaout.utils.text import csv_cell
from mambaout.weights.checkpoint import save_weights

from .config import RunConfig, from_dict
from .tasks import Task, make_task

# --- the schedule ----------------------------------------------------------------------------------------------------


def lr_factor(step: int, total: int, t) -> float:
    """The learning rate of optimizer step `step` (0-based) over `t.lr`: linear warmup from `warmup_ratio`, then
    step decay at the `milestones` (fractions of the run) or polynomial decay to `min_lr`."""
    if step < t.warmup_steps:
        warm = t.warmup_ratio + (1 - t.warmup_ratio) * step / t.warmup_steps
    else:
        warm = 1.0
    if t.schedule == "step":
        return warm * t.gamma ** sum(step >= round(m * total) for m in t.milestones)
    floor = t.min_lr / t.lr
    return warm * ((1 - floor) * (1 - min(step, total) / total) ** t.poly_power + floor)


# --- the run folder --------------------------------------------------------------------------------------------------


class Run:
    """Rank 0's files and messages; on other ranks every method is a no-op."""

    def __init__(self, out: Path, cfg: RunConfig, write: bool, append: bool):
        self.out, self.write = out, write
        self.log = self.lock = None
        if write:
            out.mkdir(parents=True, exist_ok=True)
            self.lock = RunLock(out)  # the classification trainer's lock, and its clean-up of provable run folders
            atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            self.log = open(out / "train.log", "a" if append else "w")

    def say(self, msg: str) -> None:
        if self.write:
            print(msg, flush=True)
            self.log.write(msg + "\n")
            self.log.flush()

    def row(self, row: dict) -> None:
        """Append a row to summary.csv (the header grows with the first row of its kind)."""
        if not self.write:
            return
        path = self.out / "summary.csv"
        rows = []
        if path.is_file():
            with open(path) as f:
                rows = list(csv.DictReader(f))
        rows = [r for r in rows if int(r["step"]) < row["step"]] + [row]  # a resumed run rewrites what it redoes
        fields = list(dict.fromkeys(k for r in rows for k in r))
        lines = [",".join(fields)] + [",".join(csv_cell(r.get(k)) for k in fields) for r in rows]
        atomic_write_text(path, "\n".join(lines) + "\n")

    def save(self, model, task: Task, parts: dict, step: int, cfg: RunConfig, running: dict) -> None:
        """Weights and the training state after `step`; `running`: the sums behind the numbers not yet logged.

        Called on every rank (each rank's RNG state is gathered, so a resumed rank continues its own)."""
        # as bytes: all_gather_object cannot carry tensors (torch fails to unpickle their storage)
        blob = io.BytesIO()
        torch.save(rng_state(), blob)
        blobs = dist.all_gather_lists([blob.getvalue()])
        if not self.write:
            return
        rngs = [torch.load(io.BytesIO(b), weights_only=True) for b in blobs]
        save_weights(model, self.out / "last.safetensors", **task.meta(), step=step)
        state = {k: v.state_dict() for k, v in parts.items() if v is not None}
        state.update(step=step, rng=rngs[0], rng_ranks=rngs, running=running, config=cfg.to_dict())
        atomic_torch_save(state, self.out / "state.pt")

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        if self.lock is not None:
            self.lock.release()


def load_resume(path: str) -> tuple[dict, RunConfig]:
    """The state of a run folder (or its state.pt) and the run's own configuration."""
    p = Path(path)
    p = p / "state.pt" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"--resume {path}: no training state found (expected a run folder holding state.pt)")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
        return state, from_dict(state["config"])
    except Exception as e:
        raise ValueError(f"cannot read training state {p} ({type(e).__name__}: {e})") from e


# --- training --------------------------------------------------------------------------------------------------------


def fit(cfg: RunConfig) -> dict:
    """Train as `cfg` says (or continue `cfg.train.resume`); returns the step-0 and final evaluations."""
    state = None
    if cfg.train.resume:
        state, saved = load_resume(cfg.train.resume)
        if saved.task != cfg.task:
            raise ValueError(
                f"--resume {cfg.train.resume} holds a {saved.task} run; continue it with mambaout {saved.task} train"
            )
        # cfg is the run's own configuration with the options given now (mambaout.dense.config.resolve)
        cfg.train.output = cfg.train.output or str(Path(cfg.train.resume).resolve())
    t = cfg.train
    env, device = dist.init(t.device)
    run = None
    try:
        if t.threads:
            torch.set_num_threads(t.threads)
        amp_name, amp_dtype = autocast_setting(t.amp, device)
        out = Path(t.output or Path("runs") / (Path(cfg.recipe).stem if cfg.recipe else cfg.task))
        if dist.is_main():
            check_output_free(out, t.resume, t.overwrite)
        seed_all(t.seed + env.rank)

        task = make_task(cfg)
        train_set = task.train_set()  # also fixes the class count from the data
        val_set = task.val_set()
        loader = task.train_loader(train_set, cfg.data.batch_size, cfg.data.workers, seed=t.seed)
        per_epoch = len(loader)  # batches of a whole epoch (a resumed epoch's skip shortens the loader)
        if per_epoch == 0:
            raise ValueError(
                f"{len(train_set)} training images make no batch of {cfg.data.batch_size} on each of "
                f"{env.world_size} process(es); lower --batch-size"
            )
        total = t.steps or t.epochs * per_epoch
        if state is not None and state["step"] >= total:
            # nothing left to train: say so and touch nothing (no rewritten config or log)
            if dist.is_main():
                print(f"--resume {t.resume}: the run is finished (all {total} steps done); weights in {out}")
            return {}

        model = task.model(t.pretrained, t.backbone_checkpoint).to(device)
        if env.world_size > 1 and device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # one BatchNorm over all GPUs (Swin's)
        optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, t))
        scaler = torch.amp.GradScaler(device.type) if amp_name == "fp16" else None
        parts = dict(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        step = 0
        if state is not None:
            for k, v in parts.items():
                if v is not None and k in state:
                    v.load_state_dict(state[k])
            step = state["step"]
        train_model = dist.wrap(model, device)

        run = Run(out, cfg, dist.is_main(), append=state is not None)
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        run.say(
            f"{cfg.task}: {cfg.model.backbone} {getattr(cfg.model, 'kind', 'upernet')} ({n_params:.2f}M params), "
            f"{len(train_set)} training images, {cfg.model.num_classes} classes | {total} steps of "
            f"{cfg.data.batch_size} x {env.world_size} images | lr {t.lr:g} | amp {amp_name} | {device.type} | "
            f"output {out}" + (f" | resumed at step {step}" if state else "")
        )
        results = {}
        if step == 0 and t.eval_at_start:
            results["start"] = _evaluate(task, model, val_set, device, amp_dtype, run, step, {})
        # Ctrl-C stops after the step under way, where the state is consistent and is saved (as mambaout train
        # does); a second one stops at once. Several processes could not agree on that step: there it stops at once.
        note = "stopping after this step, then saving the state"
        with DeferredInterrupt(note, env.world_size == 1) as interrupt:
            results.update(
                _train(
                    task,
                    train_model,
                    model,
                    loader,
                    per_epoch,
                    parts,
                    total,
                    step,
                    state,
                    cfg,
                    run,
                    val_set,
                    device,
                    interrupt,
                )
            )
        return results
    finally:
        if run is not None:
            run.close()
        dist.cleanup()


def _resume_rng(state: dict | None) -> dict | None:
    """This rank's RNG state in a saved training state (rank 0's when the run had another number of processes)."""
    if state is None:
        return None
    ranks = state.get("rng_ranks") or []
    return ranks[dist.get_rank()] if len(ranks) == dist.get_world_size() else state["rng"]


def _train(
    task, train_model, model, loader, per_epoch, parts, total, step, state, cfg, run, val_set, device, interrupt
) -> dict:
    t = cfg.train
    amp_dtype = autocast_setting(t.amp, device)[1]
    optimizer, scheduler, scaler = parts["optimizer"], parts["scheduler"], parts["scaler"]
    epoch = step // per_epoch
    resume_rng = _resume_rng(state)
    # the sums behind the next progress line and the next evaluation's train_loss, carried over a resume so the
    # numbers logged equal an uninterrupted run's
    running = dict(window_loss=0.0, window_n=0, eval_loss=0.0, eval_n=0) | ((state or {}).get("running") or {})
    images, t0 = 0, time.perf_counter()
    called = 0
    result = {}
    while step < total:
        skip = step - epoch * per_epoch  # resuming inside an epoch: the batches it trained are left out
        # Seeding per epoch makes an epoch's randomness (augmentation, drop path, the detector's box sampling) a
        # function of (seed, epoch, rank) only, so a resumed run replays what an uninterrupted one did (as
        # mambaout train does); the sampler's order is a function of (seed, epoch).
        seed_all(t.seed + 1000 * epoch + dist.get_rank())
        loader.set_epoch(epoch)
        loader.skip_samples(skip * cfg.data.batch_size)
        batches = iter(loader)  # draws the workers' seeds from the RNG just seeded
        if skip and resume_rng is not None:
            # continue the randomness where the interrupted run left it after this step: with workers 0 the rest
            # of the epoch is bit-identical; with worker processes the order is, their augmentation draws are not
            set_rng_state(resume_rng)
        resume_rng = None
        for batch in batches:
            if step >= total:
                break
            train_model.train()
            batch_images, targets, n = task.to_device(batch, device)
            with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else _null():
                losses = train_model(batch_images, targets)
            loss = sum(losses.values())
            if not math.isfinite(loss.item()):
                raise ValueError(f"the loss is {loss.item()} at step {step + 1}: lower --lr or set --clip-grad")
            optimizer.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.unscale_(optimizer)
            if t.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
            scaler.step(optimizer) if scaler else optimizer.step()
            if scaler:
                scaler.update()
            scheduler.step()
            step += 1
            called += 1
            running["window_loss"] += loss.item()
            running["window_n"] += 1
            running["eval_loss"] += loss.item()
            running["eval_n"] += 1
            images += n * dist.get_world_size()
            if t.progress and (step % t.log_every == 0 or step == total):
                dt = time.perf_counter() - t0
                run.say(
                    f"step {step}/{total}  loss {running['window_loss'] / running['window_n']:.4f}  "
                    + "  ".join(f"{k} {v.item():.3f}" for k, v in losses.items())
                    + f"  lr {optimizer.param_groups[0]['lr']:.3g}  {images / dt:.2f} img/s"
                )
                running.update(window_loss=0.0, window_n=0)
                images, t0 = 0, time.perf_counter()
            due = (t.eval_every and step % t.eval_every == 0) or step == total
            stop = bool(t.stop_after_steps) and called >= t.stop_after_steps and step < total
            asked = interrupt.asked and step < total
            row = {}
            if due:
                row = dict(train_loss=running["eval_loss"] / running["eval_n"])
                running.update(eval_loss=0.0, eval_n=0)
            if due or stop or asked or (t.checkpoint_every and step % t.checkpoint_every == 0):
                run.save(model, task, parts, step, cfg, dict(running))
            if due:
                result["end" if step == total else f"step{step}"] = _evaluate(
                    task, model, val_set, device, amp_dtype, run, step, row
                )
            if asked:
                raise Interrupted(f"interrupted at step {step}, state saved; continue with --resume {run.out}")
            if stop:
                run.say(f"stopping at step {step} as asked (state saved); continue with --resume {run.out}")
                return dict(result, stopped=step)
        epoch += 1
    if result.get("end"):
        run.say(f"done: {task.metric} {result['end'][task.metric]:.4g}; weights {run.out / 'last.safetensors'}")
    return result


def _evaluate(task, model, val_set, device, amp_dtype, run, step: int, row: dict) -> dict:
    t0 = time.perf_counter()
    rng = rng_state()  # evaluating draws random numbers (the loader's seed): training's must not depend on when
    try:
        metrics = task.evaluate(model, val_set, device, amp_dtype)
    finally:
        set_rng_state(rng)
    shown = {k: v for k, v in metrics.items() if k != "summary"}
    run.row(dict(step=step, **row, **shown, eval_s=round(time.perf_counter() - t0, 1)))
    numbers = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
    run.say(f"eval at step {step}: " + (f"train loss {row['train_loss']:.4f}  " if row else "") + numbers)
    return metrics


def _null():
    import contextlib

    return contextlib.nullcontext()
