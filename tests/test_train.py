"""Training: the official schedule, batch arithmetic, config resolution, checkpoints, exact resume, SIGKILL."""

import math
import shlex
from pathlib import Path

import pytest
import torch
import yaml

import mambaout
from mambaout.cli import train as train_cmd
from mambaout.training import config as C
from mambaout.training.optim import create_scheduler
from mambaout.weights.checkpoint import read_checkpoint

REPO = Path(__file__).resolve().parents[1]

# A few-second digits run: 3 optimizer steps per epoch, no eval-time waste, everything random switched on
# (RandAugment with the posterize fix, mixup/cutmix, random erasing, drop path) so resume has RNG to get right.
FAST = [
    "--model",
    "mambaout_test",
    "--batch-size",
    "16",
    "--max-steps-per-epoch",
    "3",
    "--no-progress",
    "--workers",
    "0",
    "--threads",
    "1",
    "--set",
    "data_val=digits:val",
    "--set",
    "auto_augment=rand-m9-mstd0.5-inc1",
    "--mixup",
    "0.8",
    "--cutmix",
    "1.0",
    "--reprob",
    "0.25",
    "--drop-path",
    "0.1",
    "--set",
    "eval_batch_size=512",
]


def _weights(path) -> dict:
    return read_checkpoint(path)[0]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def official_lr(epoch: int, peak: float = 4e-3) -> float:
    """The official schedule, written out: linear warmup 1e-6 -> peak over 20 epochs, cosine from peak to 1e-5
    over epochs 0..300 (the warmup replaces its start), then 1e-5 for the 10 cooldown epochs."""
    if epoch < 20:
        return 1e-6 + (peak - 1e-6) * epoch / 20
    if epoch < 300:
        return 1e-5 + (peak - 1e-5) * (1 + math.cos(math.pi * epoch / 300)) / 2
    return 1e-5


def test_official_lr_every_epoch():
    cfg = C.from_flat(C.DEFAULTS)
    assert cfg.schedule.total_epochs == 310
    plan = cfg.batch.plan(world_size=8)  # the official 8 GPUs x 128 x 4
    assert (plan.global_batch, plan.accum_steps, plan.lr) == (4096, 4, 4e-3)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=plan.lr)
    sched = create_scheduler(opt, cfg.schedule, steps_per_epoch=313)
    for epoch in range(310):
        sched.step(epoch)
        assert opt.param_groups[0]["lr"] == pytest.approx(official_lr(epoch), rel=1e-9, abs=1e-12), epoch


def test_lr_scaling_and_accumulation():
    def plan(world_size, **kw):
        p = C.BatchConfig(batch_size=64, **kw).plan(world_size)
        return p.global_batch, p.accum_steps, p.lr

    assert plan(4, global_batch=1024) == (1024, 4, pytest.approx(1e-3))  # linear scaling
    assert plan(2, global_batch=None) == (128, 1, pytest.approx(4e-3 * 128 / 4096))
    assert plan(1, lr=0.01)[2] == 0.01
    with pytest.raises(ValueError, match="not a multiple of --batch-size 64 x 3 processes"):
        plan(3, global_batch=1000)


def test_config_resolution_order(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(dict(data_train="digits:train", epochs=7, batch_size=32, lr=0.002)))
    overrides, _ = train_cmd.parse_overrides(["--recipe", str(recipe), "--epochs", "3", "--set", "min_lr=2e-5"])
    cfg = C.to_flat(C.resolve_config(overrides))
    assert cfg["epochs"] == 3 and cfg["batch_size"] == 32 and cfg["lr"] == 0.002 and cfg["min_lr"] == 2e-5
    assert cfg["weight_decay"] == 0.05  # untouched default
    assert C.resolve_config({}).run.recipe == "digits"  # no data: the embedded default
    bad = tmp_path / "bad.yaml"
    bad.write_text("lrr: 1\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown setting 'lrr' \(close: batch.lr"):
        C.resolve_config({"recipe": str(bad)})
    with pytest.raises(ValueError, match="batch_size=15: mixup/cutmix pair images within a batch, so it must be even"):
        C.resolve_config({"recipe": "digits", "batch_size": 15, "mixup": 0.8})


@pytest.mark.parametrize(
    "name, drop_path",
    [("femto", 0.025), ("kobe", 0.025), ("tiny", 0.2), ("small", 0.4), ("base", 0.6)],
)
def test_variant_recipes_are_the_official_ones(name, drop_path):
    text = C.find_recipe(f"mambaout-{name}").read_text()
    assert "# command:" in text and "# hardware:" in text and "# wall time:" in text and "# top-1:" in text
    cfg = C.to_flat(C.resolve_config({"recipe": f"mambaout-{name}", "data": None, "data_train": "x", "data_val": "y"}))
    assert cfg["model"] == f"mambaout_{name}"
    assert cfg["drop_path"] == drop_path == mambaout.get_variant(cfg["model"])[0].default_drop_path
    for key, value in dict(
        lr_base=4e-3,
        lr_base_batch=4096,
        global_batch=4096,
        weight_decay=0.05,
        epochs=300,
        cooldown_epochs=10,
        warmup_epochs=20,
        warmup_lr=1e-6,
        min_lr=1e-5,
        auto_augment="rand-m9-mstd0.5-inc1",
        mixup=0.8,
        cutmix=1.0,
        mixup_switch_prob=0.5,
        smoothing=0.1,
        reprob=0.25,
        remode="pixel",
        img_size=224,
        train_interpolation="random",
    ).items():
        assert cfg[key] == value, key


