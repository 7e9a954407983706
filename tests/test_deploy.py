"""CPU deployment (issue 21): bf16 and int8 against fp32 on real photos, the exports each runtime runs, and the
`benchmark --runtimes` table on a toy model (structure and agreement only; speed is never asserted here)."""

import copy
import json
import tarfile

import numpy as np
import pytest
import torch

import mambaout
from mambaout.cli import main
from mambaout.inference import precision

pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install 'mambaout[export]'")
pytest.importorskip("onnxscript", reason="the export extra is not installed: pip install 'mambaout[export]'")

SIZE = 64
EVAL = dict(input_size=[3, SIZE, SIZE], crop_pct=0.875, interpolation="bicubic", mean=[0.485, 0.456, 0.406])
EVAL["std"] = [0.229, 0.224, 0.225]


def _extract(tar_path, dest, per_class: int):
    counts = {}
    with tarfile.open(tar_path) as src:
        members = []
        for m in src:
            synset = m.name.strip("./").split("/")[0]
            if m.isfile() and counts.get(synset, 0) < per_class:
                counts[synset] = counts.get(synset, 0) + 1
                members.append(m)
        src.extractall(dest, members=members, filter="data")
    return dest


@pytest.fixture(scope="module")
def photos(shared_data, tmp_path_factory):
    """Imagenette photos: 40 per class to fit and calibrate on, 20 per class to score (both real, disjoint sets)."""
    root = tmp_path_factory.mktemp("imagenette")
    return (
        _extract(shared_data / "imagenette2-112-train.tar", root / "train", 40),
        _extract(shared_data / "imagenette2-112-val.tar", root / "val", 20),
    )


def _load(folder, transform, classes):
    from mambaout.data.image import load_image

    xs, ys = [], []
    for i, c in enumerate(classes):
        for p in sorted((folder / c).iterdir()):
            xs.append(transform(load_image(p)))
            ys.append(i)
    return torch.stack(xs), torch.tensor(ys)


@pytest.fixture(scope="module")
def fitted(photos, tmp_path_factory):
    """A `mambaout_test` that classifies Imagenette better than chance, in seconds: a random backbone whose last
    linear layer is fitted by ridge regression on the training photos (val top-1 about 25%, chance 10%). Its
    checkpoint, the val tensors and the fp32 logits."""
    from mambaout.data.image import eval_transform

    train, val = photos
    classes = sorted(p.name for p in train.iterdir())
    torch.manual_seed(0)
    model = mambaout.create_model("mambaout_test", num_classes=len(classes)).eval()
    transform = eval_transform(EVAL)
    x_train, y_train = _load(train, transform, classes)
    x_val, y_val = _load(val, transform, classes)
    with torch.inference_mode():
        f = model.forward_head(model.forward_features(x_train), pre_logits=True)  # [N, D]
    mu, sd = f.mean(0), f.std(0) + 1e-6
    a = torch.cat([(f - mu) / sd, torch.ones(len(f), 1)], 1)  # standardised features and a bias column
    target = torch.nn.functional.one_hot(y_train, len(classes)).float() * 2 - 1
    w = torch.linalg.solve(a.T @ a + 10 * torch.eye(a.shape[1]), a.T @ target)  # [D + 1, classes]
    with torch.no_grad():
        model.head.fc.weight.copy_((w[:-1] / sd[:, None]).T)
        model.head.fc.bias.copy_(w[-1] - (mu / sd) @ w[:-1])
    path = tmp_path_factory.mktemp("fitted") / "fitted.safetensors"
    mambaout.save_weights(
        model,
        path,
        model="mambaout_test",
        model_kwargs={"num_classes": len(classes)},
        class_names=classes,
        eval_config=EVAL,
    )
    model = mambaout.create_model(checkpoint=path).eval()
    with torch.inference_mode():
        logits = model(x_val)
    top1 = (logits.argmax(1) == y_val).float().mean().item()
    assert top1 > 0.17, f"the fitted classifier should beat chance (10%) clearly, got {top1:.1%}"
    return dict(path=path, model=model, x=x_val, y=y_val, logits=logits, top1=top1, train=train, val=val)


# --- bf16 ------------------------------------------------------------------------------------------------------------


