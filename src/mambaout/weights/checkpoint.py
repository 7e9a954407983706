"""Reading, converting, checking and writing MambaOut weights.

Three layouts load, detected from the keys:

- **official**: the raw state dicts of the official release `.pth` files (yuweihao/MambaOut):
  `downsample_layers.0.{conv1,norm1,conv2,norm2}`, `downsample_layers.{1,2,3}.{conv,norm}`,
  `stages.i.j.{norm,fc1,conv,fc2}`, `norm`, `head.{fc1,norm,fc2}`;
- **timm**: the `timm/mambaout_*` hub weights (`.safetensors` or `.bin`), which is also our module layout;
- **ours**: safetensors in the timm layout with metadata (model name, its arguments, class names, eval settings).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from mambaout.utils.files import atomic_write, cache_dir, special_kind

logger = logging.getLogger("mambaout")

FORMAT_NAME = "mambaout"
CLASSIFIER_KEYS = ("head.fc.weight", "head.fc.bias")
FIRST_CONV_KEY = "stem.conv1.weight"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


class DownloadError(RuntimeError):
    """Weights that could not be downloaded; `reason`: what was tried and how it failed, without advice (each command
    adds the option to use instead)."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


# --- layouts ---------------------------------------------------------------------------------------------------------


# where training checkpoints keep their weights: timm's train.py and ours ("state_dict" / "model"), and the EMA of them
_WEIGHT_ENTRIES = ("state_dict", "model")
_EMA_ENTRIES = ("state_dict_ema", "model_ema")


