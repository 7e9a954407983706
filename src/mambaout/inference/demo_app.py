"""The web demo: a Gradio page to classify an uploaded or pasted image (in the package so that `mambaout demo` works
after `pip install 'mambaout[demo]'`; `demo/app.py` is the same app as a script). A server offers only what its
operator named at start, each loaded once then: a visitor picks among those and can never name a path on the server.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

# Offline by default: no usage analytics or version checks from the server (set before gradio is imported).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("GRADIO_SERVER_NAME", "127.0.0.1")

import gradio as gr  # noqa: E402

from mambaout.inference.predictor import Predictor  # noqa: E402
from mambaout.models.factory import create_model  # noqa: E402

# Example photos shipped as package data (CC0, from scikit-image; see examples/LICENSE.md beside them).
EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
RANDOM_SUFFIX = " (random weights)"
_CACHED_MODELS = 3  # predictors kept in memory; switching among more reloads them
MAX_UPLOAD = "20mb"  # an upload larger than this is refused by the server before it reaches the model

# System fonts only: the default theme would make the browser fetch Google Fonts, which fails offline.
THEME = gr.themes.Default(
    font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "Consolas", "monospace"]
)


def image_input(**kwargs) -> gr.Image:
    """A `gr.Image` whose decode errors (Gradio decodes uploads before our function runs) read as a message saying
    what to do, not a bare 'Error' toast. Wrapped, not subclassed: Gradio writes a `.pyi` stub beside every component
    subclass's module, which would litter (or fail in) an installed package."""
    image = gr.Image(**kwargs)
    decode = image.preprocess

    def preprocess(payload):
        try:
            return decode(payload)
        except Exception as e:
            name = getattr(payload, "orig_name", None) or "the uploaded file"
            raise gr.Error(
                f"{name} is not an image this demo can read ({type(e).__name__}). "
                "Upload a JPEG, PNG, WebP, GIF, BMP or TIFF photo.",
                title="Not an image",
            ) from e

    image.preprocess = preprocess
    return image


class ModelPool:
    """Builds predictors on first use and keeps the last few, for the choices on the allow-list only: `allowed` maps
    a dropdown label to `("model", name)` (published weights, downloaded on first use), `("random", name)`,
    `("checkpoint", path)` or `("named checkpoint", "NAME:PATH")`."""

    def __init__(
        self,
        allowed: dict[str, tuple[str, str]],
        topk: int = 5,
        device: str | None = None,
        model_kwargs: dict | None = None,
    ):
        self.allowed = dict(allowed)
        self.model_kwargs = dict(model_kwargs or {})
        self.topk, self.device = topk, device
        self._load = functools.lru_cache(maxsize=_CACHED_MODELS)(self._build)

    def get(self, choice: str) -> Predictor:
        choice = (choice or "").strip()
        if choice not in self.allowed:  # one answer for any other string: no probing of the server's files
            raise ValueError("choose one of the models this server offers")
        return self._load(choice)

    def _build(self, choice: str) -> Predictor:
        kind, target = self.allowed[choice]
        if kind in ("checkpoint", "named checkpoint"):
            name, path = target.split(":", 1) if kind == "named checkpoint" else (None, target)
            model = create_model(name, checkpoint=path, **self.model_kwargs)
        else:
            kwargs = {k: v for k, v in self.model_kwargs.items() if k != "use_ema"}
            model = create_model(target, pretrained=kind == "model", **kwargs)
        return Predictor(model, topk=self.topk, device=self.device)


def model_choices(
    model: str | list[str] | None = None, checkpoint: str | list[str] | None = None, random_weights: bool = False
) -> dict[str, tuple[str, str]]:
    """The allow-list: dropdown label -> `(kind, target)`, in the order the command line named them.

    With checkpoints, `model` names their model (one name for all, or one per file, as `mambaout validate` pairs
    them): the target is then `NAME:PATH` (weights without our metadata: a timm or official file). Without
    checkpoints, each `model` is offered with its published weights (or at random with `random_weights`).
    """
    models = [model] if isinstance(model, str) else list(model or [])
    checkpoints = [checkpoint] if isinstance(checkpoint, (str, os.PathLike)) else list(checkpoint or [])
    allowed: dict[str, tuple[str, str]] = {}
    if checkpoints and models:
        if len(models) not in (1, len(checkpoints)):
            raise ValueError(
                f"got {len(models)} --model names for {len(checkpoints)} checkpoints: one, or one per file"
            )
        for name, path in zip(models * len(checkpoints) if len(models) == 1 else models, checkpoints):
            allowed[f"{path} ({name})"] = ("named checkpoint", f"{name}:{path}")
        return allowed
    for path in checkpoints:
        allowed[str(path)] = ("checkpoint", str(path))
    for name in models:
        allowed[name + RANDOM_SUFFIX if random_weights else name] = ("random" if random_weights else "model", name)
    if not allowed:
        raise ValueError("name at least one --model or --checkpoint for the demo to serve")
    return allowed


