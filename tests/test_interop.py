"""What users already have: checkpoints of timm's train.py, timm's Hub folders, timm's flag names (issue 19)."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.utils import CheckpointSaver, ModelEmaV3

import mambaout
from mambaout.cli import main
from mambaout.cli import train as train_cmd
from mambaout.weights.checkpoint import CheckpointError

SMALL = dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))  # timm's mambaout_femto builder, narrowed: fast on a CPU


def _timm_args(**over) -> argparse.Namespace:
    """The options timm's train.py saves with every checkpoint: an argparse.Namespace of plain values."""
    args = dict(
        data_dir="/data/imagenette", dataset="", train_split="train", val_split="validation", model="mambaout_femto",
        pretrained=False, initial_checkpoint="", resume="", num_classes=5, gp=None, img_size=None, in_chans=None,
        input_size=None, crop_pct=None, mean=None, std=None, interpolation="", batch_size=8,
        validation_batch_size=None, channels_last=False, fuser="", grad_accum_steps=1, grad_checkpointing=False,
        model_kwargs={}, torchcompile=None, opt="adamw", opt_eps=None, opt_betas=None, momentum=0.9,
        weight_decay=0.05, clip_grad=None, clip_mode="norm", layer_decay=None, sched="cosine", lr=None,
        lr_base=0.1, lr_base_size=256, lr_base_scale="", lr_noise=None, min_lr=0.0, epochs=2, decay_milestones=[90, 180],
        warmup_lr=1e-5, warmup_epochs=0, smoothing=0.1, mixup=0.0, cutmix=0.0, aa=None, reprob=0.0,
        model_ema=True, model_ema_decay=0.5, amp=False, amp_dtype="float16", seed=42, log_interval=50,
        checkpoint_hist=10, workers=0, output="", experiment="", eval_metric="top1", prefetcher=False,
        distributed=False, world_size=1, rank=0, local_rank=0, device="cpu",
    )  # fmt: skip
    args.update(over)
    return argparse.Namespace(**args)


@pytest.fixture(scope="module")
def timm_checkpoint(tmp_path_factory):
    """A checkpoint written by timm's own CheckpointSaver as timm's train.py drives it: the weights after a step,
    their EMA (which then differs from them), the optimizer, its args Namespace, epoch, metric and saver state."""
    out = tmp_path_factory.mktemp("timm-train")
    torch.manual_seed(0)
    model = timm.create_model("mambaout_femto", num_classes=5, **SMALL)
    ema = ModelEmaV3(model, decay=0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 3, 32, 32)).logsumexp(1).sum().backward()
    opt.step()
    ema.update(model)
    args = _timm_args(model_kwargs=dict(SMALL))
    saver = CheckpointSaver(model, opt, args=args, model_ema=ema, checkpoint_dir=str(out), recovery_dir=str(out))
    saver.save_checkpoint(epoch=0, metric=50.0)
    path = out / "model_best.pth.tar"
    raw = torch.load(path, map_location="cpu", weights_only=False)  # the test trusts its own file
    assert {"state_dict", "state_dict_ema", "args", "epoch", "arch", "optimizer", "version"} <= set(raw)
    assert isinstance(raw["args"], argparse.Namespace)
    assert not torch.equal(raw["state_dict"]["head.fc.weight"], raw["state_dict_ema"]["head.fc.weight"])
    return path, raw


def _timm_reference(path, use_ema: bool):
    """The same file through timm's own loader: the numbers `timm validate.py` reports."""
    model = timm.create_model("mambaout_femto", num_classes=5, **SMALL)
    timm.models.load_checkpoint(model, str(path), use_ema=use_ema)
    return model.eval()


@pytest.mark.parametrize("use_ema", [False, True])
def test_create_model_reads_timm_train_checkpoints_as_timm_does(timm_checkpoint, use_ema, caplog):
    path, raw = timm_checkpoint
    x = torch.randn(2, 3, 64, 64)
    with caplog.at_level("INFO", logger="mambaout"):
        ours = mambaout.create_model("mambaout_femto", checkpoint=path, use_ema=use_ema, **SMALL).eval()
    entry = "state_dict_ema" if use_ema else "state_dict"
    assert f"loading its '{entry}' weights" in caplog.text
    with torch.no_grad():
        assert torch.allclose(ours(x), _timm_reference(path, use_ema)(x), atol=1e-5)
        other = _timm_reference(path, not use_ema)(x)
        assert not torch.allclose(ours(x), other)  # the choice matters for this file


