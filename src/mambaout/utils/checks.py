"""Typed, range-checked configuration fields: a dataclass declares each with `setting(default, check, help, ...)`;
`validate_fields(obj)` (from `__post_init__`) stores the normalised values (a list becomes a tuple, an int a float)
or raises one line, `min_lr=nan: must be a finite number in [0, 1000]` (number checks refuse NaN and infinities).
A check's `kind` (how a flag spells it) and `bad` (values it refuses) feed `utils.schema` and tests/test_settings.py.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

_MAX_SHOWN = 60  # a value is shown up to this many characters in a message (a --set list can be long)


class Check:
    """A check of one value: `__call__(value)` returns it normalised or raises `ValueError(what is allowed)`."""

    def __init__(self, allowed: str, fn: Callable, optional: bool = False, kind: str = "value", bad=(), nargs=None):
        """`kind`: how a flag reads the value (text: as typed; number: an int or float, else the text; list:
        `nargs` such numbers; boolean: a --x/--no-x switch; value: YAML). `bad`: values the check refuses, beside
        those every check refuses (a nested mapping, NaN)."""
        self.allowed = allowed + (" (or unset)" if optional else "")
        self.fn, self.optional, self.kind, self.nargs = fn, optional, kind, nargs
        self.choices: tuple[str, ...] | None = None  # a choice's options (the parser's metavar)
        self.bad = (*bad, {"a": [1]}, math.nan)

    def __call__(self, value):
        if value is None and self.optional:
            return None
        out = self.fn(value)
        if out is BAD:
            raise ValueError(self.allowed)
        return out


BAD = object()  # what a check function returns for a value it refuses


def is_int(v) -> bool:
    """An int proper (True and False are ints to Python, never to a setting)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """A finite int or float (no bool, NaN or infinity)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(x) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:g}"


def _range_text(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if hi is None:
        return f"{'>' if lo_open else '>='} {_fmt(lo)}"
    return f"in {'(' if lo_open else '['}{_fmt(lo)}, {_fmt(hi)}{')' if hi_open else ']'}"


def number(lo: float, hi: float | None = None, *, lo_open=False, hi_open=False, optional=False) -> Check:
    """A finite float in the range (ints accepted, stored as float)."""

    def fn(v):
        if not is_number(v):
            return BAD
        if (v <= lo if lo_open else v < lo) or (hi is not None and (v >= hi if hi_open else v > hi)):
            return BAD
        return float(v)

    bad = ["x", True, math.inf, -math.inf, lo - 1 if not lo_open else lo]
    bad += [] if hi is None else [hi if hi_open else hi + 1]
    return Check(f"must be a finite number {_range_text(lo, hi, lo_open, hi_open)}", fn, optional, "number", bad)


def integer(lo: int, hi: int | None = None, *, optional=False, zero_means: str = "") -> Check:
    """An int in [lo, hi] (a float with an integral value, as YAML may write it, is taken as that int)."""

    def fn(v):
        if isinstance(v, float) and is_number(v) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            return BAD
        return v

    note = f" ({zero_means})" if zero_means else ""
    bad = ["x", 1.5, True, math.inf, lo - 1] + ([] if hi is None else [hi + 1])
    return Check(f"must be an integer {_range_text(lo, hi, False, False)}{note}", fn, optional, "number", bad)


def boolean() -> Check:
    return Check("must be true or false", lambda v: v if isinstance(v, bool) else BAD, kind="boolean", bad=["x", 2])


def choice(*options: str, optional=False) -> Check:
    fn = lambda v: v if isinstance(v, str) and v in options else BAD  # noqa: E731
    check = Check(f"must be one of {', '.join(options)}", fn, optional, "text", ["no-such-choice", 3, [options[0]]])
    check.choices = tuple(options)
    return check


def text(*, optional=False, max_len: int = 4096) -> Check:
    """A non-empty string (a path, a model name, a timm option string)."""

    def fn(v):
        return v if isinstance(v, str) and 0 < len(v) <= max_len and "\x00" not in v else BAD

    return Check("must be a non-empty string", fn, optional, "text", ["", 3, [1, 2], "x" * (max_len + 1)])


def _list(min_len, max_len, lo, hi, lo_open, increasing, item, kind: str, bad: list) -> Check:
    """A list of `min_len` to `max_len` items (`item`: is_int or is_number) in the range, stored as a tuple."""

    def fn(v):
        if not isinstance(v, (list, tuple)) or not min_len <= len(v) <= max_len:
            return BAD
        if not all(item(x) and (x > lo if lo_open else x >= lo) and x <= hi for x in v):
            return BAD
        out = tuple(v) if item is is_int else tuple(float(x) for x in v)
        return BAD if increasing and any(a > b for a, b in zip(out, out[1:])) else out

    count = str(min_len) if min_len == max_len else f"{min_len} to {max_len}"
    order = ", not decreasing" if increasing else ""
    n = max(min_len, 1)
    bad = ["x", [lo if lo_open else lo - 1] * n, [hi + 1] * n, [math.nan] * n, *bad]
    nargs = min_len if min_len == max_len else ("+" if min_len else "*")
    allowed = f"must be a list of {count} {kind} {_range_text(lo, hi, lo_open, False)}{order}"
    return Check(allowed, fn, kind="list", bad=bad, nargs=nargs)


def number_list(min_len: int, max_len: int, lo: float, hi: float, *, lo_open=False, increasing=False) -> Check:
    """A list of `min_len` to `max_len` finite numbers in the range, stored as a tuple of floats."""
    bad = [[0.5] * (min_len - 1)] if min_len > 1 else []
    bad += [[hi, lo + 1e-3 if lo_open else lo]] if increasing and min_len <= 2 <= max_len else []
    return _list(min_len, max_len, lo, hi, lo_open, increasing, is_number, "finite numbers", bad)


def numbers(n: int, lo: float, hi: float, *, lo_open=False, increasing=False) -> Check:
    """A list of `n` finite numbers in the range, stored as a tuple of floats."""
    return number_list(n, n, lo, hi, lo_open=lo_open, increasing=increasing)


def integers(min_len: int, max_len: int, lo: int, hi: int) -> Check:
    """A list of `min_len` to `max_len` integers in [lo, hi], stored as a tuple."""
    too_few = [lo] * (min_len - 1) if min_len > 1 else [lo] * (max_len + 1)
    return _list(min_len, max_len, lo, hi, False, False, is_int, "integers", [[1.5] * min_len, too_few])


def mapping(check_items: Callable[[dict], None] | None = None, bad=()) -> Check:
    """A mapping with string keys; `check_items` may raise ValueError for its contents (`bad`: mappings it refuses)."""

    def fn(v):
        if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
            return BAD
        if check_items is not None:
            check_items(v)
        return dict(v)

    check = Check("must be a mapping of name: value", fn, kind="value", bad=[[1, 2], "x", *bad])
    check.bad = tuple(b for b in check.bad if b != {"a": [1]})  # a nested mapping is a mapping: `bad` says more
    return check


def setting(default, check: Check, help: str = "", *, flags=None, default_factory=None, network=False, **cli):
    """A dataclass field declared once: its default (or a factory for mutable ones such as `{}`), check, help and
    command-line flags (None: `--name-with-dashes`; `()`: none, `--set` only). `network`: the setting shapes the
    network, so a resumed run refuses another value. Further keywords go to argparse's `add_argument`."""
    meta = {"check": check, "help": help, "flags": flags, "network": network, "cli": cli}
    given = {"default": default} if default_factory is None else {"default_factory": default_factory}
    return dataclasses.field(**given, metadata=meta)


def show(value) -> str:
    """A value as a message shows it: its repr, cut to a readable length."""
    shown = repr(value)
    return shown if len(shown) <= _MAX_SHOWN else shown[: _MAX_SHOWN - 3] + "..."


def validate_fields(obj, prefix: str = "", lists: bool = False) -> None:
    """Run every field's check on a (frozen) dataclass instance, storing the normalised values; `prefix` goes
    before the key in messages (`train.`), and `lists` stores lists as lists (tuples otherwise)."""
    for f in dataclasses.fields(obj):
        check = f.metadata.get("check")
        if check is None:
            continue
        value = getattr(obj, f.name)
        try:
            normalised = check(value)
        except ValueError as e:
            if str(e).startswith(f"{prefix}{f.name}."):  # a nested check that names its key (model_kwargs.dims=...)
                raise ValueError(str(e)) from None
            raise ValueError(f"{prefix}{f.name}={show(value)}: {e}") from None
        object.__setattr__(obj, f.name, list(normalised) if lists and isinstance(normalised, tuple) else normalised)
