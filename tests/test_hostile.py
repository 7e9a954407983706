"""Hostile inputs against every command, one table row per case (issue 14).

Each row gives a command line, the exit code it must end with, a fragment its one-line message must contain, and
the files that must stay untouched on disk (same bytes, same modification time; a path that did not exist must
still not exist). Commands run in-process through `mambaout.cli.main(argv)` with stderr captured; only rows that
need a second process (or a signal) start one. A row's command never prints a traceback.

`{w}` in a command is the world folder the module fixture builds once: small images, corrupt files, tars and
checkpoints (see `world`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mambaout
from mambaout.cli import main
from mambaout.weights.checkpoint import save_weights

CLASSES = ["ant", "bee", "cat"]
EVAL_CONFIG = dict(input_size=[3, 32, 32], crop_pct=1.0, interpolation="bicubic", mean=[0.5] * 3, std=[0.5] * 3)


@dataclass(frozen=True)
class Case:
    """One hostile input: `mambaout <argv>` must exit `code` with `message` in its output, leaving `untouched`."""

    id: str
    argv: str  # split on spaces after `{w}` is filled in
    code: int
    message: str
    untouched: tuple[str, ...] = ()  # paths relative to the world folder
    env: dict = field(default_factory=dict)
    patch: Callable | None = None  # patch(monkeypatch) before the command runs: a full disk, a missing GPU
    absent: tuple[str, ...] = ()  # fragments the output must not hold (a raw control character, a forged line)
    root: bool = False  # needs device nodes made with mknod (root only): skipped otherwise


def _png(path: Path, h: int, w: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _corrupt(path: Path, kind: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == 0:  # a real PNG cut in half
        buf = io.BytesIO()
        Image.fromarray(np.full((40, 40, 3), 7, np.uint8)).save(buf, format="PNG")
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif kind == 1:
        path.write_bytes(b"GIF89a this is not really an image")
    else:
        path.write_bytes(b"")
    return path


def _checkpoint(path: Path, num_classes: int, meta_classes: int | None = None, eval_config=None, **meta) -> Path:
    """A `mambaout_test` checkpoint with `num_classes` outputs whose metadata may claim another count."""
    torch.manual_seed(0)
    model = mambaout.create_model("mambaout_test", num_classes=num_classes)
    n = meta_classes or num_classes
    meta.setdefault("model", "mambaout_test")
    meta.setdefault("model_kwargs", {"num_classes": n})
    meta.setdefault("class_names", CLASSES if n == len(CLASSES) else [f"c{i}" for i in range(n)])
    return save_weights(model, path, eval_config=eval_config or EVAL_CONFIG, **meta)


def _huge_png(path: Path, side: int) -> Path:
    """A PNG that claims `side` x `side` pixels in its header (one black row repeated compresses to kilobytes)."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])  # 8-bit greyscale
    raw = zlib.compress(b"\x00" * (side + 1) * 64)  # only the first rows: the decoder must stop at the header check
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("world")
    for c, cls in enumerate(CLASSES):
        for i in range(2):
            _png(w / "good" / cls / f"{i}.png", 40, 48, seed=10 * c + i)
    for i, cls in enumerate(CLASSES):
        _corrupt(w / "corrupt" / cls / "bad.png", i)
    _png(w / "imgs" / "ok.png", 40, 40)
    _corrupt(w / "imgs" / "broken.jpg", 0)
    _checkpoint(w / "good.safetensors", 3)
    _checkpoint(w / "meta10-over-7.safetensors", 7, meta_classes=10)
    torch.manual_seed(0)
    torch.save(mambaout.create_model("mambaout_test", num_classes=7).state_dict(), w / "plain7.pth")
    ec = dict(EVAL_CONFIG, input_size=[3, 20000, 20000])
    _checkpoint(w / "input20000.safetensors", 3, eval_config=ec)
    _checkpoint(w / "dims-huge.safetensors", 3, model_kwargs={"num_classes": 3, "dims": [100000, 8, 8, 8]})
    # the good set again with one unreadable file per class beside the readable ones
    for f in (w / "good").rglob("*.png"):
        (w / "mixed" / f.parent.name).mkdir(parents=True, exist_ok=True)
        (w / "mixed" / f.parent.name / f.name).write_bytes(f.read_bytes())
    for i, cls in enumerate(CLASSES):
        _corrupt(w / "mixed" / cls / "zz-bad.png", i)
    _huge_png(w / "mixed" / "ant" / "huge.png", 15000)
    _png(w / "with-huge" / "a.png", 40, 40)
    _huge_png(w / "with-huge" / "b-huge.png", 15000)
    _png(w / "with-huge" / "c.png", 40, 40, seed=1)
    _png(w / "one-good-one-bad" / "ant" / "good.png", 40, 40)
    _corrupt(w / "one-good-one-bad" / "bee" / "bad.png", 1)
    with tarfile.open(w / "good.tar", "w") as tar:
        tar.add(w / "good", arcname=".")
    data = (w / "good.tar").read_bytes()
    (w / "truncated.tar").write_bytes(data[: len(data) // 3])
    (w / "garbage.tar").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (w / "empty.tar").write_bytes(b"")
    (w / "out").mkdir()
    (w / "out" / "keep.txt").write_text("do not touch")
    (w / "no-images").mkdir()
    (w / "no-images" / "notes.txt").write_text("no image here")
    # a run folder whose state says it trains mambaout_test (only its config is read before the refusal)
    (w / "run").mkdir()
    torch.save({"config": {"model": "mambaout_test", "data_train": "digits:train"}}, w / "run" / "state.pt")
    _issue18_world(w)
    _data_round_world(w)
    # recipe files that are not plain configuration data (issue 18 group 11)
    (w / "recipes").mkdir()
    (w / "recipes" / "tag.yaml").write_text("epochs: !!python/object/apply:os.system ['echo pwned']\n")
    (w / "recipes" / "name.yaml").write_text("model: !!python/name:os.system\n")
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{k}: &{k} [*{j}, *{j}, *{j}, *{j}, *{j}, *{j}, *{j}, *{j}, *{j}]\n" for j, k in zip("abcdefgh", "bcdefghi")
    )
    (w / "recipes" / "bomb.yaml").write_text(bomb)
    (w / "recipes" / "dup.yaml").write_text("epochs: 3\nlr: 0.1\nepochs: 30\n")
    (w / "recipes" / "parse.yaml").write_text("epochs: [3\nlr: 0.1\n")
    return w


def _issue18_world(w: Path) -> None:
    """Special files, damaged weights, foreign folders, bad shards and hostile names (issue 18)."""
    # special files: device nodes made here (never the system's /dev), a FIFO, a socket, links to them
    dev = w / "dev"
    dev.mkdir()
    if os.geteuid() == 0:
        os.mknod(dev / "full", stat.S_IFCHR | 0o666, os.makedev(1, 7))  # what /dev/full is
        os.mknod(dev / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))  # what /dev/null is
        os.mknod(dev / "full.onnx", stat.S_IFCHR | 0o666, os.makedev(1, 7))
        os.mknod(dev / "loop.csv", stat.S_IFBLK | 0o660, os.makedev(7, 0))  # a block device
        (dev / "link-to-full").symlink_to(dev / "full")
    os.mkfifo(dev / "fifo")
    os.mkfifo(dev / "fifo.png")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(dev / "sock"))  # the socket file stays after the socket closes
    (dev / "dangling").symlink_to(dev / "nowhere")
    # a FIFO among images: given as a folder to predict, among class folders to validate
    _png(w / "with-fifo" / "a.png", 40, 40)
    os.mkfifo(w / "with-fifo" / "b.png")
    for f in (w / "good").rglob("*.png"):
        (w / "good-fifo" / f.parent.name).mkdir(parents=True, exist_ok=True)
        (w / "good-fifo" / f.parent.name / f.name).write_bytes(f.read_bytes())
    os.mkfifo(w / "good-fifo" / "bee" / "zz-fifo.png")
    # weights that are not finite, not floating point, or of another precision
    torch.manual_seed(0)
    sd = mambaout.create_model("mambaout_test", num_classes=3).state_dict()
    meta = dict(model="mambaout_test", model_kwargs={"num_classes": 3}, class_names=CLASSES, eval_config=EVAL_CONFIG)
    bad = dict(sd)
    bad["stages.1.blocks.0.fc1.weight"] = (
        sd["stages.1.blocks.0.fc1.weight"].clone().index_fill_(0, torch.tensor([2]), torch.nan)
    )
    save_weights(bad, w / "nan.safetensors", **meta)
    inf = dict(sd)
    inf["head.fc.bias"] = torch.full_like(sd["head.fc.bias"], torch.inf)
    torch.save(inf, w / "inf.pth")
    save_weights(
        dict(sd, **{"stem.conv1.weight": sd["stem.conv1.weight"].to(torch.int64)}), w / "int.safetensors", **meta
    )
    save_weights({k: v.double() for k, v in sd.items()}, w / "f64.safetensors", **meta)
    (w / "link-to-good.safetensors").symlink_to(w / "good.safetensors")
    _png(w / "flat" / "a.png", 40, 40)  # images with no class folders
    f64 = {k: v.double() for k, v in sd.items()}
    f64["head.fc.bias"] = torch.full_like(f64["head.fc.bias"], 1e300)  # finite in float64, Inf in float32
    save_weights(f64, w / "f64-overflow.safetensors", **meta)
    _checkpoint(w / "five-no-names.safetensors", 5, class_names=None)
    # a validation set with a class the model was not trained on
    for f in (w / "good").rglob("*.png"):
        (w / "val-extra" / f.parent.name).mkdir(parents=True, exist_ok=True)
        (w / "val-extra" / f.parent.name / f.name).write_bytes(f.read_bytes())
    _png(w / "val-extra" / "dog" / "0.png", 40, 40)
    # an output folder holding the user's own files, and no run
    (w / "mine").mkdir()
    for name in ("best.safetensors", "curves.png", "notes.tmp", ".state.pt.abcdefgh.tmp"):
        (w / "mine" / name).write_text("the user's")
    # an hf export folder holding another model's config
    (w / "hf-other").mkdir()
    (w / "hf-other" / "config.json").write_text(json.dumps({"architecture": "resnet50", "num_classes": 1000}))
    # WebDataset shards with labels out of range, negative, and not numbers
    (w / "wds").mkdir()
    for name, label in (("huge", b"99999999"), ("neg", b"-3"), ("text", b"cat")):
        with tarfile.open(w / "wds" / f"{name}-0.tar", "w") as tar:
            for key, cls in (("s000", b"1"), ("s001", label)):
                for ext, payload in (("png", (w / "imgs" / "ok.png").read_bytes()), ("cls", cls)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    # names that carry control characters: a file name, and a checkpoint's class names
    evil = w / "ctrl" / "a\x1b[2Jb\n  99.99%      0  forged.png"
    _png(evil, 40, 40)
    _checkpoint(w / "evil-names.safetensors", 3, class_names=["ant\x1b[31m", "bee\n  99.99%      7  forged", "cat\x07"])
    # a JPEG whose header claims 6000 x 6000 pixels while it holds a few hundred bytes
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (6000).to_bytes(2, "big") * 2
    (w / "forged.jpg").write_bytes(bytes(data))
    # a finished run (one epoch of one epoch)
    assert main((TRAIN.format(w=w) + f" -o {w}/finished").split()) == 0


def _no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _disk_full(monkeypatch):
    """torch's writer on a full disk: a RuntimeError from inline_container.cc after half the bytes."""

    def save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4 vs 1024")

    monkeypatch.setattr(torch, "save", save)


def _interrupt(target: str, attr: str):
    """A patch: `target.attr` raises KeyboardInterrupt when called, as Ctrl-C does in the middle of the work."""

    def patch(monkeypatch):
        import importlib

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        module, _, cls = target.partition(":")
        owner = importlib.import_module(module)
        monkeypatch.setattr(getattr(owner, cls) if cls else owner, attr, interrupted)

    return patch


def _safetensors_disk_full(monkeypatch):
    """safetensors' writer on a full disk: its own exception type (not an OSError), after part of the file."""
    import safetensors.torch
    from safetensors import SafetensorError

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"part")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def _onnx_falls_back(monkeypatch):
    """torch's ONNX exporter when it cannot convert to the opset asked for: it writes its own opset 18 instead."""
    original = torch.onnx.export

    def export(*args, **kwargs):
        return original(*args, **dict(kwargs, opset_version=18))

    monkeypatch.setattr(torch.onnx, "export", export)


