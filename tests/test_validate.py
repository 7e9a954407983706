"""`mambaout validate` on real Imagenette photos, read from a tar and from the extracted folder."""

import json
import tarfile

import pytest
import torch

import mambaout
from mambaout.cli import validate as V
from mambaout.weights.checkpoint import save_weights

# 5 photos of tench (n01440764, the first folder) and 1 of each other class: an unbalanced subset, so a
# model that always answers "tench" scores 5/14 only if folder names are matched to the checkpoint's names.
PER_CLASS = {"n01440764": 5}


@pytest.fixture(scope="module")
def subset(shared_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("imagenette-subset")
    counts: dict[str, int] = {}
    members = []
    with tarfile.open(shared_data / "imagenette2-112-val.tar") as src:
        for m in src:
            if not m.isfile():
                continue
            synset = m.name.strip("./").split("/")[0]
            if counts.get(synset, 0) < PER_CLASS.get(synset, 1):
                counts[synset] = counts.get(synset, 0) + 1
                members.append(m)
        src.extractall(tmp / "folder", members=members, filter="data")
    tar_path = tmp / "subset.tar"
    with tarfile.open(tar_path, "w") as dst:
        for synset in sorted(counts):
            dst.add(tmp / "folder" / synset, arcname=synset)
    assert len(counts) == 10 and sum(counts.values()) == 14
    return tmp / "folder", tar_path, sorted(counts)


def _always(model, index: int):
    """Make `model` answer class `index` for every image (zero classifier weights, a one-hot bias)."""
    with torch.no_grad():
        model.head.fc.weight.zero_()
        model.head.fc.bias.zero_()
        model.head.fc.bias[index] = 10.0
    return model


def _checkpoint(path, class_names, index):
    """What `mambaout train` writes: weights plus model, model_kwargs, class_names and eval_config."""
    model = _always(mambaout.create_model("mambaout_test", num_classes=len(class_names)), index)
    eval_config = dict(input_size=[3, 48, 48], crop_pct=1.0, interpolation="bicubic", crop_mode="center")
    eval_config.update(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    meta = dict(model="mambaout_test", model_kwargs=dict(num_classes=10), class_names=class_names)
    return save_weights(model, path, **meta, eval_config=eval_config)


def test_tar_and_folder_give_the_same_results(subset, tmp_path):
    folder, tar_path, synsets = subset
    names = synsets[::-1]  # the checkpoint's class order differs from the folder order
    ckpt = _checkpoint(tmp_path / "w.safetensors", names, names.index("n01440764"))
    results = {}
    for label, data in (("tar", tar_path), ("folder", folder)):
        out = tmp_path / f"{label}.json"
        assert V.main([str(data), "--checkpoint", str(ckpt), "--results-file", str(out), "-j", "0"]) == 0
        results[label] = json.loads(out.read_text())
    for r in results.values():
        assert r["model"] == "mambaout_test" and r["count"] == 14 and r["img_size"] == 48
        assert r["top1"] == pytest.approx(100 * 5 / 14, abs=1e-3)  # names matched, not folder positions
        assert r["top5"] >= r["top1"]
    keys = ("top1", "top5", "loss", "count")
    assert {k: results["tar"][k] for k in keys} == {k: results["folder"][k] for k in keys}


def test_several_models_in_one_call(subset, tmp_path, capsys):
    folder, _, synsets = subset
    a = _checkpoint(tmp_path / "a.safetensors", synsets, 0)  # always tench: 5/14
    b = _checkpoint(tmp_path / "b.safetensors", synsets, 1)  # always springer: 1/14
    out = tmp_path / "r.json"
    rc = V.main([str(folder), "--checkpoint", str(a), str(b), "--results-file", str(out), "-j", "0"])
    assert rc == 0
    results = json.loads(out.read_text())
    assert [round(r["top1"], 2) for r in results] == [round(500 / 14, 2), round(100 / 14, 2)]
    assert capsys.readouterr().out.count("top-1") == 2


def test_imagenet_head_uses_imagenet_indices(subset, tmp_path):
    folder, _, _ = subset
    # a 1000-class model that always answers ImageNet class 217 (English springer, 1 of the 14 photos)
    model = _always(mambaout.create_model("mambaout_test"), 217)
    ckpt = save_weights(model, tmp_path / "in1k.safetensors")  # no metadata: a foreign checkpoint
    out = tmp_path / "r.json"
    rc = V.main(
        [str(folder), "--model", "mambaout_test", "--checkpoint", str(ckpt), "--img-size", "48", "-j", "0"]
        + ["--results-file", str(out)]
    )
    assert rc == 0
    assert json.loads(out.read_text())["top1"] == pytest.approx(100 / 14, abs=1e-3)


def test_out_of_memory_halves_the_batch(subset, tmp_path, monkeypatch):
    from mambaout.training import classify as engine

    folder, _, synsets = subset
    ckpt = _checkpoint(tmp_path / "w.safetensors", synsets, 0)
    real = engine.evaluate

    def small_memory(model, loader, *a, **k):
        if loader.batch_size > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, loader, *a, **k)

    monkeypatch.setattr(engine, "evaluate", small_memory)
    out = tmp_path / "r.json"
    assert V.main([str(folder), "--checkpoint", str(ckpt), "-b", "32", "--results-file", str(out), "-j", "0"]) == 0
    r = json.loads(out.read_text())
    assert r["batch_size"] == 4 and r["count"] == 14


def test_errors(tmp_path, capsys):
    assert V.main([str(tmp_path), "--model", "mambaout_test", "--random-weights"]) == 2  # empty folder
    assert "no images" in capsys.readouterr().err
    assert V.main([str(tmp_path / "missing"), "--model", "mambaout_test", "--random-weights"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert V.main([str(tmp_path)]) == 2
    assert "nothing to validate" in capsys.readouterr().err


def test_random_weights_only_when_asked(subset, capsys):
    folder, _, _ = subset
    assert V.main([str(folder), "--model", "mambaout_test", "-j", "0"]) == 2
    err = capsys.readouterr().err
    assert "has no weights to score" in err and "--random-weights" in err and "--pretrained" in err
    assert V.main([str(folder), "--model", "mambaout_test", "--img-size", "32", "--random-weights", "-j", "0"]) == 0
    assert "mambaout_test: top-1" in capsys.readouterr().out


def test_pretrained_offline_is_one_line(subset, capsys, monkeypatch):
    folder, _, _ = subset
    monkeypatch.setenv("MAMBAOUT_MIRROR", "http://127.0.0.1:9")  # nothing listens on the discard port
    assert V.main([str(folder), "--model", "mambaout_femto", "--pretrained", "-j", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mambaout validate: could not download") and err.count("\n") == 1
