"""Fine-tuning from the command line: --initial-checkpoint (three layouts), --pretrained, --num-classes, timm's flags."""

import pytest
import torch
from safetensors.torch import save_file

import mambaout
from mambaout.cli import train as train_cmd
from mambaout.training import config as C
from mambaout.training.optim import create_optimizer, create_scheduler
from mambaout.weights.checkpoint import read_checkpoint, save_weights, to_official_layout

# one optimizer step at lr 0 on the digits (10 classes, 32 px)
ONE_STEP = ["--epochs", "1", "--max-steps-per-epoch", "1", "--batch-size", "16", "--img-size", "32"]
ONE_STEP += ["--lr", "0", "--warmup-lr", "0", "--min-lr", "0", "--warmup-epochs", "0", "--drop-path", "0.1"]
ONE_STEP += ["--workers", "0", "--threads", "1", "--no-progress", "--device", "cpu", "--set", "data_val=digits:val"]
CLASSIFIER = ("head.fc.weight", "head.fc.bias")


def _source(model_name: str, num_classes: int, seed: int = 3):
    torch.manual_seed(seed)
    return mambaout.create_model(model_name, num_classes=num_classes).eval()


def _write(model, path, layout: str):
    sd = model.state_dict()
    if layout == "official":
        torch.save({"model": to_official_layout(sd)}, path)
    elif layout == "timm":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        save_weights(model, path, model="mambaout_test", model_kwargs={"num_classes": model.num_classes})
    return path


def _assert_backbone_equal(saved: dict, source: dict):
    backbone = [k for k in source if k not in CLASSIFIER]
    assert backbone and set(backbone) <= set(saved)
    for k in backbone:
        assert torch.equal(saved[k], source[k]), k


@pytest.mark.parametrize("layout, suffix", [("official", ".pth"), ("timm", ".safetensors"), ("ours", ".safetensors")])
def test_lr0_step_keeps_backbone_and_sizes_head_to_data(tmp_path, layout, suffix):
    source = _source("mambaout_test", num_classes=5)
    path = _write(source, tmp_path / f"source{suffix}", layout)
    out = tmp_path / "run"
    model_flag = [] if layout == "ours" else ["--model", "mambaout_test"]  # ours records its model
    assert train_cmd.main(["--initial-checkpoint", str(path), *model_flag, *ONE_STEP, "--output", str(out)]) == 0
    saved, meta = read_checkpoint(out / "last.safetensors")
    _assert_backbone_equal(saved, source.state_dict())
    assert saved["head.fc.weight"].shape[0] == 10 and meta["model_kwargs"]["num_classes"] == 10
    assert meta["model"] == "mambaout_test" and len(meta["class_names"]) == 10


def test_pretrained_through_the_mirror_and_weights_load_back_alone(tmp_path, monkeypatch, file_server):
    # the real download path: MAMBAOUT_MIRROR points at a server on 127.0.0.1 holding the official-layout file
    femto = _source("mambaout_femto", num_classes=1000)
    www = tmp_path / "www"
    www.mkdir()
    torch.save(to_official_layout(femto.state_dict()), www / "mambaout_femto.pth")
    server = file_server(www)
    monkeypatch.setenv("MAMBAOUT_MIRROR", server.url)
    out = tmp_path / "run"
    args = ["--pretrained", "--model", "mambaout_femto", *ONE_STEP, "--lr", "1e-3", "--warmup-lr", "1e-3"]
    assert train_cmd.main([*args, "--layer-decay", "0.75", "--output", str(out)]) == 0
    assert server.hits == 1 and (tmp_path / "cache" / "mambaout_femto.pth").is_file()
    saved, meta = read_checkpoint(out / "last.safetensors")
    assert "pretrained" not in meta["model_kwargs"] and "published weights" in meta["fine_tuned_from"]
    # lr 1e-3 moved the weights, with layer decay the stem the least: it trained, from the served weights
    src = femto.state_dict()
    stem_change = (saved["stem.conv1.weight"] - src["stem.conv1.weight"]).abs().max()
    last_block = "stages.3.blocks.2.fc2.weight"
    block_change = (saved[last_block] - src[last_block]).abs().max()
    assert 0 < stem_change < block_change
    # the fine-tuned weights load back with nothing but the file (no download: the mirror is gone)
    server.close()
    model = mambaout.create_model(checkpoint=out / "last.safetensors").eval()
    assert model.num_classes == 10 and len(model.class_names) == 10
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_num_classes_must_match_the_data(tmp_path, capsys):
    assert train_cmd.main(["--model", "mambaout_test", *ONE_STEP, "--num-classes", "7", "-o", str(tmp_path)]) == 2
    assert "--num-classes 7 does not match the 10 classes" in capsys.readouterr().err


