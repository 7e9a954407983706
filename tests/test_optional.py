"""A missing optional dependency gives one line naming what to install, never a traceback."""

import sys

import pytest

from mambaout.cli import main


def _hide(monkeypatch, *modules, forget=()):
    # None in sys.modules makes `import x` raise ImportError, as if x were not installed; `forget` drops modules
    # already imported that import it, so they import again
    for name in list(sys.modules):
        if name in modules or name.startswith(tuple(m + "." for m in modules)) or name in forget:
            monkeypatch.delitem(sys.modules, name)
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def _one_line(capsys, *words) -> str:
    out = capsys.readouterr().err.strip()
    err = out.splitlines()[-1]
    assert "Traceback" not in out and err.startswith("mambaout "), out
    assert all(w in err for w in words), err
    return err


def test_tensorboard_missing(monkeypatch, capsys, tmp_path):
    _hide(monkeypatch, "tensorboard", "torch.utils.tensorboard")
    args = [
        "train",
        "--tensorboard",
        "--epochs",
        "1",
        "--max-steps-per-epoch",
        "1",
        "--no-progress",
        "-o",
        str(tmp_path),
    ]
    assert main(args) == 2
    _one_line(capsys, "--tensorboard needs tensorboard", "pip install tensorboard")
    assert not (tmp_path / "state.pt").exists()


def test_gradio_missing(monkeypatch, capsys):
    _hide(monkeypatch, "gradio", forget=("mambaout.inference.demo_app",))
    assert main(["demo", "--random-weights", "--model", "mambaout_test"]) == 2
    _one_line(capsys, "gradio", "pip install 'mambaout[demo]'")


def test_onnxruntime_missing(monkeypatch, capsys, tmp_path):
    pytest.importorskip("onnx", reason="the export extra is not installed")
    _hide(monkeypatch, "onnxruntime")
    args = ["export", "--model", "mambaout_test", "--random-weights", "--img-size", "32", "--check"]
    assert main([*args, "--output", str(tmp_path / "m.onnx")]) == 2
    _one_line(capsys, "needs onnxruntime", "pip install onnxruntime")
