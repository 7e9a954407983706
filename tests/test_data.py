"""Data: image-mode conversion, corrupt files, the Posterize fix, digits, folder vs tar readers."""

import io
import os
import shutil
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


def test_cache_takes_labels_from_a_reader_without_sample_lists(tmp_path, monkeypatch):
    """timm's Hugging Face reader (`hfds/...`) keeps neither `samples` nor `targets`: the cache reads each label with
    its sample (this reader stands in for it around a folder)."""
    from mambaout.data import datasets

    n_files, _ = _write_mixed_folder(tmp_path / "set")
    plain = D.ImageDataset(tmp_path / "set")
    real = datasets._reader

    class Bare:  # a map-style reader with only what timm's Hugging Face reader offers
        def __init__(self, *args):
            self.inner = real(*args)
            self.class_to_idx = self.inner.class_to_idx

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, i):
            return self.inner[i]

        def _filename(self, i, *args, **kwargs):
            return self.inner._filename(i, *args, **kwargs)

    monkeypatch.setattr(datasets, "_reader", lambda *args: Bare(*args))
    cached = D.ImageDataset(tmp_path / "set", cache=True)
    assert cached.reader is None and len(cached) == n_files
    assert cached._targets == [t for _, t in plain.reader.samples]


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


# --- folders read once per real folder and file; a folder we may not read is named -----------------------------------


def _real_files(paths) -> list[str]:
    return sorted(os.path.realpath(p) for p in paths)


def test_link_loop_in_a_class_folder_counts_each_file_once(tmp_path, caplog):
    """`ant/up -> ..` made timm's walk (followlinks=True) list ant/x.png 41 times, once per level until ELOOP."""
    from mambaout.inference.predictor import find_images

    root = tmp_path / "v"
    (root / "ant").mkdir(parents=True)
    (root / "bee").mkdir()
    _photo(seed=1).save(root / "ant" / "x.png")
    _photo(seed=2).save(root / "bee" / "y.png")
    (root / "ant" / "up").symlink_to("..")
    ds = D.ImageDataset(root)
    assert len(ds) == 2 and ds.classes == ["ant", "bee"]
    assert sorted(ds.filename(i) for i in range(2)) == ["ant/x.png", "bee/y.png"]
    assert "not read again: ant/up" in caplog.text
    # predict (pathlib's rglob follows no folder link) sees the same files on disk
    assert _real_files(root / ds.filename(i) for i in range(2)) == _real_files(find_images([root]))
    assert D.folder_classes(str(root)) == ["ant", "bee"]


def test_linked_folders_are_read_once_and_duplicates_named(tmp_path, caplog):
    """A class folder linked from elsewhere is read; a second name for a folder already read, and a second link to a
    file already listed, are left out and named (each real file counted once)."""
    elsewhere = tmp_path / "elsewhere" / "bee"
    elsewhere.mkdir(parents=True)
    _photo(seed=3).save(elsewhere / "b.png")
    root = tmp_path / "v"
    (root / "ant").mkdir(parents=True)
    _photo(seed=1).save(root / "ant" / "a.png")
    (root / "ant" / "a-again.png").symlink_to("a.png")
    (root / "bee").symlink_to(elsewhere)
    (root / "cat").symlink_to(root / "ant")  # the ant images again, as another class: not a second class of copies
    ds = D.ImageDataset(root)
    assert ds.classes == ["ant", "bee"] and len(ds) == 2
    assert sorted(ds.filename(i) for i in range(2)) == ["ant/a.png", "bee/b.png"]
    assert "not read again: cat" in caplog.text and "counted once: ant/a-again.png" in caplog.text
    # a validation set labelled by the training set's map keeps the same listing
    val = D.ImageDataset(root, class_to_idx={"ant": 0, "bee": 1, "dog": 2}, substitute=False)
    assert [val.reader.samples[i][1] for i in range(2)] == [0, 1]


def test_unreadable_folder_is_permission_denied(tmp_path, monkeypatch):
    """A folder we may not list was passed over by timm's walk: the whole set read as 'no images found', a class
    folder left out without a word. Root bypasses file modes, so the refusal is simulated here (see
    test_permission_denied_in_a_process_without_root_bypass for the real one)."""
    root = tmp_path / "v"
    for cls in ("ant", "bee"):
        (root / cls).mkdir(parents=True)
        _photo().save(root / cls / "x.png")
    locked = set()
    scandir = os.scandir

    def refusing(path="."):
        if os.path.abspath(path) in locked:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    locked.add(str(root))
    with pytest.raises(ValueError, match=f"^permission denied reading folder {root}; make it readable"):
        D.ImageDataset(root)
    locked.clear()
    locked.add(str(root / "bee"))
    with pytest.raises(ValueError, match=f"permission denied reading folder {root / 'bee'} \\(inside the data set"):
        D.ImageDataset(root)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed")
def test_permission_denied_in_a_process_without_root_bypass(tmp_path, make_test_checkpoint):
    """validate and predict on a chmod 000 folder, run as a process without CAP_DAC_OVERRIDE/READ_SEARCH (what makes
    root read it anyway): one line saying permission denied and naming the folder (it said 'no images found')."""
    import subprocess
    import sys

    import mambaout

    root = tmp_path / "locked"
    (root / "ant").mkdir(parents=True)
    _photo().save(root / "ant" / "x.png")
    ckpt = make_test_checkpoint(["ant", "bee", "cat"], dict(input_size=[3, 32, 32], crop_pct=1.0))
    prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    env = dict(os.environ, PYTHONPATH=str(Path(mambaout.__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    root.chmod(0)
    try:
        for command, code in (("validate", 2), ("predict", 1)):
            args = [sys.executable, "-m", "mambaout", command, str(root), "--checkpoint", str(ckpt)]
            proc = subprocess.run(prefix + args, capture_output=True, text=True, env=env, timeout=300)
            assert proc.returncode == code, proc.stderr
            assert proc.stderr.strip().splitlines() == [
                f"mambaout {command}: permission denied reading folder {root}; make it readable (chmod -R u+rX) or "
                "pass another folder"
            ], proc.stderr
    finally:
        root.chmod(0o755)


def test_a_file_that_is_no_tar_is_one_line(tmp_path):
    """timm walked a regular file as a folder: 'no images found ... (Found 0 images in subfolders of ...)'."""
    (tmp_path / "model.safetensors").write_bytes(b"not images")
    with pytest.raises(ValueError, match="is a file, not an ImageFolder directory or a .tar of one"):
        D.ImageDataset(tmp_path / "model.safetensors")
