"""What the training engine needs from a task, and how the engine is told to run it.

`trainer.fit(task, loop)` trains any `Task`: classification (`training/classify.py`), detection and segmentation
(`dense/tasks.py`). A task owns its data, model, loss, evaluation, the numbers its lines show and what its
checkpoints carry; the engine owns the loop, the optimizer step, the schedule's stepping, when to evaluate and save,
the run folder, resume, Ctrl-C, the log and DDP.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class Loop:
    """How the engine runs a task, filled by the task's command from its own settings (`from_settings`).

    Exactly one of `epochs` and `steps` gives the run's length (`steps` may also cap an epoch count); the
    evaluation comes every `eval_every_epochs` epochs and/or every `eval_every_steps` steps, and always at the end.
    """

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
    """The interface a task implements; the engine calls these, in this order.

    Attributes:
        name: The command's task, as messages name it (`train`, `detect`, `segment`).
        metric: The headline key of `evaluate_run`'s result (higher is better): picks best.safetensors.
        batch_size: Images per device and micro-batch.
        batches, steps_per_epoch, train_images: The training loader (`data.loaders.EpochLoader`), the optimizer
            steps of one pass over it and its image count, set by `build_data`.
    """

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
