"""One copy of cached data per machine, not per rank: local rank 0 builds the arrays once and writes them to one
file in shared memory (`/dev/shm`) that every rank of the machine maps, so the page cache holds one copy for all.
The file is unlinked as soon as everyone has mapped it, so nothing is left behind even if the run crashes later.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mambaout.utils import distributed as dist

_ALIGN = 64  # byte alignment of each array in the file


def _shm_dir() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def cache_key(*parts) -> str:
    """A name the ranks of one job agree on: the data's identity plus the job's rendezvous (port, run id)."""
    job = (os.environ.get("TORCHELASTIC_RUN_ID", ""), os.environ.get("MASTER_PORT", ""), os.environ.get("SLURM_JOB_ID"))
    return hashlib.sha1(repr((parts, job)).encode()).hexdigest()[:16]


def write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Arrays -> one file: a JSON header line (name, dtype, shape, offset) then the aligned raw data."""
    meta, offset = {}, 0
    for name, a in arrays.items():
        meta[name] = dict(dtype=a.dtype.str, shape=list(a.shape), offset=offset)
        offset += -(-a.nbytes // _ALIGN) * _ALIGN
    header = json.dumps(meta).encode() + b"\n"
    start = -(-len(header) // _ALIGN) * _ALIGN
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for name, a in arrays.items():
            f.seek(8 + start + meta[name]["offset"])
            f.write(np.ascontiguousarray(a).tobytes())
    os.replace(tmp, path)


def map_arrays(path: Path) -> dict[str, np.ndarray]:
    """Memory-map the arrays of `write_arrays` (copy-on-write: reads share the page cache, nothing writes back)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n))
    start = 8 + -(-n // _ALIGN) * _ALIGN
    out = {}
    for name, m in meta.items():
        shape = tuple(m["shape"])
        if int(np.prod(shape)) == 0:
            out[name] = np.zeros(shape, dtype=np.dtype(m["dtype"]))
            continue
        out[name] = np.memmap(path, dtype=np.dtype(m["dtype"]), mode="c", offset=start + m["offset"], shape=shape)
    return out


def machine_shared(key: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """`build()` on local rank 0 only; every rank of the machine gets memory maps of that one result (a single
    process just builds and keeps the arrays). All ranks must call this together."""
    if not dist.is_initialized():
        return build()
    local_rank = dist.detect().local_rank
    path = _shm_dir() / f"mambaout-cache-{key}.bin"
    if local_rank == 0:
        write_arrays(path, build())
    dist.barrier()  # written
    arrays = map_arrays(path)
    dist.barrier()  # everyone has it mapped: the name can go, the mappings keep the data
    if local_rank == 0:
        path.unlink(missing_ok=True)
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
