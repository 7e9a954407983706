"""Inference on CPU: `mambaout predict`'s pipeline vs timm's, ONNX Runtime vs PyTorch, measured in one run.

    flock /tmp/mambaout-cpu.lock python benchmarks/inference_cpu.py --tar ../shared/data/imagenet-sample-1k-112.tar

1. Throughput over a folder of real photos (decode -> eval transform -> forward -> top-5), images/s, for our
   `Predictor` and for the same work written with timm (`timm.create_model` + its resolved eval transform),
   with the same weights, batch size and thread count, interleaved batch by batch; prints the ratio and checks
   both give the same top-1.
2. ONNX: export, max |ONNX Runtime - PyTorch| over real photos, and batch-1 latency of each, interleaved.

Weights are random unless --checkpoint is given: speed and agreement do not depend on them.
"""

from __future__ import annotations

import argparse
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


class TimmPipeline:
    """The same work with timm's own model and transform."""

    def __init__(self, model_name: str, state_dict: dict):
        import timm
        from timm.data import create_transform, resolve_data_config

        self.model = timm.create_model(model_name, pretrained=False, num_classes=1000).eval()
        self.model.load_state_dict(state_dict)
        self.transform = create_transform(**resolve_data_config(model=self.model))

    @torch.inference_mode()
    def __call__(self, paths: list[Path]) -> list[int]:
        from PIL import Image

        x = torch.stack([self.transform(Image.open(p).convert("RGB")) for p in paths])
        return self.model(x).softmax(-1).topk(5, dim=-1).indices[:, 0].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tar", default="../shared/data/imagenet-sample-1k-112.tar", help="ImageFolder tar")
    parser.add_argument("--model", default="mambaout_femto")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--latency-runs", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import onnxruntime as ort

    import mambaout
    from mambaout.inference import Predictor
    from mambaout.inference.export import export_onnx

    torch.manual_seed(0)
    model = mambaout.create_model(args.model, checkpoint=args.checkpoint).eval()
    print(
        f"model {args.model} ({'random weights' if args.checkpoint is None else args.checkpoint}), "
        f"input {model.pretrained_cfg['input_size']}, batch {args.batch_size}, torch threads {args.threads}, "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        with tarfile.open(args.tar) as tar:
            tar.extractall(folder, filter="data")
        n = sum(1 for p in folder.rglob("*") if p.is_file())

        # --- 1. throughput: ours vs timm, same weights, same images -------------------------------------------------
        predictor = Predictor(model, topk=5, device="cpu")
        paths = sorted(p for p in folder.rglob("*") if p.is_file())
        batches = [paths[i : i + args.batch_size] for i in range(0, n, args.batch_size)]
        compare = args.checkpoint is None and model.num_classes == 1000
        timm_run = TimmPipeline(args.model, model.state_dict()) if compare else None
        predictor.predict(batches[0], batch_size=args.batch_size)  # warm-up both
        if compare:
            timm_run(batches[0])
        # interleaved batch by batch, alternating which goes first: load from other processes hits both alike
        t_ours = t_timm = 0.0
        same = 0
        for i, batch in enumerate(batches):
            for who in ("ours", "timm") if i % 2 == 0 else ("timm", "ours"):
                if who == "timm" and not compare:
                    continue
                start = time.perf_counter()
                if who == "ours":
                    ours = predictor.predict(batch, batch_size=args.batch_size)
                    t_ours += time.perf_counter() - start
                else:
                    theirs = timm_run(batch)
                    t_timm += time.perf_counter() - start
            if compare:
                same += sum(o["top"][0]["index"] == t for o, t in zip(ours, theirs))
        start = time.perf_counter()
        predictor.predict([folder], batch_size=args.batch_size, num_workers=1)
        t_ours_w1 = time.perf_counter() - start
        print(f"throughput over {n} photos (decode + transform + forward + top-5), batch {args.batch_size}:")
        print(f"  mambaout Predictor, decode inline : {n / t_ours:7.1f} img/s ({t_ours:.1f} s)")
        if compare:
            print(f"  timm create_model + its transform : {n / t_timm:7.1f} img/s ({t_timm:.1f} s)")
            print(f"  ratio ours/timm                   : {t_timm / t_ours:7.2f}x; same top-1 on {same}/{n}")
        if compare:  # forward only, to tell the network's share of the gap from the pipeline's
            x = torch.stack([predictor.preprocess(p) for p in batches[0]])  # [B, 3, H, W]
            f_ours = f_timm = 0.0
            with torch.inference_mode():
                for i in range(6):
                    for who in ("ours", "timm") if i % 2 == 0 else ("timm", "ours"):
                        start = time.perf_counter()
                        (model if who == "ours" else timm_run.model)(x)
                        if who == "ours":
                            f_ours += time.perf_counter() - start
                        else:
                            f_timm += time.perf_counter() - start
            k = 6 * len(x)
            print(f"  forward only: mambaout.MambaOut {k / f_ours:.1f} img/s, timm's {k / f_timm:.1f} img/s")
        print(f"  mambaout Predictor, 1 decode proc : {n / t_ours_w1:7.1f} img/s ({t_ours_w1:.1f} s, separate run)")

        # --- 2. ONNX: agreement and batch-1 latency -----------------------------------------------------------------
        onnx_path = export_onnx(model, Path(tmp) / "model.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        x = torch.stack([predictor.preprocess(p) for p in paths[:: max(1, n // 64)][:64]])  # [64, 3, H, W] real photos
        diffs = []
        with torch.inference_mode():
            for i in range(0, len(x), 16):
                want = model(x[i : i + 16]).numpy()
                got = session.run(None, {name: x[i : i + 16].numpy()})[0]
                diffs.append(float(np.abs(got - want).max()))
        print(f"ONNX Runtime vs PyTorch, {len(x)} real photos in batches of 16: max abs diff {max(diffs):.2e}")

        one = x[:1]
        t_torch, t_ort = [], []
        with torch.inference_mode():
            for _ in range(5):  # warm-up both
                model(one)
                session.run(None, {name: one.numpy()})
            for _ in range(args.latency_runs):  # interleaved, so load changes hit both alike
                s = time.perf_counter()
                model(one)
                t_torch.append(time.perf_counter() - s)
                s = time.perf_counter()
                session.run(None, {name: one.numpy()})
                t_ort.append(time.perf_counter() - s)
        mt, mo = statistics.median(t_torch) * 1e3, statistics.median(t_ort) * 1e3
        print(
            f"batch-1 latency, median of {args.latency_runs}: PyTorch eager {mt:.1f} ms, ONNX Runtime {mo:.1f} ms, "
            f"ratio PyTorch/ORT {mt / mo:.2f}x"
        )


if __name__ == "__main__":
    main()
