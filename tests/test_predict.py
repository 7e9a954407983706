"""`mambaout predict` and `mambaout.inference.predictor`: decoding any image, batching, ordering, JSON, errors, class names."""

import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import mambaout
from mambaout.cli import main
from mambaout.inference import ClassNames, Predictor, class_names_for, find_images, load_image, to_rgb

CLASS_NAMES = ["tabby", "espresso", "crane", "crane"]  # a repeated name, as ImageNet has
EVAL_CONFIG = dict(input_size=[3, 64, 64], crop_pct=0.875, interpolation="bicubic", mean=[0.5] * 3, std=[0.5] * 3)


@pytest.fixture(scope="module")
def checkpoint(make_test_checkpoint):
    return make_test_checkpoint(CLASS_NAMES, EVAL_CONFIG)


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """One file per awkward case, at odd sizes; returns {case: path}."""
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    rgb = Image.fromarray(_rgb(37, 53))
    files = {
        "rgb": ("a_rgb.jpg", rgb),
        "grey": ("b_grey.png", rgb.convert("L")),
        "rgba": ("c_rgba.png", rgb.convert("RGBA")),
        "cmyk": ("d_cmyk.jpg", rgb.convert("CMYK")),
        "palette": ("e_palette.gif", rgb.convert("P")),
        "bilevel": ("f_bilevel.png", rgb.convert("1")),
        "grey16": ("g_grey16.png", Image.fromarray((np.arange(33 * 7).reshape(33, 7) * 200).astype(np.uint16))),
        "tiny": ("h_tiny.bmp", Image.fromarray(_rgb(1, 1))),
        "wide": ("sub/i_wide.webp", Image.fromarray(_rgb(5, 301))),
    }
    out = {}
    for case, (name, img) in files.items():
        img.save(root / name)
        out[case] = root / name
    (root / "j_corrupt.jpg").write_bytes(b"\xff\xd8\xff not really a JPEG")
    (root / "k_empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image; folders skip it by its suffix")
    out["corrupt"], out["empty"], out["root"] = root / "j_corrupt.jpg", root / "k_empty.png", root
    return out


# --- decoding --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["rgb", "grey", "rgba", "cmyk", "palette", "bilevel", "grey16", "tiny", "wide"])
def test_load_image_any_mode_is_rgb(images, case):
    img = load_image(images[case])
    assert img.mode == "RGB" and img.size == Image.open(images[case]).size


def test_alpha_composites_on_white_and_16_bit_keeps_its_range():
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black
    assert np.asarray(to_rgb(Image.fromarray(rgba, "RGBA"))).min() == 255  # not black: the page's white
    grey16 = Image.fromarray(np.array([[0, 1000], [30000, 60000]], np.uint16))
    out = np.asarray(load_image(grey16))[..., 0]
    assert out[0, 0] == 0 and out[1, 1] == 255 and 0 < out[1, 0] < 255  # stretched, not clipped at 255


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (6, 4), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((0, 0), 1)
    img.save(tmp_path / "t.png", transparency=0)  # palette index 0 (black) is transparent
    arr = np.asarray(load_image(tmp_path / "t.png"))
    assert tuple(arr[0, 0]) == (255, 0, 0) and tuple(arr[1, 1]) == (255, 255, 255)


def test_unreadable_raises_value_error_naming_the_file(images):
    for case in ("corrupt", "empty"):
        with pytest.raises(ValueError, match=images[case].name):
            load_image(images[case])


def test_find_images_recurses_sorted_and_keeps_files_as_given(images):
    root = images["root"]
    found = find_images([images["tiny"], root])
    assert found[0] == images["tiny"]
    assert found[1:] == sorted(found[1:]) and images["wide"] in found
    assert not any(p.suffix == ".txt" for p in found)


# --- predicting ------------------------------------------------------------------------------------------------------


def test_predictor_uses_checkpoint_names_and_eval_config(checkpoint, images):
    predictor = Predictor(checkpoint=checkpoint, topk=3)
    assert predictor.class_names.names == tuple(CLASS_NAMES) and predictor.class_names.synsets is None
    assert predictor.preprocess(images["wide"]).shape == (3, 64, 64)
    pred = predictor(images["rgb"])
    assert len(pred.indices) == 3 and pred.probs == sorted(pred.probs, reverse=True)
    assert pred.labels == [CLASS_NAMES[i] for i in pred.indices]


def test_batching_keeps_input_order_and_results(checkpoint, images):
    predictor = Predictor(checkpoint=checkpoint, topk=2)
    inputs = [images["wide"], images["corrupt"], images["rgb"], Image.open(images["cmyk"]), images["grey"]]
    one = predictor.predict(inputs, batch_size=1)
    three = predictor.predict(inputs, batch_size=3)
    assert [d["path"] for d in one] == [
        str(images["wide"]),
        str(images["corrupt"]),
        str(images["rgb"]),
        "<JpegImageFile>",
        str(images["grey"]),
    ]
    assert "error" in one[1] and "top" not in one[1]
    for a, b in zip(one, three):
        assert a.keys() == b.keys()
        if "top" in a:
            assert [t["index"] for t in a["top"]] == [t["index"] for t in b["top"]]
            np.testing.assert_allclose([t["prob"] for t in a["top"]], [t["prob"] for t in b["top"]], atol=1e-5)