def test_timm_flag_names_reach_the_config():
    overrides, _ = train_cmd.parse_overrides(
        [
            "--pretrained",
            "--model",
            "mambaout_femto",
            "--opt",
            "sgd",
            "--sched",
            "tanh",
            "--layer-decay",
            "0.8",
            "--aa",
            "rand-m5",
            "--min-lr",
            "0",
        ]
    )
    cfg = C.to_flat(C.resolve_config(overrides))
    assert (cfg["pretrained"], cfg["opt"], cfg["sched"], cfg["layer_decay"]) == (True, "sgd", "tanh", 0.8)
    assert cfg["auto_augment"] == "rand-m5" and cfg["min_lr"] == 0
    with pytest.raises(ValueError, match="not both"):
        C.resolve_config({"model": "mambaout_test", "pretrained": True, "initial_checkpoint": "x.pth"})
    with pytest.raises(ValueError, match="sched='plateau': must be one of cosine, tanh, poly, constant"):
        C.resolve_config({"sched": "plateau"})
    with pytest.raises(ValueError, match="pass --pretrained"):
        C.resolve_config({"model_kwargs": {"pretrained": True}})


def test_layer_decay_scales_lr_by_depth():
    model = _source("mambaout_test", num_classes=10)
    cfg = C.OptimConfig(opt="adamw", layer_decay=0.5, weight_decay=0.05)
    opt = create_optimizer(model, cfg, lr=1.0)
    create_scheduler(opt, C.ScheduleConfig(warmup_epochs=0), steps_per_epoch=1).step(
        0
    )  # timm's schedulers apply lr_scale
    by_param = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    lr = {name: by_param[id(p)] for name, p in model.named_parameters()}
    assert lr["head.fc.weight"] == 1.0  # the classifier trains at the full lr
    assert lr["stem.conv1.weight"] < lr["stages.0.blocks.0.fc1.weight"] < lr["stages.3.blocks.0.fc1.weight"] < 1.0
    sgd = create_optimizer(model, C.OptimConfig(opt="sgd", layer_decay=None), lr=0.1)
    assert isinstance(sgd, torch.optim.SGD)


def test_head_init_scale_scales_the_starting_classifier(tmp_path):
    """timm's --head-init-scale: the classifier the run starts from (here the checkpoint's, 10 classes as the data)
    scaled, the backbone untouched; one step at lr 0 keeps both as they started."""
    source = _source("mambaout_test", num_classes=10)
    path = _write(source, tmp_path / "source.safetensors", "ours")
    out = tmp_path / "run"
    assert (
        train_cmd.main(["--initial-checkpoint", str(path), "--head-init-scale", "0.5", *ONE_STEP, "--output", str(out)])
        == 0
    )
    saved, _ = read_checkpoint(out / "last.safetensors")
    _assert_backbone_equal(saved, source.state_dict())
    for key in CLASSIFIER:
        torch.testing.assert_close(saved[key], 0.5 * source.state_dict()[key], rtol=0, atol=0)
