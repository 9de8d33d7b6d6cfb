"""Writing OUT: what --force may replace, the per-OUT lock, stale staging, the atomic install,
and the build CLI's refusals, interruptions and OS errors as one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from artifact.shared import RANGES, error_line, run_cli
from mixexport.artifact import install
from mixexport.errors import MixexportError


def _artifact(path: Path, marker: str = "old") -> Path:
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"format": 1, "tools": {"mixexport": "0"}, "targets": {}}))
    (path / "payload.txt").write_text(marker)
    return path


# -- what may be replaced --------------------------------------------------------------------


def test_force_refuses_a_directory_that_is_not_an_artifact(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    with pytest.raises(MixexportError, match="is not a mixexport artifact"):
        install.check_destination(home, force=True, protected={})
    line = error_line(run_cli("build", "--preset", "tiny", "-o", home, "--force", "--no-validate"))
    assert "is not a mixexport artifact" in line
    assert (home / "thesis.tex").read_text() == "years of work"


def test_force_accepts_an_artifact_or_an_empty_directory(tmp_path):
    install.check_destination(_artifact(tmp_path / "a"), force=True, protected={})
    (tmp_path / "empty").mkdir()
    install.check_destination(tmp_path / "empty", force=True, protected={})
    install.check_destination(tmp_path / "new", force=False, protected={})


@pytest.mark.parametrize("where", ["checkpoint", "parent of checkpoint", "cwd", "parent of cwd"])
def test_out_may_never_be_the_checkpoint_the_cwd_or_an_ancestor(where, tmp_path, monkeypatch):
    ckpt = _artifact(tmp_path / "models" / "ckpt")  # even an artifact-looking one
    work = tmp_path / "work" / "sub"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    out = {"checkpoint": ckpt, "parent of checkpoint": ckpt.parent, "cwd": work, "parent of cwd": work.parent}[where]
    with pytest.raises(MixexportError, match=r"is (the checkpoint|the current directory) or contains it"):
        install.check_destination(out, force=True, protected={"the checkpoint": ckpt})


def test_build_refuses_the_checkpoint_as_out(tiny_checkpoint, checkpoint_copy):
    ckpt = checkpoint_copy(tiny_checkpoint)
    before = sorted(p.name for p in ckpt.iterdir())
    line = error_line(run_cli("build", ckpt, "-o", ckpt, "--force"))
    assert line == f"error: -o {ckpt} is the checkpoint or contains it ({ckpt}); choose another output directory"
    line = error_line(run_cli("build", ckpt, "-o", ckpt.parent, "--force"))
    assert "is the checkpoint or contains it" in line
    assert sorted(p.name for p in ckpt.iterdir()) == before


def test_out_that_is_a_file_or_a_symlink_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(MixexportError, match="exists and is not a directory"):
        install.check_destination(tmp_path / "file", force=True, protected={})
    target = _artifact(tmp_path / "real")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(MixexportError, match="is a symbolic link"):
        install.check_destination(tmp_path / "link", force=True, protected={})


# -- lock, staging, install ---------------------------------------------------------------------


def test_one_build_at_a_time_per_out(tmp_path):
    out = tmp_path / "out"
    with install.output_lock(out):
        with pytest.raises(MixexportError, match=f"another mixexport build is writing {out} \\(pid {os.getpid()}\\)"):
            with install.output_lock(out):
                pass
        line = error_line(run_cli("build", "--preset", "tiny", "-o", out, "--no-validate"))
        assert "another mixexport build is writing" in line
    assert not (tmp_path / ".out.lock").exists()  # removed with the lock
    with install.output_lock(out):  # free again
        pass
    assert list(tmp_path.iterdir()) == []


def test_stale_staging_of_dead_builds_is_collected_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / ".out.building-1-dead"
    stale.mkdir()
    (stale / install.MARKER).write_text(json.dumps({"host": os.uname().nodename, "pid": dead_pid, "start": "1"}))
    (stale / "model.onnx.data").write_bytes(b"\0" * 1024)
    live = install.make_staging(out)  # this process: alive
    unmarked = tmp_path / ".out.building-2-user"  # not ours to judge: no marker
    unmarked.mkdir()
    lines = []
    install.collect_stale(out, lines.append)
    assert not stale.exists() and live.exists() and unmarked.exists()
    assert lines == [f"removing {stale}, left by a build that did not finish (pid {dead_pid})"]


def test_install_new_then_replace_atomically(tmp_path):
    out = tmp_path / "out"
    first = install.make_staging(out)
    (first / "v").write_text("1")
    install.install(first, out, replace=False)
    assert (out / "v").read_text() == "1" and not (out / install.MARKER).exists()
    second = install.make_staging(out)
    (second / "v").write_text("2")
    with pytest.raises(MixexportError, match="appeared while this build ran"):
        install.install(second, out, replace=False)
    assert (out / "v").read_text() == "1"
    install.install(second, out, replace=True)
    assert (out / "v").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the old artifact went with the exchange


def test_failed_builds_never_replace_an_earlier_failed_dir(tmp_path):
    out = tmp_path / "out"
    _artifact(tmp_path / "out.failed", marker="earlier failure")
    kept = install.keep_failed(install.make_staging(out), out)
    assert kept == tmp_path / "out.failed-2"
    assert (tmp_path / "out.failed" / "payload.txt").read_text() == "earlier failure"
    assert install.keep_failed(install.make_staging(out), out) == tmp_path / "out.failed-3"


# -- the build command ----------------------------------------------------------------------------


@pytest.mark.parametrize("targets, message", [
    (",", "--target names no target; choose from portable, ort, trt"),
    ("ort,ort", "--target names ort more than once"),
    ("ort,tensorrt", "unknown target 'tensorrt'; choose from portable, ort, trt"),
    ("trt", "target trt cannot be built for float32: the MixtralMoE plugin has no float32 kernels (their tiles do "
            "not fit in shared memory); it supports float16, bfloat16"),
])
def test_target_list_is_checked_before_any_work(targets, message, tmp_path):
    line = error_line(run_cli("build", "--preset", "tiny", "--target", targets, "-o", tmp_path / "out"))
    assert line == f"error: {message}"
    assert list(tmp_path.iterdir()) == []


def test_default_targets_leave_out_what_cannot_serve_the_model(tmp_path):
    result = run_cli("build", "--preset", "tiny", "-o", tmp_path / "out", "--no-validate", "--max-context", "64")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "ort", "portable"]
    assert "trt: not built for float32: the MixtralMoE plugin has no float32 kernels" in result.stderr


@pytest.mark.parametrize("ranges", [("1", "1", "1"), ("1", "1", "2"), ("1", "4", "5"), ("3", "1", "7")])
def test_every_range_from_one_builds(ranges, tmp_path):
    batch, sequence, context = ranges
    result = run_cli("build", "--preset", "tiny", "--target", "ort", "-o", tmp_path / "out", "--no-validate",
                     "--max-batch", batch, "--max-sequence", sequence, "--max-context", context)
    assert result.exit_code == 0, result.output
    dims = json.loads((tmp_path / "out" / "manifest.json").read_text())["dynamic_dims"]
    assert dims == {"batch": [1, int(batch)], "sequence": [1, int(sequence)],
                    "past_sequence": [0, int(context) - 1], "total_sequence": [1, int(context)]}


def test_small_context_checkpoint_builds_and_validates_with_defaults(checkpoint_factory, tiny_config, tmp_path):
    """A checkpoint with max_position_embeddings 64 (as transformers writes small test models):
    the default max sequence follows the context instead of exceeding it."""
    ckpt = checkpoint_factory(tiny_config.replace(max_position_embeddings=64))
    result = run_cli("build", ckpt, "--target", "ort", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["dynamic_dims"]["sequence"] == [1, 64] and manifest["dynamic_dims"]["total_sequence"] == [1, 64]
    assert manifest["validation"]["targets"] == {"ort": "pass"}


def test_too_little_disk_is_refused_up_front(tiny_checkpoint, tmp_path, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    line = error_line(run_cli("build", tiny_checkpoint, "-o", tmp_path / "out", "--no-validate"))
    assert line.startswith(f"error: not enough disk space for {tmp_path / 'out'}: 2 target(s) need about ")
    assert line.endswith(f"0.0 MB are free on the filesystem of {tmp_path}")
    assert list(tmp_path.iterdir()) == []


def test_whole_validation_that_cannot_fit_in_memory_is_refused_up_front(tmp_path, monkeypatch):
    monkeypatch.setattr("mixexport.driver.build.memory_available", lambda: 1000)
    line = error_line(run_cli("build", "--preset", "tiny", "-o", tmp_path / "out", "--validation-mode", "whole"))
    assert "validating this model in memory needs about" in line and "use --validation-mode streamed" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["parent is a file", "name too long"])
def test_os_errors_are_one_line(case, tmp_path):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "out" if case == "parent is a file" else tmp_path / ("x" * 300)
    line = error_line(run_cli("build", "--preset", "tiny", "-o", out, "--no-validate"))
    assert line.startswith("error: ") and ("Not a directory" in line or "File exists" in line
                                            or "File name too long" in line), line


def test_sigterm_removes_the_staging_directory(tmp_path):
    """A cancelled CI job (SIGTERM) unwinds: no multi-GB .OUT.building-* is left behind."""
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "mixexport.cli.main", "build", "--preset", "tiny",
                                "--target", "ort", "-o", str(out), "--no-validate"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.building-*")):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip().splitlines()[-1] == "error: terminated (SIGTERM); files this run was writing were removed"
    assert list(tmp_path.iterdir()) == []


def test_two_builds_to_one_out_without_force(tmp_path):
    out = tmp_path / "out"
    args = ("build", "--preset", "tiny", "--target", "ort", "-o", out, "--no-validate", *_ranges())
    assert run_cli(*args).exit_code == 0
    before = (out / "manifest.json").read_bytes()
    line = error_line(run_cli(*args))
    assert line == f"error: {out} already exists; pass --force to replace it"
    assert (out / "manifest.json").read_bytes() == before


def _ranges() -> tuple[str, ...]:
    return ("--max-batch", str(RANGES["max_batch"]), "--max-sequence", str(RANGES["max_sequence"]),
            "--max-context", str(RANGES["max_context"]))
