"""The settings of a command, each declared once (`checks.setting`), and what derives from them: a `Schema` (ordered
sections) gives the parser's options (`cli.common.add_settings`), `--set` (a bare key resolves to the one section
holding it), recipe keys (`find`) and docs/settings.md (`markdown`). Standard library only: `--help` loads nothing else.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from mambaout.utils import checks as C
from mambaout.utils.limits import SEED_MAX

AMP_CHOICES = ("auto", "none", "bf16", "fp16")  # mambaout.utils.device.autocast_setting reads them


# --- the run settings of every training command (`training.trainer.Loop` reads most), each declared once ----------------


def _device(value):
    return value if isinstance(value, str) and re.fullmatch(r"cpu|cuda|mps|cuda:\d{1,2}", value) else C.BAD


_PATH, _SWITCH, _STEPS = C.text(optional=True), C.boolean(), C.integer(1, 10**12, optional=True)


def path(help_: str, **kw):
    """A path (or name) setting, unset by default."""
    return C.setting(None, _PATH, help_, **kw)


def switch(default: bool, help_: str, **kw):
    return C.setting(default, _SWITCH, help_, **kw)


_DEVICE = C.Check("must be cpu, cuda, cuda:N or mps", _device, optional=True, kind="text", bad=["tpu", "cuda:x", 3])
# name: (default, check, help, further `checks.setting` keywords); a default of ... is each command's own
RUN_SETTINGS = {
    "batch_size": (..., C.integer(1, 65536), "per-device (per-process) batch size", dict(flags=("--batch-size", "-b"))),
    "workers": (..., C.integer(0, 256), "data loader processes per rank", dict(flags=("--workers", "-j"))),
    "pretrained": (False, _SWITCH, "start from the published ImageNet weights (detect, segment: the backbone's)", {}),
    "steps": (None, _STEPS, "the run's length in optimizer steps (train: or a cap on its epochs)", {}),
    "weight_decay": (0.05, C.number(0.0, 10.0), "decoupled weight decay", {}),
    "min_lr": (..., C.number(0.0, 1e3), "lr at the end of the schedule (not read by the step schedule)", {}),
    "clip_grad": (None, C.number(0.0, 1e6, lo_open=True, optional=True), "max gradient norm (unset: no clipping)", {}),
    "device": (None, _DEVICE, "cpu, cuda, cuda:N or mps (unset: cuda when available)", {}),
    "amp": (
        "auto",
        C.choice(*AMP_CHOICES),
        "autocast: auto (bf16 on CUDA, none on CPU), none, bf16, fp16; a bare --amp is bf16",
        dict(nargs="?", const="bf16"),  # a bare --amp is bf16 autocast (as validate's switch)
    ),
    "threads": (None, C.integer(1, 1024, optional=True), "torch CPU threads per process (unset: torch's choice)", {}),
    "seed": (0, C.integer(0, SEED_MAX), "random seed (each rank adds its rank)", {}),
    "output": (None, _PATH, "run folder (unset: runs/<recipe, else model or task>)", dict(flags=("--output", "-o"))),
    "resume": (None, _PATH, "run folder or state.pt to continue; options given with it win, except the network's", {}),
    "overwrite": (False, _SWITCH, "start over in a run folder that holds a run", {}),
    "keep_top_k": (
        ...,
        C.integer(0, 1000),
        "also keep the weights of the k best evaluations",
        dict(flags=("--keep-top-k", "--checkpoint-hist")),
    ),
    "tensorboard": (False, _SWITCH, "also write TensorBoard event files", {}),
    "progress": (True, _SWITCH, "progress bar on a terminal, progress lines otherwise", {}),
    "log_every": (
        ...,
        C.integer(0, 10**9, zero_means="0: no progress lines"),
        "optimizer steps between progress lines when not on a terminal",
        dict(flags=("--log-every", "--log-interval")),
    ),
    "stop_after_steps": (None, _STEPS, "stop after N optimizer steps of this call, mid-epoch too (resume later)", {}),
    "checkpoint_every": (
        ...,
        C.integer(0, 10**12, optional=True, zero_means="0: at epoch ends only"),
        "also save the training state every N steps inside epochs",
        {},
    ),
}


def run_setting(name: str, default=...):
    """The run setting `name` as a dataclass field, with the command's own `default` where `RUN_SETTINGS` has none."""
    value, check, help_, more = RUN_SETTINGS[name]
    return C.setting(value if default is ... else default, check, help_, **more)


@dataclass(frozen=True)
class Setting:
    section: str
    name: str
    field: dataclasses.Field

    key = property(lambda self: f"{self.section}.{self.name}")
    check = property(lambda self: self.field.metadata["check"])
    help = property(lambda self: self.field.metadata.get("help", ""))
    network = property(lambda self: self.field.metadata.get("network", False))

    @property
    def default(self):
        f = self.field
        return f.default_factory() if f.default is dataclasses.MISSING else f.default

    @property
    def flags(self) -> tuple[str, ...]:
        flags = self.field.metadata.get("flags")
        return ("--" + self.name.replace("_", "-"),) if flags is None else tuple(flags)