def _check_gives_nan(monkeypatch):
    import mambaout.cli.export

    monkeypatch.setattr(mambaout.cli.export, "check_export", lambda *a, **k: float("nan"))


# one optimizer step on the six-image world set (no data argument would mean the 1,797 digits)
TRAIN_BASE = "train --model mambaout_test --img-size 32 -b 2 --global-batch 2 --max-steps-per-epoch 1 --epochs 1"
TRAIN_BASE += " --warmup-epochs 0 --cooldown-epochs 0 --workers 0 --no-progress"
TRAIN = TRAIN_BASE + " --data-train {w}/good --data-val {w}/good"


CASES = [
    # --- training options that crashed late, were silently accepted, or exhausted memory (every setting's bad
    # values are tests/test_settings.py's; these rows show a refused value leaves no run folder) ------------------
    Case(
        "train-auto-augment-garbage",
        TRAIN + " --auto-augment garbage -o {w}/out/t",
        2,
        "auto_augment='garbage': not a timm augmentation string",
    ),
    Case("train-img-size-10000", TRAIN + " --img-size 10000 -b 2 -o {w}/out/t", 2, "img_size=", ("out/t",)),
    Case("train-epochs-0", TRAIN + " --epochs 0 -o {w}/out/t", 2, "epochs=", ("out/t",)),
    Case("train-device-tpu", TRAIN + " --device tpu -o {w}/out/t", 2, "device='tpu': must be cpu, cuda", ("out/t",)),
    Case("train-missing-data", TRAIN_BASE + " --data-train {w}/nope -o {w}/out/t", 2, "does not exist", ("out/t",)),
    Case("train-data-is-a-file", TRAIN_BASE + " --data {w}/good.tar -o {w}/out/t", 2, "is a file", ("out/t",)),
    Case("train-truncated-tar", TRAIN_BASE + " --data-train {w}/truncated.tar -o {w}/out/t", 2, "cannot read"),
    Case(
        "train-only-corrupt-images",
        TRAIN_BASE + " --data-train {w}/corrupt --data-val {w}/corrupt -o {w}/out/c",
        2,
        "consecutive unreadable images",
    ),
    Case(
        "train-only-corrupt-images-in-a-worker",
        TRAIN_BASE + " --data-train {w}/corrupt --data-val {w}/corrupt --workers 1 -o {w}/out/c2",
        2,
        "consecutive unreadable images",
    ),
    Case("train-unknown-set-key", TRAIN + " --set nope=1 -o {w}/out/t", 2, "unknown setting 'nope'", ("out/t",)),
    Case("train-set-without-equals", TRAIN + " --set nope -o {w}/out/t", 2, "KEY=VALUE", ("out/t",)),
    Case("train-missing-recipe", TRAIN + " --recipe nope -o {w}/out/t", 2, "no recipe named", ("out/t",)),
    Case("train-resume-missing", "train --resume {w}/nope", 2, "no training state found"),
    Case("train-resume-weights-not-state", "train --resume {w}/good.safetensors", 2, "not a training state"),
    Case(
        "train-resume-other-model",
        "train --resume {w}/run --model mambaout_femto",
        2,
        "that run trains model 'mambaout_test'",
        ("run",),
    ),
    Case(
        "train-disk-full", TRAIN + " -o {w}/out/full", 2, "is the disk full?", ("out/full/state.pt",), patch=_disk_full
    ),
    # --- validate counts each readable image once; what it cannot read is named, and none readable is an error ----
    Case(
        "validate-only-corrupt-folder", "validate {w}/corrupt --checkpoint {w}/good.safetensors", 2, "no readable image"
    ),
    Case("validate-truncated-tar", "validate {w}/truncated.tar --checkpoint {w}/good.safetensors", 2, "cannot read"),
    Case("validate-garbage-tar", "validate {w}/garbage.tar --checkpoint {w}/good.safetensors", 2, "cannot read"),
    Case("validate-empty-tar", "validate {w}/empty.tar --checkpoint {w}/good.safetensors", 2, "cannot read"),
    Case(
        "validate-one-good-one-bad",
        "validate {w}/one-good-one-bad --checkpoint {w}/good.safetensors",
        0,
        "1 images at 32 px",
    ),
    Case("validate-missing-data", "validate {w}/nope --checkpoint {w}/good.safetensors", 2, "does not exist"),
    # --- a classifier that does not fit is an error at inference, never a random head -----------------------------
    Case(
        "validate-plain7-as-default",
        "validate {w}/good --model mambaout_test --checkpoint {w}/plain7.pth",
        2,
        "classifier has 7 classes",
    ),
    Case(
        "validate-meta10-over-7",
        "validate {w}/good --checkpoint {w}/meta10-over-7.safetensors",
        2,
        "classifier has 7 classes",
    ),
    Case(
        "predict-meta10-over-7",
        "predict {w}/imgs --checkpoint {w}/meta10-over-7.safetensors",
        2,
        "classifier has 7 classes",
    ),
    Case(
        "predict-plain7",
        "predict {w}/imgs --model mambaout_test --checkpoint {w}/plain7.pth",
        2,
        "classifier has 7 classes",
    ),
    Case(
        "export-meta10-over-7",
        "export --checkpoint {w}/meta10-over-7.safetensors -o {w}/out/x.onnx",
        2,
        "classifier has 7 classes",
        untouched=("out/x.onnx",),
    ),
    # --- checkpoint metadata is checked against bounds before anything is allocated ----------------------------------
    Case(
        "predict-input-size-20000", "predict {w}/imgs --checkpoint {w}/input20000.safetensors", 2, "input_size must be"
    ),
    Case(
        "validate-input-size-20000",
        "validate {w}/good --checkpoint {w}/input20000.safetensors",
        2,
        "input_size must be",
    ),
    Case("predict-dims-huge", "predict {w}/imgs --checkpoint {w}/dims-huge.safetensors", 2, "model_kwargs.dims"),
    # --- predict: an image over the decode budget is one more unreadable file; the others still get answers ------
    Case(
        "predict-over-pixel-budget",
        "predict {w}/with-huge --checkpoint {w}/good.safetensors",
        0,
        "over the decode budget of 64 Mpx",
    ),
    Case(
        "predict-over-a-lowered-budget",
        "predict {w}/imgs/ok.png --checkpoint {w}/good.safetensors",
        1,
        "over the decode budget of 0 Mpx",
        env={"MAMBAOUT_MAX_PIXELS": "100"},
    ),
    Case(
        "predict-device-cuda-without-gpu",
        "predict {w}/imgs --checkpoint {w}/good.safetensors --device cuda",
        2,
        "torch sees no CUDA",
        patch=_no_gpu,
    ),
    Case(
        "predict-device-tpu",
        "predict {w}/imgs --checkpoint {w}/good.safetensors --device tpu",
        2,
        "unknown device 'tpu'",
    ),
    Case("predict-missing-checkpoint", "predict {w}/imgs --checkpoint {w}/nope.safetensors", 2, "does not exist"),
    Case("predict-garbage-checkpoint", "predict {w}/imgs --checkpoint {w}/garbage.tar", 2, "cannot read"),
    Case("predict-topk-0", "predict {w}/imgs --checkpoint {w}/good.safetensors --topk 0", 2, "--topk must be"),
    Case(
        "predict-batch-size-0",
        "predict {w}/imgs --random-weights --model mambaout_test --batch-size 0",
        2,
        "--batch-size must be",
    ),
    Case(
        "predict-random-and-checkpoint",
        "predict {w}/imgs --random-weights --checkpoint {w}/good.safetensors",
        2,
        "exclude each other",
    ),
    Case("predict-model-without-weights", "predict {w}/imgs --model mambaout_test", 2, "no published weights"),
    Case("predict-unknown-model", "predict {w}/imgs --model nope --random-weights", 2, "nope"),
    Case("predict-no-images", "predict {w}/no-images --checkpoint {w}/good.safetensors", 1, "no images found"),
    # --- validate: options that were silently accepted or crashed ----------------------------------------------------
    Case(
        "validate-img-size-0",
        "validate {w}/good --checkpoint {w}/good.safetensors --img-size 0",
        2,
        "--img-size must be",
    ),
    Case(
        "validate-img-size-huge",
        "validate {w}/good --checkpoint {w}/good.safetensors --img-size 20000",
        2,
        "--img-size must be",
    ),
    Case(
        "validate-crop-pct-0",
        "validate {w}/good --checkpoint {w}/good.safetensors --crop-pct 0",
        2,
        "--crop-pct must be",
    ),
    Case(
        "validate-batch-size-0", "validate {w}/good --checkpoint {w}/good.safetensors -b 0", 2, "--batch-size must be"
    ),
    Case(
        "validate-device-cuda-without-gpu",
        "validate {w}/good --checkpoint {w}/good.safetensors --device cuda",
        2,
        "torch sees no CUDA",
        patch=_no_gpu,
    ),
    Case(
        "validate-device-tpu", "validate {w}/good --checkpoint {w}/good.safetensors --device tpu", 2, "invalid choice"
    ),
    Case(
        "validate-results-file-unwritable",
        "validate {w}/good --checkpoint {w}/good.safetensors --results-file {w}/good.tar/r.json",
        2,
        "cannot write in",
    ),
    Case(
        "validate-results-file-is-a-folder",
        "validate {w}/good --checkpoint {w}/good.safetensors --results-file {w}/out",
        2,
        "is a folder",
        ("out",),
    ),
    Case("validate-nothing", "validate {w}/good", 2, "nothing to validate"),
    Case(
        "validate-more-names-than-files",
        "validate {w}/good --model mambaout_test,mambaout_test,mambaout_test --checkpoint {w}/good.safetensors {w}/good.safetensors",
        2,
        "give one name",
    ),
    # --- export ------------------------------------------------------------------------------------------------------
    Case(
        "export-onnx-into-pt2",
        "export --checkpoint {w}/good.safetensors -o {w}/out/x.pt2 --format onnx",
        2,
        "would write onnx bytes",
        ("out/x.pt2",),
    ),
    Case(
        "export-pt2-into-onnx",
        "export --checkpoint {w}/good.safetensors -o {w}/out/x.onnx --format pt2",
        2,
        "would write pt2 bytes",
        ("out/x.onnx",),
    ),
    Case(
        "export-unknown-suffix",
        "export --checkpoint {w}/good.safetensors -o {w}/out/x.bin",
        2,
        "cannot tell the format",
        ("out/x.bin",),
    ),
    Case("export-unwritable", "export --checkpoint {w}/good.safetensors -o {w}/good.tar/x.onnx", 2, "cannot write in"),
    Case(
        "export-img-size-0",
        "export --checkpoint {w}/good.safetensors -o {w}/out/x.onnx --img-size 0",
        2,
        "--img-size must be",
        ("out/x.onnx",),
    ),
    Case(
        "export-opset-with-pt2",
        "export --checkpoint {w}/good.safetensors -o {w}/out/x.pt2 --opset 17",
        2,
        "--opset applies",
        ("out/x.pt2",),
    ),
    # --- models, flops, benchmark ------------------------------------------------------------------------------------
    Case("models-img-size-0", "models --img-size 0", 2, "--img-size must be"),
    Case("models-no-match", "models nope*", 2, "no model matches"),
    Case("flops-img-size-0", "flops --img-size 0", 2, "--img-size must be"),
    Case("flops-plot-unwritable", "flops --transformer --dim 384 --plot {w}/good.tar/p.png", 2, "cannot write in"),
    Case("flops-transformer-without-dim", "flops --transformer", 2, "needs --dim"),
    Case(
        "benchmark-csv-unwritable", "benchmark --models mambaout_femto --csv {w}/good.tar/b.csv", 2, "cannot write in"
    ),
    Case("benchmark-threads-negative", "benchmark --models mambaout_femto --threads -1", 2, "--threads must be"),
    Case("benchmark-device-tpu", "benchmark --models mambaout_femto --device tpu", 2, "unknown device"),
    Case("benchmark-img-size-0", "benchmark --models mambaout_femto --img-size 0", 2, "--img-size must be"),
    # --- the demo fails at start, not at the first click -------------------------------------------------------------
    Case("demo-port-0", "demo --model mambaout_test --random-weights --port 0", 2, "a port is 1 to 65535"),
    Case("demo-port-too-big", "demo --model mambaout_test --random-weights --port 70000", 2, "a port is 1 to 65535"),
    Case(
        "demo-port-not-a-number",
        "demo --model mambaout_test --random-weights --port http",
        2,
        "invalid int value: 'http'",
    ),
    Case("demo-missing-checkpoint", "demo --checkpoint {w}/nope.safetensors", 2, "does not exist"),
    Case("demo-checkpoint-misfit", "demo --checkpoint {w}/meta10-over-7.safetensors", 2, "classifier has 7 classes"),
    Case("demo-checkpoint-input-size-20000", "demo --checkpoint {w}/input20000.safetensors", 2, "input_size must be"),
    Case("demo-unknown-model", "demo --model nope --random-weights", 2, "nope"),
    Case("demo-model-without-weights", "demo --model mambaout_test", 2, "no published weights"),
    Case("demo-device-tpu", "demo --model mambaout_test --random-weights --device tpu", 2, "unknown device 'tpu'"),
    Case("demo-topk-0", "demo --model mambaout_test --random-weights --topk 0", 2, "--topk must be"),
    Case("demo-upload-limit-0", "demo --model mambaout_test --random-weights --max-upload-mb 0", 2, "--max-upload-mb"),
    Case("cli-unknown-command", "nope", 2, "unknown command 'nope'"),
    # --- published weights that do not exist -------------------------------------------------------------------------
    Case(
        "validate-pretrained-without-weights",
        "validate {w}/good --model mambaout_test --pretrained",
        2,
        "no published weights",
    ),
]

