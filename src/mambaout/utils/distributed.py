"""Everything distributed: torchrun/SLURM detection, process group set-up, small collectives. A command runs as one
plain process (nothing initialised), under `torchrun` or as `srun` tasks; no other module imports torch.distributed.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mambaout.utils.device import resolve_device


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    source: str = "single"  # 'single', 'torchrun' or 'slurm'


def detect() -> DistEnv:
    """Where the ranks come from: torchrun's variables win over SLURM's (torchrun inside an allocation)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]), "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:
        return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]), "slurm")
    return DistEnv()


def _slurm_master_addr() -> str:
    """The first host of the allocation (`scontrol` expands the compressed node list, e.g. `gpu[01-04]`)."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0].split("[")[0] or "127.0.0.1"


def init(device: str | None = None, backend: str | None = None) -> tuple[DistEnv, torch.device]:
    """Initialise the process group if there are several ranks; returns the rank layout and this rank's device
    (`device` as `resolve_device` takes it; a bare 'cuda' is this rank's local GPU). `backend`: default nccl on
    CUDA, gloo on CPU."""
    env = detect()
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev.index if dev.index is not None else env.local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    if env.world_size > 1 and not dist.is_initialized():
        if env.source == "slurm":
            # srun does not export a rendezvous; torch's env:// init reads these.
            os.environ.setdefault("MASTER_ADDR", _slurm_master_addr())
            ranks = dict(MASTER_PORT=29500, RANK=env.rank, WORLD_SIZE=env.world_size, LOCAL_RANK=env.local_rank)
            for key, value in ranks.items():
                os.environ.setdefault(key, str(value))
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, init_method="env://", rank=env.rank, world_size=env.world_size)
    return env, dev


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Only rank 0 logs, draws progress bars and writes files."""
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Sum a few scalars over all ranks (float64, so counts stay exact)."""
    if not is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_gather_lists(items: list) -> list:
    """The concatenation of every rank's `items` (picklable), on every rank; `items` itself with one process."""
    if not is_initialized():
        return list(items)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(items))
    return [x for part in gathered for x in part]


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP-wrap `model` when there are several ranks (a no-op for one process)."""
    if not is_initialized():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def no_sync(model: nn.Module, skip: bool):
    """Context for an accumulation micro-step: DDP skips its gradient all-reduce when `skip` is true."""
    return model.no_sync() if skip and hasattr(model, "no_sync") else contextlib.nullcontext()
