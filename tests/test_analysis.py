"""The analysis models go through the shared training pipeline and come back from its checkpoints."""

import pytest
import torch

import mambaout
from mambaout.cli import main
from mambaout.models.mamba import MambaBlock
from mambaout.models.vit import VisionTransformer


@pytest.mark.parametrize(
    "name,kind",
    [
        ("vit_tiny_deit_causal", VisionTransformer),
        ("mambaout_test_ssm", MambaBlock),
    ],
)
def test_mambaout_train_runs_and_checkpoint_restores(tmp_path, name, kind):
    out = tmp_path / "run"
    args = ["train", "--recipe", "digits", "--model", name, "--epochs", "1", "--max-steps-per-epoch", "1"]
    assert main(args + ["--workers", "0", "--output", str(out), "--no-progress"]) == 0
    model = mambaout.create_model(checkpoint=out / "last.safetensors")
    assert model.model_name == name
    if kind is VisionTransformer:
        assert isinstance(model, VisionTransformer) and all(b.attn.causal for b in model.blocks)
    else:
        assert all(isinstance(b, MambaBlock) for s in model.stages for b in s.blocks)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_kernel_ablation_recipes_differ_only_in_kernel():
    from mambaout.training.config import load_recipe

    recipes = {k: load_recipe(f"ablation-kernel-{k}") for k in (3, 7, 11, 13)}
    for k, r in recipes.items():
        assert r.pop("model_kwargs") == {"kernel_size": k}
        r.pop("output")
    assert all(r == recipes[7] for r in recipes.values())
    pair = load_recipe("mamba-vs-mambaout"), load_recipe("mamba-vs-mambaout-ssm")
    assert (pair[0]["model"], pair[1]["model"]) == ("mambaout_pico", "mambaout_pico_ssm")
    strip = [{k: v for k, v in r.items() if k not in ("model", "output")} for r in pair]
    assert strip[0] == strip[1] == {**{k: v for k, v in recipes[7].items() if k != "model"}, "model_kwargs": {}}


def test_compare_times_every_model_the_same_way():
    from mambaout.analysis.compare import compare, main

    rows = compare(["mambaout_test", "mambaout_test_ssm"], img_size=48, batch_size=2, repeats=1, steps=1)
    plain, ssm = rows
    assert ssm["params_m"] > plain["params_m"] and ssm["macs_m"] > plain["macs_m"]
    assert all(r["infer_img_s"] > 0 and r["infer_ref_img_s"] > 0 and r["train_img_s"] > 0 for r in rows)
    assert main(["mambaout_test:kernel_size=3", "--img-size", "32", "--batch-size", "2", "--repeats", "1"]) == 0
    with pytest.raises(ValueError, match="repeats"):
        compare(["mambaout_test"], repeats=0)
