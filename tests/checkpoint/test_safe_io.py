"""The one opening rule every checkpoint read uses: regular files only, never blocking, bounded;
strict JSON; names that stay inside the directory."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import pytest

from checkpoint.helpers import deadline
from mixexport.errors import MixexportError
from mixexport.safe_io import inside, open_regular, os_error, parse_json_object, read_json_object, read_regular


# -- open_regular -----------------------------------------------------------------------------------

def test_reads_a_regular_file_and_a_symlink_to_one(tmp_path):
    (tmp_path / "blob").write_bytes(b"abc")
    (tmp_path / "link").symlink_to("blob")
    for name in ("blob", "link"):
        f, size = open_regular(tmp_path / name)
        with f:
            assert (size, f.read()) == (3, b"abc")


def test_a_fifo_is_refused_at_once(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "link").symlink_to("pipe")
    for name in ("pipe", "link"):
        with deadline(), pytest.raises(MixexportError, match=rf"{name}: is a FIFO \(named pipe\), expected a "
                                                             rf"regular file"):
            open_regular(tmp_path / name)


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(MixexportError, match=r": is a directory, expected a regular file"):
        open_regular(tmp_path)


def test_a_device_is_refused(tmp_path):
    (tmp_path / "zero").symlink_to("/dev/zero")  # would read forever
    with deadline(), pytest.raises(MixexportError, match=r"zero: is a character device, expected a regular file"):
        open_regular(tmp_path / "zero")


def test_a_socket_is_refused(tmp_path):
    path = tmp_path / "sock"
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(path))
        with deadline(), pytest.raises(MixexportError, match=r"sock: no such device \(a socket or a device node"):
            open_regular(path)
    finally:
        server.close()


def test_missing_and_broken_symlink(tmp_path):
    (tmp_path / "dangling").symlink_to("nowhere")
    for name in ("absent", "dangling"):
        with pytest.raises(MixexportError, match=rf"{name}: no such file or directory"):
            open_regular(tmp_path / name)


def test_symlink_loop(tmp_path):
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    with pytest.raises(MixexportError, match=r"a: too many levels of symbolic links"):
        open_regular(tmp_path / "a")


def test_a_file_used_as_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(MixexportError, match=r"file/inner: a component of the path is not a directory"):
        open_regular(tmp_path / "file" / "inner")


def test_permission_denied_is_one_line(tmp_path, monkeypatch):
    # Tests run as root here, which reads whatever the mode bits say: make the OS answer EACCES.
    path = tmp_path / "secret"
    path.write_text("x")
    real_open = os.open

    def denied(p, *args, **kwargs):
        if Path(p) == path:
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real_open(p, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(MixexportError, match=r"secret: permission denied: check the file's permissions"):
        open_regular(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode bits say")
def test_permission_denied_for_real(tmp_path):
    path = tmp_path / "secret"
    path.write_text("x")
    path.chmod(0)
    with pytest.raises(MixexportError, match=r"secret: permission denied"):
        open_regular(path)


def test_size_bound_is_checked_before_reading(tmp_path):
    path = tmp_path / "big"
    with open(path, "wb") as f:
        f.truncate(10**12)  # sparse: a terabyte that takes no disk
    with pytest.raises(MixexportError, match=r"big: 1000000000000 bytes, more than the 1024 bytes"):
        read_regular(path, 1024)
    (tmp_path / "small").write_bytes(b"x" * 1024)
    assert read_regular(tmp_path / "small", 1024) == b"x" * 1024


def test_os_error_names_the_path_and_what_to_do():
    assert str(os_error(OSError(errno.ENOSPC, "No space left on device", "/x/y"))) == (
        "/x/y: no space left on the device: free some space or choose another disk")
    assert str(os_error(OSError(errno.EROFS, "Read-only file system"), "/ro")) == (
        "/ro: read-only file system: choose a writable directory")
    assert str(os_error(OSError(errno.EBADMSG, "Bad message"), "/z")) == "/z: Bad message"


# -- strict JSON ------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw,message", [
    (b'{"a": "\xff\xfe"}', r"f\.json: not UTF-8 text \(byte 7\): not a JSON file"),
    (b"[" * 100_000 + b"]" * 100_000, r"f\.json: JSON nested too deeply to be a valid file"),
    (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", r"f\.json: JSON nested too deeply"),
    (b'{"a": 1' + b"0" * 5000 + b"}", r"f\.json: not valid JSON \(Exceeds the limit"),
    (b'{"a": 1, "b": 2, "a": 3}', r"f\.json: key 'a' appears twice in one JSON object"),
    (b'{"o": {"k": 1, "k": 1}}', r"f\.json: key 'k' appears twice"),
    (b"[1, 2]", r"f\.json: must hold a JSON object, found list"),
    (b"null", r"f\.json: must hold a JSON object, found NoneType"),
    (b'"text"', r"f\.json: must hold a JSON object, found str"),
    (b"", r"f\.json: not valid JSON \(Expecting value"),
    (b'{"a": 1', r"f\.json: not valid JSON"),
])
def test_malformed_json_is_one_error_naming_the_file(raw, message):
    with pytest.raises(MixexportError, match=message):
        parse_json_object(raw, "f.json")


def test_nan_and_infinity_come_through_for_the_fields_to_refuse():
    value = parse_json_object(b'{"a": NaN, "b": Infinity, "c": 1e400}', "f.json")
    assert value["a"] != value["a"] and value["b"] == value["c"] == float("inf")


def test_read_json_object_bounds_and_names_the_file(tmp_path):
    (tmp_path / "ok.json").write_text('{"a": [1, {"b": null}]}')
    assert read_json_object(tmp_path / "ok.json", 100) == {"a": [1, {"b": None}]}
    with pytest.raises(MixexportError, match=r"ok\.json: 23 bytes, more than the 10 bytes"):
        read_json_object(tmp_path / "ok.json", 10)


# -- names inside a directory -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["model.safetensors", "sub/model-00001-of-00002.safetensors",
                                  "./model.safetensors", "a..b.safetensors", "..hidden"])
def test_names_inside_the_directory(tmp_path, name):
    assert inside(tmp_path, name, "index") == tmp_path / name


@pytest.mark.parametrize("name,why", [
    ("", "is empty"),
    ("../outside/x.safetensors", "climbs out of the directory with '..'"),
    ("sub/../../x.safetensors", "climbs out of the directory with '..'"),
    ("..", "climbs out"),
    ("/etc/passwd", "is absolute"),
    ("//server/share", "is absolute"),
    ("x\0.safetensors", "holds a NUL byte"),
    ("..\\x.safetensors", "holds a backslash"),
    ("C:\\x.safetensors", "holds a backslash"),
])
def test_names_outside_the_directory_are_refused(tmp_path, name, why):
    with pytest.raises(MixexportError, match=rf"^index: file name .* {why}.*; it must name a file inside "):
        inside(tmp_path, name, "index")


@pytest.mark.parametrize("name", [None, 5, ["x"], {"x": 1}, True])
def test_names_must_be_strings(tmp_path, name):
    with pytest.raises(MixexportError, match=r"^index: file names must be strings, got "):
        inside(tmp_path, name, "index")