VAL = "validate {w}/good --checkpoint {w}/good.safetensors"
PREDICT = "predict {w}/imgs/ok.png --checkpoint {w}/good.safetensors"
EXPORT = "export --checkpoint {w}/good.safetensors"
WDS = TRAIN_BASE + " --data-val {w}/good -o {w}/out/t --data-train wds/"
DATA_BENCH = "data-bench --data-train {w}/good --only cpu --workers 0"

# issue 18: special files, damaged weights, foreign folders, unbounded inputs, interrupts, hostile names
CASES_18 = [
    # --- 11. recipes that are no plain data: one line of at most ~200 characters, nothing run, nothing expanded -----
    Case("recipe-python-object", "train --print-config --recipe {w}/recipes/tag.yaml", 2, "is not plain data"),
    Case("recipe-python-name", "train --print-config --recipe {w}/recipes/name.yaml", 2, "is not plain data"),
    Case("recipe-alias-bomb", "train --print-config --recipe {w}/recipes/bomb.yaml", 2, "anchors (&a) are not allowed"),
    Case(
        "recipe-duplicate-key", "train --print-config --recipe {w}/recipes/dup.yaml", 2, "key 'epochs' is given twice"
    ),
    Case("recipe-parse-error", "train --print-config --recipe {w}/recipes/parse.yaml", 2, "not valid YAML"),
    Case("set-alias", "train --print-config --set lr=*a", 2, "aliases (*a) are not allowed"),
    # --- 12. model size from --set model_kwargs: the meta-device bound, before any memory is allocated -------------
    Case(
        "set-model-kwargs-dims-16384",
        "train --print-config --model mambaout_femto --set model_kwargs={{dims:[16384,16384,16384,16384]}}",
        2,
        "parameters, over the bound of 1,000M",
    ),
    Case("set-model-kwargs-dims-over", "train --print-config --set model_kwargs={{dims:[99999]}}", 2, "16,384]"),
    # --- 16. the seed over 64 bits -------------------------------------------------------------------------------------
    Case("train-seed-over-64-bits", "train --print-config --seed 99999999999999999999", 2, "seed=99999999999999999999"),
    # --- 1. an output path that names a device, FIFO, socket or a link to one is refused, never replaced -----------
    Case(
        "results-file-char-device",
        VAL + " --results-file {w}/dev/full",
        2,
        "is a character device",
        ("dev",),
        root=True,
    ),
    Case(
        "results-file-dev-null", VAL + " --results-file {w}/dev/null", 2, "is a character device", ("dev",), root=True
    ),
    Case(
        "results-file-link-to-device",
        VAL + " --results-file {w}/dev/link-to-full",
        2,
        "a symlink to",
        ("dev",),
        root=True,
    ),
    Case("results-file-fifo", VAL + " --results-file {w}/dev/fifo", 2, "is a named pipe (FIFO)", ("dev",)),
    # a path component over the file system's 255 bytes: one line naming it (shortened), not an OSError traceback
    Case("validate-flat-folder", "validate {w}/flat --checkpoint {w}/good.safetensors", 2, "one sub-folder per class"),
    Case("results-file-name-too-long", VAL + " --results-file {w}/" + "a" * 300 + ".json", 2, "File name too long"),
    Case(
        "validate-data-name-too-long", "validate {w}/" + "a" * 300 + " --checkpoint {w}/good.safetensors", 2, "aaa..."
    ),
    Case("predict-name-too-long", "predict {w}/" + "a" * 300 + ".png --checkpoint {w}/good.safetensors", 2, "too long"),
    Case("train-data-name-too-long", "train --print-config --data-train {w}/" + "b" * 300, 2, "File name too long"),
    Case("export-output-name-too-long", EXPORT + " -o {w}/out/" + "c" * 300 + ".onnx", 2, "File name too long"),
    Case(
        "results-file-is-the-checkpoint",
        "validate {w}/good --checkpoint {w}/good.safetensors --results-file {w}/good.safetensors",
        2,
        "which this command reads; pick another path",
        ("good.safetensors",),
    ),
    Case(
        "results-file-is-the-checkpoint-by-a-link",
        "validate {w}/good --checkpoint {w}/good.safetensors --results-file {w}/link-to-good.safetensors",
        2,
        "which this command reads",
        ("good.safetensors", "link-to-good.safetensors"),
    ),
    Case(
        "export-output-is-the-checkpoint",
        "export --checkpoint {w}/good.safetensors -o {w}/good.safetensors --format pt2",
        2,
        "which this command reads",
        ("good.safetensors",),
    ),
    Case("results-file-socket", VAL + " --results-file {w}/dev/sock", 2, "is a socket", ("dev",)),
    Case("results-file-dangling-link", VAL + " --results-file {w}/dev/dangling", 2, "which does not exist", ("dev",)),
    Case(
        "export-output-char-device", EXPORT + " -o {w}/dev/full.onnx", 2, "is a character device", ("dev",), root=True
    ),
    Case("export-output-fifo", EXPORT + " -o {w}/dev/fifo --format pt2", 2, "is a named pipe", ("dev",)),
    Case(
        "benchmark-csv-block-device",
        "benchmark --models mambaout_femto --csv {w}/dev/loop.csv",
        2,
        "is a block device",
        ("dev",),
        root=True,
    ),
    Case("flops-plot-fifo", "flops --transformer --dim 384 --plot {w}/dev/fifo", 2, "is a named pipe", ("dev",)),
    Case("train-output-is-a-device", TRAIN + " -o {w}/dev/full", 2, "is not a folder", ("dev",), root=True),
    # --- 2. a folder holding files no run wrote is refused (the user's files, even ones named like ours) ----------
    Case("train-into-a-users-folder", TRAIN + " -o {w}/mine", 2, "holds no run", ("mine",)),
    # --- 3. an hf export never replaces another model's export unasked -----------------------------------------------
    Case(
        "export-hf-over-another-model",
        EXPORT + " --format hf -o {w}/hf-other",
        2,
        "another model's export",
        ("hf-other",),
    ),
    Case("export-hf-into-a-file", EXPORT + " --format hf -o {w}/good.tar", 2, "is a file, not a folder", ("good.tar",)),
    # --- 4. weights holding NaN or Inf: one line naming the tensor, wherever they are loaded ---------------------------
    Case(
        "validate-nan-weights",
        "validate {w}/good --checkpoint {w}/nan.safetensors",
        2,
        "'stages.1.blocks.0.fc1.weight' holds non-finite values (32 NaN of 5440)",
    ),
    Case(
        "predict-nan-weights", "predict {w}/imgs --checkpoint {w}/nan.safetensors", 2, "'stages.1.blocks.0.fc1.weight'"
    ),
    Case(
        "predict-inf-weights",
        "predict {w}/imgs --model mambaout_test --checkpoint {w}/inf.pth --json",
        2,
        "'head.fc.bias' holds non-finite values (3 Inf",
    ),
    Case(
        "export-nan-weights",
        "export --checkpoint {w}/nan.safetensors -o {w}/out/n.onnx",
        2,
        "non-finite",
        ("out/n.onnx",),
    ),
    Case("demo-nan-weights", "demo --checkpoint {w}/nan.safetensors", 2, "non-finite"),
    Case(
        "export-check-nan",
        EXPORT + " -o {w}/out/c.pt2 --check",
        1,
        "the difference from PyTorch is nan",
        patch=_check_gives_nan,
    ),
    # --- 5. weights of another dtype: integers refused; a lossy float conversion said -------------------------------
    Case(
        "validate-int-weights", "validate {w}/good --checkpoint {w}/int.safetensors", 2, "'stem.conv1.weight' is int64"
    ),
    Case(
        "validate-float64-weights",
        "validate {w}/good --checkpoint {w}/f64.safetensors",
        0,
        "float64 tensors (stem.conv1.weight...) to the model's float32",
    ),
    Case(
        "validate-float64-beyond-float32",
        "validate {w}/good --checkpoint {w}/f64-overflow.safetensors",
        2,
        "'head.fc.bias' holds values up to 1e+300, beyond float32's range",
    ),
    # --- 6. a class the model was not trained on, a class count that does not match the head -----------------------
    Case(
        "validate-class-absent-from-training",
        "validate {w}/val-extra --checkpoint {w}/good.safetensors",
        2,
        "not among the checkpoint's 3 class names",
    ),
    Case(
        "train-val-class-absent-from-training",
        TRAIN_BASE + " --data-train {w}/good --data-val {w}/val-extra -o {w}/out/t",
        2,
        "holds class(es) 'dog'",
        ("out/t",),
    ),
    Case(
        "validate-class-count-vs-head",
        "validate {w}/good --checkpoint {w}/five-no-names.safetensors",
        2,
        "the dataset has 3 classes but the model 5 outputs",
    ),
    # --- 7. --opset outside what can be written -------------------------------------------------------------------
    Case(
        "export-opset-99",
        EXPORT + " -o {w}/out/x.onnx --opset 99",
        2,
        "--opset must be an integer from 18 to",
        ("out/x.onnx",),
    ),
    Case(
        "export-opset-17",
        EXPORT + " -o {w}/out/x.onnx --opset 17",
        2,
        "--opset must be an integer from 18 to",
        ("out/x.onnx",),
    ),
    Case(
        "export-opset-fallback",
        EXPORT + " -o {w}/out/x.onnx --opset 20",
        2,
        "and fell back to 18",
        ("out/x.onnx",),
        patch=_onnx_falls_back,
    ),
    # --- 8. a checkpoint of another model than the one asked for ----------------------------------------------------
    Case(
        "validate-recorded-model-differs",
        "validate {w}/good --model mambaout_femto --checkpoint {w}/good.safetensors",
        2,
        "holds mambaout_test weights, but mambaout_femto was asked for",
    ),
    Case(
        "predict-recorded-model-differs",
        "predict {w}/imgs --model mambaout_kobe --checkpoint {w}/good.safetensors",
        2,
        "holds mambaout_test weights, but mambaout_kobe",
    ),
    # allowed: an alias of the recorded model is the same model
    Case(
        "validate-alias-of-recorded-model",
        "validate {w}/good --model mambaout_pico --checkpoint {w}/good.safetensors",
        0,
        "6 images",
    ),
    # --- 9. FIFOs, sockets and devices among the inputs: named, never opened ------------------------------------------
    Case(
        "predict-fifo-given",
        "predict {w}/dev/fifo --checkpoint {w}/good.safetensors",
        1,
        "is a named pipe (FIFO), not an image file",
    ),
    Case(
        "predict-socket-given",
        "predict {w}/dev/sock --checkpoint {w}/good.safetensors",
        1,
        "is a socket, not an image file",
    ),
    Case(
        "predict-device-given",
        "predict {w}/dev/full --checkpoint {w}/good.safetensors",
        1,
        "is a character device",
        root=True,
    ),
    Case(
        "predict-fifo-in-a-folder",
        "predict {w}/with-fifo --checkpoint {w}/good.safetensors",
        0,
        "b.png is a named pipe",
    ),
    Case("validate-fifo-among-images", "validate {w}/good-fifo --checkpoint {w}/good.safetensors", 0, "zz-fifo.png"),
    Case("validate-fifo-as-data", "validate {w}/dev/fifo --checkpoint {w}/good.safetensors", 2, "is a named pipe"),
    Case(
        "predict-fifo-as-checkpoint",
        "predict {w}/imgs --checkpoint {w}/dev/fifo",
        2,
        "is a named pipe (FIFO), not a weights file",
    ),
    # --- 10. WebDataset patterns and labels are bounded ----------------------------------------------------------------
    Case(
        "train-wds-range-10e10",
        WDS + "{w}/wds/s-{{0000000000..9999999999}}.tar",
        2,
        "names 10,000,000,000 shards",
        ("out/t",),
    ),
    Case("train-wds-range-backwards", WDS + "{w}/wds/s-{{9..2}}.tar", 2, "runs backwards", ("out/t",)),
    Case(
        "train-wds-label-huge",
        WDS + "{w}/wds/huge-{{0..0}}.tar",
        2,
        "huge-0.tar: sample 's001' has label '99999999'",
        ("out/t",),
    ),
    Case(
        "train-wds-label-negative", WDS + "{w}/wds/neg-0.tar", 2, "neg-0.tar: sample 's001' has label '-3'", ("out/t",)
    ),
    Case("train-wds-label-text", WDS + "{w}/wds/text-0.tar", 2, "sample 's001' has label 'cat'", ("out/t",)),
    # --- 13. Ctrl-C: exit 130, one line, what was written kept ---------------------------------------------------------
    Case(
        "validate-interrupted",
        VAL + " --results-file {w}/out/r.json",
        130,
        "interrupted (Ctrl-C)",
        ("out/r.json",),
        patch=_interrupt("mambaout.training.classify", "evaluate"),
    ),
    Case(
        "predict-interrupted",
        PREDICT,
        130,
        "interrupted (Ctrl-C)",
        patch=_interrupt("mambaout.inference.predictor:Predictor", "predict_batch"),
    ),
    Case(
        "export-interrupted",
        EXPORT + " -o {w}/out/i.onnx",
        130,
        "interrupted (Ctrl-C)",
        ("out/i.onnx",),
        patch=_interrupt("torch.onnx", "export"),
    ),
    Case(
        "data-bench-interrupted",
        "data-bench --data-train {w}/good --only cpu --workers 0 -b 2",
        130,
        "interrupted (Ctrl-C)",
        patch=_interrupt("mambaout.cli.data_bench", "_time"),
    ),
    # --- 14. a full disk through safetensors' own error type ------------------------------------------------------------
    Case(
        "export-hf-disk-full",
        EXPORT + " --format hf -o {w}/out/hf",
        2,
        "no space left on the device",
        ("out/hf/model.safetensors",),
        patch=_safetensors_disk_full,
    ),
    Case(
        "train-disk-full-safetensors",
        TRAIN + " -o {w}/out/full2",
        2,
        "last.safetensors: no space left",
        ("out/full2/last.safetensors",),
        patch=_safetensors_disk_full,
    ),
    # --- 15. control characters in names are escaped in text; --json is exact (see test_json_keeps_names_exact) -----
    Case(
        "predict-control-chars-in-file-name",
        "predict {w}/ctrl --checkpoint {w}/good.safetensors",
        0,
        "a\\x1b[2Jb\\n  99.99%",
        absent=("\x1b", "\n  99.99%"),
    ),
    Case(
        "predict-control-chars-in-class-names",
        (PREDICT + " --topk 3").replace("good.safetensors", "evil-names.safetensors"),
        0,
        "bee\\n  99.99%      7  forged",
        absent=("\x1b", "\x07", "\n  99.99%      7"),
    ),
    # --- 16. zero and negative counts, a forged JPEG, a finished run ---------------------------------------------------
    Case("data-bench-batches-0", "data-bench --data-train {w}/good --batches 0", 2, "--batches must be >= 1"),
    Case("data-bench-warmup-negative", "data-bench --data-train {w}/good --warmup -1", 2, "--warmup must be >= 0"),
    Case("data-bench-batch-size-0", "data-bench --data-train {w}/good -b 0", 2, "--batch-size must be >= 1"),
    Case("data-bench-workers-negative", "data-bench --data-train {w}/good -j -2", 2, "--workers must be >= 0"),
    Case("data-bench-img-size-0", "data-bench --data-train {w}/good --img-size 0", 2, "--img-size must be"),
    Case("benchmark-iters-0", "benchmark --models mambaout_femto --iters 0", 2, "--iters must be >= 1"),
    Case("benchmark-batch-size-0", "benchmark --models mambaout_femto --batch-size 0", 2, "--batch-size must be >= 1"),
    Case("benchmark-warmup-negative", "benchmark --models mambaout_femto --warmup -1", 2, "--warmup must be >= 0"),
    Case("kernels-max-seconds-nan", "kernels --max-seconds nan", 2, "--max-seconds must be a positive"),
    Case(
        "predict-forged-jpeg-size",
        "predict {w}/forged.jpg --checkpoint {w}/good.safetensors",
        0,
        "claims 6000 x 6000 pixels",
    ),
    Case(
        "train-resume-finished-run",
        "train --resume {w}/finished",
        0,
        "the run is finished (all 1 epochs done",
        ("finished/state.pt", "finished/train.log", "finished/config.yaml", "finished/summary.csv", "finished"),
        absent=("epoch 2 of 1",),
    ),
    # --- data round: data-bench through train's checks; folders read once per real file; shards named ---------------
    Case("data-bench-device-tpu", "data-bench --data-train {w}/good --device tpu", 2, "unknown device 'tpu'"),
    Case(
        "data-bench-device-cuda-7", "data-bench --data-train {w}/good --device cuda:7", 2, "sees no CUDA", patch=_no_gpu
    ),
    Case("data-bench-batch-over-the-set", DATA_BENCH + " -b 64", 2, "(6 images) is smaller than one batch of 64"),
    Case("data-bench-workers-1000", DATA_BENCH + " -j 1000", 2, "workers=1000: must be an integer in [0, 256]"),
    Case("data-bench-fifo", "data-bench --data-train {w}/dev/fifo", 2, "is a named pipe (FIFO)", ("dev",)),
    Case("data-bench-weights-as-data", "data-bench --data-train {w}/good.safetensors", 2, "is a file, not an Image"),
    Case(
        "data-bench-batches-over-an-epoch",
        DATA_BENCH + " --img-size 32 -b 2 --batches 10 --warmup 0",
        0,
        "6 images make 3 batch(es) of 2 per epoch",
    ),
    Case(
        "data-bench-no-data",
        "data-bench --only cpu",
        2,
        "names no data: pass --data-train PATH",
        absent=("--data-val", "--data DIR"),
    ),
    Case("validate-link-loop", VAL.replace("{w}/good", "{w}/loop", 1), 0, " 2 images at 32 px"),  # 82 before
    Case("validate-link-loop-named", VAL.replace("{w}/good", "{w}/loop", 1), 0, "not read again: ant/up"),
    Case(
        "train-link-loop",
        TRAIN_BASE + " --data-train {w}/loop --data-val {w}/loop -o {w}/out/loop",
        0,
        "on 2 images, 2 classes",
    ),
    Case("train-wds-no-labels", WDS + "{w}/wds/nocls-0.tar", 2, "nocls-0.tar: 2 of its 2 samples carry no .cls label"),
    Case(
        "train-wds-two-ranges",
        TRAIN_BASE + " --data-train wds/{w}/wds/m-{{000..002}}-{{0..1}}.tar --data-val wds/{w}/wds/m-000-0.tar"
        " -o {w}/out/wds2",
        0,
        "on 6 images, 2 classes",
    ),
]


