"""Streamed data: WebDataset shards (written here) and the `hfids/` route (timm's iterable reader)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mambaout import data as D
from mambaout.cli import train as train_cmd
from mambaout.data import streaming as W


def _png(level: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.clip(level + rng.normal(0, 15, (20, 26, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def shards(tmp_path):
    """train: 4 shards x 6 samples of 2 classes; val: 1 shard of 8. Class names in classes.txt."""
    for split, n, per in (("train", 24, 6), ("val", 8, 8)):
        (tmp_path / split).mkdir()
        samples = [(f"s{i:04d}", _png(50 if i % 2 else 200, i), "png", i % 2) for i in range(n)]
        W.write_shards(samples, str(tmp_path / split / f"{split}-%04d.tar"), per)
        (tmp_path / split / "classes.txt").write_text("bright\ndark\n")
    return tmp_path


def test_shards_expand_and_read_back(shards):
    urls = W.expand_urls(str(shards / "train" / "train-{0000..0003}.tar"))
    assert len(urls) == 4 and W.expand_urls(str(shards / "train")) == urls
    keys = [k for u in urls for k, _, _ in W.iter_shard(u)]
    assert keys == [f"s{i:04d}" for i in range(24)]
    with pytest.raises(FileNotFoundError, match="train-9999"):
        W.expand_urls(str(shards / "train" / "train-{9998..9999}.tar"))


def test_each_rank_reads_a_disjoint_share_once(shards):
    seen = []
    for rank in range(2):
        ds = D.create_dataset(f"wds/{shards}/train/train-{{0000..0003}}.tar", transform=np.array)
        assert ds.classes == ["bright", "dark"] and ds.total == 24
        loader = D.train_loader(ds, batch_size=3, rank=rank, world_size=2, seed=0, workers=0)
        loader.set_epoch(1)
        assert len(loader) == 4
        for x, y, n_bad in loader:
            assert x.shape == (3, 20, 26, 3) and n_bad.sum() == 0
            seen += [(int(a.float().mean()), int(b)) for a, b in zip(x, y)]
    assert len(seen) == 24
    # labels agree with the pixels (dark samples carry label 1) and nothing came twice
    assert all((mean < 128) == bool(label) for mean, label in seen)


def test_val_shard_shared_by_sample_when_shards_are_few(shards):
    got = []
    for rank in range(3):
        ds = D.create_dataset(f"wds/{shards}/val/val-0000.tar", transform=np.array)
        loader = D.eval_loader(ds, batch_size=4, rank=rank, world_size=3)
        got += [int(y) for _, ys, _ in loader for y in ys]
    assert len(got) == 8  # every image exactly once over the three ranks


def test_training_order_is_shuffled_per_epoch(shards):
    ds = W.IterableImages(f"wds/{shards}/train", transform=lambda im: np.asarray(im).mean(), training=True)
    ds.shuffle_buffer = 8
    orders = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        orders.append([round(float(x), 3) for x, _, _ in ds])
    assert sorted(orders[0]) == sorted(orders[1]) and orders[0] != orders[1]


@pytest.mark.parametrize("pipeline", ["cpu", "gpu"])
def test_train_on_shards(shards, tmp_path, pipeline):
    """Both pipelines train and validate from shards (the gpu one: CPU workers crop, the device augments)."""
    out = tmp_path / f"run-{pipeline}"
    rc = train_cmd.main(
        ["--data-train", f"wds/{shards}/train/train-{{0000..0003}}.tar", "--data-val", f"wds/{shards}/val"]
        + ["--model", "mambaout_test", "--img-size", "24", "--epochs", "1", "--batch-size", "6", "--workers", "0"]
        + ["--no-progress", "--cooldown-epochs", "0", "--warmup-epochs", "0", "--data-pipeline", pipeline]
        + ["--set", "global_batch=null", "--output", str(out)]
    )
    assert rc == 0
    row = (out / "summary.csv").read_text().splitlines()[1].split(",")
    assert row[4] != ""  # val top-1 measured on the 8 streamed images


class _IterableOnlyReader:
    """What timm's `hfids/` reader is: iterable, no `__getitem__`."""

    class_to_idx = {"cat": 0, "dog": 1}
    num_samples = 6

    def __init__(self, *_, **__):
        self.items = [(Image.new("RGB", (10, 12), (200 * (i % 2),) * 3), i % 2) for i in range(6)]

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)


