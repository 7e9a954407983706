"""Data: image-mode conversion, corrupt files, the Posterize fix, digits, folder vs tar readers."""

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from mambaout import data as D
from mambaout.data.transforms import AugmentConfig


def _photo(size=(40, 30), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _write_mixed_folder(root):
    """Two classes of real files in every awkward mode, plus two unreadable ones."""
    a, b = root / "a", root / "b"
    a.mkdir(parents=True)
    b.mkdir()
    _photo(seed=1).save(a / "rgb.jpg", quality=90)
    _photo(seed=2).convert("L").save(a / "grey.png")
    _photo(seed=3).convert("P", palette=Image.ADAPTIVE).save(a / "palette.png", transparency=0)
    rgba = _photo(seed=4).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(b / "rgba.png")
    _photo(seed=5).convert("CMYK").save(b / "cmyk.jpg")
    Image.fromarray(np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50).save(b / "grey16.png")
    good = io.BytesIO()
    _photo(seed=6).save(good, format="JPEG")
    (b / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 3])
    (a / "not_an_image.jpg").write_text("this is not a JPEG")
    return 8, 2  # files, unreadable


def test_to_rgb_every_mode():
    base = _photo()
    for mode in ("L", "1", "P", "RGBA", "LA", "CMYK", "YCbCr", "I", "F"):
        img = base.convert(mode)
        out = D.to_rgb(img)
        assert out.mode == "RGB" and out.size == base.size, mode
    # transparency is composited on white, not black
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert D.to_rgb(clear).getpixel((0, 0)) == (255, 255, 255)


def test_corrupt_images_substituted_counted_and_named_for_training(tmp_path, caplog):
    n_files, n_bad = _write_mixed_folder(tmp_path / "set")
    ds = D.ImageDataset(tmp_path / "set", transform=D.eval_transform(dict(input_size=[3, 32, 32])))
    assert len(ds) == n_files and ds.classes == ["a", "b"]
    skipped = 0
    for i in range(len(ds)):
        x, y, n = ds[i]
        assert x.shape == (3, 32, 32) and torch.isfinite(x).all() and y in (0, 1)
        skipped += n
    assert skipped == n_bad
    assert "not_an_image.jpg" in caplog.text and "truncated.jpg" in caplog.text


def test_corrupt_images_left_out_of_evaluation_batches(tmp_path):
    n_files, n_bad = _write_mixed_folder(tmp_path / "set")
    tf = D.eval_transform(dict(input_size=[3, 32, 32]))
    ds = D.ImageDataset(tmp_path / "set", transform=tf, substitute=False)
    # through a loader with a worker process: each readable image once, the unreadable ones named
    loader = D.eval_loader(ds, batch_size=3, workers=1)
    batches = list(loader)
    assert sum(len(y) for _, y, _ in batches if y is not None) == n_files - n_bad
    names = sorted(Path(n).name for _, _, bad in batches for n in bad)
    assert names == ["not_an_image.jpg", "truncated.jpg"]
    with pytest.raises(ValueError, match="must not substitute"):
        D.eval_loader(D.ImageDataset(tmp_path / "set", transform=tf), batch_size=3)


def test_corrupt_images_cached(tmp_path):
    n_files, n_bad = _write_mixed_folder(tmp_path / "set")
    ds = D.ImageDataset(tmp_path / "set", transform=None, cache=True)
    assert ds.reader is None  # everything now comes from RAM
    results = [ds[i] for i in range(n_files)]
    assert all(img.mode == "RGB" for img, _, _ in results)
    assert sum(n for _, _, n in results) == n_bad


def test_all_unreadable_raises_actionable(tmp_path):
    (tmp_path / "x").mkdir()
    for i in range(3):
        (tmp_path / "x" / f"{i}.jpg").write_text("junk")
    ds = D.ImageDataset(tmp_path)
    with pytest.raises(ValueError, match="unreadable"):
        ds[0]


