"""Post-training static int8 quantisation for CPU deployment, with ONNX Runtime's quantiser.

    mambaout export --checkpoint best.safetensors --format onnx-int8 --calib DIR [--calib-images 256] -o m-int8.onnx
    mambaout validate VAL_DIR --checkpoint m-int8.onnx        # top-1 of the int8 model, same transform and labels

Why ONNX Runtime's quantiser: already our export extra's dependency; its output is plain ONNX (QDQ) that ONNX Runtime
runs with integer kernels on any x86 or Arm CPU and OpenVINO also reads. torch.ao PT2E needs `torch.compile` at load
time and is in flux; NNCF would make OpenVINO a hard dependency.

Quantised: the matmuls and convs (almost all MACs), int8 weights per output channel, uint8 activations per tensor
(MinMax); LayerNorm, GELU and the gate product stay fp32. `reduce_range` (7-bit weights, the default, as ONNX Runtime
advises): without VNNI (AVX2), u8 x s8 products can saturate in the 16-bit adds of `vpmaddubsw`.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from mambaout.data.image import load_image
from mambaout.deploy.runtimes import ONNX_INSTALL, ORT_INSTALL
from mambaout.inference.predictor import find_images
from mambaout.utils.optional import require

__all__ = ["calibration_images", "quantize_int8", "QUANTIZED_OPS"]

QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")


def calibration_images(folder: str | os.PathLike, transform, num_images: int = 256, seed: int = 0) -> np.ndarray:
    """`num_images` images drawn (seeded) from `folder` (searched recursively), through `transform`: `[N, 3, H, W]`.
    Unreadable files are skipped for others; fewer readable images than asked for are all used; none: ValueError."""
    if num_images < 1:
        raise ValueError(f"the calibration needs at least 1 image, got num_images={num_images}")
    paths = find_images([folder])
    random.Random(seed).shuffle(paths)
    images = []
    for p in paths:
        try:
            images.append(transform(load_image(p)))
        except ValueError:
            continue  # an unreadable file: take the next one
        if len(images) == num_images:
            break
    if not images:
        raise ValueError(f"no readable image under {folder} to calibrate on; pass --calib DIR with images in it")
    return torch.stack(images).numpy()  # [N, 3, H, W]


def _reader(images: np.ndarray, input_name: str, batch_size: int):
    from onnxruntime.quantization import CalibrationDataReader

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{input_name: images[i : i + batch_size]} for i in range(0, len(images), batch_size)])

        def get_next(self):
            return next(self.batches, None)

    return Batches()


def quantize_int8(
    onnx_path: str | os.PathLike,
    output: str | os.PathLike,
    images: np.ndarray,
    batch_size: int = 16,
    per_channel: bool = True,
    reduce_range: bool = True,
    op_types: tuple[str, ...] = QUANTIZED_OPS,
) -> Path:
    """Write an int8 (QDQ) copy of the fp32 ONNX file at `onnx_path` (dynamic batch axis) to `output`, calibrated on
    `images` `[N, 3, H, W]` (already through the eval transform), `batch_size` per forward; `op_types` are quantised,
    the rest stays fp32. The metadata `mambaout export` stored is carried over, plus a `quantization` entry."""
    onnx = require("onnx", "int8 quantisation", ONNX_INSTALL)
    require("onnxruntime", "int8 quantisation", ORT_INSTALL)
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    source = onnx.load(str(onnx_path))
    meta = {p.key: p.value for p in source.metadata_props}
    input_name = source.graph.input[0].name
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # shape inference and graph fusions first, as ONNX Runtime's quantiser asks (its `quant_pre_process`)
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(output),
            _reader(images, input_name, batch_size),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(op_types),
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"CalibTensorRangeSymmetric": False},
        )
    quantized = onnx.load(str(output))
    how = dict(tool="onnxruntime.quantization.quantize_static", format="QDQ")
    how.update(weights="int8 per-channel" if per_channel else "int8 per-tensor", activations="uint8 per-tensor, MinMax")
    how.update(reduce_range=reduce_range, ops=list(op_types), calibration_images=int(len(images)))
    meta["quantization"] = json.dumps(how)
    onnx.helper.set_model_props(quantized, meta)  # replaces the quantiser's own entries
    onnx.save(quantized, str(output))
    return output
