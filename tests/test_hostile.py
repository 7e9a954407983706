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
    return w


def _no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _disk_full(monkeypatch):
    """torch's writer on a full disk: a RuntimeError from inline_container.cc after half the bytes."""

    def save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4 vs 1024")

    monkeypatch.setattr(torch, "save", save)


# one optimizer step on the six-image world set (no data argument would mean the 1,797 digits)
TRAIN_BASE = "train --model mambaout_test --img-size 32 -b 2 --global-batch 2 --max-steps-per-epoch 1 --epochs 1"
TRAIN_BASE += " --warmup-epochs 0 --cooldown-epochs 0 --workers 0 --no-progress"
TRAIN = TRAIN_BASE + " --data-train {w}/good --data-val {w}/good"


CASES = [
    # --- training options that crashed late, were silently accepted, or exhausted memory --------------------------
    Case("train-eval-every-0", TRAIN + " --eval-every 0 -o {w}/out/t", 2, "eval_every=", ("out/t",)),
    Case(
        "train-auto-augment-garbage",
        TRAIN + " --auto-augment garbage -o {w}/out/t",
        2,
        "auto_augment='garbage': not a timm augmentation string",
    ),
    Case("train-threads-negative", TRAIN + " --threads -1 -o {w}/out/t", 2, "threads=", ("out/t",)),
    Case("train-threads-zero", TRAIN + " --threads 0 -o {w}/out/t", 2, "threads=", ("out/t",)),
    Case("train-weight-decay-negative", TRAIN + " --weight-decay -5 -o {w}/out/t", 2, "weight_decay="),
    Case("train-smoothing-2", TRAIN + " --smoothing 2 -o {w}/out/t", 2, "smoothing=", ("out/t",)),
    Case("train-smoothing-1", TRAIN + " --smoothing 1 -o {w}/out/t", 2, "smoothing=", ("out/t",)),
    Case("train-checkpoint-every-negative", TRAIN + " --checkpoint-every -1 -o {w}/out/t", 2, "checkpoint_every"),
    Case("train-keep-top-k-negative", TRAIN + " --keep-top-k -1 -o {w}/out/t", 2, "keep_top_k="),
    Case("train-img-size-7", TRAIN + " --img-size 7 -o {w}/out/t", 2, "img_size=", ("out/t",)),
    Case("train-img-size-10000", TRAIN + " --img-size 10000 -b 2 -o {w}/out/t", 2, "img_size=", ("out/t",)),
    Case("train-epochs-0", TRAIN + " --epochs 0 -o {w}/out/t", 2, "epochs=", ("out/t",)),
    Case("train-lr-negative", TRAIN + " --lr -1 -o {w}/out/t", 2, "lr=", ("out/t",)),
    Case("train-reprob-2", TRAIN + " --reprob 2 -o {w}/out/t", 2, "reprob=", ("out/t",)),
    Case("train-workers-negative", TRAIN + " --workers -1 -o {w}/out/t", 2, "workers=", ("out/t",)),
    Case("train-global-batch-0", TRAIN + " --global-batch 0 -o {w}/out/t", 2, "global_batch="),
    Case("train-stop-after-steps-0", TRAIN + " --stop-after-steps 0 -o {w}/out/t", 2, "stop_after_steps="),
    Case("train-device-tpu", TRAIN + " --device tpu -o {w}/out/t", 2, "invalid choice", ("out/t",)),
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
    Case("train-unknown-set-key", TRAIN + " --set nope=1 -o {w}/out/t", 2, "unknown options", ("out/t",)),
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
        "demo-port-not-a-number", "demo --model mambaout_test --random-weights --port http", 2, "expected a port number"
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


def _snapshot(world: Path, paths) -> dict:
    out = {}
    for rel in paths:
        p = world / rel
        if p.is_file():
            out[rel] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        elif p.is_dir():
            out[rel] = sorted(str(q.relative_to(p)) for q in p.rglob("*"))
        else:
            out[rel] = None
    return out


def run_case(case: Case, world: Path, capsys, monkeypatch) -> tuple[int, str]:
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
    return code, captured.out + captured.err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile(case: Case, world: Path, capsys, monkeypatch):
    before = _snapshot(world, ("good.safetensors", *case.untouched))
    code, output = run_case(case, world, capsys, monkeypatch)
    assert "Traceback" not in output, output
    assert code == case.code, output
    assert case.message in output, output
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
    run = tmp_path / "run"
    run.mkdir()
    stale = [run / ".last.safetensors.x1y2z3.tmp", run / ".state.pt.abc.tmp", run / ".curves.png.tmp.png"]
    for p in stale:
        p.write_bytes(b"\0" * 1000)
    (run / "notes.tmp").write_text("not ours: not hidden")
    assert main([*_train(world), "-o", str(run)]) == 0
    assert not any(p.exists() for p in stale) and (run / "notes.tmp").exists()
    assert not list(run.glob(".*.tmp*"))
    assert ".last.safetensors.x1y2z3.tmp" in caplog.text


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
