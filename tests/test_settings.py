"""Every setting of every training command, from its one declaration: bad values generated from its check are one
line naming it, through `--set`, through its flag and through a recipe file; and the docs' settings table is the
one the declarations give.

The values come from each check (`Check.bad`: the wrong type, each end of the range, NaN, infinity, a nested
mapping), so a new setting is tested the day it is declared. The commands run in-process (their `main`, as a user's
command line reaches it); a few rows run the real console for the exit status.
"""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mambaout.cli import dense as dense_cmd
from mambaout.cli import train as train_cmd
from mambaout.dense import config as D
from mambaout.training import config as C

SCHEMAS = {"train": C.SCHEMA, "detect": D.schema("detect"), "segment": D.schema("segment")}
DOCS = Path(__file__).resolve().parents[1] / "docs" / "settings.md"


def _run(command: str, argv: list[str], capsys, given: bool = True) -> tuple[int, str]:
    """`mambaout <command> [train] ARGV --print-config` in-process: (exit status, stderr). --print-config runs the
    whole resolution and validation and nothing else, so a bad value that slipped through exits 0. `given`: the
    data (train) or the length (detect, segment) given as options, which a recipe file's values would not beat."""
    try:
        if command == "train":  # data given: no digits recipe to read on every call (only settings are tested)
            data = ["--data-train", "digits:train", "--data-val", "digits:val"] if given else []
            code = train_cmd.main([*data, *argv, "--print-config"])
        else:
            code = dense_cmd.main(command, ["train", *(["--steps", "1"] if given else []), *argv, "--print-config"])
    except SystemExit as e:  # argparse's own refusals (a list flag given too few values)
        code = e.code
    return code, capsys.readouterr().err


