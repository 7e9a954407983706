"""The run folder of every task's training (docs/training.md lists its files), and how a run is saved and restored.

`state.pt` holds all `--resume` needs in one file, so weights never pair with another optimizer state; every file is
written to a temporary name and renamed. Only rank 0 writes (the others' `RunFolder(write=False)` gathers RNG states).
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mambaout.utils import distributed as dist
from mambaout.utils import files

logger = logging.getLogger("mambaout")


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    np_state = np.random.get_state()
    numpy = [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]]
    state = dict(torch=torch.get_rng_state(), numpy=numpy, python=list(random.getstate()))
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n, py = state["numpy"], state["python"]
    np.random.set_state((n[0], n[1].numpy(), *n[2:]))
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resume_path(path: str | os.PathLike) -> Path:
    """`--resume` accepts a run folder or its `state.pt`."""
    p = Path(path)
    p = p / "state.pt" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"--resume {path}: no training state found (expected a run folder holding state.pt)")
    return p


def load_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read training state {path} ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or "config" not in state:
        raise ValueError(
            f"{path} is not a training state written by mambaout train (no 'config' in it); pass the run folder "
            "or its state.pt"
        )
    return state


@dataclass
class Trainable:
    """The objects a training step updates, and `state.pt` holds."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object  # timm's interface: step(epoch) at an epoch's start, step_update(n) after optimizer step n
    scaler: torch.amp.GradScaler  # disabled but for fp16 (its state is then {})
    ema: nn.Module | None = None  # timm's ModelEmaV3: the averaged weights are `ema.module`

    def stateful(self) -> dict:
        """What `state.pt` holds of these, by its key (None: not in this run)."""
        ema = self.ema.module if self.ema is not None else None
        return dict(model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler, ema=ema)


@dataclass
class Progress:
    """Where a run stands: the epoch to start, optimizer steps so far, the best evaluation and the top-k kept."""

    start_epoch: int = 0
    global_step: int = 0
    best: dict | None = None
    top_k: list = field(default_factory=list)  # (score, step, file name), best first
    resume_step: int = 0  # a mid-epoch state: optimizer steps already done inside `start_epoch`
    resume_rng: dict | None = None  # ... and this rank's RNG state to continue that epoch from
    sums: dict | None = None  # the loss sums behind the numbers not yet logged (`trainer.Sums`)

    @classmethod
    def restore(cls, state: dict, parts: Trainable) -> Progress:
        """Load `state` (a `state.pt`) into `parts` and return where it left off."""
        for key, obj in parts.stateful().items():
            saved = state[key] if key in ("model", "optimizer", "scheduler") else state.get(key)
            if obj is not None and saved:
                obj.load_state_dict(saved)
        # this rank's RNG state and sums (rank 0's when the run had another number of processes)
        ranks, step = state.get("ranks") or [], state.get("epoch_step", 0)
        own = ranks[dist.get_rank()] if len(ranks) == dist.get_world_size() else ranks[0]
        top_k = [tuple(t) for t in state.get("top_k", [])]
        rng = own["rng"] if step else None
        return cls(state["epoch"] + 1, state["step"], state.get("best"), top_k, step, rng, own["sums"])


RUN_FILES = ("state.pt", "config.yaml", "summary.csv", "last.safetensors", "train.log")  # any: the folder holds a run

# What a run writes before its first state: a folder holding only these (and its lock) held a run that stopped
# before it saved anything, which --resume cannot continue, so a new run may start there without --overwrite.
NEVER_STARTED = {"config.yaml", "train.log"}

# The temporaries a killed write leaves: `files.atomic_write`'s `.NAME.XXXXXXXX.tmp` (mkstemp's 8 characters;
# `.tmp.png` for the plot) of a run's files, and the fixed name earlier versions drew curves.png into.
_WRITTEN = r"state\.pt|config\.yaml|summary\.csv|(last|best|last_ema)\.safetensors|(epoch|step)-\d{4,}\.safetensors"
STALE_TEMPORARY = re.compile(
    rf"\.({_WRITTEN})\.[a-z0-9_]{{8}}\.tmp|\.curves\.png\.[a-z0-9_]{{8}}\.tmp\.png|\.curves\.png\.tmp\.png"
)


