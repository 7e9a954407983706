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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mambaout
from mambaout.checkpoint import save_weights
from mambaout.cli import main

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
    return w


CASES = [
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
