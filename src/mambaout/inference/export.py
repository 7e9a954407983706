"""Exporting a MambaOut for deployment: ONNX (dynamic batch axis) and `torch.export` programs (`.pt2`), each carrying
the model name, its arguments, the class names and the eval transform (ONNX: `metadata_props`; `.pt2`: the
`mambaout.json` extra file), so a runtime can preprocess and label without our package (docs/export.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from mambaout.data.image import EvalSettings
from mambaout.inference.predictor import class_names_for
from mambaout.utils.files import atomic_write

INPUT_NAME, OUTPUT_NAME = "input", "logits"
METADATA_FILE = "mambaout.json"  # name of the metadata entry inside a .pt2 archive
DEFAULT_OPSET = 18  # the lowest opset torch's ONNX exporter writes (none older); onnxruntime >= 1.14 runs it


def export_metadata(model: nn.Module, img_size: int | None = None) -> dict:
    """The facts stored beside an exported graph (the same contract as our checkpoints' metadata); with `img_size`,
    the eval transform's input size is the exported graph's, not the model's default."""
    names = class_names_for(model)
    meta = {
        "model": getattr(model, "model_name", type(model).__name__),
        "model_kwargs": getattr(model, "model_kwargs", {}),
        "class_names": list(names.names),
        "eval_config": EvalSettings.from_dict(getattr(model, "pretrained_cfg", None) or {}).to_dict(),
    }
    if img_size is not None:
        meta["eval_config"]["input_size"][1:] = [img_size, img_size]
    if names.synsets is not None:
        meta["synsets"] = list(names.synsets)
    return meta


def _prepare(model: nn.Module, img_size: int | None, metadata: dict | None) -> tuple[nn.Module, torch.Tensor, dict]:
    """(the model in eval mode, an example input, the metadata to store) of an export."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    in_chans, h, w = cfg.get("input_size", (3, 224, 224))
    if img_size is not None:
        if img_size < 32:
            raise ValueError(f"img_size must be >= 32 (the network downsamples by 32), got {img_size}")
        h = w = img_size
    meta = export_metadata(model, img_size) if metadata is None else metadata
    # batch 2, not 1: torch.export specialises a dimension of size 0 or 1 to a constant
    return model.eval(), torch.randn(2, in_chans, h, w), meta


def _batch_dim():
    return {0: torch.export.Dim("batch", min=1, max=65536)}


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    img_size: int | None = None,
    opset: int = DEFAULT_OPSET,
    metadata: dict | None = None,
) -> Path:
    """Write `model` (put in eval mode) as ONNX: input `input` `[batch, 3, H, W]`, output `logits` `[batch,
    num_classes]`. The batch axis is dynamic; H = W = `img_size` (default: the model's eval input size; a multiple
    of 32 keeps every stage's map whole). `metadata` is stored as `metadata_props` (values JSON-encoded); default
    `export_metadata(model, img_size)`."""
    import onnx

    check_opset(opset)
    model, x, meta = _prepare(model, img_size, metadata)

    def write(tmp: str) -> None:
        with torch.no_grad(), _converter_log() as converter:
            torch.onnx.export(
                model,
                (x,),
                tmp,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=(_batch_dim(),),
                opset_version=opset,
                dynamo=True,
                verbose=False,
                external_data=False,
            )
        proto = onnx.load(tmp)
        # torch falls back to its own opset when it cannot convert to the one asked for: never write another quietly
        wrote = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        if wrote != opset:
            why = next((str(r.exc_info[1]).strip().splitlines()[-1] for r in converter if r.exc_info), "")
            raise ValueError(
                f"torch's ONNX exporter could not convert this model to opset {opset}"
                + (f" ({why.split(': ')[-1]})" if why else "")
                + f" and fell back to {wrote}; pass a lower --opset ({DEFAULT_OPSET} always works)"
            )
        _save_onnx(proto, tmp, meta)

    return atomic_write(path, write)  # a failed or interrupted export leaves no half-written file


def _save_onnx(proto, path: str, metadata: dict) -> None:
    import onnx

    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(proto, path)


@contextlib.contextmanager
def _converter_log():
    """Collect what onnxscript's version converter logs (a traceback when it gives up) instead of printing it."""
    log = logging.getLogger("onnxscript.version_converter")
    handler, propagate = logging.handlers.BufferingHandler(capacity=1 << 30), log.propagate  # never flushes
    log.addHandler(handler)
    log.propagate = False
    try:
        yield handler.buffer
    finally:
        log.removeHandler(handler)
        log.propagate = propagate


def check_opset(opset) -> int:
    """`opset` if an export can target it (up to the newest the installed `onnx` knows), else ValueError naming the
    range (ImportError without `onnx`)."""
    import onnx

    ok = range(DEFAULT_OPSET, onnx.defs.onnx_opset_version() + 1)
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in ok:
        raise ValueError(f"--opset must be an integer from {ok.start} to {ok.stop - 1}, got {opset!r}")
    return opset


def read_onnx_metadata(path_or_session) -> dict:
    """The metadata `export_onnx` stored, from a path or an `onnxruntime.InferenceSession`."""
    if hasattr(path_or_session, "get_modelmeta"):
        props = path_or_session.get_modelmeta().custom_metadata_map
    else:
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path_or_session), load_external_data=False).metadata_props}
    return {k: json.loads(v) for k, v in props.items()}


