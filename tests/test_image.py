"""One decoding path: the same file gives the same tensor through `validate`'s dataset and through `Predictor`."""

import numpy as np
import pytest
import torch
from PIL import Image

import mambaout
from mambaout.cli.validate import eval_dataset
from mambaout.data.image import load_image
from mambaout.inference import Predictor

EVAL_CONFIG = dict(input_size=[3, 48, 48], crop_pct=0.875, interpolation="bicubic", mean=[0.5] * 3, std=[0.25] * 3)


def _photo(h=37, w=53, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _write_awkward_files(folder):
    """The four files of issue 12, each a case where two decoders could disagree; returns {case: name}."""
    folder.mkdir(parents=True)
    # 16-bit grey whose darkest pixel is far from 0: scaling by the maximum and stretching the range differ
    grey16 = (20000 + np.arange(41 * 29).reshape(41, 29) * 30).astype(np.uint16)
    Image.fromarray(grey16).save(folder / "grey16.png")
    # a landscape JPEG whose EXIF says "rotate 90 degrees clockwise to view" (orientation 6)
    exif = Image.Exif()
    exif[0x0112] = 6
    _photo(seed=1).save(folder / "rotated.jpg", exif=exif, quality=95)
    _photo(seed=2).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    # palette with a transparent index: transparent pixels must become white, not the palette's colour 0
    pal = _photo(seed=3).convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.save(folder / "palette_alpha.png", transparency=0)
    return {"grey16": "grey16.png", "rotated": "rotated.jpg", "cmyk": "cmyk.jpg", "palette_alpha": "palette_alpha.png"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("awkward")
    return root, _write_awkward_files(root / "things")


@pytest.fixture(scope="module")
def model():
    m = mambaout.create_model("mambaout_test", num_classes=1)  # the folder's one class: validate maps by count
    m.pretrained_cfg.update(EVAL_CONFIG)
    return m


@pytest.mark.parametrize("case", ["grey16", "rotated", "cmyk", "palette_alpha"])
def test_validate_dataset_and_predictor_give_the_same_tensor(folder, model, case):
    root, names = folder
    dataset = eval_dataset(model, str(root))
    files = [dataset.filename(i) for i in range(len(dataset))]
    index = next(i for i, f in enumerate(files) if f.endswith(names[case]))
    x_validate, _, skipped = dataset[index]
    x_predict = Predictor(model, device="cpu").preprocess(root / "things" / names[case])
    assert skipped == 0 and x_validate.shape == (3, 48, 48)
    assert torch.equal(x_validate, x_predict)


def test_the_shared_decoder_rotates_stretches_and_composites(folder):
    root, names = folder
    things = root / "things"
    assert load_image(things / names["rotated"]).size == (37, 53)  # EXIF applied: 53x37 landscape stored
    grey = np.asarray(load_image(things / names["grey16"]))[..., 0]
    assert grey.min() == 0 and grey.max() == 255  # the used 16-bit range stretched onto 8 bits
    stored = Image.open(things / names["palette_alpha"])
    transparent = np.asarray(stored) == 0
    assert transparent.any()
    assert (np.asarray(load_image(things / names["palette_alpha"]))[transparent] == 255).all()