def unwrap_state_dict(obj, use_ema: bool = False, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint, unwrapped from `{'state_dict': ...}`-style containers and DDP's `module.`
    prefix. Of weights and their EMA it gives the weights, as timm's `load_checkpoint` does (the EMA with `use_ema`),
    and logs the entry taken."""
    held = [k for k in _WEIGHT_ENTRIES + _EMA_ENTRIES if isinstance(obj, dict) and isinstance(obj.get(k), dict)]
    if held:
        wanted = _EMA_ENTRIES if use_ema else _WEIGHT_ENTRIES
        entry = next((k for k in wanted if k in held), None)
        if entry is None and use_ema:
            raise CheckpointError(
                f"{source} holds no EMA weights (entries: {', '.join(held)}); leave out --use-ema / use_ema=True"
            )
        entry = entry or held[0]  # an EMA-only file: its one set of weights
        others = [k for k in held if k != entry]
        log = logger.warning if others else logger.info  # several candidates: say which one the numbers come from
        hint = "" if use_ema or not any(k in _EMA_ENTRIES for k in others) else " (--use-ema / use_ema=True: the EMA)"
        not_these = f", not {', '.join(map(repr, others))}" if others else ""
        log("%s: loading its %r weights%s%s", source, entry, not_these, hint)
        obj = obj[entry]
    elif use_ema:
        raise CheckpointError(f"{source} is a plain state dict without EMA weights; leave out --use-ema / use_ema=True")
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("checkpoint holds no state dict (expected a dict of tensors, maybe under 'state_dict')")
    return {_strip(k): v for k, v in obj.items()}


def _strip(key: str) -> str:
    """The key without the prefixes DDP (`module.`) and `torch.compile` (`_orig_mod.`) add, in any number."""
    while key.startswith(("module.", "_orig_mod.")):
        key = key.partition(".")[2]
    return key


# (official, ours) key prefixes, `{0}` and `{1}` numbers: one table for both directions
_LAYOUTS = [
    ("downsample_layers.0.", "stem."),
    ("downsample_layers.{0}.", "stages.{0}.downsample."),
    ("stages.{0}.{1}.", "stages.{0}.blocks.{1}."),
    ("head.fc1.", "head.pre_logits.fc."),
    ("head.norm.", "head.pre_logits.norm."),
    ("head.fc2.", "head.fc."),
    ("norm.", "head.norm."),
]


def _rename(state_dict: dict, to_ours: bool) -> dict:
    """Rename keys by the first matching `_LAYOUTS` prefix, official -> ours or back."""
    pairs = _LAYOUTS if to_ours else [(ours, official) for official, ours in _LAYOUTS]
    rules = [
        ("^" + re.escape(a).replace(r"\{0\}", r"(\d+)").replace(r"\{1\}", r"(\d+)"), b.format(r"\1", r"\2"))
        for a, b in pairs
    ]
    out = {}
    for k, v in state_dict.items():
        for pattern, repl in rules:
            k, n = re.subn(pattern, repl, k)
            if n:
                break
        out[k] = v
    return out


def to_model_layout(state_dict: dict) -> dict[str, torch.Tensor]:
    """Any supported layout -> our (timm's) key names."""
    if any(k.startswith("downsample_layers.") for k in state_dict):
        return _rename(state_dict, to_ours=True)
    if any(k.startswith("stem.") for k in state_dict):  # timm's layout, which is ours
        return dict(state_dict)
    raise CheckpointError(
        "checkpoint is not a MambaOut state dict: found neither 'downsample_layers.*' (official) nor 'stem.*' (timm) "
        f"keys; first keys: {list(state_dict)[:4]}"
    )


def to_official_layout(state_dict: dict) -> dict[str, torch.Tensor]:
    """Our key names -> the official release's (paper-style models only: the `_rw` ones have no official layout)."""
    if any(".ls.gamma" in k for k in state_dict):
        raise CheckpointError("LayerScale weights (the _rw models) have no place in the official layout")
    return _rename(state_dict, to_ours=False)


# --- fitting a state dict to a model --------------------------------------------------------------------------------


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Refit the first conv's `[out, 3, k, k]` RGB weights to `in_chans` inputs: one channel sums the RGB filters (a
    grey image then gives the RGB response); more tile them, scaled by `3 / in_chans` (the same activation scale)."""
    src = weight.shape[1]
    if in_chans == src:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_chans // src)  # ceil
    return weight.repeat(1, reps, 1, 1)[:, :in_chans] * (src / in_chans)


def fit_state_dict(
    model: nn.Module, state_dict: dict, name: str = "model", new_head: bool = False, warn: bool = True
) -> dict:
    """Convert `state_dict` to `model`'s layout, adapting the input conv. A checkpoint classifier of another width is
    dropped for the model's fresh one with `new_head` (fine-tuning to another class count), else an error, never a
    silently random head. `warn=False` (a dry run on a shape-only model) logs quietly."""
    sd = to_model_layout(state_dict)
    target = model.state_dict()
    log = logger.warning if warn else logger.debug
    conv = sd.get(FIRST_CONV_KEY)
    in_chans = target[FIRST_CONV_KEY].shape[1] if FIRST_CONV_KEY in target else None
    if conv is not None and in_chans is not None and conv.shape[1] != in_chans:
        log("%s: adapting the first conv from %d to %d input channels", name, conv.shape[1], in_chans)
        sd[FIRST_CONV_KEY] = adapt_input_conv(conv, in_chans)
    fc_w = CLASSIFIER_KEYS[0]
    have = tuple(sd[fc_w].shape)[0] if fc_w in sd else None
    want = tuple(target[fc_w].shape)[0] if fc_w in target else 0
    if have is not None and have != want:
        if not new_head:
            raise CheckpointError(
                f"the checkpoint's classifier has {have} classes but {name} is built with {want}: its metadata or "
                f"the class count asked for does not match the weights. Build the model the weights fit: "
                f"--num-classes {have} on the command line (Python: num_classes={have}); to fine-tune to another "
                "class count, train with --num-classes N (Python: num_classes=N re-initialises the classifier)"
            )
        msg = "%s: checkpoint classifier has %d classes, the model %d: loading everything but the classifier, "
        log(msg + "which keeps its fresh initialisation", name, have, want)
        for k in CLASSIFIER_KEYS:
            sd.pop(k, None)
        sd.update({k: v for k, v in target.items() if k in CLASSIFIER_KEYS})
    check_fits(target, sd, name)
    check_dtypes(target, sd, name, warn)
    return sd


def check_finite(state_dict: dict, source: str) -> None:
    """Refuse weights holding NaN or Inf (they give NaN logits, hence a meaningless metric or prediction), naming the
    first such tensor in file order."""
    for key, value in state_dict.items():
        if value.is_floating_point() or value.is_complex():
            bad = ~torch.isfinite(value)
            if bad.any():
                n_nan = int(torch.isnan(value).sum())
                what = ", ".join(f"{n} {kind}" for n, kind in ((n_nan, "NaN"), (int(bad.sum()) - n_nan, "Inf")) if n)
                raise CheckpointError(
                    f"{source}: tensor {key!r} holds non-finite values ({what} of {value.numel()}); the weights are "
                    "damaged (a diverged run?): use an earlier checkpoint"
                )
            if value.dtype == torch.float64 and bool((value.abs() > torch.finfo(torch.float32).max).any()):
                raise CheckpointError(
                    f"{source}: float64 tensor {key!r} holds values up to {value.abs().max().item():.3g}, beyond "
                    "float32's range: loaded into the float32 model they would be Inf; the weights are damaged"
                )


def check_dtypes(target: dict, sd: dict, name: str = "model", warn: bool = True) -> None:
    """Refuse integer, boolean or complex tensors for floating-point parameters (a quantised or damaged file), never
    cast; floating-point tensors of another precision are converted when loaded (float64 -> float32 rounds: said)."""
    narrowed = []
    for key, want in target.items():
        have = sd.get(key)
        if have is None or have.dtype == want.dtype:
            continue
        not_float = not have.is_floating_point() or have.is_complex()
        if want.is_floating_point() == not_float:  # float weights from ints/complex, or the other way round
            why = (
                ": integer, boolean or complex weights are not MambaOut weights (a quantised or damaged file?); pass "
                "the floating-point checkpoint"
                if not_float
                else "; the checkpoint does not fit the model"
            )
            raise CheckpointError(
                f"checkpoint tensor {key!r} is {_dtype(have)} but {name} holds {_dtype(want)} there{why}"
            )
        if have.is_floating_point() and torch.finfo(have.dtype).bits > torch.finfo(want.dtype).bits:
            narrowed.append(key)
    if narrowed and warn:
        first = narrowed[0]
        msg = "%s: converting %d %s tensors (%s...) to the model's %s, which rounds them"
        logger.warning(msg, name, len(narrowed), _dtype(sd[first]), first, _dtype(target[first]))


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def check_fits(target: dict, sd: dict, name: str = "model") -> None:
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
        for k in target
        if k in sd and sd[k].shape != target[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{len(items)} {label}: {', '.join(items[:5])}{more}")
        raise CheckpointError(
            f"checkpoint does not fit {name}: {'; '.join(parts)}. Check the model name and its arguments "
            "(depths, dims, expansion_ratio, conv_ratio, kernel_size) match the weights"
        )


# --- files -----------------------------------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike, use_ema: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a `.safetensors`, `.pth`/`.pt`/`.bin`/`.pth.tar` (pickled; read weights-only) file or a URL.

    Pickled files never fully unpickle (that runs whatever code a file names): `_load_pickled`. Returns the state
    dict (any layout) and our metadata (empty for files we did not write).
    """
    path = str(path)
    if path.startswith(("http://", "https://")):
        path = str(download([path]))
    if special_kind(path):  # a FIFO would block the read forever: never opened
        raise CheckpointError(f"checkpoint {path} is {special_kind(path)}, not a weights file; pass a file path")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a folder, not a weights file; pass the .safetensors/.pth in it")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; pass a .safetensors/.pth file path or an http(s) URL"
        )
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"cannot read checkpoint {path}: permission denied")
    if path.lower().endswith((".onnx", ".xml")):
        raise CheckpointError(
            f"{path} is an exported model (ONNX / OpenVINO), not PyTorch weights: mambaout validate runs it; "
            "elsewhere pass the .safetensors it was exported from"
        )
    if path.endswith(".safetensors"):
        if use_ema:  # refused before the tensors are read
            raise CheckpointError(f"{path} holds one set of weights (safetensors); leave out --use-ema / use_ema=True")
        return _read_safetensors(path, tensors=True, fix="download it again")
    obj = _load_pickled(path)
    meta = obj.get("mambaout_metadata", {}) if isinstance(obj, dict) else {}
    return unwrap_state_dict(obj, use_ema, path), meta or _timm_train_metadata(obj)