def _posterize_ops(transform):
    stack, ops = [transform], []
    while stack:
        t = stack.pop()
        stack.extend(getattr(t, "transforms", []) or [])
        ops += [op for op in getattr(t, "ops", []) or [] if "Posterize" in op.name]
    return ops


def test_randaugment_posterize_zero_bits_is_fixed():
    """timm's `inc1` PosterizeIncreasing at magnitude 10 asks for 0 bits; Pillow >= 13 raises on that."""
    from timm.data import auto_augment

    img = _photo((48, 48))
    expected = ImageOps.posterize(img, 1)
    # The unfixed path: timm's own op at 0 bits either raises (Pillow >= 13) or blacks the image out
    # (Pillow < 13); neither is the 1-bit result, so this test fails if the fix is not applied.
    try:
        unfixed = auto_augment.posterize(img, 0)
    except ValueError:
        unfixed = None
    assert unfixed is None or not np.array_equal(np.asarray(unfixed), np.asarray(expected))

    tf = D.build_train_transform(AugmentConfig())  # the official recipe: rand-m9-mstd0.5-inc1
    ops = _posterize_ops(tf)
    assert ops, "the official recipe's RandAugment has a Posterize op"
    for op in ops:
        assert op.level_fn(10.0, op.hparams) == (0,)  # the failing magnitude, as timm computes it
        op.prob, op.magnitude, op.magnitude_std = 1.0, 10.0, 0.0
        out = op(img)  # would raise ValueError on Pillow >= 13 without the fix
        assert np.array_equal(np.asarray(out), np.asarray(expected))
    # and the whole transform runs on many draws (magnitudes sampled with std 0.5 around 9)
    for seed in range(20):
        np.random.seed(seed)
        assert tf(img).shape == (3, 224, 224)


def test_digits_split_and_images():
    tr, va = D.DigitsDataset("train"), D.DigitsDataset("val")
    assert len(tr) + len(va) == 1797 and len(va) == 360
    img, y, n = tr[0]
    assert img.size == (32, 32) and img.mode == "RGB" and 0 <= y < 10 and n == 0
    with pytest.raises(ValueError, match="split"):
        D.DigitsDataset("test")


def test_folder_and_tar_read_the_same(tmp_path):
    root = tmp_path / "folder"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            _photo(seed=10 * ord(c[0]) + i).save(root / c / f"{i}.png")
    tar_path = tmp_path / "set.tar"
    with tarfile.open(tar_path, "w") as tf:
        for c in ("cat", "dog"):
            tf.add(root / c, arcname=c)
    tf_eval = D.eval_transform(dict(input_size=[3, 24, 24]))
    a, b = D.ImageDataset(root, tf_eval), D.ImageDataset(tar_path, tf_eval)
    assert a.classes == b.classes == ["cat", "dog"] and len(a) == len(b) == 6
    xa = sorted((int(y), round(x.sum().item(), 3)) for x, y, _ in (a[i] for i in range(6)))
    xb = sorted((int(y), round(x.sum().item(), 3)) for x, y, _ in (b[i] for i in range(6)))
    assert xa == xb


def test_resolve_split(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val.tar").write_bytes(b"")
    assert D.resolve_split(str(tmp_path), "train").endswith("train")
    assert D.resolve_split(str(tmp_path), "val").endswith("val.tar")
    with pytest.raises(FileNotFoundError, match="no 'test' split"):
        D.resolve_split(str(tmp_path), "test")
    with pytest.raises(ValueError, match="--data-train"):
        D.resolve_split(str(tmp_path / "val.tar"), "val")


def test_imagenette_tar_direct(shared_data):
    ds = D.ImageDataset(shared_data / "imagenette2-112-val.tar")
    assert len(ds) == 1966 and len(ds.classes) == 10 and ds.classes[0] == "n01440764"
    assert D.imagenet_class_map(ds.classes)["n02102040"] == 217


def test_shard_sampler_covers_each_index_once():
    shards = [list(D.ShardSampler(10, r, 3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(10))
