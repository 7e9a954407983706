"""Deploying a trained MambaOut on CPUs: int8 quantisation (`quantize`), the exported model run by ONNX Runtime or
OpenVINO (`runtimes`), and `mambaout benchmark --runtimes` (`benchmark`). bf16 lives in `mambaout.inference.precision`,
beside the Predictor that uses it. Nothing here changes the model: each path takes our `MambaOut` (or its export)."""