def check_output_free(out: Path, resume, overwrite: bool) -> None:
    """FileExistsError for a new run where another run or foreign files are, unless resuming or `overwrite`."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--output {out} is not a folder; a run folder holds several files: pass a folder path")
    if resume or overwrite or not out.is_dir():
        return
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and set(found) <= NEVER_STARTED and (out / ".lock").is_file():
        return  # a run that stopped before it saved anything (bad data, a typo): nothing to continue, nothing to keep
    if found:
        raise FileExistsError(
            f"run folder {out} already holds a run ({', '.join(found)}); continue it with --resume {out}, "
            "start over in it with --overwrite, or pick another folder with --output"
        )
    # no run state: anything but a lock (a run killed before its first file) was put there by someone else
    foreign = sorted(p.name for p in out.iterdir() if p.name != ".lock")
    if foreign:
        more = f" (+{len(foreign) - 5} more)" if len(foreign) > 5 else ""
        raise FileExistsError(
            f"--output {out} is not empty and holds no run: {', '.join(map(repr, foreign[:5]))}{more} were not "
            "written by a mambaout run; pick an empty or new folder, or pass --overwrite to write the run beside them"
        )


def lock_folder(out: Path):
    """Take the folder's `.lock` (flock; released by the kernel however the process ends, or when the returned file
    is closed; None: no flock here); ValueError naming the pid of a live holder. On a folder that provably holds a run
    of this package (its lock, and its state or config), also remove the temporaries a killed write left (as large as
    checkpoints): only `STALE_TEMPORARY` names, only regular files."""
    # a run folder is judged before this run's own lock and config make every folder look like one
    provable = (out / ".lock").is_file() and any((out / n).is_file() for n in ("state.pt", "config.yaml"))
    lock = _flock(out)
    for p in out.glob(".*.tmp*") if provable else ():
        if STALE_TEMPORARY.fullmatch(p.name) and p.is_file() and not p.is_symlink():
            size = p.stat().st_size
            p.unlink(missing_ok=True)
            logger.warning("removed %s (%.1f MiB), left by a write that was interrupted", p, size / 2**20)
    return lock


def _flock(out: Path):
    try:
        import fcntl
    except ImportError:  # no flock (Windows): run unlocked
        return None
    f = open(out / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise ValueError(
            f"run folder {out} is in use by another mambaout train (pid {holder}); wait for it to finish, "
            "or pass another --output"
        ) from None
    f.truncate(0)  # "a+": the write goes to the (now empty) end
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


class RunFolder:
    """The run folder as the engine writes it (docs/training.md lists its files; `write=False` on ranks but 0). Epochs
    count from 1 in summary.csv, the log and epoch-NNNN files; the weights files (last, best, the `keep_top_k` best
    by the task's `metric`, higher is better) carry the task's `meta()`."""

    def __init__(self, out: Path, task, write: bool, keep_top_k=0, tensorboard=False, resumed=False):
        self.out, self.config, self.meta, self.write = out, task.config(), task.meta(), write
        self.metric, self.keep_top_k, self.lock, self.tb, self.log = task.metric, keep_top_k, None, None, None
        if write:
            import yaml

            out.mkdir(parents=True, exist_ok=True)
            self.lock = lock_folder(out)
            files.atomic_write_text(out / "config.yaml", yaml.safe_dump(_plain(self.config), sort_keys=False))
            if tensorboard:  # the trainer has checked that tensorboard is installed
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            self.log = open(out / "train.log", "a" if resumed else "w")

    def say(self, msg: str) -> None:
        """Print `msg` and add it to train.log (rank 0 only)."""
        if not self.write:
            return
        print(msg, flush=True)
        try:
            self.log.write(msg + "\n")
            self.log.flush()
        except OSError as e:  # a full disk: one line naming the file
            raise files.FileWriteError(e.errno, f"cannot write {self.log.name}: {e.strerror}") from e

    def save_state(self, parts: Trainable, progress: Progress, completed_epoch: int, epoch_step=0, sums=None):
        """Called on every rank: each rank's RNG state and unlogged loss sums are gathered, so a resumed rank continues
        its own. `epoch_step` > 0 marks a checkpoint inside the next epoch."""
        mine = dict(rng=rng_state(), sums=sums)
        ranks = [mine]
        if dist.get_world_size() > 1:  # as bytes: all_gather_object cannot carry tensors (torch can't unpickle them)
            blob = io.BytesIO()
            torch.save(mine, blob)
            ranks = [torch.load(io.BytesIO(b), weights_only=True) for b in dist.all_gather_lists([blob.getvalue()])]
        if not self.write:
            return
        state = {key: None if obj is None else obj.state_dict() for key, obj in parts.stateful().items()}
        state.update(epoch=completed_epoch, step=progress.global_step, epoch_step=epoch_step, best=progress.best)
        state.update(top_k=[list(t) for t in progress.top_k], ranks=ranks, config=_plain(self.config))
        files.atomic_torch_save(state, self.out / "state.pt")

    def save_row(self, parts: Trainable, progress: Progress, row: dict, name: str) -> None:
        """last.safetensors (and last_ema), the k best evaluations as `name`, best.safetensors, the row."""
        if not self.write:
            return
        extra = {k: row[k] for k in ("epoch", "step", self.metric) if row.get(k) is not None}
        self.save_weights(parts.model, "last.safetensors", **extra)
        if parts.ema is not None:
            self.save_weights(parts.ema.module, "last_ema.safetensors", **extra)
        score = row.get(self.metric)
        if score is not None and self.keep_top_k:  # the top k evaluations (score, step, file name), best first
            k, top_k = self.keep_top_k, progress.top_k
            top_k.append((score, row["step"], name))
            top_k.sort(key=lambda t: (-t[0], t[1]))
            if any(t[2] == name for t in top_k[:k]):
                self.save_weights(parts.model, name, **extra)
            for _, _, dropped in top_k[k:]:
                (self.out / dropped).unlink(missing_ok=True)
            del top_k[k:]
        self._log(row)
        ema_score = row.get(f"ema_{self.metric}")
        if score is None:
            return
        best = max(score, ema_score if ema_score is not None else -math.inf)
        if progress.best is None or best > progress.best[self.metric]:
            use_ema = ema_score is not None and ema_score > score
            progress.best = {"epoch": row["epoch"], "step": row["step"], self.metric: best}
            progress.best["source"] = "ema" if use_ema else "model"
            model = parts.ema.module if use_ema else parts.model
            self.save_weights(model, "best.safetensors", **dict(extra, **{self.metric: best}))

    def _log(self, row: dict) -> None:
        """Add `row` to summary.csv (a resumed run rewrites the steps it redoes), curves.png and TensorBoard."""
        path = self.out / "summary.csv"
        rows = [r for r in _read_csv(path) if int(r["step"]) < row["step"]] + [row]
        fields = list(dict.fromkeys(k for r in rows for k in r))
        lines = [",".join(fields)] + [",".join(csv_cell(r.get(k)) for k in fields) for r in rows]
        files.atomic_write_text(path, "\n".join(lines) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, float(v), row["step"])
            self.tb.flush()
        try:
            plot_curves(path, self.out / "curves.png", self.metric)
        except Exception as e:  # a plotting problem must never stop training
            logger.warning("could not draw curves.png: %s", e)

    def save_weights(self, model: nn.Module, name: str, **extra) -> Path:
        from mambaout.weights.checkpoint import save_weights

        return save_weights(model, self.out / name, **self.meta, **extra)

    def close(self) -> None:
        if self.log is not None:
            with contextlib.suppress(OSError):  # what did not fit on a full disk was reported by `say`
                self.log.close()
        for resource in (self.tb, self.lock):  # closing the lock's file releases the flock
            if resource is not None:
                resource.close()
        self.tb = self.lock = self.log = None


def csv_cell(value) -> str:
    """A value as a summary.csv cell: unset, a list or a mapping is empty; a float has 6 significant digits."""
    if value is None or value == "" or isinstance(value, (list, dict)):
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return [_plain(v) for v in obj] if isinstance(obj, (list, tuple)) else obj


def _read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(path.read_text().splitlines())) if path.is_file() else []


def plot_curves(summary_csv: Path, png: Path, metric: str = "top1") -> None:
    """Losses, the headline `metric` and the learning rate per epoch (as summary.csv counts them) into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read_csv(summary_csv)
    if not rows:
        return

    def col(k):
        return [float(r[k]) if r.get(k) else math.nan for r in rows]

    ep = col("epoch")  # already counted from 1 (a mid-epoch row: a fraction)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    curves = {"train_loss": "train", "val_loss": "val", metric: metric, f"ema_{metric}": f"EMA {metric}"}
    for i, (key, label) in enumerate(curves.items()):  # two a panel: the second only where it has values
        if i % 2 == 0 or any(not math.isnan(v) for v in col(key)):
            axes[i // 2].plot(ep, col(key), label=label)
    axes[2].plot(ep, col("lr"))
    for ax, title in zip(axes, ("loss", f"val {metric}", "learning rate")):
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    fig.tight_layout()
    try:
        files.atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=90, format="png"), suffix=".png")
    finally:
        plt.close(fig)