def test_cli_json_is_the_only_stdout_in_input_order(checkpoint, images):
    """A real process: nothing but the JSON document may reach stdout (progress bar and notes go to stderr)."""
    args = [str(images["rgb"]), str(images["root"]), str(images["grey"]), "--checkpoint", str(checkpoint)]
    proc = subprocess.run(
        [sys.executable, "-m", "mambaout", "predict", *args, "--json", "--topk", "3", "--batch-size", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    expected = [images["rgb"], *find_images([images["root"]]), images["grey"]]
    assert [d["path"] for d in doc] == [str(p) for p in expected]
    errors = {d["path"] for d in doc if "error" in d}
    assert errors == {str(images["corrupt"]), str(images["empty"])}
    for d in doc:
        if "top" in d:
            assert len(d["top"]) == 3 and all(t["label"] == CLASS_NAMES[t["index"]] for t in d["top"])
    assert "predict" in proc.stderr  # the progress bar (more images than one batch)


def test_cli_text_reports_bad_files_on_stderr_and_goes_on(checkpoint, images, capsys):
    code = main(["predict", str(images["corrupt"]), str(images["rgb"]), "--checkpoint", str(checkpoint), "--topk", "1"])
    out, err = capsys.readouterr()
    assert code == 0
    assert str(images["rgb"]) in out and str(images["corrupt"]) not in out
    assert images["corrupt"].name in err and "1 of 2 files could not be read" in err


def test_cli_fails_only_when_nothing_is_readable(checkpoint, images, tmp_path, capsys):
    assert (
        main(
            [
                "predict",
                str(images["corrupt"]),
                str(tmp_path / "missing.jpg"),
                "--checkpoint",
                str(checkpoint),
                "--json",
            ]
        )
        == 1
    )
    doc = json.loads(capsys.readouterr().out)
    assert [("error" in d) for d in doc] == [True, True] and "missing.jpg" in doc[1]["error"]
    assert main(["predict", str(tmp_path), "--checkpoint", str(checkpoint)]) == 1  # an empty folder


def test_cli_rejects_bad_arguments(checkpoint, capsys):
    with pytest.raises(SystemExit):
        main(["predict", "x.jpg", "--topk", "0"])
    assert main(["predict", "x.jpg", "--model", "mambaout_test"]) == 2  # no weights published: say what to pass
    assert "--random-weights" in capsys.readouterr().err


# --- class names -----------------------------------------------------------------------------------------------------


def test_imagenet_names_key_on_synsets():
    model = mambaout.create_model("mambaout_test")  # 1000 classes, no stored names
    names = class_names_for(model)
    assert len(names.names) == 1000 and names.synsets[0] == "n01440764" and names.names[0] == "tench"
    # 'crane' is both a bird (134) and a machine (517): the label must tell them apart
    assert names.names[134] == names.names[517] == "crane"
    assert names.label(134) == "crane (n02012849)" and names.label(517) == "crane (n03126707)"
    assert names.label(0) == "tench"
    assert class_names_for(mambaout.create_model("mambaout_test", num_classes=7)).names == tuple(map(str, range(7)))
    assert ClassNames(("a", "a")).label(1) == "a"  # no synsets: names as stored
    # an ImageFolder of Imagenette stores synsets as class names: show the words, keep the synsets
    model = mambaout.create_model("mambaout_test", num_classes=2)
    model.class_names = ["n01440764", "n02102040"]
    assert class_names_for(model) == ClassNames(("tench", "English springer"), ("n01440764", "n02102040"))
    model.class_names = ["n01440764", "n99999999"]  # not ImageNet's: kept as stored
    assert class_names_for(model) == ClassNames(("n01440764", "n99999999"))


def test_real_photos_index_synset_name(shared_data, tmp_path):
    """All 1000 sample photos through decode -> resize -> 1000-way head; then index -> synset -> name, checked by
    forcing the head (zero weights, one-hot bias) to each photo's own class: top-1 must be its folder's synset."""
    with tarfile.open(shared_data / "imagenet-sample-1k-112.tar") as tar:
        tar.extractall(tmp_path, filter="data")
    folders = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(folders) == 1000
    torch.manual_seed(0)
    model = mambaout.create_model("mambaout_test")
    model.pretrained_cfg["input_size"] = [3, 64, 64]  # structure, not accuracy: small inputs keep this fast
    predictor = Predictor(model, topk=5, device="cpu")
    preds = predictor.predict([tmp_path], batch_size=100)
    assert len(preds) == 1000 and all("top" in p for p in preds)  # every photo decodes (23 are greyscale)
    assert all(len(p["top"]) == 5 and p["top"][0]["synset"] in predictor.class_names.synsets for p in preds)

    fc = predictor.model.head.fc
    with torch.no_grad():
        fc.weight.zero_()
        for index in (0, 134, 217, 517, 999):
            fc.bias.zero_()
            fc.bias[index] = 10.0
            photo = next(f for f in folders[index].iterdir())
            top = predictor.predict([photo])[0]["top"][0]
            assert top["index"] == index and top["synset"] == folders[index].name
            assert top["label"] == predictor.class_names.label(index)
