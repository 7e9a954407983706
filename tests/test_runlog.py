"""What a run prints and logs: train.log, progress lines off a terminal, the epoch line's lr and numbering."""

import csv
import math
import sys

from mambaout.cli import train as train_cmd

RUN = ["--model", "mambaout_test", "--epochs", "2", "--warmup-epochs", "1", "--batch-size", "16", "--img-size", "32"]
RUN += ["--max-steps-per-epoch", "3", "--workers", "0", "--threads", "1", "--device", "cpu", "--keep-top-k", "2"]


def digits_lr(step: int) -> float:
    """RUN's schedule written out by hand (digits recipe: per-step, lr 3e-3, warmup_lr 1e-6, min_lr 1e-5; here 3
    steps per epoch, 1 warmup epoch, 2 epochs): linear warmup from warmup_lr over steps 0..3, then a half cosine
    from the peak to min_lr over steps 0..6 (the warmup replaces its start), as timm's CosineLRScheduler does."""
    peak, warmup_lr, min_lr, warmup_steps, total_steps = 3e-3, 1e-6, 1e-5, 3, 6
    if step < warmup_steps:
        return warmup_lr + (peak - warmup_lr) * step / warmup_steps
    return min_lr + (peak - min_lr) * (1 + math.cos(math.pi * step / total_steps)) / 2


def test_log_file_step_lines_lr_and_epoch_numbers(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cmd.main([*RUN, "--log-every", "1", "--output", str(out)]) == 0
    printed = capsys.readouterr()
    # stderr is not a terminal here: no bar, a progress line per step (the epoch's last one too, as every task's)
    assert "it/s" not in printed.err
    steps = [line for line in printed.out.splitlines() if " step " in line]
    assert [line.split()[:4] for line in steps] == [
        ["epoch", f"{e}/2", "step", f"{s}/3"] for e in (1, 2) for s in (1, 2, 3)
    ]
    assert all(" loss " in line and " lr " in line and " ETA " in line and line.endswith(" img/s") for line in steps)
    # train.log holds what the run printed
    log = (out / "train.log").read_text()
    assert log.splitlines() == printed.out.splitlines()
    assert log.startswith("training mambaout_test") and "epoch 2/2  lr" in log and "done in" in log
    # the epoch's last lr: the lr of its last optimizer step (the digits recipe's schedule moves per step)
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for epoch, row in enumerate(rows):
        want = digits_lr(3 * epoch + 2)
        assert float(row["lr"]) == float(f"{want:.6g}")
        assert f"epoch {epoch + 1}/2  lr {want:.3g} " in log
    # weights files count epochs as the log does, from 1
    assert sorted(p.name for p in out.glob("epoch-*")) == ["epoch-0001.safetensors", "epoch-0002.safetensors"]


def test_progress_bar_on_a_terminal_only(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert train_cmd.main([*RUN, "--epochs", "1", "--log-every", "1", "--output", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr()
    assert "epoch 1/1:" in printed.err and "it/s" in printed.err  # tqdm's bar
    assert " step " not in printed.out


def test_a_classification_run_measured_in_steps(tmp_path):
    """`steps` ends a run of epochs after that many optimizer steps in all: a row at the epoch's end, and one with
    the final evaluation where the steps ran out (inside the second epoch of 3 steps)."""
    import torch

    out = tmp_path / "run"
    assert train_cmd.main([*RUN, "--epochs", "5", "--set", "steps=4", "--no-progress", "--output", str(out)]) == 0
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["epoch"], r["step"]) for r in rows] == [("1", "3"), ("1.3333", "4")] and rows[1]["top1"]
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 4


def test_curves_plot_each_epoch_at_its_number(tmp_path, monkeypatch):
    """summary.csv counts epochs from 1: curves.png plots them there (not one further)."""
    import matplotlib.figure

    from mambaout.training import runfolder

    summary = tmp_path / "summary.csv"
    summary.write_text("epoch,step,lr,train_loss,top1\n1,3,0.1,2.0,10\n2,6,0.05,1.5,20\n")
    drawn = []

    def savefig(fig, path, **kwargs):
        drawn.append([list(ax.lines[0].get_xdata()) for ax in fig.axes])
        open(path, "wb").close()

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    runfolder.plot_curves(summary, tmp_path / "curves.png")
    assert drawn == [[[1.0, 2.0]] * 3]


def test_a_non_finite_loss_is_one_line(tmp_path, capsys, monkeypatch):
    """A loss that turns NaN stops the run with one line saying what to change, exit 2 (no traceback)."""
    from mambaout.training.classify import ClassifyTask

    real = ClassifyTask.loss

    def nan_after_a_step(self, model, inputs, targets):
        loss, parts = real(self, model, inputs, targets)
        self.calls = getattr(self, "calls", 0) + 1
        return (loss * float("nan") if self.calls > 1 else loss), parts

    monkeypatch.setattr(ClassifyTask, "loss", nan_after_a_step)
    assert train_cmd.main([*RUN, "--no-progress", "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mambaout train: the loss became inf or NaN between steps 0 and 3")


def test_a_resumed_run_logs_the_lines_of_the_uninterrupted_one(tmp_path, capsys):
    """Progress lines every 2 steps of the run (3 an epoch): stopped after step 4 (inside epoch 2) and resumed, the
    run prints the same lines, numbers and all, as the run that was not stopped (the ETA and speed apart)."""

    def step_lines(printed: str) -> list[str]:
        return [line.rsplit("  ", 2)[0] for line in printed.splitlines() if " step " in line and "ETA" in line]

    args = [*RUN, "--log-every", "2"]
    assert train_cmd.main([*args, "--output", str(tmp_path / "straight")]) == 0
    straight = step_lines(capsys.readouterr().out)
    assert train_cmd.main([*args, "--output", str(tmp_path / "split"), "--stop-after-steps", "4"]) == 0
    assert train_cmd.main(["--resume", str(tmp_path / "split")]) == 0
    assert step_lines(capsys.readouterr().out) == straight
    assert [line.split()[1:4:2] for line in straight] == [["1/2", "2/3"], ["2/2", "1/3"], ["2/2", "3/3"]]
