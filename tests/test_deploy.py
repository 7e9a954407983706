"""CPU deployment (issue 21): bf16 and int8 against fp32 on real photos, the exports each runtime runs, and the
`benchmark --runtimes` table on a toy model (structure and agreement only; speed is never asserted here)."""

import copy
import importlib.util
import json
import tarfile

import pytest
import torch

import mambaout
from mambaout.cli import main
from mambaout.deploy import benchmark as rt
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


@pytest.fixture(scope="module")
def runtime_files(tmp_path_factory):
    """What `benchmark --runtimes` writes before its rows run: the toy model's weights, exports and probe."""
    folder = tmp_path_factory.mktemp("runtimes")
    notes = rt.prepare("mambaout_test", folder, SIZE, openvino=importlib.util.find_spec("openvino") is not None)
    return folder, notes


@pytest.mark.parametrize("key", list(rt.IMPLS))
def test_every_runtime_row_computes_timms_logits(runtime_files, key, monkeypatch):
    """Each row of `benchmark --runtimes`, built as its own process builds it, against timm fp32 on the probe."""
    from mambaout.kernels import cpu

    folder, notes = runtime_files
    if key.startswith("OpenVINO") and importlib.util.find_spec("openvino") is None:
        pytest.skip("the openvino extra is not installed: pip install 'mambaout[openvino]'")
    if key.startswith("OpenVINO") and key in notes:
        pytest.skip(notes[key])
    for switch in ("_BF16", "_NATIVE", "_PACK_CONVS"):  # rows switch these on for their process
        monkeypatch.setattr(cpu, switch, getattr(cpu, switch))
    got = rt.measure(key, folder, [1, 3], iters=1, warmup=0, threads=torch.get_num_threads(), img_size=SIZE)
    if key == "ours fp32, C kernels":
        assert cpu.cpu_native_enabled() and cpu.cpu_pack_convs_enabled()
    assert {int(b): len(t) for b, t in got["times"].items()} == {1: 1, 3: 1} and min(got["times"][3]) > 0
    diff = got["diff"]
    if key == "timm fp32":
        assert diff == 0  # the baseline against itself: the probe's logits were computed by this very model
    elif rt.IMPLS[key] == "fp32":
        assert diff < 1e-4, diff  # the same function as timm's, up to float rounding
    elif rt.IMPLS[key] == "bf16":
        assert 0 < diff < 0.1, diff  # bf16 rounding (emulated where the CPU lacks bf16)
    else:
        assert 1e-4 < diff < 1.0, diff  # int8: quantised, differs from fp32, but not garbage


@pytest.mark.heavy  # inductor compiles (tens of seconds on 2 cores)
@pytest.mark.parametrize("key", list(rt.COMPILED))
def test_compiled_runtime_rows_compute_timms_logits(runtime_files, key):
    import torch._inductor.config as inductor_config

    folder, _ = runtime_files
    with inductor_config.patch(freezing=inductor_config.freezing):  # the row sets it for its (own) process
        got = rt.measure(key, folder, [2], iters=1, warmup=0, threads=torch.get_num_threads(), img_size=SIZE)
    assert not inductor_config.freezing
    assert got["diff"] < (1e-4 if rt.COMPILED[key] == "fp32" else 0.1), got["diff"]
    if rt.COMPILED[key] == "bf16":
        assert got["diff"] > 0  # really ran in bf16


def _row(impl, bs, by_round):
    times = [float(t) for t in by_round.split()]
    return dict(impl=impl, batch_size=bs, img_per_s=1.0, ms_per_step=times[0], ratio_vs_timm=1.0, load=0.5, note="",
                max_abs_diff_vs_timm=0.0, rounds=len(times), ms_per_step_by_round=by_round)  # fmt: skip