def _data_round_world(w: Path) -> None:
    """A class folder holding a link to its parent (a loop), unlabelled shards, shards named by two brace ranges."""
    _png(w / "loop" / "ant" / "x.png", 40, 40)
    _png(w / "loop" / "bee" / "y.png", 40, 40, seed=1)
    (w / "loop" / "ant" / "up").symlink_to("..")
    image = (w / "imgs" / "ok.png").read_bytes()
    shards = {"nocls-0.tar": [(f"s{k}", {"png": image}) for k in range(2)]}
    for a in range(3):
        for b in range(2):
            shards[f"m-{a:03d}-{b}.tar"] = [(f"s{a}{b}", {"png": image, "cls": str((a + b) % 2).encode()})]
    for name, samples in shards.items():
        with tarfile.open(w / "wds" / name, "w") as tar:
            for key, parts in samples:
                for ext, payload in parts.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def _snapshot(world: Path, paths) -> dict:
    out = {}
    for rel in paths:
        p = world / rel
        if p.is_dir() and not p.is_symlink():
            # every entry by what it is: a device node replaced by a regular file must show
            out[rel] = sorted(_kind(q) for q in p.rglob("*"))
        elif p.is_symlink() or (p.exists() and not p.is_file()):
            out[rel] = _kind(p)
        elif p.is_file():
            out[rel] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        else:
            out[rel] = None
    return out