def test_timm_checkpoint_names_its_model_and_class_count(timm_checkpoint):
    """No --model or num_classes needed: `arch` and `args.num_classes` say them."""
    path, _ = timm_checkpoint
    meta = mambaout.read_checkpoint(path)[1]
    assert meta == {
        "model": "mambaout_femto",
        "model_kwargs": {"depths": [1] * 4, "dims": [8, 16, 24, 32], "num_classes": 5},
    }


class Note:
    """A harmless class that is not on the allow-list: loading it would mean importing and running our code."""


def test_unknown_pickled_types_are_refused_in_one_line(tmp_path):
    path = tmp_path / "odd.pth.tar"
    torch.save({"state_dict": {}, "extra": Note()}, path)
    with pytest.raises(CheckpointError, match=r"^[^\n]*type [\w.]*Note, which is not read[^\n]*$"):
        mambaout.read_checkpoint(path)


def test_use_ema_on_a_file_without_ema_is_an_error(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save(timm.create_model("mambaout_femto", num_classes=5, **SMALL).state_dict(), path)
    with pytest.raises(CheckpointError, match="without EMA weights"):
        mambaout.read_checkpoint(path, use_ema=True)


def _image_folder(root, classes: int = 5, per_class: int = 2):
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


def test_validate_predict_export_read_the_timm_checkpoint(timm_checkpoint, tmp_path, capsys, caplog):
    """Every command reads the file; `--use-ema` switches to the EMA weights, and the log says which was taken."""
    path, _ = timm_checkpoint
    data = _image_folder(tmp_path / "val")
    losses = {}
    for ema in (False, True):
        res = tmp_path / f"r{ema}.json"
        extra = ["--use-ema"] if ema else []
        argv = ["validate", str(data), "--checkpoint", str(path), "--img-size", "32", "-j", "0", "--device", "cpu"]
        caplog.clear()
        code = main([*argv, "--results-file", str(res), *extra])
        assert code == 0, capsys.readouterr().err
        assert f"loading its '{'state_dict_ema' if ema else 'state_dict'}' weights" in caplog.text
        losses[ema] = json.loads(res.read_text())["loss"]
        assert json.loads(res.read_text())["count"] == 10
    assert losses[False] != losses[True]

    # the reference: timm's loader and the same eval transform give validate's loss
    from mambaout.cli.validate import eval_dataset

    reference = _timm_reference(path, use_ema=True)
    reference.pretrained_cfg = mambaout.create_model(checkpoint=path).pretrained_cfg
    reference.class_names = None
    ds = eval_dataset(reference, str(data), img_size=32)
    xs, ys = zip(*[ds[i][:2] for i in range(len(ds))])
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(reference(torch.stack(xs)), torch.tensor(ys)).item()
    assert losses[True] == pytest.approx(loss, abs=1e-4)

    img = next(data.rglob("*.png"))
    capsys.readouterr()
    assert main(["predict", str(img), "--checkpoint", str(path), "--json", "--device", "cpu", "--use-ema"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["top"]) == 5
    assert main(["export", "--checkpoint", str(path), "--format", "hf", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_classes"] == 5


def test_num_classes_on_the_commands(tmp_path, capsys):
    """Weights with a 5-wide classifier and no metadata: --num-classes 5 builds their model; without it, the error
    names the option the command has."""
    torch.manual_seed(0)
    path = tmp_path / "plain.pth"
    torch.save(timm.create_model("mambaout_femto", num_classes=5).state_dict(), path)
    img = tmp_path / "x.png"
    Image.new("RGB", (48, 48), (200, 30, 30)).save(img)
    assert main(["predict", str(img), "--checkpoint", str(path), "--model", "mambaout_femto", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--num-classes 5" in err and "num_classes=N re-" in err and len(err.strip().splitlines()) == 1
    base = ["--checkpoint", str(path), "--model", "mambaout_femto", "--num-classes"]
    assert main(["predict", str(img), *base, "5", "--json", "--device", "cpu"]) == 0
    assert {t["index"] for t in json.loads(capsys.readouterr().out)[0]["top"]} == set(range(5))
    # a wrong width stays an error: --num-classes states the weights' width, it never swaps in a random head
    assert main(["predict", str(img), *base, "7", "--device", "cpu"]) == 2
    assert "classifier has 5 classes" in capsys.readouterr().err
    data = _image_folder(tmp_path / "val")
    assert main(["validate", str(data), *base, "5", "--img-size", "32", "-j", "0", "--device", "cpu"]) == 0
    assert main(["export", *base, "5", "--format", "hf", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_classes"] == 5
    from mambaout.cli.demo import get_args_parser

    assert get_args_parser().parse_args(["--num-classes", "5", "--use-ema"]).num_classes == 5
    # the demo serves the same file: --model names the checkpoint's model, --num-classes its classifier width
    pytest.importorskip("gradio", reason="the demo extra is not installed: pip install 'mambaout[demo]'")
    from mambaout.inference.demo_app import ModelPool, model_choices

    allowed = model_choices(["mambaout_femto"], [str(path)])
    assert allowed == {f"{path} (mambaout_femto)": ("named checkpoint", f"mambaout_femto:{path}")}
    pool = ModelPool(allowed, topk=3, device="cpu", model_kwargs={"num_classes": 5})
    predictor = pool.get(f"{path} (mambaout_femto)")
    assert predictor.model.num_classes == 5 and len(predictor(str(img)).indices) == 3
    with pytest.raises(ValueError, match="2 --model names for 1 checkpoints"):
        model_choices(["mambaout_femto", "mambaout_kobe"], [str(path)])


def test_train_initial_checkpoint_from_timm(timm_checkpoint, tmp_path, capsys):
    """`train --initial-checkpoint model_best.pth.tar` starts from the file's state_dict (or with --use-ema its EMA):
    at learning rate 0 the trained weights are exactly the ones taken."""
    path, raw = timm_checkpoint
    data = _image_folder(tmp_path / "d" / "train", classes=5, per_class=2)
    _image_folder(tmp_path / "d" / "val", classes=5, per_class=1)
    for ema in (False, True):
        out = tmp_path / f"run{ema}"
        argv = ["--data", str(data.parent), "--initial-checkpoint", str(path), "--img-size", "32", "--epochs", "1"]
        argv += ["--batch-size", "4", "--workers", "0", "--no-progress", "--lr", "0", "--warmup-epochs", "0"]
        argv += ["--cooldown-epochs", "0", "--output", str(out), "--device", "cpu", "--set", "global_batch=null"]
        argv += ["--min-lr", "0", "--warmup-lr", "0", "--set", "model_kwargs={depths: [1,1,1,1], dims: [8,16,24,32]}"]
        assert train_cmd.main(argv + (["--use-ema"] if ema else [])) == 0, capsys.readouterr().err
        trained = mambaout.read_checkpoint(out / "last.safetensors")[0]
        source = raw["state_dict_ema" if ema else "state_dict"]
        assert torch.equal(trained["stem.conv1.weight"], source["stem.conv1.weight"])
        assert torch.equal(trained["head.fc.weight"], source["head.fc.weight"])  # 5 classes: the head is kept too


def test_local_dir_and_folder_paths_open_timm_hub_folders(tmp_path):
    """A folder in timm's Hub layout, as timm writes it (`save_for_hf`: config.json + model.safetensors, or the
    older pytorch_model.bin), opens by `local-dir:PATH` and by its path, with timm's own class count."""
    from timm.models import save_for_hf

    torch.manual_seed(0)
    theirs = timm.create_model("mambaout_femto", num_classes=3).eval()
    folder = tmp_path / "timm-folder"
    save_for_hf(theirs, str(folder), model_config={"num_classes": 3}, safe_serialization="both")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for name in (f"local-dir:{folder}", str(folder)):
            ours = mambaout.create_model(name).eval()
            assert ours.num_classes == 3 and torch.allclose(ours(x), theirs(x), atol=1e-5)
    (folder / "model.safetensors").unlink()
    torch.save(theirs.state_dict(), folder / "pytorch_model.bin")
    with torch.no_grad():
        assert torch.allclose(mambaout.create_model(f"local-dir:{folder}").eval()(x), theirs(x), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="config.json"):
        mambaout.create_model(f"local-dir:{tmp_path}")


# --- flags ----------------------------------------------------------------------------------------------------------


def _help(command: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "mambaout", command, "--help"], capture_output=True, text=True, check=True
    ).stdout


def test_train_flags_follow_timm():
    """Switches show as switches; timm's names are aliases of ours; --amp is a bare switch (bf16, as in validate)."""
    text = train_cmd.get_args_parser().format_help()
    for switch in ("pretrained", "cache", "model-ema", "channels-last", "compile", "overwrite", "tensorboard"):
        assert f"[--{switch} | --no-{switch}" in text.replace("\n", " ").replace("  ", " ") or f"--{switch}, " in text
        assert f"--{switch} [" not in text
    flat = lambda argv: train_cmd.parse_overrides(argv)[0]  # noqa: E731  (the settings given, by key)
    assert flat(["--amp"])["amp"] == "bf16" and flat(["--amp", "fp16"])["amp"] == "fp16"
    aliases = {
        "--data-dir": ("data", "d"),
        "--torchcompile": ("compile", True),
        "--log-interval": ("log_every", 7),
        "--checkpoint-hist": ("keep_top_k", 7),
        "--lr-base-size": ("lr_base_batch", 7),
        "--validation-batch-size": ("eval_batch_size", 7),
    }
    for flag, (dest, value) in aliases.items():
        argv = [flag] if value is True else [flag, str(value)]
        assert flat(argv) == {dest: value}, flag
    overrides, _ = train_cmd.parse_overrides(["--experiment", "e1", "--output", "out"])
    assert overrides["output"].replace("\\", "/") == "out/e1"


def test_no_prefix_abbreviations(monkeypatch):
    """`--checkpoint x` is never taken as --checkpoint-every x: argparse's prefix matching is off in every command."""
    from mambaout.cli import COMMANDS

    seen = {}

    def record(self, args=None, namespace=None):
        seen[self.prog] = self.allow_abbrev
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", record)
    for command in COMMANDS:
        with pytest.raises(SystemExit):
            main([command, "--help"])
    assert len(seen) == len(COMMANDS) and not any(seen.values()), seen


def test_train_checkpoint_is_not_checkpoint_every(capsys):
    with pytest.raises(SystemExit):
        train_cmd.get_args_parser().parse_args(["--checkpoint", "x"])
    assert "unrecognized arguments: --checkpoint" in capsys.readouterr().err


def test_offline_pretrained_is_one_line_naming_initial_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MAMBAOUT_MIRROR", "http://127.0.0.1:9")  # nothing listens on the discard port
    argv = ["--pretrained", "--model", "mambaout_femto", "--data-train", "digits:train", "--data-val", "digits:val"]
    argv += ["--epochs", "1", "--output", str(tmp_path / "run"), "--no-progress", "--device", "cpu"]
    assert train_cmd.main([*argv, "--set", "global_batch=null", "--img-size", "32", "--batch-size", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--initial-checkpoint PATH" in err and "--checkpoint PATH" not in err


def test_pretrained_of_a_model_without_weights_names_trains_own_flags(capsys):
    """The default model (mambaout_test) has no published weights: the line names what train takes."""
    assert train_cmd.main(["--pretrained", "--epochs", "1", "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mambaout_test has no published weights" in err, err
    assert "--initial-checkpoint PATH" in err and "--random-weights" not in err and "--checkpoint PATH" not in err


@pytest.mark.parametrize("fmt", [None, "NCHW", "NHWC"])
def test_output_fmt_in_both_factories(fmt, tmp_path):
    """The layouts docs/timm.md lists: ours default NCHW, timm's (after register_timm) default NHWC, both as asked;
    the same weights give the same maps in either layout."""
    x = torch.randn(1, 3, 64, 64)
    kw = {} if fmt is None else {"output_fmt": fmt}
    torch.manual_seed(0)
    weights = tmp_path / "w.pth"
    torch.save(mambaout.create_model("mambaout_femto").state_dict(), weights)
    ours = mambaout.create_model("mambaout_femto", checkpoint=weights, features_only=True, **kw).eval()
    mambaout.register_timm(["mambaout_femto"])
    try:
        overlay = dict(file=str(weights))
        theirs = timm.create_model(
            "mambaout_femto", pretrained=True, pretrained_cfg_overlay=overlay, features_only=True, **kw
        ).eval()
    finally:
        mambaout.unregister_timm()
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    want_ours, want_timm = (fmt or "NCHW"), (fmt or "NHWC")
    nchw = torch.Size([1, 48, 16, 16])
    assert a[0].shape == (nchw if want_ours == "NCHW" else torch.Size([1, 16, 16, 48]))
    assert b[0].shape == (nchw if want_timm == "NCHW" else torch.Size([1, 16, 16, 48]))
    for fa, fb in zip(a, b):
        fa = fa if want_ours == "NHWC" else fa.permute(0, 2, 3, 1)  # [B, C, H, W] -> [B, H, W, C]
        fb = fb if want_timm == "NHWC" else fb.permute(0, 2, 3, 1)
        torch.testing.assert_close(fa, fb, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="output_fmt"):
        mambaout.register_timm(["mambaout_femto"])
        try:
            timm.create_model("mambaout_femto", features_only=True, output_fmt="NDHW")
        finally:
            mambaout.unregister_timm()


# --- Hugging Face transformers ----------------------------------------------------------------------------------------

IMAGENETTE_FIVE = ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079"]  # as ImageFolder names them
FIVE_WORDS = ["tench", "English springer", "cassette player", "chain saw", "church"]  # what `mambaout predict` shows


@pytest.fixture(scope="module")
def hf_export(tmp_path_factory):
    """A fine-tuned 5-class model (synset folder names, 64 px), exported with `mambaout export --format hf`."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    model = mambaout.create_model("mambaout_test", num_classes=5)
    eval_config = dict(input_size=[3, 64, 64], crop_pct=1.0, interpolation="bicubic", mean=[0.5] * 3, std=[0.25] * 3)
    ckpt = mambaout.save_weights(
        model, root / "best.safetensors", model="mambaout_test", model_kwargs=model.model_kwargs,
        class_names=IMAGENETTE_FIVE, eval_config=eval_config,
    )  # fmt: skip
    assert main(["export", "--checkpoint", str(ckpt), "--format", "hf", str(root / "out")]) == 0
    img = root / "x.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(img)
    return root / "out", ckpt, img


def test_hf_export_config_has_one_class_count_and_words(hf_export):
    config = json.loads((hf_export[0] / "config.json").read_text())
    assert "num_classes" not in config["model_args"] and config["num_classes"] == 5
    assert config["label_names"] == FIVE_WORDS


def _our_logits(ckpt, img):
    from mambaout.inference import Predictor

    predictor = Predictor(checkpoint=ckpt, device="cpu")
    with torch.no_grad():
        return predictor.model(predictor.preprocess(str(img)).unsqueeze(0))


def test_transformers_loads_the_hf_export(hf_export):
    """AutoModelForImageClassification, TimmWrapperForImageClassification and the image-classification pipeline
    open the folder; on the same image their logits (through their own preprocessing) equal ours."""
    transformers = pytest.importorskip(
        "transformers", reason="transformers is an optional test dependency: pip install transformers"
    )
    folder, ckpt, img = hf_export
    want = _our_logits(ckpt, img)
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    inputs = processor(Image.open(img).convert("RGB"), return_tensors="pt")
    for cls in (transformers.AutoModelForImageClassification, transformers.TimmWrapperForImageClassification):
        model = cls.from_pretrained(folder).eval()
        assert model.config.id2label == dict(enumerate(FIVE_WORDS))
        with torch.no_grad():
            got = model(**inputs).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    pipe = transformers.pipeline("image-classification", model=str(folder), device="cpu")
    top = pipe(str(img), top_k=5)
    probs = want.softmax(-1)[0]
    assert [t["label"] for t in top] == [FIVE_WORDS[i] for i in probs.argsort(descending=True).tolist()]
    assert top[0]["score"] == pytest.approx(probs.max().item(), abs=1e-4)


# --- what the documentation promises --------------------------------------------------------------------------------


def test_recipe_with_another_model_gets_its_own_folder():
    from mambaout.training.config import resolve_config

    cfg = resolve_config(train_cmd.parse_overrides(["--recipe", "imagenette-cpu", "--data-train", "digits:train"])[0])
    assert cfg.output_folder() == Path("runs/imagenette-cpu")
    argv = ["--recipe", "imagenette-cpu", "--data-train", "digits:train", "--model", "mambaout_femto"]
    cfg = resolve_config(train_cmd.parse_overrides(argv)[0])
    assert cfg.output_folder() == Path("runs/imagenette-cpu-mambaout_femto")
    argv = ["--recipe", "mamba-vs-mambaout", "--data-train", "digits:train", "--model", "vit_tiny_deit_causal"]
    assert resolve_config(train_cmd.parse_overrides(argv)[0]).output_folder() == Path(
        "runs/mamba-vs-mambaout/vit_tiny_deit_causal"
    )  # not .../gated-cnn, the recipe's own model's folder
    argv += ["--output", "mine"]
    assert resolve_config(train_cmd.parse_overrides(argv)[0]).output_folder() == Path("mine")


def test_recipe_with_another_model_keeps_neither_the_recipes_network_nor_its_folder(caplog):
    """The recipe's depths/dims shape its own model: another --model is built as itself (femto's 7.3M parameters,
    not the recipe's 0.83M network under femto's name), with a warning; the folder is recorded as the run's."""
    from mambaout.training.config import resolve_config

    argv = ["--recipe", "imagenette-cpu", "--data-train", "digits:train", "--model", "mambaout_femto"]
    cfg = resolve_config(train_cmd.parse_overrides(argv)[0])
    assert cfg.model.model_kwargs == {} and "left out for mambaout_femto" in caplog.text
    assert cfg.run.output == "runs/imagenette-cpu-mambaout_femto"  # what config.yaml and --print-config show
    n = sum(p.numel() for p in mambaout.create_model("mambaout_femto", **cfg.model.model_kwargs).parameters())
    assert 7.0e6 < n < 7.5e6
    # an ablation recipe's kernel_size is the point of the recipe: it stays with another model
    argv = ["--recipe", "ablation-kernel-11", "--data-train", "digits:train", "--model", "mambaout_femto"]
    assert resolve_config(train_cmd.parse_overrides(argv)[0]).model.model_kwargs == {"kernel_size": 11}
    # and the user's own model_kwargs win
    argv = ["--recipe", "imagenette-cpu", "--data-train", "digits:train", "--model", "mambaout_femto"]
    cfg = resolve_config(train_cmd.parse_overrides([*argv, "--set", "model_kwargs={dims: [8, 16, 32, 64]}"])[0])
    assert cfg.model.model_kwargs == {"dims": [8, 16, 32, 64]}


def test_summary_csv_counts_epochs_from_1_as_the_log_does(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--epochs", "2", "--max-steps-per-epoch", "1", "--output", str(out), "--no-progress", "--device", "cpu"]
    assert train_cmd.main([*argv, "--img-size", "32", "--warmup-epochs", "0", "--cooldown-epochs", "0"]) == 0
    log = capsys.readouterr().out
    epochs = [line.split(",")[0] for line in (out / "summary.csv").read_text().splitlines()[1:]]
    assert epochs == ["1", "2"] and "epoch 1/2" in log and "epoch 2/2" in log


def test_flops_columns_name_their_unit(capsys):
    assert main(["flops", "--models", "mambaout_test", "--img-size", "64"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "MACs@64 (G)" in header and "MACs@64 (M)" in header and " (M) " not in header.replace("params (M)", "")


def test_print_config_without_data_marks_it_unset(capsys):
    assert train_cmd.main(["--recipe", "imagenette-cpu", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# data is unset") and "\ndata_train: null\n" in out
    assert "\nmodel: mambaout_test\n" in out  # the recipe itself is resolved
    assert train_cmd.main(["--recipe", "imagenette-cpu"]) == 2  # running it still needs the data
    assert "names no data" in capsys.readouterr().err


def test_validate_digits_val_checks_the_default_jobs_weights(make_test_checkpoint, capsys):
    names = [str(i) for i in range(10)]
    eval_config = dict(input_size=[3, 32, 32], crop_pct=1.0, interpolation="bicubic", mean=[0.5] * 3, std=[0.5] * 3)
    ckpt = make_test_checkpoint(names, eval_config)
    assert main(["validate", "digits:val", "--checkpoint", str(ckpt), "-j", "0", "--device", "cpu"]) == 0
    assert "360 images" in capsys.readouterr().out  # the held-out 20% of the digits, each counted once


@pytest.mark.parametrize("argv", [["--no-such-flag"], ["--help-me"]], ids=["unknown", "typo"])
def test_a_bad_argument_is_one_line_on_every_command(argv, capsys):
    """argparse's error names the argument and where the options are, in one line (not the whole usage block)."""
    from mambaout.cli import COMMANDS

    for command in COMMANDS:
        try:
            code = main([command, *argv])
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, (command, err)
        assert (argv[0] in err or "arguments are required" in err) and f"mambaout {command} --help" in err, err


def test_a_refused_value_of_thousands_of_characters_is_shortened(capsys):
    """A 5000-digit --epochs stays one readable line (the value shown shortened)."""
    assert train_cmd.main(["--epochs", "1" + "0" * 5000, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < 400 and "epochs='1000" in err and "..." in err, err[:500]