def _yaml(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def _names(setting) -> list[str]:
    return [setting.key, setting.name, *setting.flags]


def _assert_one_line(code: int, err: str, setting, how: str, value) -> None:
    lines = err.strip().splitlines()
    assert code == 2, f"{setting.key}={value!r} through {how} was accepted"
    assert len(lines) == 1 and "Traceback" not in err, (how, value, err)
    named = any(re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", lines[0]) for n in _names(setting))
    assert named, f"{how} {value!r}: the line does not name {setting.key}: {lines[0]}"
    said_by_check = re.search(rf"(?<![\w-]){re.escape(setting.name)}=", lines[0]) and setting.check.kind != "value"
    if said_by_check:  # the setting's check said it (a mapping's items say their own): what it allows
        assert lines[0].endswith(setting.check.allowed), (how, value, lines[0])


def _flag_argv(setting, value) -> list[str] | None:
    """The command line that gives `value` through the setting's first flag; None where a flag cannot carry it
    (a switch takes no value; a text flag's value is always a string)."""
    kind, flag = setting.check.kind, setting.flags[0]
    if kind == "boolean":
        return None
    if kind == "list" and isinstance(value, list):
        return [flag, *(str(v) for v in value)] if value else None
    text = str(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else _yaml(value)
    if kind == "text":
        try:
            setting.check(text)  # what the flag gives: the text itself
            return None
        except ValueError:
            pass
    return [f"{flag}={text}"]


CASES = [
    pytest.param(command, s, id=f"{command}-{s.key}") for command, schema in SCHEMAS.items() for s in schema.settings
]


@pytest.mark.parametrize(("command", "setting"), CASES)
def test_bad_values_are_one_line_naming_the_setting(command, setting, capsys, tmp_path):
    assert len(setting.check.bad) >= 3 and any(isinstance(v, float) and math.isnan(v) for v in setting.check.bad)
    for value in setting.check.bad:
        code, err = _run(command, ["--set", f"{setting.key}={_yaml(value)}"], capsys)
        _assert_one_line(code, err, setting, "--set", value)
        if setting.flags:
            argv = _flag_argv(setting, value)
            if argv is not None:
                code, err = _run(command, argv, capsys)
                _assert_one_line(code, err, setting, "the flag", value)
        if setting.name == "recipe":
            continue  # a recipe's own name is --recipe's, never a key inside it
        recipe = tmp_path / "r.yaml"
        if command == "train":
            recipe.write_text(yaml.safe_dump({setting.name: value}))
        else:
            sections = {"train": {"steps": 1}, setting.section: {}}
            sections[setting.section][setting.name] = value
            recipe.write_text(yaml.safe_dump({"task": command, **sections}))
        code, err = _run(command, ["--recipe", str(recipe)], capsys, given=False)
        _assert_one_line(code, err, setting, "a recipe file", value)


@pytest.mark.parametrize("command", sorted(SCHEMAS))
def test_every_setting_is_checked_and_its_default_passes(command):
    schema = SCHEMAS[command]
    fields = [f"{name}.{f.name}" for name, cls in schema.sections.items() for f in dataclasses.fields(cls)]
    assert [s.key for s in schema.settings] == fields, "a field declared without setting(): no check, no flag"
    assert all(s.help for s in schema.settings)
    for s in schema.settings:
        s.check(s.default)  # a default its own check refuses would fail every run
    flags = [f for s in schema.settings for f in s.flags]
    assert len(flags) == len(set(flags)), "two settings share a flag"


def test_bare_and_dotted_keys_resolve_and_ambiguous_ones_are_refused(capsys):
    overrides, _ = train_cmd.parse_overrides(["--set", "schedule.epochs=7", "--set", "smoothing=0.2"])
    assert overrides == {"epochs": 7, "smoothing": 0.2}
    got = dense_cmd._overrides(
        dense_cmd.train_parser("detect").parse_args(["--set", "lr=0.5", "--img-size", "96"]), "detect"
    )
    assert got == {"train.lr": 0.5, "model.min_size": 96, "data.min_sizes": [96]}
    got = dense_cmd._overrides(dense_cmd.train_parser("segment").parse_args(["--set", "train.min_lr=2e-5"]), "segment")
    assert got == {"train.min_lr": 2e-5}  # YAML 1.1 reads 2e-5 as text; every command takes it as the number
    assert dense_cmd.main("detect", ["train", "--set", "max_size=900", "--steps", "1"]) == 2
    assert "'max_size' is in several sections: give one of model.max_size, data.max_size" in capsys.readouterr().err
    assert train_cmd.main(["--set", "optim.lr=1", "--print-config"]) == 2  # lr is batch.lr
    err = capsys.readouterr().err
    assert err.startswith("mambaout train: unknown setting 'optim.lr' (close: batch.lr") and err.count("\n") == 1
    detect = dense_cmd.train_parser("detect").parse_args
    assert vars(detect(["--no-progress", "--amp"])) == {"train.progress": False, "train.amp": "bf16"}


def test_amp_and_threads_mean_the_same_in_every_training_command():
    for command in ("train", "detect", "segment"):
        schema = SCHEMAS[command]
        amp = next(s for s in schema.settings if s.name == "amp")
        threads = next(s for s in schema.settings if s.name == "threads")
        assert (amp.help, amp.check.allowed, amp.default) == (
            SCHEMAS["train"].find("amp").help,
            "must be one of auto, none, bf16, fp16",
            "auto",
        )
        assert threads.check.allowed == "must be an integer in [1, 1,024] (or unset)"


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["train", "--min-lr", "nan"], "mambaout train: min_lr=nan: must be a finite number in [0, 1000]"),
        (["detect", "train", "--lr", "inf", "--set", "nope=1"], "mambaout detect train: unknown setting 'nope'"),
    ],
)
def test_bad_values_exit_2_without_traceback_from_the_console(argv, said):
    proc = subprocess.run([sys.executable, "-m", "mambaout", *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith(said) and proc.stderr.count("\n") == 1, proc.stderr


@pytest.mark.parametrize(
    ("env", "epochs", "cooldown", "per_epoch"),
    [
        ({"MAMBAOUT_MAX_STEPS": "6"}, 6, 0, 1),  # 300 + 10 epochs: 6 epochs of 1 step
        ({"MAMBAOUT_MAX_STEPS": "10", "MAMBAOUT_MAX_EPOCHS": "3"}, 3, 0, 3),  # 9 steps, the most 3 epochs give
        ({"MAMBAOUT_MAX_STEPS": "2", "MAMBAOUT_MAX_EPOCHS": "1"}, 1, 0, 2),  # tests/test_docs.py's caps
    ],
)
def test_max_steps_caps_the_optimizer_steps_of_the_whole_run(env, epochs, cooldown, per_epoch, monkeypatch):
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    flat = dict(C.DEFAULTS)  # 300 epochs and 10 of cooldown
    caps = train_cmd._smoke_caps(flat)
    assert (caps["epochs"], caps["cooldown_epochs"], caps["max_steps_per_epoch"]) == (epochs, cooldown, per_epoch)
    assert (epochs + cooldown) * per_epoch <= int(env["MAMBAOUT_MAX_STEPS"])
    # the dense commands: the same number is the run's steps
    cfg = D.resolve("detect", None, {"train.epochs": 12})
    dense_cmd._smoke_cap(cfg)
    assert (cfg.train.epochs, cfg.train.steps) == (None, int(env["MAMBAOUT_MAX_STEPS"]))


def settings_markdown() -> str:
    """docs/settings.md as the declarations give it."""
    parts = [
        "# Settings\n",
        "Every setting of the training commands, generated from their declarations (`setting(...)` in the "
        "config sections) by `python tests/test_settings.py`; tests/test_settings.py holds this file equal to what "
        "they give. Each is a flag where one is listed, and always `--set KEY=VALUE` or `--set SECTION.KEY=VALUE` "
        "(a bare key when one section alone has it), and a key in a recipe file. Values given with `--resume` win "
        "over the run's own, except those of the settings that shape the network (marked *network*).\n",
    ]
    titles = {"train": "`mambaout train`", "detect": "`mambaout detect train`", "segment": "`mambaout segment train`"}
    for command, schema in SCHEMAS.items():
        parts.append(f"## {titles[command]}\n")
        parts.append(schema.markdown())
    return "\n".join(parts)


def test_the_docs_settings_table_is_the_generated_one():
    assert DOCS.read_text() == settings_markdown(), "regenerate it: python tests/test_settings.py"


if __name__ == "__main__":
    DOCS.write_text(settings_markdown())
    print(f"wrote {DOCS}")
