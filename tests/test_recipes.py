"""Recipes as an installed user meets them: package data, data from the command line, recipe files, run folders."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mambaout.cli import train as train_cmd
from mambaout.training import config as C

TINY = ["--model", "mambaout_test", "--epochs", "1", "--batch-size", "16", "--max-steps-per-epoch", "1"]
TINY += ["--workers", "0", "--threads", "1", "--no-progress", "--device", "cpu", "--img-size", "32"]


def test_recipes_are_package_data_listed_from_any_folder(tmp_path):
    # a fresh interpreter in an empty folder: only the installed package can supply the recipes
    proc = subprocess.run(
        [sys.executable, "-m", "mambaout", "train", "--list-recipes"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(C.__file__).parents[1])},
    )
    assert proc.returncode == 0, proc.stderr
    names = proc.stdout.split()
    assert {"digits", "finetune", "imagenette-cpu", "mambaout-tiny"} <= set(names)
    assert C.find_recipe("digits").parent == C.PACKAGE_RECIPES


def test_recipes_name_no_repository_paths():
    for name in C.list_recipes():
        recipe = C.load_recipe(name)
        for key in ("data", "data_train", "data_val"):
            value = recipe.get(key)
            assert value is None or str(value).startswith("digits:"), f"{name}: {key}={value!r}"


def test_recipe_without_data_says_what_to_pass():
    with pytest.raises(ValueError, match=r"recipe 'imagenette-cpu' names no data: pass --data DIR"):
        C.resolve_config({"recipe": "imagenette-cpu"})
    assert train_cmd.main(["--recipe", "imagenette-cpu"]) == 2


def test_data_on_the_command_line_beats_the_recipe(tmp_path):
    for split in ("train", "val"):
        (tmp_path / "data" / split).mkdir(parents=True)
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(yaml.safe_dump({"data_train": "/nowhere/train.tar", "data_val": "/nowhere/val.tar"}))
    cfg = C.to_flat(C.resolve_config({"recipe": str(recipe), "data": str(tmp_path / "data")}))
    assert cfg["data_train"] == str(tmp_path / "data" / "train")
    assert cfg["data_val"] == str(tmp_path / "data" / "val")
    # explicit --data-train still beats --data for its own split
    cfg = C.to_flat(
        C.resolve_config({"recipe": str(recipe), "data": str(tmp_path / "data"), "data_train": "digits:train"})
    )
    assert (cfg["data_train"], cfg["data_val"]) == ("digits:train", str(tmp_path / "data" / "val"))
    # without --data the recipe's own data stands
    assert C.resolve_config({"recipe": str(recipe)}).data.data_train == "/nowhere/train.tar"


def test_recipe_given_as_a_file_path_runs_in_runs_stem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "sub" / "digits.yaml"
    path.parent.mkdir()
    path.write_text(C.find_recipe("digits").read_text())
    assert train_cmd.main(["--recipe", str(path), *TINY]) == 0
    assert (tmp_path / "runs" / "digits" / "last.safetensors").is_file()
    assert path.is_file() and path.read_text() == C.find_recipe("digits").read_text()


def test_existing_run_folder_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cmd.main([*TINY, "--output", str(out)]) == 0
    before = (out / "state.pt").read_bytes()
    capsys.readouterr()
    assert train_cmd.main([*TINY, "--output", str(out), "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert f"run folder {out} already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert (out / "state.pt").read_bytes() == before
    assert train_cmd.main([*TINY, "--output", str(out), "--seed", "1", "--overwrite"]) == 0
    assert (out / "state.pt").read_bytes() != before


def test_a_run_that_stopped_before_saving_anything_does_not_block_the_folder(tmp_path, capsys):
    """A start that failed on its data leaves its config and log; the next start there needs no --overwrite."""
    out = tmp_path / "run"
    out.mkdir()
    for name in (".lock", "config.yaml", "train.log"):
        (out / name).write_text("from the failed start")
    assert train_cmd.main([*TINY, "--output", str(out)]) == 0
    assert (out / "state.pt").is_file() and "from the failed start" not in (out / "config.yaml").read_text()
    (out / "state.pt").unlink()  # summary.csv and the weights still say a run trained here
    assert train_cmd.main([*TINY, "--output", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_license_file_is_the_declared_apache_2():
    repo = Path(__file__).resolve().parents[1]
    text = (repo / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert 'license = "Apache-2.0"' in (repo / "pyproject.toml").read_text()
