"""One copy of cached data per machine, not per rank: local rank 0 builds the arrays once and writes them to one
folder in shared memory (`/dev/shm`) that every rank of the machine maps, so the page cache holds one copy for all.
The folder is removed as soon as everyone has mapped it, so nothing is left behind even if the run crashes later.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mambaout.utils import distributed as dist


def _shm_dir() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def cache_key(*parts) -> str:
    """A name the ranks of one job agree on: the data's identity plus the job's rendezvous (port, run id)."""
    job = (os.environ.get("TORCHELASTIC_RUN_ID", ""), os.environ.get("MASTER_PORT", ""), os.environ.get("SLURM_JOB_ID"))
    return hashlib.sha1(repr((parts, job)).encode()).hexdigest()[:16]


def write_arrays(folder: Path, arrays: dict[str, np.ndarray]) -> None:
    """Arrays -> `folder/NAME.npy`, one plain `.npy` file each (no pickles)."""
    folder.mkdir(exist_ok=True)
    for name, a in arrays.items():
        np.save(folder / f"{name}.npy", a, allow_pickle=False)


def map_arrays(folder: Path) -> dict[str, np.ndarray]:
    """Memory-map the arrays of `write_arrays` (copy-on-write: reads share the page cache, nothing writes back)."""
    return {p.stem: np.load(p, mmap_mode="c") for p in folder.glob("*.npy")}


def machine_shared(key: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """`build()` on local rank 0 only; every rank of the machine gets memory maps of that one result (a single
    process just builds and keeps the arrays). All ranks must call this together."""
    if not dist.is_initialized():
        return build()
    local_rank = dist.detect().local_rank
    path = _shm_dir() / f"mambaout-cache-{key}"
    if local_rank == 0:
        write_arrays(path, build())
    dist.barrier()  # written
    arrays = map_arrays(path)
    dist.barrier()  # everyone has it mapped: the name can go, the mappings keep the data
    if local_rank == 0:
        shutil.rmtree(path, ignore_errors=True)
    return arrays


class PackedBytes:
    """A list of `bytes | None` stored as one uint8 buffer plus offsets (what the shared cache holds)."""

    def __init__(self, arrays: dict[str, np.ndarray]):  # from `pack`: data, offsets [N + 1], missing [N] bool
        self.data, self.offsets, self.missing = arrays["data"], arrays["offsets"], arrays["missing"]

    @staticmethod
    def pack(items: list[bytes | None]) -> dict[str, np.ndarray]:
        lengths = np.array([-1 if b is None else len(b) for b in items], dtype=np.int64)
        offsets = np.zeros(len(items) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(np.maximum(lengths, 0))
        data = np.frombuffer(b"".join(b for b in items if b is not None), dtype=np.uint8)
        return dict(data=data, offsets=offsets, missing=(lengths < 0))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> bytes | None:
        return None if self.missing[i] else self.data[self.offsets[i] : self.offsets[i + 1]].tobytes()
