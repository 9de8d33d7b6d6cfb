"""Reading files a user points us at, without trusting them: one opening rule for every input.

Every file mixexport reads from a checkpoint (and an artifact) goes through `open_regular`:
it opens without blocking and checks with `fstat` on the open descriptor that it is a regular
file, so a FIFO, device, socket or directory in a file's place is refused at once instead of
hanging or reading forever, and what was checked is what is read (no race between a `stat` and
the `open`). Symlinks are followed: a Hugging Face cache snapshot is a directory of links into
`../../blobs/`, and must keep working. What is refused is a *name* that leaves the directory
(`inside`), and a target that is not a regular file.

JSON inputs are read with a byte bound first (`read_json_object`), then parsed strictly: UTF-8
only, no duplicate keys (the json module would silently keep the last), errors for nesting too
deep to parse and for numbers too long to convert, all as one-line `MixexportError`s that name
the file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from mixexport.errors import MixexportError

# What to tell the user for the OS errors an input or output path can cause.
_OS_ERROR_HINTS = {
    errno.ENOENT: "no such file or directory",
    errno.EACCES: "permission denied: check the file's permissions",
    errno.EPERM: "operation not permitted: check the file's permissions",
    errno.ENOTDIR: "a component of the path is not a directory",
    errno.EISDIR: "is a directory",
    errno.ELOOP: "too many levels of symbolic links (a symlink loop?)",
    errno.ENAMETOOLONG: "file name too long: choose a shorter path",
    errno.ENOSPC: "no space left on the device: free some space or choose another disk",
    errno.EDQUOT: "disk quota exceeded: free some space or choose another disk",
    errno.EROFS: "read-only file system: choose a writable directory",
    errno.ENXIO: "no such device (a socket or a device node, not a regular file)",
    errno.EIO: "input/output error (a failing disk or network file system?)",
    errno.ENOTEMPTY: "directory not empty",
    errno.EEXIST: "already exists",
    errno.EXDEV: "cannot rename across file systems",
}


def cut(text: str, limit: int = 120) -> str:
    """Text from a file, cut short for an error message: a hostile file may hold megabytes in one
    field or name, and an error stays one readable line."""
    return text if len(text) <= limit else text[:limit] + "..."


def os_error(exc: OSError, path: str | os.PathLike | None = None) -> MixexportError:
    """A one-line user error for an OS error on `path`: the path, then what happened and what to do.

    Args:
        exc: the error the OS raised.
        path: the path to name (default: the one the error carries).

    Returns:
        the error to raise (`raise os_error(exc, path) from None`).
    """
    path = path if path is not None else (exc.filename or "?")
    what = _OS_ERROR_HINTS.get(exc.errno, exc.strerror or str(exc))
    return MixexportError(f"{path}: {what}")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | os.PathLike, max_bytes: int | None = None) -> tuple[BinaryIO, int]:
    """Open `path` for reading if (after following symlinks) it is a regular file.

    Opens with O_NONBLOCK, so opening a FIFO returns at once instead of waiting for a writer,
    checks the descriptor with fstat, then clears O_NONBLOCK for ordinary reads.

    Args:
        path: the file.
        max_bytes: refuse a file larger than this (None: any size).

    Returns:
        (binary file object positioned at 0, its size in bytes). The caller closes it.

    Raises:
        MixexportError: naming the path, when it is missing, unreadable, not a regular file or
            larger than `max_bytes`.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise os_error(exc, path) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MixexportError(f"{path}: is {_kind(info.st_mode)}, expected a regular file")
        if max_bytes is not None and info.st_size > max_bytes:
            raise MixexportError(f"{path}: {info.st_size} bytes, more than the {max_bytes} bytes such a file "
                                 f"may have")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb"), info.st_size
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The whole content of a regular file of at most `max_bytes` bytes (see `open_regular`).

    The read itself is bounded by the size checked: a file that grows after the check is refused,
    not read on.
    """
    f, size = open_regular(path, max_bytes)
    try:
        with f:
            data = f.read(size + 1)  # one byte more than checked: a file that grew is refused
    except OSError as exc:
        raise os_error(exc, path) from None
    if len(data) > size:
        raise MixexportError(f"{path}: grew while being read; read it again when nothing writes to it")
    return data


class _DuplicateKey(ValueError):
    pass


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def parse_json_object(raw: bytes, source: str) -> dict[str, Any]:
    """Parse `raw` as a UTF-8 JSON object, strictly (see the module docstring).

    Args:
        raw: the bytes.
        source: names the file (or part of it) in errors, e.g. "config.json" or "X: header".

    Returns:
        the object. NaN and Infinity literals come through as floats: fields that need a finite
        number check for it.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MixexportError(f"{source}: not UTF-8 text (byte {exc.start}): not a JSON file") from None
    try:
        value = json.loads(text, object_pairs_hook=_object_without_duplicates)
    except _DuplicateKey as exc:
        raise MixexportError(f"{source}: key {exc.args[0]!r} appears twice in one JSON object") from None
    except RecursionError:
        raise MixexportError(f"{source}: JSON nested too deeply to be a valid file") from None
    except ValueError as exc:  # JSONDecodeError, and integers with too many digits
        raise MixexportError(f"{source}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise MixexportError(f"{source}: must hold a JSON object, found {type(value).__name__}")
    return value


def read_json_object(path: str | os.PathLike, max_bytes: int) -> dict[str, Any]:
    """Read and parse a JSON object file of at most `max_bytes` bytes; errors name `path`."""
    return parse_json_object(read_regular(path, max_bytes), str(path))


def inside(root: Path, name: Any, source: str) -> Path:
    """`root / name` for a relative name that stays inside `root` lexically.

    A name from a file (e.g. a shard in an index's weight_map) may name a file in `root` or a
    subfolder of it; it may not be absolute, empty, climb out with `..`, or hold NUL bytes or
    backslashes (a Windows separator that would hide a `..`). The file it names may itself be a
    symlink (Hugging Face cache layouts are); `open_regular` checks what it points to.

    Args:
        root: the directory the user named.
        name: the name as found in the file.
        source: names the file and field in errors, e.g. "X/model.safetensors.index.json: weight_map".

    Returns:
        the path, not resolved.
    """
    if not isinstance(name, str):
        raise MixexportError(f"{source}: file names must be strings, got {name!r}")
    why = ("is empty" if not name else
           "holds a NUL byte" if "\0" in name else
           "holds a backslash" if "\\" in name else
           "is absolute" if PurePosixPath(name).is_absolute() else
           "climbs out of the directory with '..'" if ".." in PurePosixPath(name).parts else None)
    if why:
        raise MixexportError(f"{source}: file name {name!r} {why}; it must name a file inside {root}")
    return root / PurePosixPath(name)


def format_bytes(nbytes: int) -> str:
    """A byte count for messages: GB from 1 GB up, MB below."""
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 10**9 else f"{nbytes / 1e6:.1f} MB"


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename or a new file in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