def test_resolve_dtype_falls_back_where_the_cpu_lacks_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: (False, "Some CPU (AVX2, no AVX512-BF16 or AMX)"))
    dtype, message = precision.resolve_dtype("bf16", "cpu")
    assert dtype == "fp32" and "Some CPU" in message and "\n" not in message
    assert precision.resolve_dtype("bf16", "cpu", allow_emulated=True) == ("bf16", "")
    assert precision.resolve_dtype("fp32", "cpu") == ("fp32", "")
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: (True, "Xeon (amx_bf16)"))
    assert precision.resolve_dtype("bf16", "cpu") == ("bf16", "")
    with pytest.raises(ValueError, match="dtype must be one of"):
        precision.resolve_dtype("int4", "cpu")


def test_bf16_agrees_with_fp32_on_real_photos(fitted):
    from mambaout.inference.predictor import Predictor

    predictor = Predictor(copy.deepcopy(fitted["model"]), device="cpu", dtype="bf16", allow_emulated=True)
    assert predictor.dtype == "bf16"
    assert next(predictor.model.parameters()).dtype == torch.bfloat16  # the bf16 path really ran
    with torch.inference_mode():
        logits = predictor.model(fitted["x"])
    assert logits.dtype == torch.float32
    diff = (logits - fitted["logits"]).abs().max().item()
    assert 0 < diff < 0.05 * fitted["logits"].abs().max().item()  # bf16 rounding: not zero, but small
    agree = (logits.argmax(1) == fitted["logits"].argmax(1)).float().mean().item()
    top1 = (logits.argmax(1) == fitted["y"]).float().mean().item()
    assert agree >= 0.95, f"bf16 and fp32 top-1 agree on {agree:.1%} of {len(logits)} photos"
    assert abs(top1 - fitted["top1"]) <= 0.02