def test_hfids_goes_through_the_iterable_route(monkeypatch):
    """`hfids/` used to reach ImageDataset (random access) and fail with TypeError on timm's iterable reader."""
    import timm.data.readers

    monkeypatch.setattr(timm.data.readers, "create_reader", lambda *a, **k: _IterableOnlyReader())
    ds = D.create_dataset("hfids/some/dataset:train", transform=np.array)
    assert isinstance(ds, W.IterableImages) and ds.classes == ["cat", "dog"] and len(ds) == 6
    loader = D.eval_loader(ds, batch_size=4)
    labels = [int(y) for _, ys, _ in loader for y in ys]
    assert labels == [0, 1, 0, 1, 0, 1]
    with pytest.raises(TypeError):
        _IterableOnlyReader()[0]  # what ImageDataset would have done


def test_two_brace_ranges_expand_all(tmp_path):
    """`s-{000..002}-{0..1}.tar` (valid in webdataset) expanded only the first range, then said 'shards not found'."""
    names = [f"s-{a:03d}-{b}.tar" for a in range(3) for b in range(2)]
    for name in names:
        W.write_shards([("k", _png(50, 0), "png", 0)], str(tmp_path / name.replace(".tar", "%.0s.tar")), 1)
    assert W.expand_urls(str(tmp_path / "s-{000..002}-{0..1}.tar")) == [str(tmp_path / n) for n in names]
    # the bound holds for the product of the ranges, checked before any list is built (10^12 names would not fit)
    with pytest.raises(ValueError, match="names 1,000,000,000,000 shards"):
        W.expand_urls(str(tmp_path / "s-{000000..999999}-{000000..999999}.tar"))


def _shard(path, samples):
    """A tar of (key, {extension: bytes}) samples, as WebDataset lays them out."""
    import tarfile

    with tarfile.open(path, "w") as tar:
        for key, parts in samples:
            for ext, payload in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


def test_shards_without_labels_are_named_in_one_line(tmp_path):
    """Samples without `.cls` were counted as nothing and never named: train said 'not among the 0 classes' or
    'an epoch has 0 batches'."""
    for i in range(2):
        _shard(tmp_path / f"u-{i}.tar", [(f"s{i}{k}", {"png": _png(50, k)}) for k in range(4)])
    with pytest.raises(ValueError) as e:
        D.create_dataset(f"wds/{tmp_path}/u-{{0..1}}.tar")
    message = str(e.value)
    assert message.startswith(f"WebDataset shard {tmp_path / 'u-0.tar'}: 4 of its 4 samples carry no .cls label")
    assert "(and 1 more shard(s) with 4 such samples)" in message and "\n" not in message


def test_unlabelled_samples_among_labelled_ones_are_skipped_and_said(tmp_path, caplog):
    samples = [(f"s{k}", {"png": _png(50, k), "cls": b"1"}) for k in range(3)]
    samples += [("s3", {"png": _png(50, 3)}), ("s4", {"cls": b"0"})]  # no label; a label without an image
    _shard(tmp_path / "m-0.tar", samples)
    ds = W.IterableImages(f"wds/{tmp_path}/m-0.tar", transform=np.array)
    assert ds.total == 3 and ds.classes == ["0", "1"]
    assert "m-0.tar: 1 of its 5 samples carry no .cls label and 1 have a .cls label but no image" in caplog.text
    assert "2 incomplete sample(s) skipped, 3 used" in caplog.text
    assert [label for _, label, _ in ds] == [1, 1, 1]  # what is counted is what is read