# a run folder of `mambaout train` holds these weights files; the best epoch's first, else the last epoch's
RUN_WEIGHTS = ("best.safetensors", "last.safetensors")


def run_weights(path: str | os.PathLike) -> str:
    """The weights file `path` names: `path` itself, or for a run folder of `mambaout train` its best weights
    (`best.safetensors`), else its last (`last.safetensors`)."""
    if not os.path.isdir(path):
        return str(path)
    for name in RUN_WEIGHTS:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise CheckpointError(
        f"{path} is a folder without {' or '.join(RUN_WEIGHTS)}; pass a run folder of mambaout train or a weights file"
    )


def read_metadata(path: str | os.PathLike) -> dict:
    """A checkpoint's metadata (`model`, `model_kwargs`, ...; empty for files we did not write), reading the
    tensors only where the format keeps both together (pickled files)."""
    path = str(path)
    if path.endswith(".safetensors") and os.path.isfile(path):
        return _read_safetensors(path, tensors=False, fix="write it again")[1]
    return read_checkpoint(path)[1]


def _read_safetensors(path: str, tensors: bool, fix: str) -> tuple[dict, dict]:
    """(the tensors, or {} without `tensors`; our metadata) of a safetensors file; `fix`: what to do if it is damaged."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read {path} as safetensors ({e}); the file may be truncated: {fix}") from e
    return sd, _decode_metadata(meta)


def _timm_train_metadata(obj) -> dict:
    """What a checkpoint of timm's train.py says of its model: `arch`, and of `args` the `--model-kwargs` and the
    class and channel counts (timm passes all of them to `create_model`)."""
    args = obj.get("args") if isinstance(obj, dict) else None
    if not isinstance(args, argparse.Namespace) or not isinstance(obj.get("arch"), str):
        return {}
    extra = getattr(args, "model_kwargs", None)
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in extra.items()} if isinstance(extra, dict) else {}
    for key in ("num_classes", "in_chans"):
        value = getattr(args, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            kwargs[key] = value
    return {"model": obj["arch"], "model_kwargs": kwargs}


# The non-tensor types allowed in a pickled checkpoint besides torch's own weights-only set (dicts, lists, tuples,
# numbers, strings): timm's train.py saves its options as `args`, an argparse.Namespace of such plain values.
_SAFE_GLOBALS = [argparse.Namespace]


def _load_pickled(path: str):
    """`torch.load(weights_only=True)` with `_SAFE_GLOBALS` allowed; a refusal is one line naming the type."""
    safe = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5; 2.4 has only the global allow-list
    if safe is None:
        torch.serialization.add_safe_globals(_SAFE_GLOBALS)
    try:
        with safe(_SAFE_GLOBALS) if safe is not None else contextlib.nullcontext():
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found:
            raise CheckpointError(
                f"{path} holds a Python object of type {found.group(1)}, which is not read: only tensors and plain "
                "values (and argparse.Namespace) load without running the file's code. Re-save its state dict "
                "alone: torch.save(model.state_dict(), 'weights.pth')"
            ) from None
        raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint ({type(e).__name__}: {e})") from e


def _decode_metadata(meta: dict[str, str]) -> dict:
    if meta.get("format") != FORMAT_NAME:
        return {}
    try:
        return {k: json.loads(v) for k, v in meta.items() if k != "format"}
    except ValueError as e:
        raise CheckpointError(f"the checkpoint's metadata is not valid JSON ({e}); the file is damaged") from e


def save_weights(model_or_state: nn.Module | dict, path: str | os.PathLike, **metadata) -> Path:
    """Write a model's (unwrapped from DDP/compile) or a state dict's weights as safetensors, atomically (a crash
    mid-write leaves any previous file intact), with `metadata` (JSON-serialisable: `model`, `model_kwargs`, ...)."""
    from safetensors.torch import save_file  # looked up on each call: tests replace it to simulate a crash

    sd = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    meta = {"format": FORMAT_NAME, **{k: json.dumps(v) for k, v in metadata.items()}}
    return atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))


# --- downloads -------------------------------------------------------------------------------------------------------


def cache_name(url: str) -> str:
    """File name in the cache (and on a mirror): hub files are all `model.safetensors`, so they take the repo's name."""
    base = url.rstrip("/").rsplit("/", 1)[-1]
    if "/resolve/" in url:
        repo = url.split("/resolve/")[0].rsplit("/", 1)[-1]
        base = repo + os.path.splitext(base)[1]
    return base


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(urls: list[str] | tuple[str, ...], root: Path | None = None, progress: bool = True) -> Path:
    """Fetch the first of `urls` that answers into the cache and return its path.

    Each URL has its own cache name (`cache_name`), stored under the suffix of its real format (`file_format`), so a
    fallback URL's file is never read as another's. A cached file is reused while its recorded SHA-256 matches; a
    download goes to a `.part` file, checked against Content-Length, hashed, then moved into place. With
    `$MAMBAOUT_MIRROR` set (a folder URL), files come from `$MAMBAOUT_MIRROR/<cache name>` instead.
    """
    root = Path(root) if root else cache_dir()
    names = [cache_name(u) for u in urls]
    for name in names:
        for cached in {root / name, root / _with_suffix(name, ".safetensors"), root / _with_suffix(name, ".pth")}:
            if cached.is_file():
                sidecar = cached.with_name(cached.name + ".sha256")
                if sidecar.is_file() and sidecar.read_text().strip() == _sha256(cached):
                    return cached
                logger.warning("cached %s fails its checksum; downloading it again", cached)
    mirror = os.environ.get("MAMBAOUT_MIRROR")
    tries = [f"{mirror.rstrip('/')}/{name}" for name in names] if mirror else list(urls)
    errors = []
    for url, name in zip(tries, names):
        try:
            return _fetch(url, root / name, progress)
        except (urllib.error.URLError, OSError, DownloadError) as e:
            errors.append(f"{url} ({getattr(e, 'reason', None) or e})")
    reason = f"could not download {'; '.join(errors)}"
    raise DownloadError(
        f"{reason}. Offline? Fetch the file elsewhere and pass it as checkpoint=PATH (CLI: --checkpoint PATH), "
        f"or put it in {root} as {names[0]}",
        reason,
    )