def test_predict_and_validate_dtype_bf16_say_they_fall_back(fitted, monkeypatch, capsys):
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: (False, "Test CPU (AVX2, no AVX512-BF16 or AMX)"))
    image = next(p for p in (fitted["val"]).rglob("*") if p.is_file())
    ck = str(fitted["path"])
    assert main(["predict", str(image), "--checkpoint", ck, "--device", "cpu", "--json", "--no-progress"]) == 0
    fp32 = json.loads(capsys.readouterr().out)
    argv = ["predict", str(image), "--checkpoint", ck, "--device", "cpu", "--json", "--dtype", "bf16", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert json.loads(out.out) == fp32  # it ran fp32
    assert out.err.count("Test CPU") == 1 and "fp32" in out.err
    rc = main(["validate", str(fitted["val"]), "--checkpoint", ck, "--device", "cpu", "--dtype", "bf16", "-j", "0"])
    assert rc == 0 and capsys.readouterr().err.count("Test CPU") == 1


# --- int8 ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_file(fitted, tmp_path_factory):
    path = tmp_path_factory.mktemp("int8") / "fitted-int8.onnx"
    argv = ["export", "--checkpoint", str(fitted["path"]), "--format", "onnx-int8", "-o", str(path)]
    assert main(argv + ["--calib", str(fitted["train"]), "--calib-images", "64"]) == 0
    return path


def test_int8_export_is_quantised_and_keeps_its_metadata(int8_file):
    import onnx

    proto = onnx.load(str(int8_file))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 10  # the matmuls' and convs' weights
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert meta["quantization"]["calibration_images"] == 64
    assert meta["eval_config"]["input_size"] == [3, SIZE, SIZE] and len(meta["class_names"]) == 10


def test_int8_top1_close_to_fp32_on_real_photos(fitted, int8_file):
    from mambaout.deploy.runtimes import load_runtime_model

    model = load_runtime_model(int8_file)
    logits = model(fitted["x"])
    assert torch.isfinite(logits).all()
    assert (logits - fitted["logits"]).abs().max() > 1e-4  # int8, not the fp32 graph
    agree = (logits.argmax(1) == fitted["logits"].argmax(1)).float().mean().item()
    top1 = (logits.argmax(1) == fitted["y"]).float().mean().item()
    assert agree >= 0.85, f"int8 and fp32 top-1 agree on {agree:.1%} of {len(logits)} photos"
    assert abs(top1 - fitted["top1"]) <= 0.04, f"int8 top-1 {top1:.1%} vs fp32 {fitted['top1']:.1%}"


def test_validate_scores_an_exported_model_like_the_checkpoint(fitted, int8_file, tmp_path, capsys):
    onnx_fp32 = tmp_path / "fitted.onnx"
    assert main(["export", "--checkpoint", str(fitted["path"]), "-o", str(onnx_fp32)]) == 0
    results = {}
    for key, ck in (("torch", fitted["path"]), ("onnx", onnx_fp32), ("int8", int8_file)):
        out = tmp_path / f"{key}.json"
        argv = ["validate", str(fitted["val"]), "--checkpoint", str(ck), "--device", "cpu", "-j", "0"]
        assert main(argv + ["--results-file", str(out)]) == 0
        results[key] = json.loads(out.read_text())
    assert results["onnx"]["count"] == results["torch"]["count"] == 200
    assert results["onnx"]["top1"] == results["torch"]["top1"]  # the same graph, the same labels
    assert abs(results["torch"]["top1"] - 100 * fitted["top1"]) < 1e-6  # the same photos as the fixture scored
    assert abs(results["int8"]["top1"] - results["torch"]["top1"]) <= 4.0
    capsys.readouterr()
    assert main(["validate", str(fitted["val"]), "--checkpoint", str(int8_file), "--dtype", "bf16"]) == 2
    assert "precision it was exported with" in capsys.readouterr().err


def test_int8_export_needs_calibration_images(tmp_path):
    with pytest.raises(SystemExit):  # --format onnx-int8 without --calib
        main(["export", "--model", "mambaout_test", "--random-weights", "--format", "onnx-int8", "-o", "m.onnx"])
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["export", "--model", "mambaout_test", "--random-weights", "--format", "onnx-int8"]
    assert main(argv + ["--calib", str(empty), "-o", str(tmp_path / "m.onnx")]) == 2


# --- OpenVINO --------------------------------------------------------------------------------------------------------


def test_openvino_export_equals_pytorch(fitted, tmp_path):
    pytest.importorskip("openvino", reason="the openvino extra is not installed: pip install 'mambaout[openvino]'")
    from mambaout.deploy.runtimes import load_runtime_model

    xml = tmp_path / "fitted.xml"
    assert main(["export", "--checkpoint", str(fitted["path"]), "-o", str(xml), "--check"]) == 0
    assert xml.with_suffix(".bin").is_file() and xml.with_suffix(".json").is_file()
    model = load_runtime_model(xml)
    assert model.class_names == fitted["model"].class_names and model.pretrained_cfg["input_size"] == [3, SIZE, SIZE]
    for batch in (1, 7):  # dynamic batch axis
        got = model(fitted["x"][:batch])
        assert (got - fitted["logits"][:batch]).abs().max() < 1e-4


# --- benchmark --runtimes --------------------------------------------------------------------------------------------


def test_benchmark_runtimes_table_on_a_toy_model(tmp_path, capsys):
    import csv

    out_csv = tmp_path / "rows.csv"
    argv = ["benchmark", "--runtimes", "--models", "mambaout_test", "--img-size", "64", "--batch-size", "3"]
    assert main(argv + ["--iters", "1", "--warmup", "0", "--device", "cpu", "--csv", str(out_csv)]) == 0
    out = capsys.readouterr().out
    assert "| timm fp32" in out and "| ours int8 (ONNX Runtime)" in out
    assert "roofline fp32, batch 1:" in out and "GMACs/image" in out
    rows = list(csv.DictReader(out_csv.open()))
    impls = {r["impl"] for r in rows}
    assert {"timm fp32", "ours fp32", "ours bf16", "ours int8 (ONNX Runtime)", "ONNX Runtime fp32, our export"} <= impls
    assert {r["batch_size"] for r in rows} == {"1", "3"}
    for r in rows:
        diff = float(r["max_abs_diff_vs_timm"])
        assert np.isfinite(diff)
        if "fp32" in r["impl"]:  # the same function as timm's, up to float rounding
            assert diff < 1e-4, r
        if r["img_per_s"]:
            assert float(r["img_per_s"]) > 0 and float(r["ratio_vs_timm"]) > 0
        if r["impl"] == "timm fp32":
            assert diff == 0 and float(r["ratio_vs_timm"]) == 1
        if r["impl"] == "ours bf16":
            assert 0 < diff < 0.1  # bf16 rounding, measured even where it is not timed
        if "int8" in r["impl"]:
            assert diff > 1e-4  # quantised: differs from fp32
    with pytest.raises(SystemExit):  # --calib belongs to --runtimes
        main(["benchmark", "--models", "mambaout_test", "--calib", "x"])
