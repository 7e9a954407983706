"""Loading weights in the three layouts, fitting them to changed heads/inputs, and the download path."""

import dataclasses
import logging

import pytest
import torch
from safetensors.torch import save_file

import mambaout
from mambaout.models import variants
from mambaout.weights.checkpoint import (
    CheckpointError,
    DownloadError,
    download,
    file_format,
    read_checkpoint,
    save_weights,
    to_official_layout,
)


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def femto():
    torch.manual_seed(0)
    return mambaout.create_model("mambaout_femto").eval()


@pytest.mark.parametrize("fmt", ["official_pth", "official_wrapped", "timm_safetensors", "timm_bin", "ours"])
def test_every_layout_loads_strictly(tmp_path, femto, fmt):
    sd = femto.state_dict()
    if fmt == "official_pth":
        path = tmp_path / "mambaout_femto.pth"
        torch.save(to_official_layout(sd), path)
    elif fmt == "official_wrapped":  # training checkpoints wrap the weights and may keep DDP's prefix
        path = tmp_path / "checkpoint.pth.tar"
        torch.save({"model": {f"module.{k}": v for k, v in to_official_layout(sd).items()}, "epoch": 3}, path)
    elif fmt == "timm_safetensors":
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    elif fmt == "timm_bin":
        path = tmp_path / "pytorch_model.bin"
        torch.save(sd, path)
    else:
        path = save_weights(femto, tmp_path / "ours.safetensors", model="mambaout_femto", class_names=["a"] * 1000)
    loaded = mambaout.create_model("mambaout_femto", checkpoint=path)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(_logits(loaded, x), _logits(femto, x))


def test_our_checkpoint_records_its_model(tmp_path):
    model = mambaout.create_model("mambaout_test", num_classes=3, kernel_size=5, dims=(8, 16, 24, 32))
    path = save_weights(
        model,
        tmp_path / "w.safetensors",
        model="mambaout_test",
        model_kwargs=model.model_kwargs,
        class_names=["cat", "dog", "fox"],
        eval_config=dict(input_size=[3, 64, 64], crop_pct=0.9),
    )
    sd, meta = read_checkpoint(path)
    assert meta["class_names"] == ["cat", "dog", "fox"] and meta["model"] == "mambaout_test"
    loaded = mambaout.create_model(checkpoint=path)  # no name: the file says which model
    assert loaded.class_names == ["cat", "dog", "fox"] and loaded.stages[0].blocks[0].conv.kernel_size == (5, 5)
    assert loaded.feature_info.channels() == [8, 16, 24, 32]  # widths travel with the checkpoint too
    assert path.stat().st_mode & 0o044  # readable by others (umask permitting), unlike mkstemp's 0600
    assert loaded.pretrained_cfg["input_size"] == [3, 64, 64] and loaded.pretrained_cfg["crop_pct"] == 0.9
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(_logits(loaded, x), _logits(model, x))


