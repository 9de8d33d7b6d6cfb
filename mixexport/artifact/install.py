"""Writing an artifact directory without ever losing what was there.

The rules, for OUT (the directory the user named with `-o`):

- OUT is assembled in a staging directory beside it (`.OUT.building-PID-XXXX`), which holds a
  marker naming the process that made it. Staging directories of builds that died (SIGKILL, power
  loss) are removed by the next build of the same OUT; nothing else is ever collected.
- One build at a time per OUT: an exclusive lock (`.OUT.lock` beside it) is held from the first
  check to the install; a second build fails at once instead of silently replacing the first.
- `--force` replaces only a directory that is a mixexport artifact (or empty), never a
  checkpoint, the checkpoint being exported or one of its ancestors, nor the current directory
  or one of its ancestors.
- The install is one atomic rename: `renameat2(RENAME_NOREPLACE)` for a new OUT and
  `renameat2(RENAME_EXCHANGE)` to replace one, so there is no moment without OUT. Where the
  filesystem or OS lacks renameat2, the fallback is the classic pair of renames.
- A build that fails parity is kept in `OUT.failed` (or `OUT.failed-2`, ...: an existing one is
  never replaced).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import secrets
import shutil
import socket
from pathlib import Path
from typing import Callable, Iterator

from mixexport.errors import MixexportError
from mixexport.safe_io import fsync_dir, read_json_object

MANIFEST = "manifest.json"
MARKER = ".mixexport-staging.json"
_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_MAX_MANIFEST_BYTES = 64 * 1024 * 1024

try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
except (AttributeError, OSError):  # not glibc >= 2.28 / not Linux
    _renameat2 = None


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(src, dst, flags). Returns False where the OS or filesystem does not support it."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _process_id() -> dict:
    """This process, as a stale-directory marker names it: host, pid and the pid's start time
    (so a recycled pid is not mistaken for the build that made the directory)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid())}


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, starttime, after the "(comm)" field


def _alive(marker: dict) -> bool:
    if marker.get("host") != socket.gethostname():
        return True  # another machine's build (shared filesystem): not ours to judge
    pid = marker.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return marker.get("start") is None or _start_time(pid) == marker.get("start")


def is_artifact(path: Path) -> bool:
    """Whether `path` is a directory mixexport wrote: it holds a manifest.json whose JSON names
    mixexport as its writer. Cheap and bounded: the manifest is not otherwise checked here."""
    try:
        data = read_json_object(path / MANIFEST, _MAX_MANIFEST_BYTES)
    except (MixexportError, OSError):
        return False
    return isinstance(data, dict) and isinstance(data.get("tools"), dict) and "mixexport" in data["tools"] \
        and "format" in data


def _contains(outer: Path, inner: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_destination(out: Path, force: bool, protected: dict[str, Path]) -> None:
    """Refuse an OUT this build must not write to.

    Args:
        out: the artifact directory the user named.
        force: whether the user asked to replace an existing OUT.
        protected: directories OUT must never be, or contain (e.g. {"the checkpoint": path}).

    Raises:
        MixexportError: naming OUT and why.
    """
    real = out.resolve()
    guarded = {**protected, "the current directory": Path.cwd()}
    for what, path in guarded.items():
        if _contains(real, path.resolve()):
            raise MixexportError(f"-o {out} is {what} or contains it ({path}); choose another output directory")
    if not os.path.lexists(out):
        return
    if out.is_symlink():
        raise MixexportError(f"{out} is a symbolic link; give the directory itself as -o")
    if not out.is_dir():
        raise MixexportError(f"{out} exists and is not a directory; choose another output directory")
    if not force:
        raise MixexportError(f"{out} already exists; pass --force to replace it")
    if not is_artifact(out) and any(out.iterdir()):
        raise MixexportError(f"{out} is not a mixexport artifact (no manifest.json written by mixexport); "
                             f"--force replaces only artifacts: remove it yourself or choose another directory")


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the lock of OUT (`.OUT.lock` beside it) for the duration of the block.

    Raises:
        MixexportError: when another live build holds it.
    """
    path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise MixexportError(f"another mixexport build is writing {out} (pid {holder}); wait for it to finish "
                                 f"or choose another output directory") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder unlinked this file after we opened it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def make_staging(out: Path) -> Path:
    """A new staging directory beside OUT, marked as this process's."""
    path = out.parent / f".{out.name}.building-{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir()
    (path / MARKER).write_text(json.dumps(_process_id()) + "\n")
    return path


def collect_stale(out: Path, progress: Callable[[str], None]) -> None:
    """Remove the staging and old-artifact directories of dead builds of OUT (call under the lock)."""
    for path in sorted(out.parent.glob(f".{out.name}.building-*")) + sorted(out.parent.glob(f".{out.name}.old-*")):
        marker = path / MARKER
        try:
            if path.is_symlink() or not path.is_dir() or not marker.is_file():
                continue
            owner = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(owner, dict) and not _alive(owner):
            progress(f"removing {path}, left by a build that did not finish (pid {owner.get('pid')})")
            shutil.rmtree(path, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
    fsync_dir(root)


def install(staging: Path, out: Path, replace: bool) -> None:
    """Put the finished staging directory at OUT in one atomic step.

    Every file is flushed before the rename and the parent directory after it, so a crash never
    leaves an OUT whose files are empty or partly written.

    Args:
        staging: the finished artifact (from `make_staging`).
        out: where it goes.
        replace: whether an existing OUT (already checked by `check_destination`) is replaced.
    """
    if os.path.lexists(out) and not replace:
        raise MixexportError(f"{out} appeared while this build ran; it was not replaced (pass --force)")
    (staging / MARKER).unlink(missing_ok=True)
    _fsync_tree(staging)
    if os.path.lexists(out):
        if _rename2(staging, out, _RENAME_EXCHANGE):
            shutil.rmtree(staging)  # now the old artifact
        else:
            old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.replace(out, old)
            (old / MARKER).write_text(json.dumps(_process_id()) + "\n")  # collected if we die here
            os.replace(staging, out)
            shutil.rmtree(old)
    elif not _rename2(staging, out, _RENAME_NOREPLACE):
        os.rename(staging, out)
    fsync_dir(out.parent)


def keep_failed(staging: Path, out: Path) -> Path:
    """Move a build that failed parity to `OUT.failed` (or the first free `OUT.failed-N`)."""
    (staging / MARKER).unlink(missing_ok=True)
    for n in range(1, 1000):
        target = out.with_name(f"{out.name}.failed" + ("" if n == 1 else f"-{n}"))
        if os.path.lexists(target):
            continue
        try:
            if not _rename2(staging, target, _RENAME_NOREPLACE):
                os.rename(staging, target)
        except FileExistsError:  # made by someone else since the check
            continue
        return target
    raise MixexportError(f"{out}.failed through {out}.failed-999 all exist; remove old failed builds")