def _kind(p: Path) -> tuple:
    """What a path is, read without opening it: (name, file type, device numbers or link target, inode, size, mtime)."""
    st = p.lstat()
    target = os.readlink(p) if stat.S_ISLNK(st.st_mode) else st.st_rdev
    return (p.name, stat.S_IFMT(st.st_mode), target, st.st_ino, st.st_size, st.st_mtime_ns)


def run_case(case: Case, world: Path, capsys, monkeypatch, caplog=None) -> tuple[int, str]:
    for k, v in case.env.items():
        monkeypatch.setenv(k, v)
    if case.patch is not None:
        case.patch(monkeypatch)
    argv = case.argv.format(w=world).split()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    captured = capsys.readouterr()
    # warnings go to stderr through logging's last-resort handler; under pytest its capture handler takes them
    logged = caplog.text if caplog is not None else ""
    return code, captured.out + captured.err + logged


ALL_CASES = CASES + CASES_18


# a watchdog, not a measurement: a regression that opens a FIFO would block forever
@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", ALL_CASES, ids=[c.id for c in ALL_CASES])
def test_hostile(case: Case, world: Path, capsys, monkeypatch, caplog):
    if case.root and os.geteuid() != 0:
        pytest.skip("needs device nodes made with mknod (root)")
    before = _snapshot(world, ("good.safetensors", *case.untouched))
    code, output = run_case(case, world, capsys, monkeypatch, caplog)
    assert "Traceback" not in output, output
    assert code == case.code, output
    assert case.message in output, output
    for fragment in case.absent:
        assert fragment not in output, (fragment, output)
    assert _snapshot(world, ("good.safetensors", *case.untouched)) == before


