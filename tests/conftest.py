import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = Path(os.environ.get("MAMBAOUT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The research-only test images (../shared/data or $MAMBAOUT_SHARED_DATA); skips when absent."""
    if not (SHARED_DATA / "imagenette2-112-val.tar").is_file():
        pytest.skip(
            f"shared test data not found at {SHARED_DATA}; set MAMBAOUT_SHARED_DATA to the folder holding the tars"
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def make_test_checkpoint(tmp_path_factory):
    """Writes a `mambaout_test` checkpoint as `mambaout train` would: weights plus class names and eval settings."""
    import mambaout

    def make(class_names, eval_config, perturb: float = 0.0, seed: int = 0) -> Path:
        torch.manual_seed(seed)
        model = mambaout.create_model("mambaout_test", num_classes=len(class_names))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(perturb * torch.randn_like(p))
        path = tmp_path_factory.mktemp("ckpt") / f"{len(class_names)}-classes.safetensors"
        return mambaout.save_weights(
            model,
            path,
            model="mambaout_test",
            model_kwargs={"num_classes": len(class_names)},
            class_names=list(class_names),
            eval_config=eval_config,
        )

    return make


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Downloads in tests never touch the user's cache."""
    monkeypatch.setenv("MAMBAOUT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MAMBAOUT_MIRROR", raising=False)