def test_wrong_checkpoint_names_keys_and_shapes(tmp_path, femto):
    path = tmp_path / "femto.pth"
    torch.save(to_official_layout(femto.state_dict()), path)
    with pytest.raises(CheckpointError) as e:
        mambaout.create_model("mambaout_tiny", checkpoint=path)
    msg = str(e.value)
    assert "does not fit mambaout_tiny" in msg and "shape mismatches" in msg
    assert "stem.conv1.weight: checkpoint (24, 3, 3, 3) vs model (48, 3, 3, 3)" in msg and "\n" not in msg
    with pytest.raises(CheckpointError, match=r"missing keys: stages\.2\.blocks\.9"):
        mambaout.create_model("mambaout_kobe", checkpoint=path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        mambaout.create_model("mambaout_femto", checkpoint=bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mambaout.create_model("mambaout_femto", checkpoint=tmp_path / "nope.pth")


def test_fine_tune_reinitialises_only_the_classifier(tmp_path, femto, caplog):
    path = tmp_path / "femto.pth"
    torch.save(to_official_layout(femto.state_dict()), path)
    with caplog.at_level(logging.WARNING, logger="mambaout"):
        model = mambaout.create_model("mambaout_femto", checkpoint=path, num_classes=10)
    assert "1000 classes, the model 10" in caplog.text
    assert model.get_classifier().weight.shape == (10, 1152)
    src = femto.state_dict()
    for k, v in model.state_dict().items():
        if not k.startswith("head.fc."):
            assert torch.equal(v, src[k]), k


def test_in_chans_adapts_first_conv(tmp_path, femto):
    path = tmp_path / "femto.safetensors"
    save_weights(femto, path)
    grey = mambaout.create_model("mambaout_femto", checkpoint=path, in_chans=1)
    x = torch.randn(1, 1, 64, 64)
    # A 1-channel model sums the RGB filters, so it answers a grey image as the RGB model answers it tiled.
    assert torch.allclose(_logits(grey, x), _logits(femto, x.expand(-1, 3, -1, -1)), atol=1e-4)
    four = mambaout.create_model("mambaout_femto", checkpoint=path, in_chans=4)
    assert four.stem.conv1.weight.shape == (24, 4, 3, 3)


@pytest.fixture
def served_femto(tmp_path, femto, monkeypatch, file_server):
    """Official-layout femto weights served over HTTP and registered as `mambaout_femto.in1k`."""
    root = tmp_path / "www"
    root.mkdir()
    torch.save(to_official_layout(femto.state_dict()), root / "mambaout_femto.pth")
    server = file_server(root)
    variant = variants._REGISTRY["mambaout_femto"]
    w = dataclasses.replace(variant.weights[0], urls=(f"{server.url}/mambaout_femto.pth",))
    monkeypatch.setitem(variants._REGISTRY, "mambaout_femto", dataclasses.replace(variant, weights=(w,)))
    return server


def test_pretrained_downloads_verifies_and_caches(served_femto, femto, tmp_path):
    model = mambaout.create_model("mambaout_femto", pretrained=True)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(_logits(model, x), _logits(femto, x))
    cached = tmp_path / "cache" / "mambaout_femto.pth"
    assert cached.is_file() and (tmp_path / "cache" / "mambaout_femto.pth.sha256").is_file()
    mambaout.create_model("mambaout_femto", pretrained=True)
    assert served_femto.hits == 1  # the second call used the cache
    cached.write_bytes(cached.read_bytes()[:-10])  # a damaged cache entry fails its checksum and is fetched again
    tuned = mambaout.create_model("mambaout_femto.in1k", pretrained=True, num_classes=10)
    assert served_femto.hits == 2 and tuned.num_classes == 10


def test_mirror_env_var(served_femto, monkeypatch):
    variant = variants._REGISTRY["mambaout_femto"]
    w = dataclasses.replace(variant.weights[0], urls=("https://example.invalid/x/mambaout_femto.pth",))
    monkeypatch.setitem(variants._REGISTRY, "mambaout_femto", dataclasses.replace(variant, weights=(w,)))
    monkeypatch.setenv("MAMBAOUT_MIRROR", served_femto.url)
    mambaout.create_model("mambaout_femto", pretrained=True)
    assert served_femto.hits == 1


def test_offline_fails_in_one_line(served_femto):
    served_femto.close()  # nothing listens there any more
    with pytest.raises(DownloadError) as e:
        mambaout.create_model("mambaout_femto", pretrained=True)
    msg = str(e.value)
    assert served_femto.url in msg and "checkpoint=PATH" in msg and "\n" not in msg


def _register_femto_urls(monkeypatch, *urls):
    variant = variants._REGISTRY["mambaout_femto"]
    w = dataclasses.replace(variant.weights[0], urls=urls)
    monkeypatch.setitem(variants._REGISTRY, "mambaout_femto", dataclasses.replace(variant, weights=(w,)))


def test_fallback_url_is_cached_under_its_own_name_and_format(tmp_path, femto, monkeypatch, file_server):
    hub = tmp_path / "www" / "timm" / "mambaout_femto.in1k" / "resolve" / "main"
    hub.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in femto.state_dict().items()}, str(hub / "model.safetensors"))
    server = file_server(tmp_path / "www")
    first = f"{server.url}/gone/mambaout_femto.pth"  # the official URL answers 404: the hub copy is fetched
    _register_femto_urls(monkeypatch, first, f"{server.url}/timm/mambaout_femto.in1k/resolve/main/model.safetensors")
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(_logits(mambaout.create_model("mambaout_femto", pretrained=True), x), _logits(femto, x))
    cache = tmp_path / "cache"
    assert (cache / "mambaout_femto.in1k.safetensors").is_file()
    assert not (cache / "mambaout_femto.pth").exists()  # safetensors bytes never sit under the .pth name
    hits = server.hits
    assert torch.equal(_logits(mambaout.create_model("mambaout_femto", pretrained=True), x), _logits(femto, x))
    assert server.hits == hits  # the fallback's cached copy is found and verified: no download


def test_download_names_the_file_by_its_real_format(tmp_path, femto, file_server):
    www = tmp_path / "www"
    www.mkdir()
    save_file({k: v.contiguous() for k, v in femto.state_dict().items()}, str(www / "mambaout_femto.pth"))
    server = file_server(www)
    path = download([f"{server.url}/mambaout_femto.pth"], root=tmp_path / "c")
    assert path.name == "mambaout_femto.safetensors" and file_format(path) == ".safetensors"
    assert read_checkpoint(path)[0].keys() == femto.state_dict().keys()
    torch.save(femto.state_dict(), www / "other.safetensors")  # and the other way round
    assert download([f"{server.url}/other.safetensors"], root=tmp_path / "c").name == "other.pth"


def test_save_weights_is_atomic(tmp_path, monkeypatch):
    path = save_weights({"a": torch.ones(2)}, tmp_path / "w.safetensors")
    import safetensors.torch

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_weights({"a": torch.zeros(2)}, path)
    assert torch.equal(read_checkpoint(path)[0]["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
