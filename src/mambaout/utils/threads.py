"""The CPU thread policy of every `mambaout` command and of the test run: as many intra-op threads as cores are free
(`begin()` before torch loads, `settle()` after; MAMBAOUT_THREADS, OMP_NUM_THREADS and `--threads` override it).
Why and how: docs/performance.md, "CPU threads on a shared machine".
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

_ENV = "MAMBAOUT_THREADS"


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask; `os.cpu_count()` where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class CpuSnapshot:
    """Machine-wide busy and total CPU seconds since boot (/proc/stat), this process's CPU seconds, the wall clock."""

    busy: float
    total: float
    own: float
    wall: float


def _niceness() -> int:
    try:
        return os.getpriority(os.PRIO_PROCESS, 0)
    except (AttributeError, OSError):
        return 0


def cpu_snapshot() -> CpuSnapshot | None:
    """The counters `free_cores` compares; None where the machine's CPU time cannot be read (no /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    idle = ticks[3] + ticks[4]  # waiting for a disk is not using a core
    if _niceness() <= 0:
        idle += ticks[1]  # niced processes yield their cores to us: for a process at priority 0 those cores are free
    t = os.times()
    return CpuSnapshot((sum(ticks) - idle) / hz, sum(ticks) / hz, t.user + t.system, time.monotonic())


def free_cores(before: CpuSnapshot, after: CpuSnapshot, cores: int | None = None) -> float | None:
    """Cores other processes left free between two snapshots (our CPU time taken out); None for under 50 ms."""
    cores = cores or usable_cores()
    total = after.total - before.total
    if after.wall - before.wall < 0.05 or total <= 0:
        return None
    machine = os.cpu_count() or cores
    wall_cores = total / machine  # the wall time as /proc/stat counts it (ticks of every CPU / CPUs)
    others = max(0.0, (after.busy - before.busy) - (after.own - before.own)) / wall_cores
    if machine > cores:  # other processes may run on CPUs outside our affinity: count only their share of ours
        others *= cores / machine
    return max(0.0, cores - others)


def threads_for(free: float | None, cores: int | None = None) -> int:
    """Intra-op threads for `free` free cores: rounded, at least 1, at most the usable cores (all when unknown)."""
    cores = cores or usable_cores()
    return cores if free is None else max(1, min(cores, int(free + 0.5)))


@dataclass
class Policy:
    """What the policy chose and why (printed by `describe`)."""

    threads: int | None = None
    reason: str = "not applied"
    free: float | None = None


policy = Policy()
_begun: CpuSnapshot | None = None


def _env_threads() -> tuple[int | None, str]:
    for name in (_ENV, "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if not value:
            continue
        if name == _ENV and value.lower() == "all":
            return usable_cores(), f"{name}=all"
        try:
            n = int(value.split(",")[0])  # OMP_NUM_THREADS may list one count per nesting level
        except ValueError:
            raise ValueError(f"{name}={value!r}: expected a whole number of threads (or 'all' for {_ENV})") from None
        if n < 1:
            raise ValueError(f"{name}={value!r}: expected at least 1 thread")
        return n, f"{name}={n}"
    return None, ""


def begin() -> None:
    """Step 1, before torch is imported: remember the CPU counters (see the module docstring)."""
    global _begun
    _begun = cpu_snapshot()


def settle(min_window: float = 0.2, again: bool = False, most: int | None = None) -> Policy:
    """Step 2: set torch's intra-op threads from the cores left free since `begin()` (watched for at least
    `min_window` seconds), or from the environment; once per process unless `again`. `most` caps the policy's count
    (not the environment's). Imports torch; returns the module's `policy`."""
    global _begun
    if policy.threads is not None and not again:
        _begun = None
        return policy
    forced, why = _env_threads()
    if forced is not None:
        return set_threads(forced, why)
    before = _begun or cpu_snapshot()
    _begun = None
    if before is not None and time.monotonic() - before.wall < min_window:
        time.sleep(min_window - (time.monotonic() - before.wall))
    after = cpu_snapshot()
    free = free_cores(before, after) if before and after else None
    n = threads_for(free)
    if most is not None:
        n = max(1, min(n, most))
    if free is None:
        reason = "machine load unreadable: every usable core"
    else:
        reason = f"{free:.1f} of {usable_cores()} usable cores free at start-up"
    return set_threads(n, reason, free)


def set_threads(n: int, reason: str = "--threads", free: float | None = None) -> Policy:
    """Set torch's intra-op threads to `n` (the one place that does), remembering why; ValueError for `n` < 1."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a whole number >= 1, got {n!r}")
    import torch

    torch.set_num_threads(n)
    policy.threads, policy.reason, policy.free = n, reason, free if free is not None else policy.free
    return policy


def describe() -> str:
    """One line: the thread count torch uses now and why, e.g. `2 threads (2.0 of 2 usable cores free at start-up)`."""
    if "torch" not in sys.modules:
        return "threads not set yet (torch not imported)"
    import torch

    n = torch.get_num_threads()
    return f"{n} threads ({policy.reason if policy.threads == n else 'set by the caller'})"
