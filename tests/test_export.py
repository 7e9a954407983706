"""`mambaout export`: ONNX with a dynamic batch axis equal to PyTorch under ONNX Runtime, and `.pt2` round trips."""

import json

import numpy as np
import pytest
import torch

import mambaout
from mambaout.cli import main

ort = pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install 'mambaout[export]'")
pytest.importorskip("onnxscript", reason="the export extra is not installed: pip install 'mambaout[export]'")

from mambaout.inference.export import load_pt2, read_onnx_metadata  # noqa: E402

CLASS_NAMES = ["tabby", "espresso", "rocket"]
EVAL_CONFIG = dict(input_size=[3, 96, 96], crop_pct=0.9, interpolation="bilinear", mean=[0.5] * 3, std=[0.25] * 3)


@pytest.fixture(scope="module")
def checkpoint(make_test_checkpoint):
    # trained-looking LayerNorm and bias values, so the comparison is not between near-identity layers
    return make_test_checkpoint(CLASS_NAMES, EVAL_CONFIG, perturb=0.05)


@pytest.fixture(scope="module")
def model(checkpoint):
    return mambaout.create_model(checkpoint=checkpoint).eval()


@pytest.fixture(scope="module")
def onnx_file(checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--output", str(path)]) == 0
    return path


@pytest.mark.parametrize("batch", [1, 3, 5])  # the export traced batch 2
def test_onnx_runtime_equals_pytorch_at_other_batch_sizes(model, onnx_file, batch):
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 96, 96]  # symbolic batch, fixed image
    x = torch.randn(batch, 3, 96, 96, generator=torch.Generator().manual_seed(batch))
    got = session.run([out.name], {inp.name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert got.shape == (batch, len(CLASS_NAMES))
    assert np.abs(got - want).max() <= 1e-4


def test_onnx_carries_names_and_eval_config(onnx_file):
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    meta = read_onnx_metadata(session)
    assert meta == read_onnx_metadata(onnx_file)
    assert meta["model"] == "mambaout_test" and meta["class_names"] == CLASS_NAMES
    assert meta["eval_config"] == {**EVAL_CONFIG, "crop_mode": "center"}
    assert meta["model_kwargs"]["num_classes"] == len(CLASS_NAMES)


def test_pt2_round_trip(model, checkpoint, tmp_path):
    path = tmp_path / "model.pt2"
    assert main(["export", "--checkpoint", str(checkpoint), "--output", str(path), "--img-size", "64"]) == 0
    program, meta = load_pt2(path)
    assert meta["class_names"] == CLASS_NAMES and meta["eval_config"]["input_size"] == [3, 64, 64]
    for batch in (1, 4):
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=1e-5)


def test_imagenet_model_exports_its_synsets(tmp_path):
    path = tmp_path / "in1k.onnx"
    code = main(
        ["export", "--model", "mambaout_test", "--random-weights", "-o", str(path), "--img-size", "64", "--check"]
    )
    assert code == 0
    meta = read_onnx_metadata(path)
    assert len(meta["class_names"]) == 1000 and meta["synsets"][217] == "n02102040"
    assert meta["class_names"][217] == "English springer" and meta["eval_config"]["input_size"] == [3, 64, 64]
    json.dumps(meta)


def test_export_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):  # no format and an unknown suffix
        main(["export", "--model", "mambaout_test", "--random-weights", "-o", str(tmp_path / "m.bin")])
    with pytest.raises(SystemExit):
        main(["export", "--model", "mambaout_test", "--random-weights", "-o", str(tmp_path / "m.pt2"), "--opset", "18"])
    assert (
        main(
            [
                "export",
                "--model",
                "mambaout_test",
                "--random-weights",
                "-o",
                str(tmp_path / "m.onnx"),
                "--img-size",
                "16",
            ]
        )
        == 2
    )
    assert (
        main(
            ["export", "--model", "mambaout_test", "--random-weights", "-o", str(tmp_path / "m.onnx"), "--opset", "13"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "img_size must be >= 32" in err and "--opset must be an integer from 18 to" in err


def test_an_exported_model_with_nan_weights_is_refused_by_its_runtime(onnx_file, checkpoint, tmp_path):
    """NaN in an ONNX initializer (or an OpenVINO constant) would give NaN logits, a chance-level metric with exit 0:
    refused when the file is loaded, naming the weight, as NaN PyTorch weights are."""
    import onnx
    from onnx import numpy_helper

    from mambaout.deploy.runtimes import load_runtime_model

    proto = onnx.load(str(onnx_file))
    init = next(t for t in proto.graph.initializer if numpy_helper.to_array(t).dtype == np.float32)
    arr = numpy_helper.to_array(init).copy()
    arr.flat[:5] = np.nan
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    bad = tmp_path / "nan.onnx"
    onnx.save(proto, str(bad))
    with pytest.raises(ValueError, match=rf"weight '{init.name}' holds non-finite values \(5 of"):
        load_runtime_model(bad)
    assert load_runtime_model(onnx_file).num_classes == 3  # the untouched export loads
    ov = pytest.importorskip("openvino", reason="the openvino extra is not installed: pip install 'mambaout[openvino]'")
    xml = tmp_path / "nan.xml"
    ov.save_model(ov.convert_model(str(bad)), str(xml), compress_to_fp16=False)
    with pytest.raises(ValueError, match="holds non-finite values"):
        load_runtime_model(xml)


def test_checkpoint_arguments_that_are_no_weights_file_say_what_they_are(onnx_file, tmp_path, capsys):
    """An exported model, a folder or an unreadable file given as --checkpoint: one line saying so."""
    import os

    assert main(["predict", str(tmp_path), "--checkpoint", str(onnx_file)]) == 2
    assert "is an exported model (ONNX / OpenVINO), not PyTorch weights" in capsys.readouterr().err
    assert main(["predict", str(tmp_path), "--checkpoint", str(tmp_path)]) == 2
    assert "is a folder, not a weights file" in capsys.readouterr().err
    assert main(["validate", str(tmp_path), "--checkpoint", str(tmp_path / "x.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    os.mkfifo(tmp_path / "fifo.onnx")
    assert main(["validate", str(tmp_path), "--checkpoint", str(tmp_path / "fifo.onnx")]) == 2
    assert "is a named pipe (FIFO), not an exported model file" in capsys.readouterr().err