def test_round_ratios_pair_each_round_of_ours_with_its_peers_of_the_same_dtype():
    rows = [
        _row("timm fp32", 1, "20.00 30.00 40.00"),
        _row("ours fp32", 1, "10.00 20.00 50.00"),
        _row("ONNX Runtime fp32, our export", 1, "12.00 18.00 60.00"),
        _row("ours fp32, C kernels", 1, "8.00 20.00 25.00"),
        _row("ours bf16, fast path", 1, "5.00 6.00 8.00"),
        _row("ours bf16 (torch.compile)", 1, "4.00 4.00 4.00"),  # ours, not the fast path's switch: no line
        _row("timm bf16 (autocast)", 1, "10.00 9.00 8.00"),
        _row("ONNX Runtime fp32, our export", 32, "1.00 1.00 1.00"),  # another batch: not paired with batch 1
    ]
    assert rt.round_ratio_lines(rows) == [
        "by round, batch 1: timm fp32 / ours fp32 = 2.00 1.50 0.80 (median 1.50)",
        "by round, batch 1: ONNX Runtime fp32, our export / ours fp32 = 1.20 0.90 1.20 (median 1.20)",
        "by round, batch 1: timm fp32 / ours fp32, C kernels = 2.50 1.50 1.60 (median 1.60)",
        "by round, batch 1: ours fp32 / ours fp32, C kernels = 1.25 1.00 2.00 (median 1.25)",
        "by round, batch 1: ONNX Runtime fp32, our export / ours fp32, C kernels = 1.50 0.90 2.40 (median 1.50)",
        "by round, batch 1: timm bf16 (autocast) / ours bf16, fast path = 2.00 1.50 1.00 (median 1.50)",
    ]
    table = rt.format_runtime_table(rows)
    assert "| ms/step by round |" in table.splitlines()[0] and "| 10.00 20.00 50.00 |" in table
    one = [_row("timm fp32", 1, "20.00"), _row("ours fp32", 1, "10.00")]
    assert rt.round_ratio_lines(one) == [] and "by round" not in rt.format_runtime_table(one)


@pytest.mark.heavy  # a whole `benchmark --runtimes`: exports, quantisation and three worker processes
def test_benchmark_runtimes_runs_each_row_in_its_own_process(tmp_path, capsys, monkeypatch):
    import csv

    pids = []
    real = rt._own_process

    def spy(cmd, timeout=1800):
        got = real(cmd, timeout)
        pids.append(cmd[3])
        return got

    monkeypatch.setattr(rt, "_own_process", spy)
    out_csv = tmp_path / "rows.csv"
    argv = ["benchmark", "--runtimes", "--models", "mambaout_test", "--img-size", "64", "--batch-size", "3"]
    argv += ["--only", "ours fp32", "ours int8 (ONNX Runtime)", "--iters", "1", "--warmup", "0", "--device", "cpu"]
    assert main(argv + ["--csv", str(out_csv), "--rounds", "2"]) == 0
    assert pids == ["timm fp32", "ours fp32", "ours int8 (ONNX Runtime)"] * 2  # one worker process per row and round
    out = capsys.readouterr().out
    assert "each row in its own process" in out and "| ours int8 (ONNX Runtime)" in out
    assert "by round, batch 3: timm fp32 / ours fp32 = " in out
    assert "roofline fp32, batch 1:" in out and "GMACs/image" in out
    rows = list(csv.DictReader(out_csv.open()))
    assert {(r["impl"], r["batch_size"]) for r in rows} == {
        (k, b) for k in ("timm fp32", "ours fp32", "ours int8 (ONNX Runtime)") for b in ("1", "3")
    }
    for r in rows:
        assert float(r["img_per_s"]) > 0 and float(r["ratio_vs_timm"]) > 0
        assert r["rounds"] == "2" and len(r["ms_per_step_by_round"].split()) == 2
        if r["impl"] == "timm fp32":
            assert float(r["max_abs_diff_vs_timm"]) == 0 and float(r["ratio_vs_timm"]) == 1
    with pytest.raises(SystemExit):  # --calib belongs to --runtimes
        main(["benchmark", "--models", "mambaout_test", "--calib", "x"])
    with pytest.raises(SystemExit):
        main(["benchmark", "--models", "mambaout_test", "--only", "ours fp32"])
