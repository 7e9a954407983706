"""The CUDA path without a GPU: the fused kernels are opt-in, compile fast for sm_90, and gpu_check cannot hang.

- Every Triton kernel compiles for sm_90 on this CPU-only machine (Triton ships ptxas), each compile timed; the
  command fails when a compile takes longer than its bound (`aot` marker: minutes of CPU; how fast they are is a
  benchmark's question, measured by `mambaout kernels --aot sm_90`, so the test's bound leaves room for a loaded
  machine).
- Tuning keys and specialisation leave batch size and resolution out, so a new batch does not recompile.
- A block on CUDA runs its plain forward unless the fused kernels were asked for.
- benchmarks/gpu_check.py runs each section in its own process under a timeout: a stalled section costs only that
  (the stalled section sleeps forever, so its short timeout always fires; the others get minutes of margin).
"""

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mambaout import kernels
from mambaout.kernels import gated_dwconv as gd
from mambaout.models.mambaout import GatedCNNBlock

ROOT = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(not gd._HAS_TRITON, reason="triton is not installed (CPU-only torch build)")


def _cli(*args, timeout=300):
    cmd = [sys.executable, "-m", "mambaout.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _main(*args) -> tuple[int, str, str]:
    """`mambaout ARGS` in this process, the console script's own call (a process costs seconds of imports): its exit
    code, stdout and stderr. An exception the command lets through fails the test, where a process would print it."""
    from mambaout.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's errors and -h
            code = e.code
    return code, out.getvalue(), err.getvalue()


@needs_triton
@pytest.mark.aot
@pytest.mark.timeout(900)
def test_every_kernel_config_compiles_for_sm90():
    res = _cli("kernels", "--aot", "sm_90", "--max-seconds", "120", timeout=800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [line.split() for line in res.stdout.splitlines() if line.startswith("gated_dwconv_")]
    per_kernel: dict[str, set] = {}
    for row in rows:
        seconds = float(row[-2])
        assert 0 < seconds <= 120, row  # > 0: really compiled (a fresh cache), not read back from an earlier run
        per_kernel.setdefault(row[0], set()).add(" ".join(row[-5:-2]))
    assert set(per_kernel) == {"gated_dwconv_fwd", "gated_dwconv_bwd_gate", "gated_dwconv_bwd_conv"}
    # fwd/bwd_gate: 2 variants (identity, conv channels) x configs; bwd_conv: 1 variant x configs
    assert len(rows) == 5 * len(gd.CONFIGS)
    assert all(len(configs) == len(gd.CONFIGS) <= 4 for configs in per_kernel.values())


@needs_triton
@pytest.mark.aot
def test_a_compile_over_the_bound_fails_the_command():
    res = _cli(
        "kernels", "--aot", "sm_90", "--kernel", "gated_dwconv_bwd_conv", "--max-seconds", "1e-6"
    )  # no compile is that fast
    assert res.returncode == 1
    assert "SLOW" in res.stdout and "would stall" in res.stderr


@needs_triton
@pytest.mark.parametrize("args", [("--aot", "sm_7"), ("--aot", "sm_90", "--dtypes", "int8"), ("--aot", "gfx90")])
def test_bad_aot_arguments_get_one_line(args):
    code, _, err = _main("kernels", *args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_kernels_command_says_which_path_is_default():
    code, out, _ = _main("kernels")
    assert code == 0
    assert "opt-in" in out and "--fused-kernels" in out


@needs_triton
def test_batch_size_and_resolution_do_not_recompile():
    for fn in (gd._fwd_kernel, gd._bwd_gate_kernel, gd._bwd_conv_kernel):
        unspecialised = {p.name for p in fn.params if p.do_not_specialize}
        assert {"NPIX", "H", "W", "KS"} <= unspecialised, fn.__name__
    for tuned in (gd._fwd_tuned, gd._bwd_gate_tuned, gd._bwd_conv_tuned):
        assert "NPIX" not in tuned.keys and len(tuned.configs) <= 4


def _cuda_like_block():
    """A block that believes its parameters are on CUDA (what `.cuda()` records), run on CPU tensors."""
    torch.manual_seed(0)
    block = GatedCNNBlock(12, kernel_size=3).eval()
    block.device_type = "cuda"
    return block


def test_cuda_blocks_run_the_plain_forward_unless_fused_kernels_are_asked_for(monkeypatch):
    block = _cuda_like_block()
    calls = []
    monkeypatch.setattr(GatedCNNBlock, "_forward_fused_gpu", lambda self, x: calls.append(1) or x)
    x = torch.randn(2, 5, 4, 12)
    with torch.no_grad():
        out = block(x)
        torch.testing.assert_close(out, block._forward_reference(x))
        assert not calls and not kernels.fused_kernels_enabled()
        with kernels.fused_kernels():
            block(x)
        assert calls == [1]
        with kernels.fused_kernels(), kernels.reference_mode():
            block(x)  # reference_mode still wins
        assert calls == [1]


def test_env_var_opts_in(tmp_path):
    code = "from mambaout import kernels; print(kernels.fused_kernels_enabled())"
    for value, want in (("1", "True"), ("0", "False")):
        env = {**__import__("os").environ, "MAMBAOUT_FUSED_KERNELS": value}
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert res.stdout.strip() == want, res.stderr


def test_block_records_its_device_when_built_and_moved():
    block = GatedCNNBlock(8)
    assert block.device_type == "cpu"
    assert block.to("meta").device_type == "meta"
    with torch.device("meta"):
        assert GatedCNNBlock(8).device_type == "meta"


@pytest.mark.heavy
@pytest.mark.timeout(400)
def test_gpu_check_survives_a_hanging_section(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(tmp_path)]
    # env hangs for ever, so its 3 s always run out; kernel_check (two interpreted kernel cases) gets 240 s
    cmd += ["--only", "env,kernel_check", "--hang", "env", "--timeout", "env=3", "--timeout", "kernel_check=240"]
    res = subprocess.run([*cmd, "--budget", "280"], capture_output=True, text=True, timeout=290)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = (tmp_path / "gpu_check.md").read_text()
    assert "- env: TIMEOUT after 3 s" in report
    assert "- kernel_check: ok" in report  # the next section still ran
    checks = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [c for c in checks if c["kind"] == "kernel_check"] == [dict(kind="kernel_check", fails=0, cases=2)]
    assert "## mambaout_tiny vs timm" in report and "not measured" in report


@pytest.mark.heavy
@pytest.mark.timeout(600)  # 76 s alone on 2 idle cores, 80 s beside a busy process (2026-12-07)
def test_gpu_check_smoke_runs_every_section(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(tmp_path)]
    res = subprocess.run(cmd + ["--budget", "500"], capture_output=True, text=True, timeout=550)
    assert res.returncode == 0
    report = (tmp_path / "gpu_check.md").read_text()
    assert "TIMEOUT" not in report and "FAILED" not in report, report


def test_commands_take_the_fused_kernels_switch_outside_the_config():
    from mambaout.cli import train, validate

    given, args = train.parse_overrides(["--fused-kernels"])
    assert args.fused_kernels and "fused_kernels" not in given  # an implementation choice, not a hyperparameter
    assert not hasattr(train.parse_overrides([])[1], "fused_kernels")  # unset options stay out of the namespace
    assert validate.get_args_parser().parse_args(["data", "--fused-kernels"]).fused_kernels
    assert "--fused-kernels" in _main("predict", "-h")[1]
