"""Deploying a trained MambaOut on CPUs: int8 quantisation and the runtimes users deploy with (bf16 lives in
`mambaout.inference.precision`, beside the Predictor that uses it).

- `quantize`: post-training static int8 quantisation with ONNX Runtime's quantiser, calibrated on a folder of images.
- `runtimes`: the exported model run by ONNX Runtime or OpenVINO behind the `nn.Module` interface our commands take.
- `benchmark`: `mambaout benchmark --runtimes`, every way of running one model side by side, with a roofline line.

Nothing here changes the model: each path takes our `MambaOut` (or its export) as it is.
"""
