"""The two kinds of failure mixexport knows.

`MixexportError` is for mistakes a user can make or fix (a bad checkpoint, an unsupported config,
a missing TensorRT, a parity failure): the CLI prints its message on one line and exits 1.
`InternalError` is a bug in mixexport: the CLI lets its traceback through.
"""


class MixexportError(Exception):
    """A problem the user can fix; the message says what and how."""


class InternalError(RuntimeError):
    """A broken invariant inside mixexport (a bug, not a user mistake)."""


def first_line(exc: BaseException) -> str:
    """The first line of another library's exception message (its type name where it has none),
    for a one-line MixexportError that says what went wrong there."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