def _validate(world: Path, data: str, capsys, tmp_path) -> tuple[dict, str]:
    out = tmp_path / f"{data}.json"
    code = main(
        ["validate", str(world / data), "--checkpoint", str(world / "good.safetensors"), "--results-file", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    return json.loads(out.read_text()), err


def test_validate_with_corrupt_files_gives_exactly_the_metric_without_them(world, capsys, tmp_path):
    clean, _ = _validate(world, "good", capsys, tmp_path)
    mixed, err = _validate(world, "mixed", capsys, tmp_path)
    for key in ("top1", "top5", "loss", "count"):
        assert mixed[key] == clean[key], key
    assert clean["count"] == 6 and clean["skipped"] == 0 and clean["skipped_files"] == []
    # 3 corrupt files and one over the decode budget, each named in the results file and on stderr
    assert mixed["skipped"] == 4
    assert sorted(Path(f).name for f in mixed["skipped_files"]) == ["huge.png"] + ["zz-bad.png"] * 3
    assert "huge.png" in err and "zz-bad.png" in err


# --- the run folder: one trainer at a time, stale temporaries removed, resume from anywhere -------------------------


def _train(world: Path, extra: str = "") -> list[str]:
    return (TRAIN.format(w=world) + " " + extra).split()


def test_second_trainer_on_a_locked_run_folder_is_refused(world, tmp_path, capsys):
    """A trainer holds its run folder; a second one on the same folder exits 2 and writes nothing there."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "mambaout", *_train(world, "--epochs 500"), "-o", str(run)],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None:
            if (run / ".lock").is_file() and (run / ".lock").read_text().strip() and (run / "config.yaml").is_file():
                break
            time.sleep(0.05)
        assert first.poll() is None, "the first trainer ended before the test could race it"
        before = _snapshot(run, ("config.yaml",))  # written once at the start: the second one must not rewrite it
        # even told to overwrite the folder's run (issue 11's guard), a second trainer must not while one is live
        code = main([*_train(world), "--seed", "1", "--overwrite", "-o", str(run)])
        err = capsys.readouterr().err
        assert code == 2 and f"in use by another mambaout train (pid {first.pid})" in err, err
        assert _snapshot(run, ("config.yaml",)) == before
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the kernel drops a killed trainer's lock: the folder is free again
    assert main([*_train(world), "--overwrite", "-o", str(run)]) == 0


def test_stale_temporaries_are_removed_at_the_next_start(world, tmp_path, caplog):
    """In a folder that provably holds a run, the temporaries our own writes leave are removed; nothing else is."""
    run = tmp_path / "run"
    assert main([*_train(world), "-o", str(run)]) == 0  # the run: its lock, config and state
    stale = [run / ".last.safetensors.x1y2z3ab.tmp", run / ".state.pt.abc_1234.tmp", run / ".curves.png.tmp.png"]
    for p in stale:
        p.write_bytes(b"\0" * 1000)
    # not ours: not hidden, a hidden name we never make, mkstemp's shape for a file a run does not write
    foreign = [run / "notes.tmp", run / ".notes.tmp", run / ".report.pdf.abcdefgh.tmp"]
    for p in foreign:
        p.write_text("not ours")
    assert main([*_train(world), "--overwrite", "-o", str(run)]) == 0
    assert not any(p.exists() for p in stale)
    assert all(p.read_text() == "not ours" for p in foreign)
    assert ".last.safetensors.x1y2z3ab.tmp" in caplog.text


def test_temporaries_in_a_folder_that_holds_no_run_are_left_alone(world, tmp_path):
    """--overwrite on a user's folder writes the run beside their files; names like ours are not proof of a run."""
    run = tmp_path / "mine"
    run.mkdir()
    theirs = [run / ".last.safetensors.abcdefgh.tmp", run / ".curves.png.tmp.png", run / "best.safetensors"]
    for p in theirs:
        p.write_text("the user's")
    assert main([*_train(world), "--overwrite", "-o", str(run)]) == 0
    assert all(p.read_text() == "the user's" for p in theirs[:2])
    assert (run / "state.pt").is_file()


def test_resume_from_another_working_directory(world, tmp_path, monkeypatch):
    """Relative data paths are stored resolved, so --resume works wherever it is started."""
    monkeypatch.chdir(world)
    args = (
        "train --data-train good --data-val good --model mambaout_test --img-size 32 -b 2 --global-batch 2 --epochs 2"
    )
    args += " --warmup-epochs 0 --cooldown-epochs 0 --workers 0 --no-progress --stop-after-epochs 1"
    assert main([*args.split(), "-o", str(tmp_path / "run")]) == 0
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert state["config"]["data_train"] == str(world / "good")
    monkeypatch.chdir(tmp_path.parent)
    assert main(["train", "--resume", str(tmp_path / "run"), "--no-progress"]) == 0
    assert len((tmp_path / "run" / "summary.csv").read_text().splitlines()) == 1 + 2


# --- the demo as a server: uploads bounded and removed, a taken port is one line ------------------------------------


def test_demo_uploads_go_to_a_private_folder_removed_at_shutdown(monkeypatch):
    pytest.importorskip("gradio", reason="the demo extra is not installed")
    import os

    import mambaout.inference.demo_app as demo_app

    seen = {}

    def fake_launch(app, host, port, max_file_size, **kwargs):  # stands in for serving until Ctrl+C
        folder = Path(os.environ["GRADIO_TEMP_DIR"])
        (folder / "upload.png").write_bytes(b"an upload")
        seen.update(folder=folder, host=host, max_file_size=max_file_size)

    monkeypatch.setattr(demo_app, "launch", fake_launch)
    assert main(["demo", "--model", "mambaout_test", "--random-weights", "--max-upload-mb", "5"]) == 0
    assert seen["host"] == "127.0.0.1" and seen["max_file_size"] == "5mb"
    assert seen["folder"].name.startswith("mambaout-demo-") and not seen["folder"].exists()


def test_demo_on_a_taken_port_is_one_line(capsys):
    pytest.importorskip("gradio", reason="the demo extra is not installed")
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["demo", "--model", "mambaout_test", "--random-weights", "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 2 and str(port) in err and "Traceback" not in err, err


# --- issue 18: what needs a second process (a signal, a pipe, a device as stdout), and effects beyond one line -------


def _cli(args: list[str], **kwargs) -> subprocess.Popen:
    """`python -m mambaout ARGS` running this checkout's package (not an installed copy), started as from a terminal:
    with Ctrl-C at its default. A test run started in the background of a script ignores SIGINT, its children
    inherit that, and Python then installs no KeyboardInterrupt handler, so the Ctrl-C tests would test nothing."""
    src = str(Path(mambaout.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    terminal = dict(preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return subprocess.Popen([sys.executable, "-m", "mambaout", *args], env=env, **terminal, **kwargs)


def _wait_for_line(stream, fragment: str, limit: int = 400) -> list[str]:
    """Lines of `stream` up to the first holding `fragment` (a blocking read: no timer decides anything)."""
    lines = []
    for _ in range(limit):
        line = stream.readline()
        if not line:
            break
        lines.append(line)
        if fragment in line:
            return lines
    raise AssertionError(f"{fragment!r} never came: {lines}")


@pytest.mark.timeout(600)
def test_ctrl_c_in_train_saves_a_resumable_state(world, tmp_path):
    """Ctrl-C after a reported step: exit 130, one line saying where the state was saved; --resume continues it."""
    run = tmp_path / "run"
    args = _train(world, "--epochs 50 --max-steps-per-epoch 3 --log-every 1").copy()
    args.remove("--no-progress")
    proc = _cli([*args, "-o", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_line(proc.stdout, "step 1/3")  # a step is done: the run is inside its first epoch
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    # where it stops depends on how far the run got when the signal came: after a step inside the epoch, or after
    # the epoch (the signal came during its last step); either way the state is saved and the message says so
    last = err.strip().splitlines()[-1]
    assert last.startswith("mambaout train: interrupted ") and f"state saved; continue with --resume {run}" in last
    assert torch.load(run / "state.pt", weights_only=True)["step"] >= 1
    code = subprocess.run(
        [sys.executable, "-m", "mambaout", "train", "--resume", str(run), "--epochs", "50", "--stop-after-epochs", "1"],
        env=dict(os.environ, PYTHONPATH=str(Path(mambaout.__file__).resolve().parents[1])),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert code.returncode == 0 and "resumed from" in code.stdout, code.stderr


@pytest.mark.timeout(600)
def test_ctrl_c_in_predict_keeps_what_was_printed(world, tmp_path):
    """Ctrl-C while predict is blocked writing results (a 4 KiB pipe nobody reads): exit 130, one line, the results
    already printed kept. The child cannot finish first: its 40 results do not fit the pipe."""
    import fcntl

    folder = tmp_path / "many"
    for i in range(40):
        _png(folder / f"{i:02d}.png", 40, 40, seed=i)
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, 1031, 4096)  # F_SETPIPE_SZ: the smallest pipe the kernel gives
    args = ["predict", str(folder), "--checkpoint", str(world / "good.safetensors"), "--batch-size", "1"]
    try:
        proc = _cli([*args, "--no-progress"], stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    with os.fdopen(read_end, "rb", buffering=0) as out:  # unbuffered: readline takes one line, not the pipe
        first = out.readline().decode()
        proc.send_signal(signal.SIGINT)
        rest = out.read().decode()
        err = proc.communicate(timeout=300)[1].decode()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "mambaout predict: interrupted (Ctrl-C); files already written are kept"
    assert first.strip().endswith("00.png") and "39.png" not in rest


def test_closed_pipe_ends_quietly(world):
    """`predict ... | head -1` after head has gone: exit 0 and nothing on stderr, as `cat` does."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # closed before the child starts: every write it makes fails with EPIPE
    try:
        proc = _cli(
            ["predict", str(world / "good"), "--checkpoint", str(world / "good.safetensors")],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        os.close(write_end)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and err == "", err


@pytest.mark.skipif(os.geteuid() != 0, reason="needs a device node made with mknod (root)")
def test_full_stdout_is_one_line(world):
    """stdout on a full device (our own node, like /dev/full): one line naming it, exit 2."""
    with open(world / "dev" / "full", "w") as full:
        proc = _cli(
            ["predict", str(world / "good"), "--checkpoint", str(world / "good.safetensors")],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
        )
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert err.strip().splitlines() == [
        f"mambaout predict: cannot write to stdout ({world / 'dev' / 'full'}): No space left on device"
    ], err


def test_a_real_full_disk_is_one_line_naming_the_file(world, tmp_path):
    """A 256 KiB tmpfs as the run folder: the first weights file does not fit (safetensors' own error type)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)]).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        proc = _cli(
            [*_train(world), "-o", str(mount / "run")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2 and "Traceback" not in err, err
        line = err.strip().splitlines()[-1]
        assert line.startswith("mambaout train: cannot write ") and "no space left on the device" in line, err
        assert not list((mount / "run").glob(".*.tmp*"))  # no half-written temporary left behind
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_json_keeps_names_exact(world, capsys):
    """--json holds the class names and file names as they are; only the text output escapes them."""
    assert main(["predict", str(world / "ctrl"), "--checkpoint", str(world / "evil-names.safetensors"), "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["path"] == str(next((world / "ctrl").iterdir()))
    assert "\x1b" in entry["path"] and "\n" in entry["path"]
    assert {t["label"] for t in entry["top"]} == {"ant\x1b[31m", "bee\n  99.99%      7  forged", "cat\x07"}


def test_a_run_beside_the_users_files_with_overwrite(world, tmp_path):
    """--overwrite is the way into a folder of one's own files: the run is written, their other files stay."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.tmp").write_text("mine")
    assert main([*_train(world), "-o", str(out)]) == 2
    assert main([*_train(world), "--overwrite", "-o", str(out)]) == 0
    assert (out / "notes.tmp").read_text() == "mine" and (out / "state.pt").is_file()


def test_export_hf_replaces_only_its_own_model_unasked(world, tmp_path, capsys):
    folder = tmp_path / "hf"
    args = ["export", "--checkpoint", str(world / "good.safetensors"), "--format", "hf", "-o", str(folder)]
    assert main(args) == 0
    assert main(args) == 0  # the same model again: updated in place
    config = folder / "config.json"
    config.write_text(json.dumps(dict(json.loads(config.read_text()), num_classes=9)))  # now another model's
    assert main(args) == 2 and "num_classes" in capsys.readouterr().err
    assert json.loads(config.read_text())["num_classes"] == 9
    assert main([*args, "--overwrite"]) == 0
    assert json.loads(config.read_text())["num_classes"] == 3


def test_an_output_symlink_to_a_file_stays_a_link(world, tmp_path):
    """Atomic replacement writes the file a link points to, and keeps the link."""
    target = tmp_path / "real.json"
    target.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    assert (
        main(
            [
                "validate",
                str(world / "good"),
                "--checkpoint",
                str(world / "good.safetensors"),
                "--results-file",
                str(link),
            ]
        )
        == 0
    )
    assert link.is_symlink() and json.loads(target.read_text())["count"] == 6


def test_create_model_refuses_another_models_weights_under_its_name(world):
    """The issue's case: a mambaout_test run loaded as mambaout_femto (its classifier width asked for) is refused."""
    from mambaout.weights.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="holds mambaout_test weights, but mambaout_femto was asked for"):
        mambaout.create_model("mambaout_femto", checkpoint=world / "good.safetensors", num_classes=5)
    # where the tensors fit the name asked for, it wins: the alias names the same network
    model = mambaout.create_model("mambaout_pico", checkpoint=world / "good.safetensors")
    assert model.model_name == "mambaout_test" and model.num_classes == 3


def test_weights_of_lower_precision_load_exactly(world, tmp_path, caplog):
    """float16 -> float32 is exact: loaded without a word; the values are the file's."""
    sd = mambaout.create_model("mambaout_test", num_classes=3).state_dict()
    half = {k: v.half() for k, v in sd.items()}
    save_weights(half, tmp_path / "half.safetensors", model="mambaout_test", model_kwargs={"num_classes": 3})
    model = mambaout.create_model(checkpoint=tmp_path / "half.safetensors")
    assert torch.equal(model.state_dict()["head.fc.weight"], half["head.fc.weight"].float())
    assert "converting" not in caplog.text
