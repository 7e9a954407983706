"""Post-training static int8 quantisation for CPU deployment, with ONNX Runtime's quantiser.

    mambaout export --checkpoint best.safetensors --format onnx-int8 --calib DIR [--calib-images 256] -o m-int8.onnx
    mambaout validate VAL_DIR --checkpoint m-int8.onnx        # top-1 of the int8 model, same transform and labels

Why ONNX Runtime's quantiser (of the maintained toolkits the issue names): it is already our export extra's
dependency, so int8 costs users no new package; its output is a plain ONNX file (QDQ) that ONNX Runtime runs with
integer kernels on any x86 or Arm CPU (AVX2, AVX512-VNNI, AMX, NEON) and that OpenVINO also reads; and calibration
is a short loop over our own eval transform. PyTorch's own stack (torch.ao PT2E with the X86 inductor quantiser)
needs `torch.compile` at load time and is in flux between releases; NNCF would add OpenVINO as a hard dependency.

What is quantised, and why: the matmuls (`fc1`, `fc2`, the head) and the convs, which hold almost all MACs, with
int8 weights per output channel and uint8 activations (per tensor, MinMax over the calibration images).
LayerNorm, GELU and the gate product stay fp32, between dequantise/quantise pairs ONNX Runtime fuses into its
integer kernels. On CPUs without VNNI (AVX2), u8 x s8 products can saturate in the 16-bit adds of
`vpmaddubsw`; `reduce_range` (7-bit weights) avoids that and is the default here, as ONNX Runtime advises.
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
from mambaout.inference.predictor import find_images
from mambaout.utils.optional import require

__all__ = ["calibration_images", "quantize_int8", "QUANTIZED_OPS"]

QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")
ORT_INSTALL = "onnxruntime  (or the export extra: 'mambaout[export]')"


def calibration_images(folder: str | os.PathLike, transform, num_images: int = 256, seed: int = 0) -> np.ndarray:
    """`num_images` images drawn (seeded) from `folder` (searched recursively), through `transform`: `[N, 3, H, W]`.

    Unreadable files are skipped and replaced by others; fewer readable images than asked for uses them all.

    Raises:
        ValueError: no readable image in `folder`.
    """
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
    """Write an int8 (QDQ) copy of the fp32 ONNX file at `onnx_path`, calibrated on `images` `[N, 3, H, W]`.

    The metadata `mambaout export` stored (model, class names, eval transform) is carried over, plus a
    `quantization` entry recording how it was quantised.

    Args:
        onnx_path: An fp32 export (dynamic batch axis).
        output: The int8 `.onnx` to write.
        images: Calibration images, already through the model's eval transform.
        batch_size: Images per calibration forward.
        per_channel: One weight scale per output channel (else one per tensor).
        reduce_range: 7-bit weights, for CPUs without VNNI (see the module docstring).
        op_types: ONNX ops to quantise; the rest stays fp32.
    """
    onnx = require("onnx", "int8 quantisation", "onnx  (or the export extra: 'mambaout[export]')")
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
    meta["quantization"] = json.dumps(
        dict(
            tool="onnxruntime.quantization.quantize_static",
            format="QDQ",
            weights="int8 per-channel" if per_channel else "int8 per-tensor",
            activations="uint8 per-tensor, MinMax",
            reduce_range=reduce_range,
            ops=list(op_types),
            calibration_images=int(len(images)),
        )
    )
    onnx.helper.set_model_props(quantized, meta)  # replaces the quantiser's own entries
    onnx.save(quantized, str(output))
    return output
