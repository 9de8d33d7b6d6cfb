"""The two kinds of failure mixexport knows.

`MixexportError` is for mistakes a user can make or fix (a bad checkpoint, an unsupported config,
a missing TensorRT, a parity failure): the CLI prints its message on one line and exits 1.
`InternalError` is a bug in mixexport: the CLI lets its traceback through.
"""


class MixexportError(Exception):
    """A problem the user can fix; the message says what and how."""


class InternalError(RuntimeError):
    """A broken invariant inside mixexport (a bug, not a user mistake)."""
