"""Distributed: rank detection, and DDP on CPU (gloo) giving the weights of one process over the same global batch."""

import contextlib
import os
import socket
import subprocess
import sys

import pytest
import torch

from mambaout.utils import distributed as dist
from mambaout.weights.checkpoint import read_checkpoint

# One process with batch 32 == one with 16 x 2 accumulation == two with 16 each == two "nodes" with 16 each:
# the same 32 images per step (DistributedSampler's shuffle is one permutation cut differently), no randomness
# in the data (full-image crops, no flip/colour jitter/erasing/mixup) and none in the model (no drop path).
COMMON = [
    "train",
    "--model",
    "mambaout_test",
    "--data-train",
    "digits:train",
    "--set",
    "data_val=null",
    "--img-size",
    "32",
    "--global-batch",
    "32",
    "--epochs",
    "1",
    "--max-steps-per-epoch",
    "2",
    "--warmup-epochs",
    "0",
    "--cooldown-epochs",
    "0",
    "--lr",
    "0.003",
    "--mixup",
    "0",
    "--cutmix",
    "0",
    "--smoothing",
    "0",
    "--reprob",
    "0",
    "--auto-augment",
    "none",
    "--drop-path",
    "0",
    "--set",
    "scale=[1, 1]",
    "--set",
    "ratio=[1, 1]",
    "--set",
    "hflip=0",
    "--set",
    "color_jitter=0",
    "--set",
    "train_interpolation=bicubic",
    "--workers",
    "0",
    "--threads",
    "1",
    "--no-progress",
    "--device",
    "cpu",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_"))}
    return dict(env, OMP_NUM_THREADS="1")


def _weights(run) -> dict:
    return read_checkpoint(run / "last.safetensors")[0]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _mean_diff(a: dict, b: dict) -> float:
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    return diffs.mean().item()


def _close(a: dict, b: dict) -> bool:
    # Same 32 per-image gradients summed in another order agree to float32 rounding (~1e-7 relative). AdamW
    # divides each gradient by its own running magnitude, so on the few weights whose gradient is ~1e-8 that
    # rounding is amplified to a visible fraction of a step; hence a bound on the mean as well as on the max.
    # A real mismatch (other images, a missing all-reduce, wrong loss scaling) moves the mean by ~1e-3.
    return _max_diff(a, b) < 2e-4 and _mean_diff(a, b) < 2e-7


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The four ways of taking the same two optimizer steps; started together, so they overlap."""
    tmp = tmp_path_factory.mktemp("ddp")
    port = _free_port()
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    cmds = {
        "one": [sys.executable, "-m", "mambaout", *COMMON, "--batch-size", "32"],
        "accum": [sys.executable, "-m", "mambaout", *COMMON, "--batch-size", "16"],
        "ddp2": [*torchrun, "--nproc-per-node", "2", "--master-port", str(_free_port()), "-m", "mambaout"]
        + [*COMMON, "--batch-size", "16"],
    }
    node = [*torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d"]
    node += ["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "mambaout-test", "-m", "mambaout"]
    node += [*COMMON, "--batch-size", "16"]
    cmds["node0"] = node
    cmds["node1"] = node
    procs = {}
    for name, cmd in cmds.items():
        out = tmp / ("nodes" if name.startswith("node") else name)
        procs[name] = subprocess.Popen(
            [*cmd, "--output", str(out)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    logs = {}
    for name, p in procs.items():
        try:
            logs[name] = p.communicate(timeout=600)[0]
        except subprocess.TimeoutExpired:
            p.kill()
            logs[name] = p.communicate()[0]
        assert p.returncode == 0, f"{name} failed:\n{logs[name][-3000:]}"
    return tmp, logs


@pytest.mark.multiprocess
@pytest.mark.timeout(1200)  # the fixture's five trainings, seven processes on the machine at once
def test_ddp_two_processes_match_one(runs):
    tmp, logs = runs
    assert "2 process(es)" in logs["ddp2"] and "16 x 2 x 1 accumulation" in logs["ddp2"]
    assert "16 x 1 x 2 accumulation" in logs["accum"]
    one, accum, ddp = _weights(tmp / "one"), _weights(tmp / "accum"), _weights(tmp / "ddp2")
    # The three runs sum the same 32 per-image gradients in a different order (one batch; two micro-batches;
    # two ranks averaged by the all-reduce), so they agree to float32 rounding, not bit for bit.
    print("max/mean |one - accum|", _max_diff(one, accum), _mean_diff(one, accum))
    print("max/mean |one - ddp|", _max_diff(one, ddp), _mean_diff(one, ddp))
    assert _close(one, accum)
    assert _close(one, ddp)
    moved = max((one[k] - v).abs().max().item() for k, v in _initial_weights().items())
    assert moved > 1e-3  # the steps really changed the weights


def _initial_weights() -> dict:
    import mambaout

    torch.manual_seed(0)  # the trainer seeds with `seed` (0) right before building the model
    return mambaout.create_model("mambaout_test", num_classes=10, drop_path_rate=0.0).state_dict()


@pytest.mark.multiprocess
@pytest.mark.timeout(1200)
def test_two_nodes_rendezvous(runs):
    tmp, logs = runs
    assert "2 process(es)" in logs["node0"] + logs["node1"]
    one, nodes = _weights(tmp / "one"), _weights(tmp / "nodes")
    print("max/mean |one - two nodes|", _max_diff(one, nodes), _mean_diff(one, nodes))
    assert _close(one, nodes)


def test_detect_torchrun_and_slurm(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(k, raising=False)
    assert dist.detect() == dist.DistEnv()
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert dist.detect() == dist.DistEnv(5, 1, 8, "slurm")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert dist.detect() == dist.DistEnv(2, 0, 4, "torchrun")  # torchrun inside an allocation wins


def test_single_process_helpers():
    assert dist.get_rank() == 0 and dist.get_world_size() == 1 and dist.is_main()
    assert dist.all_reduce_sum([1.0, 2.0]) == [1.0, 2.0]


def test_no_sync_enters_the_models_no_sync_only_on_skipped_micro_steps():
    class Wrapped(torch.nn.Linear):
        """Stands in for DistributedDataParallel: records whether its no_sync was entered around the backward."""

        def __init__(self):
            super().__init__(2, 1)
            self.syncing, self.synced_backwards = True, []
            self.weight.register_hook(lambda grad: self.synced_backwards.append(self.syncing))

        @contextlib.contextmanager
        def no_sync(self):
            self.syncing = False
            try:
                yield
            finally:
                self.syncing = True

    ddp = Wrapped()
    for skip in (True, False):  # a micro-step before the last of an accumulation, then the last one
        with dist.no_sync(ddp, skip=skip):
            ddp(torch.ones(1, 2)).sum().backward()
    assert ddp.synced_backwards == [False, True]
    # a plain module has no no_sync: its gradients still accumulate over the micro-steps
    m = torch.nn.Linear(2, 1)
    for _ in range(2):
        with dist.no_sync(m, skip=True):
            m(torch.ones(1, 2)).sum().backward()
    torch.testing.assert_close(m.weight.grad, torch.full((1, 2), 2.0))


def _tensors(obj, prefix="") -> dict:
    """Every tensor in a (nested) state, by its path."""
    if torch.is_tensor(obj):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {k: v for key, value in items for k, v in _tensors(value, f"{prefix}/{key}").items()}


def _torchrun(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port())]
    proc = subprocess.run([*cmd, "-m", "mambaout", *args], env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


@pytest.mark.multiprocess
@pytest.mark.timeout(1200)
def test_ddp_classification_resumed_mid_epoch_is_the_uninterrupted_run(tmp_path):
    """2 ranks over gloo with randomness that differs per rank (drop path, mixup/cutmix, random erasing, EMA):
    stopped inside the second epoch and resumed, the final state equals the uninterrupted run's, every tensor (each
    rank continues its own saved RNG state and loss sums)."""
    args = [a for a in COMMON if a not in ("--no-progress",)]
    for flag, value in (("--mixup", "0.8"), ("--cutmix", "1.0"), ("--reprob", "0.5"), ("--drop-path", "0.2")):
        args[args.index(flag) + 1] = value
    args[args.index("--epochs") + 1] = "2"
    args[args.index("--max-steps-per-epoch") + 1] = "3"
    args += ["--batch-size", "16", "--model-ema", "--log-every", "1"]
    straight, parted = tmp_path / "straight", tmp_path / "parted"
    _torchrun([*args, "--output", str(straight)])
    _torchrun([*args, "--output", str(parted), "--stop-after-steps", "4"])
    state = torch.load(parted / "state.pt", weights_only=True)
    assert (state["epoch"], state["epoch_step"], state["step"]) == (0, 1, 4) and len(state["ranks"]) == 2
    _torchrun(["train", "--resume", str(parted), "--log-every", "1"])
    a, b = (_tensors(torch.load(run / "state.pt", weights_only=True)) for run in (straight, parted))
    a = {k: v for k, v in a.items() if "/ranks/" not in k}  # the RNG states: equal too, but not training's result
    b = {k: v for k, v in b.items() if "/ranks/" not in k}
    assert a.keys() == b.keys() and len(a) > 68
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, f"{len(unequal)} of {len(a)} tensors differ: {unequal[:5]}"
    lines = [(run / "train.log").read_text().splitlines() for run in (straight, parted)]
    steps = [[line.rsplit("  ", 2)[0] for line in log if " step " in line and "ETA" in line] for log in lines]
    assert steps[0] == steps[1] and len(steps[0]) == 6  # the same losses logged at every step