def scalar(text: str):
    """A number flag's value: an int, else a float (nan and inf too), else the text, which the check then names."""
    try:
        return int(text)
    except ValueError:  # not an int, or one of over 4300 digits
        pass
    try:
        number = float(text)
    except ValueError:
        return text
    return text if math.isinf(number) and "inf" not in text.lower() else number  # 1e999 is no infinity asked for


def coerce(value):
    """YAML 1.1 reads `2e-5` (no dot) as a string; numbers written that way are meant as numbers."""
    if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value.strip()):
        return float(value)
    return value


def yaml_value(text: str):
    from mambaout.utils.safe_yaml import load_yaml

    return load_yaml(text, "value")


class Schema:
    """The settings of `sections` (`{name: dataclass}`), in declaration order."""

    def __init__(self, sections: dict[str, type]):
        self.sections = dict(sections)
        self.settings = [
            Setting(section, f.name, f)
            for section, cls in self.sections.items()
            for f in dataclasses.fields(cls)
            if "check" in f.metadata
        ]

    def find(self, key: str) -> Setting:
        """The setting named `section.key` or a bare `key` that one section alone has (ValueError: an unknown or
        ambiguous key, one line listing the candidates)."""
        key = key.strip().replace("-", "_")
        hits = [s for s in self.settings if key in (s.key, s.name)]
        if len(hits) == 1:
            return hits[0]
        if hits:
            raise ValueError(f"{key!r} is in several sections: give one of {', '.join(s.key for s in hits)}")
        last = key.rpartition(".")[2]
        near = [s.key for s in self.settings if last and (last in s.name or s.name in last)][:6]
        hint = f"close: {', '.join(near)}" if near else "the keys are those --print-config prints"
        raise ValueError(f"unknown setting {key!r} ({hint})")

    def checked(self, key: str, value):
        """`value` as the setting `key` stores it, checked before it is used (a path before it is opened); a
        ValueError is one line, `key=value: what is allowed` (the key as the caller's messages name it)."""
        try:
            return self.find(key).check(value)
        except ValueError as e:
            raise ValueError(f"{key}={C.show(value)}: {e}") from None

    def recipe_items(self, path, items: dict, prefix: str = "") -> dict:
        """A recipe's `key: value` items (under `prefix`, a section's `model.`) by setting name, numbers as `coerce`
        reads them; ValueError: `recipe PATH: ` and what `find` says of an unknown key."""
        try:
            return {self.find(f"{prefix}{key}").name: coerce(value) for key, value in items.items()}
        except ValueError as e:
            raise ValueError(f"recipe {path}: {e}") from None

    def parse_set(self, items: list[str] | None) -> dict[Setting, object]:
        """`--set KEY=VALUE` items (YAML values) by setting."""
        from mambaout.utils.safe_yaml import load_yaml

        out = {}
        for item in items or []:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--set expects KEY=VALUE (or SECTION.KEY=VALUE), got {item!r}")
            out[self.find(key)] = coerce(load_yaml(value, f"--set {key.strip()}"))
        return out

    def refuse_network_changes(self, resume: str, given: dict, saved: dict, flat: bool = False) -> None:
        """A resumed run takes later options, except another value of a setting that shapes the network: a
        ValueError names it, the run's value and the one given. `given`, `saved`: values by key (`name` when
        `flat`, else `section.key`)."""
        for s in self.settings:
            key = s.name if flat else s.key
            if s.network and key in given and saved.get(key) is not None and given[key] != saved[key]:
                raise ValueError(
                    f"--resume {resume}: that run trains {key} {saved[key]!r}, not {given[key]!r}; drop the option "
                    "to continue it, or start a new run in another --output folder"
                )

    def markdown(self) -> str:
        """The settings as a markdown table: key, flags, default, what is allowed and the help."""
        rows = ["| key | flags | default | allowed | what it does |", "| --- | --- | --- | --- | --- |"]
        for s in self.settings:
            flags = ", ".join(f"`{f}`" for f in s.flags) or "`--set` only"
            allowed = s.check.allowed.removeprefix("must be ")
            note = " *network*" if s.network else ""
            cells = (f"`{s.key}`", flags, f"`{show_default(s.default)}`", allowed, s.help + note)
            # | would end a cell and <name> would be read as an HTML tag
            rows.append("| " + " | ".join(c.replace("|", "\\|").replace("<", "\\<") for c in cells) + " |")
        return "\n".join(rows) + "\n"


def show_default(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(list(value) if isinstance(value, tuple) else value)
