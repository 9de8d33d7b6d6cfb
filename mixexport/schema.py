"""Schema checks for the JSON an artifact holds: small combinators that check a parsed value's
types and ranges and name the field at fault (`targets.ort.files[0].bytes must be ...`).

A leaf: the manifest's schema (`mixexport.artifact.manifest`) is built from these, and so are the
fields a target backend adds to its own manifest entry (`Backend.manifest_fields`).
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
from pathlib import Path
from typing import Any, Callable

from mixexport.errors import MixexportError
from mixexport.safe_io import inside

_INT64_MAX = 2**63 - 1


class Invalid(Exception):
    """A field that fails the schema: `where` is its path (`targets.ort.files[0].bytes`)."""

    def __init__(self, where: str, what: str):
        super().__init__(where, what)
        self.where, self.what = where, what


Check = Callable[[Any, str], None]


def join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def integer(lo: int = 0, hi: int = _INT64_MAX) -> Check:
    def check(value, where):
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise Invalid(where, "must be a non-negative integer" if (lo, hi) == (0, _INT64_MAX) else
                           f"must be an integer in [{lo}, {hi}]")
    return check


def number(lo: float, hi: float) -> Check:
    def check(value, where):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not lo <= value <= hi:
            raise Invalid(where, f"must be a finite number in [{lo}, {hi}]")
    return check


def boolean(value, where) -> None:
    if not isinstance(value, bool):
        raise Invalid(where, "must be true or false")


def text(choices: tuple[str, ...] | None = None, pattern: str | None = None, max_len: int = 4096) -> Check:
    def check(value, where):
        if not isinstance(value, str) or len(value) > max_len:
            raise Invalid(where, f"must be a string of at most {max_len} characters")
        if choices is not None and value not in choices:
            raise Invalid(where, f"must be one of {', '.join(choices)} (found {value!r})")
        if pattern is not None and not re.fullmatch(pattern, value):
            raise Invalid(where, f"{value!r} is not of the form {pattern}")
    return check


def exactly(expected: Any) -> Check:
    def check(value, where):
        if type(value) is not type(expected) or value != expected:
            raise Invalid(where, f"must be {json.dumps(expected)}")
    return check


def nullable(inner: Check) -> Check:
    def check(value, where):
        if value is not None:
            inner(value, where)
    return check


def array(item: Check, min_len: int = 0, max_len: int = 1_000_000) -> Check:
    def check(value, where):
        if not isinstance(value, list) or not min_len <= len(value) <= max_len:
            raise Invalid(where, f"must be a list of {min_len} to {max_len} items")
        for i, v in enumerate(value):
            item(v, f"{where}[{i}]")
    return check


def mapping(value_check: Check, keys: Check = text(max_len=256)) -> Check:
    def check(value, where):
        if not isinstance(value, dict):
            raise Invalid(where, "must be a JSON object")
        for k, v in value.items():
            keys(k, f"{where} key")
            value_check(v, join(where, k))
    return check


def record(required: dict[str, Check], optional: dict[str, Check] | None = None, open_: bool = False) -> Check:
    """An object with these fields; unknown fields are refused unless `open_`."""
    optional = optional or {}

    def check(value, where):
        if not isinstance(value, dict):
            raise Invalid(where, "must be a JSON object")
        for key, field in required.items():
            if key not in value:
                raise Invalid(join(where, key), "is missing")
            field(value[key], join(where, key))
        for key, v in value.items():
            if key in optional:
                optional[key](v, join(where, key))
            elif key not in required and not open_:
                raise Invalid(join(where, key), "is not a known field")
    return check


def either(*choices: tuple[Callable[[dict], bool], Check]) -> Check:
    """The first check whose predicate accepts the object (a tagged union)."""
    def check(value, where):
        for accepts, inner in choices:
            if isinstance(value, dict) and accepts(value):
                return inner(value, where)
        raise Invalid(where, "is none of the kinds of record expected here")
    return check


def path_problem(name: Any) -> str | None:
    """Why `name` is not a '/'-separated path relative to OUT that stays inside it (None: it is).

    Relative, normalised, no '..', no NUL, no backslash (a Windows separator that would hide a '..').
    """
    if not isinstance(name, str) or len(name) > 1024:
        return "must be a string of at most 1024 characters"
    try:
        inside(Path("OUT"), name, "")
    except MixexportError:
        return f"{name!r} must be a relative path inside the artifact (no '..', not absolute)"
    if posixpath.normpath(name) != name:
        return f"{name!r} must be a normalised path (no '.', '//' or trailing '/')"
    return None


def relative_path(value, where) -> None:
    """Schema check: a path relative to OUT (`path_problem`)."""
    problem = path_problem(value)
    if problem:
        raise Invalid(where, problem)


def absolute_path(value, where) -> None:
    """Schema check: an absolute path outside the artifact (the checkpoint a build read)."""
    text()(value, where)
    if not os.path.isabs(value) or "\0" in value:
        raise Invalid(where, f"{value!r} must be an absolute path without NUL bytes")


SHA256 = text(pattern="[0-9a-f]{64}")
FILE = record({"path": relative_path, "bytes": integer(), "sha256": SHA256})
