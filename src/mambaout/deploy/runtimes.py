"""An exported MambaOut run by ONNX Runtime or OpenVINO, behind the `nn.Module` interface our commands take.

`load_runtime_model('model.onnx')` (or an OpenVINO `.xml`) gives a module whose forward runs the runtime on CPU and
which carries what `mambaout validate` and `Predictor` read from a model: `pretrained_cfg` (the eval transform),
`num_classes`, `class_names` and `model_name`, from the metadata `mambaout export` stored beside the graph. So an
int8 or OpenVINO export is scored by the same code, on the same images, as the PyTorch model it came from.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mambaout.inference.export import DEFAULT_OPSET, export_metadata, export_onnx, read_onnx_metadata
from mambaout.utils.files import special_kind
from mambaout.utils.optional import require

__all__ = ["RUNTIME_SUFFIXES", "RuntimeModel", "OnnxRuntimeModel", "OpenVinoModel", "load_runtime_model", "ort_session"]

RUNTIME_SUFFIXES = (".onnx", ".xml")  # ONNX (fp32 or int8) and OpenVINO IR
OPENVINO_INSTALL = "openvino  (or the extra: 'mambaout[openvino]')"
ORT_INSTALL = "onnxruntime  (or the export extra: 'mambaout[export]')"
ONNX_INSTALL = "onnx  (or the export extra: 'mambaout[export]')"


def ort_session(path: str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime CPU session set up for latency as its threading guide recommends (docs/performance.md), with
    `threads` intra-op threads (default torch's count)."""
    ort = require("onnxruntime", "running an ONNX model", ORT_INSTALL)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_finite_arrays(arrays, source: str) -> None:
    """Refuse an exported graph whose floating-point weights hold NaN or Inf (its outputs would be NaN: a metric
    of chance with exit 0), naming the first such weight, as PyTorch weights are refused."""
    for name, value in arrays:
        if np.issubdtype(value.dtype, np.floating) and value.size and not np.isfinite(value).all():
            n = int((~np.isfinite(value)).sum())
            raise ValueError(
                f"{source}: weight {name!r} holds non-finite values ({n} of {value.size}); the exported model is "
                "damaged: export it again from finite weights"
            )


class RuntimeModel(nn.Module):
    """Base: the metadata of an exported model as the attributes of one of ours; subclasses run the graph."""

    runtime = "?"

    def __init__(self, path: str | os.PathLike, meta: dict):
        super().__init__()
        self.path = Path(path)
        cfg = dict(meta.get("eval_config") or {})
        if "input_size" not in cfg:
            raise ValueError(
                f"{path} carries no eval settings (input_size, mean, std): export it with `mambaout export`, "
                "which stores them beside the graph"
            )
        self.pretrained_cfg = cfg
        self.model_name = f"{meta.get('model', 'model')} [{self.runtime}]"
        self.model_kwargs = meta.get("model_kwargs", {})
        names = meta.get("synsets") or meta.get("class_names")  # folder names first: validate matches on those
        self.class_names = list(names) if names else None
        self.num_classes = len(names) if names else int(meta.get("num_classes", 0))

    def _run(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, num_classes] fp32 logits
        x = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(np.ascontiguousarray(self._run(x), dtype=np.float32))


class OnnxRuntimeModel(RuntimeModel):
    """An ONNX file written by `mambaout export` (fp32 or `--format onnx-int8`) run by ONNX Runtime on CPU."""

    runtime = "onnxruntime"

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        onnx = require("onnx", "reading an ONNX model", ONNX_INSTALL)
        from onnx import numpy_helper

        graph = onnx.load(str(path)).graph
        check_finite_arrays(((t.name, numpy_helper.to_array(t)) for t in graph.initializer), str(path))
        self.session = ort_session(path, threads)
        super().__init__(path, read_onnx_metadata(self.session))
        self.input_name = self.session.get_inputs()[0].name

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]


class OpenVinoModel(RuntimeModel):
    """An OpenVINO IR (`.xml` + `.bin` + metadata `.json`, from `mambaout export --format openvino`) compiled for the
    CPU with the LATENCY hint (one request at a time, as OpenVINO's CPU guide recommends); `precision` `'f32'` or
    `'bf16'` (a hint: f32 where the CPU lacks bf16), `threads` default torch's."""

    runtime = "openvino"

    def __init__(self, path: str | os.PathLike, precision: str = "f32", threads: int | None = None):
        ov = require("openvino", "running an OpenVINO model", OPENVINO_INSTALL)
        path = Path(path)
        meta_file = path.with_name(path.stem + ".json")
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        config = {
            "INFERENCE_PRECISION_HINT": precision,
            "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
            "PERFORMANCE_HINT": "LATENCY",
        }
        core = ov.Core()
        model = core.read_model(str(path))
        constants = (op for op in model.get_ordered_ops() if op.get_type_name() == "Constant")
        check_finite_arrays(((op.get_friendly_name(), op.get_data()) for op in constants), str(path))
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        super().__init__(path, meta)

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.request.infer({0: x})[self.compiled.output(0)]


def load_runtime_model(path: str | os.PathLike, threads: int | None = None) -> RuntimeModel:
    """The exported model at `path` (`.onnx`: ONNX Runtime; `.xml`: OpenVINO) as a module (see module docstring)."""
    path = Path(path)
    kind = special_kind(path)
    if kind or path.is_dir():
        raise ValueError(f"{path} is {kind or 'a folder'}, not an exported model file; pass the .onnx/.xml file")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    runtime = {".onnx": OnnxRuntimeModel, ".xml": OpenVinoModel}.get(path.suffix.lower())
    if runtime is None:
        raise ValueError(f"{path}: an exported model is a .onnx or an OpenVINO .xml file, got {path.suffix!r}")
    return runtime(path, threads=threads)


def is_runtime_file(path: str | os.PathLike | None) -> bool:
    """Whether `path` names an exported model (run by a runtime) rather than PyTorch weights."""
    return path is not None and Path(str(path)).suffix.lower() in RUNTIME_SUFFIXES


def export_openvino(
    model: nn.Module, path: str | os.PathLike, img_size: int | None = None, opset: int | None = None
) -> Path:
    """Write `model` as OpenVINO IR converted from our ONNX export (dynamic batch): `path` (`.xml`), the fp32 weights
    (`.bin`) and the metadata (`.json`) beside it."""
    ov = require("openvino", "--format openvino", OPENVINO_INSTALL)
    path = Path(path)
    if path.suffix.lower() != ".xml":
        raise ValueError(f"an OpenVINO model is a .xml file (weights in a .bin beside it), got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(model, Path(tmp) / "model.onnx", img_size, opset or DEFAULT_OPSET)
        ov_model = ov.convert_model(str(onnx_path))
        ov.save_model(ov_model, str(path), compress_to_fp16=False)  # fp32 weights: the logits equal PyTorch's
    meta = export_metadata(model, img_size)
    path.with_name(path.stem + ".json").write_text(json.dumps(meta, indent=1) + "\n")
    return path
