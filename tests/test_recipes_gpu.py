"""The imagenette-h100 recipe (gpu data pipeline) runs end to end: here on CPU, a few steps, tiny overrides."""

from __future__ import annotations

import numpy as np
from PIL import Image

from mambaout.cli import train as train_cmd
from mambaout.training import config as T


def test_imagenette_h100_recipe_uses_the_gpu_pipeline():
    cfg = T.to_flat(T.resolve_config({"recipe": "imagenette-h100", "data_train": "train.tar", "data_val": "val.tar"}))
    assert cfg["data_pipeline"] == "gpu" and cfg["cache"] is True and cfg["img_size"] == 160
    assert cfg["auto_augment"] == "rand-m9-mstd0.5-inc1"


def test_imagenette_h100_recipe_runs_on_cpu(tmp_path, capsys):
    for split in ("train", "val"):
        for c in range(3):
            (tmp_path / "data" / split / f"c{c}").mkdir(parents=True)
            for i in range(6):
                arr = np.random.default_rng(10 * c + i).integers(0, 256, (28, 36, 3), dtype=np.uint8)
                Image.fromarray(arr).save(tmp_path / "data" / split / f"c{c}" / f"{i}.jpg")
    out = tmp_path / "run"
    rc = train_cmd.main(
        ["--recipe", "imagenette-h100", "--data-train", str(tmp_path / "data" / "train")]
        + ["--data-val", str(tmp_path / "data" / "val"), "--device", "cpu", "--amp", "none"]
        + ["--no-compile", "--model", "mambaout_test", "--img-size", "32", "--batch-size", "4"]
        + ["--epochs", "1", "--warmup-epochs", "0", "--max-steps-per-epoch", "2", "--workers", "0", "--no-progress"]
        + ["--set", "eval_batch_size=8", "--output", str(out)]
    )
    assert rc == 0
    row = (out / "summary.csv").read_text().splitlines()[1].split(",")
    assert row[4] != ""  # validated
    assert "3 classes" in capsys.readouterr().out  # the tiny data, not the recipe's
