"""The gpu data pipeline end to end (on CPU tensors), and the one-copy-per-machine cache."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from mambaout.cli import train as train_cmd
from mambaout.data import gpu_loader as data_gpu
from mambaout.data import shared_cache


@pytest.fixture
def folder(tmp_path):
    """Two classes of small images of different sizes (one canvas must hold them all)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, level in (("a", 60), ("b", 190)):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(10):
                h, w = 24 + 2 * i, 30 - i
                arr = np.clip(level + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(tmp_path / "data" / split / c / f"{i}.png")
    return tmp_path / "data"


def test_decode_once_into_a_padded_canvas(folder):
    from mambaout.data import ImageDataset

    ds = ImageDataset(str(folder / "train"))
    arrays = data_gpu.decode_images(ds)
    assert arrays["images"].shape == (20, 3, 42, 30) and arrays["images"].dtype == np.uint8
    for i in (0, 7, 19):
        h, w = arrays["sizes"][i]
        f, target = ds.reader[i]
        want = np.asarray(Image.open(f).convert("RGB")).transpose(2, 0, 1)
        assert arrays["targets"][i] == target
        assert (h, w) == want.shape[1:] and np.array_equal(arrays["images"][i, :, :h, :w], want)
        assert arrays["images"][i, :, h:, :].sum() == 0 and arrays["images"][i, :, :, w:].sum() == 0


def test_decoded_loader_is_sharded_and_augmented_on_its_device(folder):
    from mambaout.data import ImageDataset
    from mambaout.data.gpu_aug import GpuAugment

    ds = ImageDataset(str(folder / "train"))
    data = data_gpu.DecodedImages(data_gpu.decode_images(ds), ds.classes, ds.class_to_idx)
    seen = []
    for rank in (0, 1):
        loader = data_gpu.DecodedTrainLoader(data, GpuAugment(img_size=16), 4, rank=rank, world_size=2, seed=3)
        loader.sampler.set_epoch(1)
        assert len(loader) == 2
        batches = list(loader)
        assert all(x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 for x, _, _ in batches)
        seen += list(loader.sampler)[:8]
    assert len(set(seen)) == 16  # the two ranks see different images


def _smoke_args(folder, out, *extra):
    return (
        ["--data", str(folder), "--model", "mambaout_test", "--img-size", "24", "--epochs", "1"]
        + ["--batch-size", "8", "--workers", "0", "--no-progress", "--cooldown-epochs", "0", "--warmup-epochs", "0"]
        + ["--set", "global_batch=null", "--output", str(out), "--data-pipeline", "gpu", *extra]
    )


@pytest.mark.parametrize("cache", ["--cache", "--no-cache"])
def test_train_with_the_gpu_pipeline(folder, tmp_path, cache):
    """`--data-pipeline gpu` trains and evaluates: decoded once (cache) or cropped by CPU workers (streamed)."""
    out = tmp_path / f"run{cache}"
    assert train_cmd.main(_smoke_args(folder, out, cache)) == 0
    rows = (out / "summary.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].split(",")[4] != ""  # a val top-1 was measured


def test_gpu_pipeline_rejects_what_it_does_not_implement(folder, tmp_path, capsys):
    args = _smoke_args(folder, tmp_path / "r", "--auto-augment", "augmix-m5")
    assert train_cmd.main(args) == 2
    assert "--data-pipeline cpu" in capsys.readouterr().err


# --- one copy per machine ----------------------------------------------------------------------------------------


def _rank_main(rank, world, init_file, out_dir, counter):
    import torch.distributed as tdist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)

    def build():
        with open(counter, "a") as f:
            f.write(f"{rank}\n")
        return dict(x=np.arange(1000, dtype=np.int32).reshape(10, 100), y=np.array([b"ok"] * 3))

    arrays = shared_cache.machine_shared("test-" + os.path.basename(out_dir), build)
    source = arrays["x"].filename if isinstance(arrays["x"], np.memmap) else "private copy"
    with open(os.path.join(out_dir, f"{rank}.txt"), "w") as f:
        f.write(f"{int(arrays['x'].sum())} {source}")
    tdist.barrier()
    tdist.destroy_process_group()


@pytest.mark.multiprocess
def test_cache_is_built_once_per_machine_and_mapped_by_every_rank(tmp_path):
    counter = tmp_path / "built.txt"
    mp.spawn(_rank_main, args=(3, str(tmp_path / "init"), str(tmp_path), str(counter)), nprocs=3, join=True)
    assert counter.read_text().split() == ["0"]  # only local rank 0 built (decoded) the data
    seen = [(tmp_path / f"{rank}.txt").read_text().split() for rank in range(3)]
    assert all(int(total) == 999 * 1000 // 2 for total, _ in seen)
    assert len({source for _, source in seen}) == 1 and seen[0][1].endswith("x.npy")  # every rank maps one file
    assert not list(shared_cache._shm_dir().glob("mambaout-cache-test-*"))  # unlinked once mapped


def test_packed_bytes_round_trip(tmp_path):
    items = [b"abc", None, b"", b"\x00\xff" * 10]
    arrays = shared_cache.PackedBytes.pack(items)
    shared_cache.write_arrays(tmp_path / "c", arrays)
    packed = shared_cache.PackedBytes(shared_cache.map_arrays(tmp_path / "c"))
    assert [packed[i] for i in range(len(packed))] == items


def test_data_bench_prints_the_three_pipelines(folder, capsys):
    from mambaout.cli import data_bench

    args = ["--data-train", str(folder / "train"), "--img-size", "24", "--batch-size", "4", "--batches", "2"]
    assert data_bench.main(args + ["--warmup", "1", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    table = out.splitlines()[2:5]
    assert [line.split()[0] for line in table] == ["ours", "ours", "timm"] and "cpu tensors" in table[1]
    assert float(table[2].split()[-1]) == 1.0 and all(float(line.split()[-1]) > 0 for line in table)
    assert "cores" in out and "decoded 20 images once" in out