def build_app(
    model: str | list[str] | None = "mambaout_femto.in1k",
    checkpoint: str | list[str] | None = None,
    random_weights: bool = False,
    topk: int = 5,
    examples_dir: str | os.PathLike | None = None,
    device: str | None = None,
    model_kwargs: dict | None = None,
    preload: bool = True,
) -> gr.Blocks:
    """The demo page offering `model_choices(model, checkpoint, random_weights)`, `topk` labels per image, the photos
    of `examples_dir` (default: the package's examples) as examples; `model_kwargs` (`num_classes`, `use_ema`, ...)
    go to `create_model` for every model. `preload` loads every offered model now, so a bad name or file fails here
    and not at the first click (ValueError, FileNotFoundError, CheckpointError, DownloadError).
    """
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    allowed = model_choices(model, checkpoint, random_weights)
    pool = ModelPool(allowed, topk=topk, device=device, model_kwargs=model_kwargs)
    if preload:
        for label in allowed:
            pool.get(label)
    choices = list(allowed)
    examples_dir = Path(examples_dir) if examples_dir else EXAMPLES_DIR
    examples = sorted(str(p) for p in examples_dir.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))

    def classify(image_path: str | None, choice: str) -> dict[str, float]:
        if image_path is None:
            raise gr.Error("Upload or paste an image first.", title="No image")
        try:
            predictor = pool.get(choice)
        except Exception as e:  # not on the allow-list, or an offline download of a model evicted from memory
            raise gr.Error(f"Cannot load that model: {e}", title="Model not loaded") from e
        try:
            pred = predictor(image_path)
        except ValueError as e:
            raise gr.Error(str(e), title="Not an image") from e
        return dict(zip(pred.labels, pred.probs))

    # uploads older than an hour are deleted every hour (and the upload folder when the demo command ends)
    with gr.Blocks(title="MambaOut demo", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(
            "# MambaOut image classification\n"
            "Upload or paste an image and press **Classify**. Models: MambaOut (Yu & Wang, CVPR 2025), "
            "a vision backbone of Gated CNN blocks. Published weights download on first use."
        )
        with gr.Row():
            with gr.Column():
                image = image_input(
                    type="filepath", image_mode=None, sources=["upload", "clipboard"], label="Image", elem_id="image"
                )
                choice = gr.Dropdown(
                    choices, value=choices[0], allow_custom_value=False, label="Model", elem_id="model"
                )
                button = gr.Button("Classify", variant="primary", elem_id="classify")
            with gr.Column():
                labels = gr.Label(num_top_classes=topk, label="Top classes", elem_id="labels")
        if examples:
            gr.Examples(examples=[[p] for p in examples], inputs=[image], label="Examples (CC0 photos)")
        button.click(classify, inputs=[image, choice], outputs=labels, api_name="classify")
    return app


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, max_file_size=MAX_UPLOAD, **kwargs):
    """Serve `app` with offline-friendly settings (no share link, no SSR node server, system fonts) and an upload
    size limit. Gradio's own start-up lines are silenced (they advise `share=True` in `launch()`, which a command-line
    user cannot act on, and this server never makes public links); one line names the address instead.
    """
    examples = [str(EXAMPLES_DIR)] if EXAMPLES_DIR.is_dir() else []
    block = not kwargs.pop("prevent_thread_lock", False)
    quiet = kwargs.pop("quiet", False)
    fixed = dict(share=False, ssr_mode=False, theme=THEME, allowed_paths=examples, quiet=True, prevent_thread_lock=True)
    result = app.launch(server_name=host, server_port=port, max_file_size=max_file_size, **fixed, **kwargs)
    if not quiet:
        print(f"* Running on {app.local_url} (Ctrl+C to stop)", flush=True)
    if block:
        app.block_thread()
    return result