def _with_suffix(name: str, suffix: str) -> str:
    stem, ext = os.path.splitext(name)
    return (stem if ext in (".pth", ".pt", ".bin", ".safetensors") else name) + suffix


def file_format(path: Path) -> str:
    """`'.safetensors'` or `'.pth'` from a weights file's first bytes (not its name)."""
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header; torch.save: a zip or a pickle
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 30):
        return ".safetensors"
    return ".pth"


def _fetch(url: str, dest: Path, progress: bool) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    req = urllib.request.Request(url, headers={"User-Agent": "mambaout"})
    with urllib.request.urlopen(req, timeout=30) as resp, open(part, "wb") as out:
        total = int(resp.headers.get("Content-Length") or 0)
        done = 0
        show = progress and sys.stderr.isatty()
        while chunk := resp.read(1 << 20):
            out.write(chunk)
            done += len(chunk)
            if show:
                pct = f"{100 * done / total:5.1f}%" if total else ""
                print(f"\rdownloading {dest.name}: {done / 2**20:7.1f} MiB {pct}", end="", file=sys.stderr)
        if show:
            print(file=sys.stderr)
    if total and done != total:
        part.unlink(missing_ok=True)
        raise DownloadError(f"truncated download: got {done} of {total} bytes")
    digest = _sha256(part)
    real = file_format(part)
    if os.path.splitext(dest.name)[1] != real:  # e.g. a .pth URL answering with safetensors bytes
        dest = dest.with_name(_with_suffix(dest.name, real))
    os.replace(part, dest)
    dest.with_name(dest.name + ".sha256").write_text(digest + "\n")
    logger.info("downloaded %s (sha256 %s)", dest, digest)
    return dest