def _recipe_command(name: str) -> list[str]:
    """The arguments after `train` in the `# command:` line at the top of a recipe (continuation lines joined)."""
    lines = C.find_recipe(name).read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("# command:"))
    text = lines[i].removeprefix("# command:")
    while text.rstrip().endswith("\\"):
        i += 1
        text = text.rstrip()[:-1] + " " + lines[i].removeprefix("#")
    argv = shlex.split(text.split("(")[0])  # "(same as: ...)" / "(or --data DIR ...)" are remarks
    return argv[argv.index("train") + 1 :]


@pytest.mark.parametrize("name", C.list_recipes())
def test_every_recipe_states_a_command_that_resolves(name, tmp_path):
    """Each recipe's header (big_vision's habit) holds the command, hardware, wall time and top-1, and its command
    goes through the real option parser and resolver, with the data placeholders pointed at a real folder."""
    lines = C.find_recipe(name).read_text().splitlines()
    header = lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))]
    for field in ("command", "hardware", "wall time", "top-1"):
        assert any(line.startswith(f"# {field}:") for line in header), f"{name}: no '# {field}:' at the top"
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
    argv = [str(tmp_path) if a in ("DIR", "/path/to/imagenet") else a for a in _recipe_command(name)]
    given, _ = train_cmd.parse_overrides(argv)
    flat = C.to_flat(C.resolve_config(given))
    assert flat["recipe"] == (given.get("recipe") or "digits")
    for key, value in given.items():
        if key == "data":
            assert (flat["data_train"], flat["data_val"]) == (str(tmp_path / "train"), str(tmp_path / "val"))
        elif key in ("data_train", "data_val"):  # stored absolute when the path exists here (../shared/data)
            assert flat[key] == (str(Path(value).resolve()) if Path(value).exists() else value)
        else:
            assert flat[key] == value, key


def test_default_digits_run_writes_loadable_weights(tmp_path, capsys):
    out = tmp_path / "run"
    rc = train_cmd.main(["--epochs", "2", "--output", str(out), "--keep-top-k", "1", *FAST])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "held-out top-1" in printed
    for f in ("last.safetensors", "best.safetensors", "state.pt", "config.yaml", "summary.csv", "curves.png"):
        assert (out / f).is_file(), f
    assert len(list(out.glob("epoch-*.safetensors"))) == 1  # top-k with k=1
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,step,lr,train_loss,val_loss,top1,top5") and len(rows) == 3
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"] == "mambaout_test" and saved["recipe"] == "digits" and saved["drop_path"] == 0.1

    # the metadata contract: no model name needed to rebuild it
    _, meta = read_checkpoint(out / "last.safetensors")
    assert meta["model"] == "mambaout_test" and meta["class_names"] == [str(i) for i in range(10)]
    assert meta["model_kwargs"]["num_classes"] == 10 and meta["eval_config"]["input_size"] == [3, 32, 32]
    model = mambaout.create_model(checkpoint=out / "last.safetensors").eval()
    assert model.class_names == meta["class_names"] and model.pretrained_cfg["input_size"] == [3, 32, 32]
    from mambaout.data import DigitsDataset, eval_transform
    from mambaout.training.classify import evaluate

    ds = DigitsDataset("val", transform=eval_transform(model.pretrained_cfg))
    loader = torch.utils.data.DataLoader(ds, batch_size=512)
    top1 = evaluate(model, loader, torch.device("cpu"))["top1"]
    last_row = rows[-1].split(",")
    assert top1 == pytest.approx(float(last_row[5]), abs=1e-3)  # the trainer's eval, reproduced from the file


def test_corrupt_images_counted_in_summary(tmp_path):
    import numpy as np
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "data" / "train" / c).mkdir(parents=True)
        (tmp_path / "data" / "val" / c).mkdir(parents=True)
        for i in range(8):
            arr = np.full((20, 20, 3), 40 if c == "a" else 200, np.uint8)
            Image.fromarray(arr).convert("L" if i % 2 else "RGB").save(tmp_path / "data" / "train" / c / f"{i}.png")
            Image.fromarray(arr).save(tmp_path / "data" / "val" / c / f"{i}.png")
    (tmp_path / "data" / "train" / "a" / "broken.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "run"
    rc = train_cmd.main(
        ["--data", str(tmp_path / "data"), "--model", "mambaout_test", "--img-size", "32", "--epochs", "1"]
        + ["--batch-size", "17", "--mixup", "0", "--cutmix", "0", "--workers", "0", "--no-progress"]
        + ["--cooldown-epochs", "0", "--warmup-epochs", "0"]
        + ["--set", "global_batch=null", "--output", str(out)]
    )
    assert rc == 0
    row = (out / "summary.csv").read_text().splitlines()[1].split(",")
    assert int(row[-1]) == 1  # the one broken file, met once in the epoch


def test_cli_errors_are_actionable(capsys):
    assert train_cmd.main(["--recipe", "no-such-recipe"]) == 2
    assert "available:" in capsys.readouterr().err
    assert train_cmd.main(["--batch-size", "48", "--global-batch", "100", *FAST]) == 2
    assert "not a multiple" in capsys.readouterr().err