def export_pt2(
    model: nn.Module, path: str | os.PathLike, img_size: int | None = None, metadata: dict | None = None
) -> Path:
    """Write `model` as a `torch.export` program (dynamic batch), loadable with `torch.export.load`; the metadata is
    the archive's `mambaout.json` extra file (`load_pt2` reads both)."""
    model, x, meta = _prepare(model, img_size, metadata)
    with torch.no_grad():
        program = torch.export.export(model, (x,), dynamic_shapes=(_batch_dim(),))
    extra = {METADATA_FILE: json.dumps(meta)}
    return atomic_write(path, lambda tmp: torch.export.save(program, tmp, extra_files=extra), suffix=".pt2")


DETECTOR_OPSET = 11  # torchvision's detection models are tested for ONNX at opset 11, through the TorchScript exporter


def export_detector_onnx(model: nn.Module, path: str | os.PathLike, size: tuple[int, int], metadata: dict) -> Path:
    """Write a torchvision Mask / Faster R-CNN as ONNX by torchvision's supported path: the TorchScript exporter
    (`dynamo=False`) at opset 11, one image `images` `[3, H, W]` (RGB in [0, 1]; H and W dynamic) in, `boxes`
    `[N, 4]` (x1, y1, x2, y2 in the input's pixels), `labels` `[N]`, `scores` `[N]` (and `masks` `[N, 1, H, W]`
    probabilities) out. torch's dynamo exporter cannot take these models: `torch.export` stops at a guard on a
    data-dependent size in `torchvision.ops.batched_nms` (GuardOnDataDependentSymNode). `size`: (H, W) of the
    example image the graph is traced with; `metadata` is stored as `metadata_props` (values JSON-encoded).
    """
    import onnx

    model = model.eval()
    x = torch.rand(3, *size)
    has_mask = getattr(model.roi_heads, "has_mask", lambda: False)()
    outputs = ["boxes", "labels", "scores"] + (["masks"] if has_mask else [])
    axes = {"images": [1, 2], "boxes": [0], "labels": [0], "scores": [0], "masks": [0, 2, 3]}

    def write(tmp: str) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter warns of every traced Python number: none of it is ours
            torch.onnx.export(
                model,
                ([x],),
                tmp,
                input_names=["images"],
                output_names=outputs,
                dynamic_axes={k: v for k, v in axes.items() if k == "images" or k in outputs},
                opset_version=DETECTOR_OPSET,
                dynamo=False,
            )
        _save_onnx(onnx.load(tmp), tmp, metadata)

    return atomic_write(path, write)


def load_pt2(path: str | os.PathLike) -> tuple[torch.export.ExportedProgram, dict]:
    """The program and metadata of a `.pt2` written by `export_pt2` (call `program.module()(x)` to run it)."""
    extra = {METADATA_FILE: ""}
    program = torch.export.load(str(path), extra_files=extra)
    return program, json.loads(extra[METADATA_FILE] or "{}")
