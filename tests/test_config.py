"""The typed training configuration: every key checked once (one line naming it), the flat file format round-trips,
and recipe YAML is plain data."""

from __future__ import annotations

import pytest
import yaml

from mambaout.cli import data_bench
from mambaout.cli import train as train_cmd
from mambaout.training import config as C
from mambaout.utils.safe_yaml import MAX_MESSAGE, YamlError, load_yaml

# Values each setting's own check accepts but the configuration refuses, or that no generated value reaches (every
# setting's wrong types, ranges, NaN and nested mappings are tests/test_settings.py's, generated from the checks).
BEYOND_THE_CHECK = [
    ("model", "no_such_model", "no_such_model"),
    ("opt", "adamz", "not an optimizer timm knows"),
    ("recipe", "no-such-recipe", "no recipe named 'no-such-recipe'"),
    ("recipe", "[1]", "recipe=[1]: must be a non-empty string"),
    ("recipe", "1e308", "recipe=1e+308: must be a non-empty string"),
    ("model_kwargs", "{head_mlp_ratio: .inf}", "model_kwargs.head_mlp_ratio=inf"),
    ("model_kwargs", "{ls_init_value: .nan}", "model_kwargs.ls_init_value=nan"),
    ("model_kwargs", "{drop_rate: .nan}", "model_kwargs.drop_rate=nan"),
    ("model_kwargs", "{stem_mid_norm: [1]}", "model_kwargs.stem_mid_norm=[1]"),
    ("model_kwargs", "{conv_ratio: .nan}", "model_kwargs.conv_ratio=nan"),
    ("model_kwargs", "{in_chans: {a: [1]}}", "model_kwargs.in_chans="),
    ("model_kwargs", "{norm_layer: x}", "model_kwargs.norm_layer"),
    ("model_kwargs", "{num_classes: 10}", "pass --num-classes"),
    ("model_kwargs", "{kernel_size: 8}", "model_kwargs.kernel_size=8"),
    ("model_kwargs", "{a: [1]}", "does not take 'a'"),
    ("epochs", "1" + "0" * 5000, "--set epochs: line 1: an integer of 5,001 characters"),  # over int()'s limit
]


@pytest.mark.parametrize(("key", "value", "said"), BEYOND_THE_CHECK)
def test_values_refused_beyond_the_check_are_one_line(key, value, said, capsys):
    rc = train_cmd.main(["--set", f"{key}={value}", "--print-config"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert said in lines[0], lines[0]


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
    from mambaout.training import trainer
    from mambaout.utils.device import autocast_setting

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_setting("auto", cpu) == ("none", None)
    assert autocast_setting("auto", cuda) == ("bf16", torch.bfloat16)
    assert autocast_setting("fp16", cpu) == ("fp16", torch.float16)
    assert trainer.Loop.from_settings(C.to_flat(C.TrainConfig()), output=".").amp == "auto"  # read by the engine
    assert trainer.autocast_setting is autocast_setting  # the engine the dense tasks run on
    args = benchmark.get_args_parser().parse_args(["--amp", "auto", "--device", "cpu"])
    assert benchmark._dtype(args) == "fp32"
