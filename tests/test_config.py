"""The typed training configuration: every key checked once (one line naming it), the flat file format round-trips,
and recipe YAML is plain data."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from mambaout.cli import data_bench
from mambaout.cli import train as train_cmd
from mambaout.training import config as C
from mambaout.utils.safe_yaml import MAX_MESSAGE, YamlError, load_yaml

# One bad value per key of the flat configuration, as `--set KEY=VALUE` writes it (YAML), and a fragment of what
# the one-line error must say. Every key of DEFAULTS has a row (test_every_key_has_a_row).
BAD = {
    "data": ("[1, 2]", "non-empty string"),
    "data_train": ("[1, 2]", "non-empty string"),
    "data_val": ("{a: 1}", "non-empty string"),
    "train_split": ("''", "non-empty string"),
    "val_split": ("3", "non-empty string"),
    "cache": ("maybe", "true or false"),
    "data_pipeline": ("tpu", "one of cpu, gpu"),
    "workers": ("-1", "integer in [0, 256]"),
    "persistent_workers": ("2", "true or false"),
    "img_size": ("10000", "integer in [16, 2,048]"),
    "scale": ("[0.5, 0.1]", "not decreasing"),
    "ratio": ("[0, 1]", "finite numbers in (0, 100]"),
    "hflip": ("1.5", "in [0, 1]"),
    "color_jitter": ("-1", "in [0, 10]"),
    "auto_augment": ("[1]", "non-empty string"),
    "train_interpolation": ("cubic", "one of nearest"),
    "reprob": (".nan", "finite number in [0, 1]"),
    "remode": ("x", "one of const, rand, pixel"),
    "recount": ("0", "integer in [1, 100]"),
    "mean": ("[a, b, c]", "3 finite numbers"),
    "std": ("[0, 1, 1]", "3 finite numbers in (0, 1000]"),
    "mixup": ("-1", "in [0, 100]"),
    "cutmix": (".inf", "finite number"),
    "mixup_prob": ("2", "in [0, 1]"),
    "mixup_switch_prob": ("-0.1", "in [0, 1]"),
    "mixup_mode": ("x", "one of batch, pair, elem"),
    "smoothing": ("1", "in [0, 1)"),
    "model": ("no_such_model", "no_such_model"),
    "model_kwargs": ("[1, 2]", "mapping"),
    "pretrained": ("yes please", "true or false"),
    "use_ema": ("2", "true or false"),
    "initial_checkpoint": ("[]", "non-empty string"),
    "num_classes": ("0", "integer in [1, 100,000]"),
    "drop_path": ("1.0", "in [0, 1)"),
    "drop_rate": (".nan", "finite number"),
    "batch_size": ("0", "integer in [1, 65,536]"),
    "global_batch": ("-4", "integer in [1,"),
    "lr": ("-1", "in [0, 1000]"),
    "lr_base": ("0", "in (0, 1000]"),
    "lr_base_batch": ("0", "integer in [1,"),
    "opt": ("adamz", "not an optimizer timm knows"),
    "layer_decay": ("1.5", "in (0, 1]"),
    "weight_decay": (".nan", "finite number in [0, 10]"),
    "betas": ("[0.9]", "list of 2 finite numbers"),
    "eps": ("0", "in (0, 1]"),
    "clip_grad": ("-1", "in (0, 1e+06]"),
    "epochs": ("0", "integer in [1, 100,000]"),
    "steps": ("0", "integer in [1,"),
    "cooldown_epochs": ("-1", "integer in [0,"),
    "warmup_epochs": ("1.5", "integer in [0,"),
    "warmup_lr": (".inf", "finite number"),
    "min_lr": (".nan", "finite number in [0, 1000]"),
    "sched": ("plateau", "one of cosine, tanh, poly, constant"),
    "sched_on_updates": ("3", "true or false"),
    "eval_crop_pct": ("0", "in [0.05, 1]"),
    "eval_interpolation": ("random", "one of nearest"),
    "eval_batch_size": ("0", "integer in [1,"),
    "eval_every": ("0", "integer in [1,"),
    "device": ("tpu", "cpu, cuda, cuda:N or mps"),
    "amp": ("fp8", "one of auto, none, bf16, fp16"),
    "channels_last": ("sure", "true or false"),
    "compile": ("2", "true or false"),
    "grad_checkpointing": ("x", "true or false"),
    "threads": ("0", "integer in [1, 1,024]"),
    "model_ema": ("x", "true or false"),
    "model_ema_decay": ("1.5", "in [0, 1]"),
    "seed": ("-1", "integer in [0, 9,223,372,036,854,775,807]"),
    "output": ("[1]", "non-empty string"),
    "resume": ("[1]", "non-empty string"),
    "overwrite": ("x", "true or false"),
    "keep_top_k": ("-1", "integer in [0, 1,000]"),
    "tensorboard": ("x", "true or false"),
    "progress": ("x", "true or false"),
    "log_every": ("-1", "0: no progress lines"),
    "max_steps_per_epoch": ("0", "integer in [1,"),
    "stop_after_epochs": ("0", "integer in [1,"),
    "stop_after_steps": ("0", "integer in [1,"),
    "checkpoint_every": ("-1", "0: at epoch ends only"),
    "recipe": ("no-such-recipe", "no recipe named 'no-such-recipe'"),
}


def test_every_key_has_a_row():
    assert set(BAD) == set(C.DEFAULTS), sorted(set(BAD) ^ set(C.DEFAULTS))


@pytest.mark.parametrize("key", sorted(BAD))
def test_a_bad_value_is_one_line_naming_the_key(key, capsys):
    value, allowed = BAD[key]
    # --print-config runs the whole resolution and validation, and nothing else: a value that slipped through
    # would print the config and exit 0 instead of training
    rc = train_cmd.main(["--set", f"{key}={value}", "--print-config"])
    err = capsys.readouterr().err
    assert rc == 2, f"{key}={value} was accepted"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert allowed in lines[0], lines[0]
    if key != "recipe":
        assert lines[0].startswith(f"mambaout train: {key}="), lines[0]


# Beside each key's own row, values no key takes: NaN, a nested mapping, and the ones the first probe found
# (a recipe that is no string, model arguments that are no numbers, a model_kwargs key create_model sets itself).
SWEEP = [(key, value) for key in sorted(C.DEFAULTS) for value in (".nan", "{a: [1]}")] + [
    ("recipe", "[1]"),
    ("recipe", "1e308"),
    ("model_kwargs", "{head_mlp_ratio: .inf}"),
    ("model_kwargs", "{ls_init_value: .nan}"),
    ("model_kwargs", "{drop_rate: .nan}"),
    ("model_kwargs", "{stem_mid_norm: [1]}"),
    ("model_kwargs", "{conv_ratio: .nan}"),
    ("model_kwargs", "{in_chans: {a: [1]}}"),
    ("model_kwargs", "{norm_layer: x}"),
    ("model_kwargs", "{num_classes: 10}"),
    ("model_kwargs", "{kernel_size: 8}"),
    ("epochs", "1" + "0" * 5000),  # Python's int() refuses over 4300 digits, in words naming neither key nor file
]


@pytest.mark.parametrize(("key", "value"), SWEEP)
def test_no_key_takes_nan_or_a_nested_mapping(key, value, capsys):
    rc = train_cmd.main(["--set", f"{key}={value}", "--print-config"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    # the line names the key (model_kwargs' own keys as model_kwargs.KEY; an argument the model lacks, by the model)
    names = (f"{key}=", f"{key}.", f"--set {key}:", "model=")
    assert lines[0].startswith(tuple(f"mambaout train: {n}" for n in names)), err


def test_bad_values_exit_2_without_traceback_from_the_console():
    # one row through a real process: the exit code and stderr a user sees
    proc = subprocess.run(
        [sys.executable, "-m", "mambaout", "train", "--min-lr", "nan"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "mambaout train: min_lr=nan: must be a finite number in [0, 1000]"
    )


@pytest.mark.parametrize("recipe", C.list_recipes())
def test_every_shipped_recipe_round_trips(recipe):
    cfg = C.resolve_config({"recipe": recipe, "data_train": "digits:train", "data_val": "digits:val"})
    flat = C.to_flat(cfg)
    assert list(flat) == list(C.DEFAULTS)  # the file format: every key, in one order
    assert C.from_flat(flat) == cfg
    # ... also through the YAML a run folder's config.yaml holds
    assert C.from_flat(load_yaml(yaml.safe_dump(flat, sort_keys=False), "config.yaml")) == cfg
    # each section holds the recipe's values, typed
    loaded = C.load_recipe(recipe)
    for key, value in loaded.items():
        if key in ("data", "data_train", "data_val"):
            continue
        section = getattr(cfg, C.KEY_SECTION[key])
        got = getattr(section, key)
        assert (list(got) if isinstance(got, tuple) else got) == value, key


def test_sections_are_frozen_and_read_by_name():
    cfg = C.resolve_config({})
    with pytest.raises(AttributeError):
        cfg.batch.batch_size = 3
    assert cfg.augment.img_size == 32 and cfg.model.model == "mambaout_test"  # the digits recipe
    assert cfg.loading.eval_batch_size == 2 * cfg.batch.batch_size


def test_model_kwargs_are_checked_on_the_meta_device(capsys):
    rc = train_cmd.main(["--set", "model_kwargs={dims: [16384, 16384, 16384, 16384]}", "--print-config"])
    err = capsys.readouterr().err
    assert rc == 2 and "over the bound of 1,000M" in err and len(err.strip().splitlines()) == 1
    rc = train_cmd.main(["--set", "model_kwargs={no_such_argument: 1}", "--print-config"])
    assert rc == 2 and "does not take 'no_such_argument'" in capsys.readouterr().err


def test_warmup_longer_than_the_run_is_warned(caplog):
    C.resolve_config({"epochs": 2, "warmup_epochs": 5})
    assert "warmup_epochs=5 is more than epochs=2" in caplog.text


def test_print_config_without_data_marks_it_unset(capsys):
    assert train_cmd.main(["--recipe", "imagenette-cpu", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# data is unset") and yaml.safe_load(out)["data_train"] is None


HOSTILE_YAML = {
    "python tag": ("model: !!python/object/apply:os.system ['echo hi']\n", "is not plain data"),
    "python name": ("opt: !!python/name:os.system\n", "is not plain data"),
    "alias bomb": (
        "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
        "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n",
        "not allowed",
    ),
    "duplicate key": ("epochs: 3\nlr: 0.1\nepochs: 5\n", "key 'epochs' is given twice"),
    "parse error": ("epochs: [1, 2\nlr: 0.1\n", "not valid YAML"),
    "not a mapping": ("- 1\n- 2\n", "must be a YAML mapping"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_YAML))
def test_hostile_recipe_yaml_is_one_short_line(case, tmp_path, capsys):
    text, said = HOSTILE_YAML[case]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    assert train_cmd.main(["--recipe", str(recipe), "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and said in err and "Traceback" not in err, err
    assert len(err) <= MAX_MESSAGE + len(f"mambaout train: recipe {recipe}: "), len(err)


def test_set_values_go_through_the_same_yaml_rules(capsys):
    assert train_cmd.main(["--set", "model_kwargs=&a {depths: *a}", "--print-config"]) == 2
    assert "not allowed" in capsys.readouterr().err
    with pytest.raises(YamlError, match="anchors .* not allowed"):
        load_yaml("a: &x 1\nb: *x\n", "t")


def test_data_bench_resolves_and_checks_as_train_does(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("reprob: 2\nstd: [0, 1, 1]\n")
    rc = data_bench.main(["--recipe", str(recipe), "--data-train", str(tmp_path)])
    assert rc == 2 and "reprob=2: must be a finite number in [0, 1]" in capsys.readouterr().err


def test_one_reading_of_amp_auto_for_train_dense_and_benchmark():
    """`--amp auto` means bf16 autocast on CUDA and full precision on CPU, read by one function that the training
    config, the dense trainer and `mambaout benchmark` all call (it was written three times)."""
    import torch

    from mambaout.cli import benchmark
    from mambaout.dense import tasks
    from mambaout.utils.device import autocast_setting

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_setting("auto", cpu) == ("none", None)
    assert autocast_setting("auto", cuda) == ("bf16", torch.bfloat16)
    assert autocast_setting("fp16", cpu) == ("fp16", torch.float16)
    assert C.PerfConfig(amp="auto").amp_dtype(cuda) == ("bf16", torch.bfloat16)
    assert tasks.autocast_setting is autocast_setting
    args = benchmark.get_args_parser().parse_args(["--amp", "auto", "--device", "cpu"])
    assert benchmark._dtype(args) == "fp32"
