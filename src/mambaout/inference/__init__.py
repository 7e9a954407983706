"""Inference: `from mambaout.inference import Predictor, predict` is the documented import; the demo app
(`demo_app`, needs gradio) and `export` are imported only when used.
"""

from mambaout.inference.predictor import (
    ClassNames,
    Predictor,
    class_names_for,
    dumps,
    find_images,
    format_text,
    load_image,
    predict,
    to_rgb,
)

__all__ = [
    "ClassNames",
    "Predictor",
    "class_names_for",
    "dumps",
    "find_images",
    "format_text",
    "load_image",
    "predict",
    "to_rgb",
]
