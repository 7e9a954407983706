"""The Hugging Face Hub / timm folder format: export --format hf, timm's loaders, create_model("hf-hub:...")."""

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import timm
import torch

import mambaout
from mambaout.cli import main
from mambaout.weights.hub import export_hf


@pytest.fixture
def tuned(tmp_path):
    """A 5-class `mambaout_test` checkpoint as a fine-tuning run writes it."""
    torch.manual_seed(0)
    model = mambaout.create_model("mambaout_test", num_classes=5, kernel_size=5)
    names = ["bird", "dog", "reptile", "insect", "mammal"]
    eval_config = dict(input_size=[3, 64, 64], crop_pct=1.0, interpolation="bicubic", mean=[0.5] * 3, std=[0.5] * 3)
    path = tmp_path / "best.safetensors"
    mambaout.save_weights(
        model, path, model="mambaout_test", model_kwargs=model.model_kwargs, class_names=names, eval_config=eval_config
    )
    return mambaout.create_model(checkpoint=path).eval(), path


def _export(tuned, folder) -> Path:
    assert main(["export", "--checkpoint", str(tuned[1]), "--format", "hf", "--output", str(folder)]) == 0
    return folder


def test_timm_local_dir_opens_the_export(tuned, tmp_path):
    ours, _ = tuned
    folder = _export(tuned, tmp_path / "hf")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    theirs = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(theirs(x), ours(x), atol=1e-5)
    cfg = theirs.pretrained_cfg
    assert (
        cfg["label_names"] == ours.class_names and tuple(cfg["input_size"]) == (3, 64, 64) and cfg["mean"] == [0.5] * 3
    )
    assert json.loads((folder / "config.json").read_text())["model_args"]["kernel_size"] == 5


class _HubMirror:
    """Answers the Hub's `/<org>/<name>/resolve/<revision>/<file>` requests from a local folder of repos."""

    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, root: Path):
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _file(self):
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) != 5 or parts[2] != "resolve":
                    return None
                path = root / parts[0] / parts[1] / parts[4]
                return path if path.is_file() else None

            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

            def _answer(self, body: bool):
                path = self._file()
                if path is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Repo-Commit", mirror.COMMIT)
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_hf_hub_names_load_through_huggingface_hub(tuned, tmp_path):
    pytest.importorskip("huggingface_hub", reason="huggingface_hub is not installed")
    ours, _ = tuned
    _export(tuned, tmp_path / "repos" / "me" / "mambaout-animals")
    server = _HubMirror(tmp_path / "repos")
    x = torch.randn(2, 3, 64, 64)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(ours(x), tmp_path / "want.pt")
    # a fresh interpreter: huggingface_hub reads HF_ENDPOINT when imported
    script = f"""
import timm, torch, mambaout
x, want = torch.load({str(tmp_path / "x.pt")!r}), torch.load({str(tmp_path / "want.pt")!r})
ours = mambaout.create_model("hf-hub:me/mambaout-animals").eval()
theirs = timm.create_model("hf-hub:me/mambaout-animals", pretrained=True).eval()
with torch.no_grad():
    assert torch.equal(ours(x), want) and torch.allclose(theirs(x), want, atol=1e-5)
print(ours.model_name, ours.class_names)
"""
    env = dict(
        os.environ, HF_ENDPOINT=server.url, HF_HUB_CACHE=str(tmp_path / "hf-cache"), HF_HUB_DISABLE_TELEMETRY="1"
    )
    env["PYTHONPATH"] = str(Path(mambaout.__file__).parents[1])
    try:
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "mambaout_test ['bird', 'dog', 'reptile', 'insect', 'mammal']"


def test_export_hf_refuses_what_timm_cannot_build(tmp_path, capsys):
    args = ["export", "--model", "mambaout_test", "--random-weights", "--format", "hf", "-o", str(tmp_path / "x")]
    assert main(args) == 0  # the plain architecture exports
    model = mambaout.create_model("mambaout_test", act_layer="silu")
    with pytest.raises(ValueError, match="timm's MambaOut cannot build this model"):
        export_hf(model, tmp_path / "y")
