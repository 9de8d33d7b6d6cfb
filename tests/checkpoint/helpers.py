"""Helpers for the checkpoint input tests: a deadline for calls that must not block, and ways to
damage a copy of a checkpoint (config text, index text, a safetensors header)."""

from __future__ import annotations

import contextlib
import json
import signal
from pathlib import Path

DEADLINE_SECONDS = 10


@contextlib.contextmanager
def deadline(seconds: int = DEADLINE_SECONDS):
    """Fail, instead of hanging the suite, when the body blocks (e.g. opening a FIFO) for `seconds`.

    SIGALRM's handler raises, which interrupts a blocking open() or read() in the main thread.
    """
    def expire(*_):
        raise TimeoutError(f"still blocked after {seconds}s: a read that must be refused at once is waiting")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def header_of(path: Path) -> tuple[dict, bytes]:
    """(parsed header, data section) of a safetensors file."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_raw_header(path: Path, raw: bytes, data: bytes) -> None:
    """A safetensors file with exactly these header bytes (padded with spaces to 8) and data."""
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def with_field(base: dict, field: str, json_text: str) -> str:
    """config/index JSON text of `base` with `field` set to the literal JSON text `json_text`
    (so values json.dumps cannot write, such as 1e400, keep their spelling)."""
    rest = {k: v for k, v in base.items() if k != field}
    return json.dumps(rest)[:-1] + f', "{field}": {json_text}}}'
