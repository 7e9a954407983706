"""Typed, range-checked configuration fields: what a setting may hold, said once, checked once.

A frozen dataclass declares each field with `setting(default, check)`; `validate_fields(obj)` (called from the
section's `__post_init__`) runs every check, stores the normalised value (a list becomes a tuple, an int a float)
and raises one `ValueError` line naming the key, the value and what is allowed:

    min_lr=nan: must be a finite number in [0, 1000]

NaN and infinities are refused by every number check; no setting here means anything by them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

_MAX_SHOWN = 60  # a value is shown up to this many characters in a message (a --set list can be long)


class Check:
    """A check of one value: `__call__(value)` returns it normalised or raises `ValueError(what is allowed)`."""

    def __init__(self, allowed: str, fn: Callable, optional: bool = False):
        self.allowed = allowed + (" (or unset)" if optional else "")
        self.fn, self.optional = fn, optional

    def __call__(self, value):
        if value is None and self.optional:
            return None
        out = self.fn(value)
        if out is _BAD:
            raise ValueError(self.allowed)
        return out


_BAD = object()
BAD = _BAD  # what a check function returns for a value it refuses


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
            return _BAD
        if (v <= lo if lo_open else v < lo) or (hi is not None and (v >= hi if hi_open else v > hi)):
            return _BAD
        return float(v)

    return Check(f"must be a finite number {_range_text(lo, hi, lo_open, hi_open)}", fn, optional)


def integer(lo: int, hi: int | None = None, *, optional=False, zero_means: str = "") -> Check:
    """An int in [lo, hi] (a float with an integral value, as YAML may write it, is taken as that int)."""

    def fn(v):
        if isinstance(v, float) and is_number(v) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            return _BAD
        return v

    note = f" ({zero_means})" if zero_means else ""
    return Check(f"must be an integer {_range_text(lo, hi, False, False)}{note}", fn, optional)


def boolean() -> Check:
    return Check("must be true or false", lambda v: v if isinstance(v, bool) else _BAD)


def choice(*options: str, optional=False) -> Check:
    return Check(f"must be one of {', '.join(options)}", lambda v: v if v in options else _BAD, optional)


def text(*, optional=False, max_len: int = 4096) -> Check:
    """A non-empty string (a path, a model name, a timm option string)."""

    def fn(v):
        return v if isinstance(v, str) and 0 < len(v) <= max_len and "\x00" not in v else _BAD

    return Check("must be a non-empty string", fn, optional)


def number_list(min_len: int, max_len: int, lo: float, hi: float, *, lo_open=False, increasing=False) -> Check:
    """A list of `min_len` to `max_len` finite numbers in the range, stored as a tuple of floats."""

    def fn(v):
        if not isinstance(v, (list, tuple)) or not min_len <= len(v) <= max_len:
            return _BAD
        out = []
        for x in v:
            if not is_number(x) or (x <= lo if lo_open else x < lo) or x > hi:
                return _BAD
            out.append(float(x))
        if increasing and any(a > b for a, b in zip(out, out[1:])):
            return _BAD
        return tuple(out)

    count = str(min_len) if min_len == max_len else f"{min_len} to {max_len}"
    order = ", not decreasing" if increasing else ""
    return Check(f"must be a list of {count} finite numbers {_range_text(lo, hi, lo_open, False)}{order}", fn)


def numbers(n: int, lo: float, hi: float, *, lo_open=False, increasing=False) -> Check:
    """A list of `n` finite numbers in the range, stored as a tuple of floats."""
    return number_list(n, n, lo, hi, lo_open=lo_open, increasing=increasing)


def mapping(check_items: Callable[[dict], None] | None = None) -> Check:
    """A mapping with string keys; `check_items` may raise ValueError for its contents."""

    def fn(v):
        if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
            return _BAD
        if check_items is not None:
            check_items(v)
        return dict(v)

    return Check("must be a mapping of name: value", fn)


def setting(default, check: Check, default_factory=None):
    """A dataclass field with its check (and a factory for mutable defaults such as `{}`)."""
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata={"check": check})
    return dataclasses.field(default=default, metadata={"check": check})


def integers(min_len: int, max_len: int, lo: int, hi: int) -> Check:
    """A list of `min_len` to `max_len` integers in [lo, hi], stored as a tuple."""

    def fn(v):
        if not isinstance(v, (list, tuple)) or not min_len <= len(v) <= max_len:
            return _BAD
        if not all(is_int(x) and lo <= x <= hi for x in v):
            return _BAD
        return tuple(v)

    count = str(min_len) if min_len == max_len else f"{min_len} to {max_len}"
    return Check(f"must be a list of {count} integers in [{_fmt(lo)}, {_fmt(hi)}]", fn)


def show(value) -> str:
    """A value as a message shows it: its repr, cut to a readable length."""
    text_ = repr(value)
    return text_ if len(text_) <= _MAX_SHOWN else text_[: _MAX_SHOWN - 3] + "..."


def validate_fields(obj) -> None:
    """Run every field's check on a (frozen) dataclass instance, storing the normalised values."""
    for f in dataclasses.fields(obj):
        check = f.metadata.get("check")
        if check is None:
            continue
        value = getattr(obj, f.name)
        try:
            normalised = check(value)
        except ValueError as e:
            if str(e).startswith(f"{f.name}."):  # a nested check that already names its key (model_kwargs.dims=...)
                raise ValueError(str(e)) from None
            raise ValueError(f"{f.name}={show(value)}: {e}") from None
        object.__setattr__(obj, f.name, normalised)


def field_names(cls) -> Sequence[str]:
    return [f.name for f in dataclasses.fields(cls)]
