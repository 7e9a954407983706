"""The CPU thread policy (mambaout/utils/threads.py): threads from the cores other processes leave free.

Speed is never asserted here (benchmarks/thread_policy.py measures it); these hold the arithmetic on hand-made
counters, the overrides, and that a real busy process lowers the free cores the policy sees.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mambaout.utils import threads
from mambaout.utils.threads import CpuSnapshot, free_cores, threads_for

SRC = str(Path(threads.__file__).resolve().parents[2])


def _machine(monkeypatch, cpus: int):
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)


def test_free_cores_counts_only_other_processes(monkeypatch):
    _machine(monkeypatch, 2)
    # 1 s of wall time on 2 CPUs = 2 CPU-seconds in /proc/stat; 1.5 of them busy, 0.5 of those ours
    before = CpuSnapshot(busy=100.0, total=1000.0, own=3.0, wall=50.0)
    after = CpuSnapshot(busy=101.5, total=1002.0, own=3.5, wall=51.0)
    assert free_cores(before, after, cores=2) == pytest.approx(1.0)  # one core used by others: 1 free
    assert threads_for(1.0, cores=2) == 1
    ours_only = CpuSnapshot(busy=101.5, total=1002.0, own=4.5, wall=51.0)  # all the busy time was ours
    assert free_cores(before, ours_only, cores=2) == pytest.approx(2.0)
    assert threads_for(2.0, cores=2) == 2


def test_free_cores_on_a_share_of_a_bigger_machine(monkeypatch):
    _machine(monkeypatch, 8)
    before = CpuSnapshot(busy=0.0, total=0.0, own=0.0, wall=0.0)
    after = CpuSnapshot(busy=4.0, total=8.0, own=0.0, wall=1.0)  # 4 of 8 CPUs busy with others
    assert free_cores(before, after, cores=8) == pytest.approx(4.0)
    assert free_cores(before, after, cores=2) == pytest.approx(1.0)  # 2 CPUs less the others' share: 4 x 2/8 = 1


def test_short_window_or_nothing_known_keeps_every_core(monkeypatch):
    _machine(monkeypatch, 2)
    before = CpuSnapshot(busy=0.0, total=0.0, own=0.0, wall=0.0)
    assert free_cores(before, CpuSnapshot(1.0, 2.0, 0.0, 0.01), cores=2) is None  # 10 ms says nothing
    assert threads_for(None, cores=3) == 3
    assert threads_for(0.0, cores=4) == 1  # at least one thread, even on a saturated machine
    assert threads_for(2.4, cores=4) == 2 and threads_for(2.6, cores=4) == 3 and threads_for(9.0, cores=4) == 4


@pytest.fixture
def fresh_policy(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "policy", threads.Policy())
    yield threads
    torch.set_num_threads(before)


def test_environment_overrides_and_bad_values_are_refused(fresh_policy, monkeypatch):
    monkeypatch.setenv("MAMBAOUT_THREADS", "1")
    assert fresh_policy.settle().threads == 1 and torch.get_num_threads() == 1
    assert "MAMBAOUT_THREADS=1" in fresh_policy.describe()
    monkeypatch.setenv("MAMBAOUT_THREADS", "all")
    assert fresh_policy.settle(again=True).threads == threads.usable_cores()
    monkeypatch.setenv("MAMBAOUT_THREADS", "two")
    with pytest.raises(ValueError, match="MAMBAOUT_THREADS='two'"):
        fresh_policy.settle(again=True)
    monkeypatch.delenv("MAMBAOUT_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert fresh_policy.settle(again=True).reason == "OMP_NUM_THREADS=1"
    with pytest.raises(ValueError, match=">= 1"):
        fresh_policy.set_threads(0)


def test_settle_applies_once_unless_asked_again(fresh_policy, monkeypatch):
    monkeypatch.setenv("MAMBAOUT_THREADS", "1")
    fresh_policy.settle()
    monkeypatch.setenv("MAMBAOUT_THREADS", "all")
    assert fresh_policy.settle().threads == 1  # a command run in-process by a test keeps the count it has
    fresh_policy.set_threads(1, "--threads")
    assert fresh_policy.describe() == "1 threads (--threads)"


def test_a_busy_process_lowers_the_free_cores():
    """Only an upper bound: other load on the machine can only lower the free cores further."""
    cores = threads.usable_cores()
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)  # let it start
        before = threads.cpu_snapshot()
        if before is None:
            pytest.skip("no /proc/stat here")
        time.sleep(1.0)
        free = free_cores(before, threads.cpu_snapshot())
    finally:
        hog.kill()
        hog.wait()
    assert free is not None and free <= cores - 0.5, (free, cores)


def test_cli_start_up_applies_the_policy_without_loading_torch_early():
    """`import mambaout.cli` stays torch-free; `_start_up` loads torch and sets the count (here from the env)."""
    code = (
        "import sys, mambaout.cli as c; assert 'torch' not in sys.modules; c._start_up('x'); "
        "import torch; from mambaout.utils import threads; print(torch.get_num_threads(), threads.describe())"
    )
    env = dict(os.environ, PYTHONPATH=SRC, MAMBAOUT_THREADS="1")
    env.pop("OMP_NUM_THREADS", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == "1" and "MAMBAOUT_THREADS=1" in out


def test_a_bad_thread_count_in_the_environment_is_one_line_and_exit_2():
    env = dict(os.environ, PYTHONPATH=SRC, MAMBAOUT_THREADS="lots")
    done = subprocess.run([sys.executable, "-m", "mambaout", "models"], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "mambaout models: MAMBAOUT_THREADS='lots': expected a whole number of threads (or 'all' for MAMBAOUT_THREADS)"
    ]


@pytest.mark.parametrize("our_nice, busy", [(0, 3.0), (10, 5.0)])
def test_niced_time_is_free_for_a_default_priority_process(monkeypatch, tmp_path, our_nice, busy):
    """/proc/stat's second column (user time of niced processes) counts as idle for a process at priority 0, whose
    threads the scheduler serves first; a niced process counts it as busy (it cannot tell their nice from its own)."""
    stat = tmp_path / "stat"
    stat.write_text("cpu  200 200 100 1000 0 0 0 0 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")  # 2 s of niced time of 5 busy
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: real_open(stat if f == "/proc/stat" else f, *a, **k))
    monkeypatch.setattr(threads, "_niceness", lambda: our_nice)
    monkeypatch.setattr(threads.os, "sysconf", lambda name: 100)
    snapshot = threads.cpu_snapshot()
    assert (snapshot.busy, snapshot.total) == (busy, 15.0)
