"""The `mixexport` command line: --version, `init`, and how user errors reach the terminal."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mixexport import __version__
from mixexport.checkpoint import Checkpoint, preset
from mixexport.cli.main import cli

# The console script pip installs beside this interpreter.
MIXEXPORT = Path(sys.executable).with_name("mixexport")


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    assert MIXEXPORT.exists(), f"{MIXEXPORT} missing: install the package (pip install -e '.[test]')"
    return subprocess.run([str(MIXEXPORT), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), prog_name="mixexport")


def test_version_option():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout == f"mixexport, version {__version__}\n"


def test_version_from_the_installed_script():
    proc = run_cli("--version")
    assert proc.returncode == 0
    assert proc.stdout == f"mixexport, version {__version__}\n"


def test_init_with_cli_runner(tmp_path):
    out = tmp_path / "tiny"
    result = invoke("init", str(out), "--preset", "tiny", "--layers", "1", "--experts", "3", "--seed", "4")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote {out} in {result.stdout.split(' in ')[1]}"
    assert "[mixexport] writing tiny checkpoint (1 layers, 3 experts, top-2, float32)" in result.stderr
    ckpt = Checkpoint(out)
    assert ckpt.config == preset("tiny").replace(num_hidden_layers=1, num_local_experts=3)


def test_init_experts_below_the_preset_top_k_lowers_top_k(tmp_path):
    result = invoke("init", str(tmp_path / "one"), "--layers", "1", "--experts", "1")
    assert result.exit_code == 0, result.output
    assert Checkpoint(tmp_path / "one").config.num_experts_per_tok == 1


def test_init_sharded_with_cli_runner(tmp_path):
    out = tmp_path / "sharded"
    result = invoke("init", str(out), "--max-shard-size", "100KB")
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors.index.json").exists()
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 2
    assert result.stderr.count("[mixexport] wrote model-") == len(shards)
    assert Checkpoint(out).config == preset("tiny")


def test_init_through_a_subprocess(tmp_path):
    out = tmp_path / "tiny"
    proc = run_cli("init", str(out), "--preset", "tiny", "--top-k", "1", "--dtype", "bf16")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {out} in ")
    config = Checkpoint(out).config
    assert (config.num_experts_per_tok, config.dtype) == (1, "bfloat16")



@pytest.mark.parametrize("name", [".", "..", "../here", "../../"])
def test_init_refuses_the_current_directory_and_its_parents(name, tmp_path):
    # `init .` used to replace the cwd by a rename, pulling the directory from under the shell.
    # A subprocess: its cwd is the empty directory, pytest's is left alone.
    here = tmp_path / "a" / "here"
    here.mkdir(parents=True)
    proc = run_cli("init", name, "--layers", "1", cwd=here)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1].endswith("is the current directory or one of its parents; name a new "
                                                 "directory (e.g. mixexport init tiny-model)")
    assert list(here.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_init_a_relative_new_directory(tmp_path):
    proc = run_cli("init", "tiny", "--layers", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert Checkpoint(tmp_path / "tiny").config == preset("tiny").replace(num_hidden_layers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no staging directory left


@pytest.mark.parametrize("alias,canonical,code", [
    ("fp16", "float16", "F16"), ("float16", "float16", "F16"), ("bf16", "bfloat16", "BF16"),
    ("BF16", "bfloat16", "BF16"), ("float32", "float32", "F32"), ("fp32", "float32", "F32"),
])
def test_init_dtype_aliases(alias, canonical, code, tmp_path):
    out = tmp_path / "model"
    result = invoke("init", str(out), "--layers", "1", "--dtype", alias)
    assert result.exit_code == 0, result.output
    raw = json.loads((out / "config.json").read_text())
    assert raw["dtype"] == raw["torch_dtype"] == canonical
    assert {info.dtype for info in Checkpoint(out).tensors.values()} == {code}


def test_unknown_dtype_is_a_one_line_usage_error(tmp_path):
    result = invoke("init", str(tmp_path / "model"), "--dtype", "int8")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: Invalid value for '--dtype': 'int8' is not one of ")
    assert result.stderr.count("\n") == 1


# -- user errors: one line, exit 1, no traceback; --verbose adds the traceback --------------------

TOP_K_ERROR = "error: config: num_experts_per_tok=3 must be between 1 and num_local_experts=2\n"


def test_user_error_is_one_line_without_traceback(tmp_path):
    proc = run_cli("init", str(tmp_path / "model"), "--experts", "2", "--top-k", "3")
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == TOP_K_ERROR
    assert not (tmp_path / "model").exists()


def test_bad_option_value_is_one_line_without_traceback(tmp_path):
    proc = run_cli("init", str(tmp_path / "model"), "--preset", "nope")
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == ("error: Invalid value for '--preset': 'nope' is not one of 'tiny', 'small', "
                           "'mixtral-8x7b', 'mixtral-8x22b'. (see mixexport init --help)\n")


def test_user_error_from_the_writer_is_one_line(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    proc = run_cli("init", str(tmp_path))
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    # The progress line comes first; the error is the last line and the only one starting "error:".
    assert [line for line in lines if not line.startswith("[mixexport] ")] == [lines[-1]]
    assert lines[-1] == f"error: {tmp_path} already exists and is not empty; choose another directory or remove it"
    assert "Traceback" not in proc.stderr


def test_user_error_with_cli_runner(tmp_path):
    result = invoke("init", str(tmp_path / "model"), "--experts", "2", "--top-k", "3")
    assert result.exit_code == 1
    assert result.stderr == TOP_K_ERROR


def test_verbose_shows_the_traceback(tmp_path):
    proc = run_cli("--verbose", "init", str(tmp_path / "model"), "--experts", "2", "--top-k", "3")
    assert proc.returncode == 1
    assert proc.stderr.startswith("Traceback (most recent call last):")
    assert "mixexport.errors.MixexportError: config: num_experts_per_tok=3" in proc.stderr
    assert proc.stderr.endswith(TOP_K_ERROR)


# -- every option value: a checkpoint or one error line ---------------------------------------------

def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if not line.startswith("[mixexport] ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.mark.parametrize("size", ["inf", "nan", "-1", "0", "1e400", "-inf", "5XB", "0.1"])
def test_init_bad_max_shard_size(tmp_path, size):
    line = one_error_line(invoke("init", str(tmp_path / "model"), "--max-shard-size", size))
    assert line.startswith(f"error: --max-shard-size '{size}'")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,message", [
    (["--layers", "0"], "error: Invalid value for '--layers': 0 is not in the range x>=1."),
    (["--layers", "5000"], "error: config: num_hidden_layers must be between 1 and 1024, got 5000"),
    (["--layers", str(10**30)], f"error: config: num_hidden_layers must be between 1 and 1024, got {10**30}"),
    (["--experts", "2000"], "error: config: num_local_experts must be between 1 and 1024, got 2000"),
    (["--top-k", "0"], "error: Invalid value for '--top-k': 0 is not in the range x>=1."),
    (["--seed", "x"], "error: Invalid value for '--seed': 'x' is not a valid integer."),
])
def test_init_bad_numbers(tmp_path, args, message):
    line = one_error_line(invoke("init", str(tmp_path / "model"), *args))
    assert line.startswith(message)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("seed", ["-1", str(2**64 + 1), str(-(10**40))])
def test_init_any_integer_seed(tmp_path, seed):
    out = tmp_path / "model"
    result = invoke("init", str(out), "--layers", "1", "--seed", seed)
    assert result.exit_code == 0, result.output
    assert Checkpoint(out).config.num_hidden_layers == 1


def test_init_reports_bytes_and_time_per_shard(tmp_path):
    result = invoke("init", str(tmp_path / "sharded"), "--max-shard-size", "300KB")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("[mixexport] wrote ")]
    assert len(lines) > 2
    pattern = (r"\[mixexport\] wrote model-(\d{5})-of-(\d{5})\.safetensors \(\d+ tensors, \d+\.\d MB; shard (\d+) of "
               r"(\d+), \d+\.\d MB of \d+\.\d MB in \d+\.\ds\)")
    for k, line in enumerate(lines, 1):
        match = re.fullmatch(pattern, line)
        assert match, line
        assert [int(g) for g in match.groups()] == [k, len(lines), k, len(lines)]


def test_init_into_a_file_path_is_one_line(tmp_path):
    (tmp_path / "file").write_text("mine")
    line = one_error_line(invoke("init", str(tmp_path / "file" / "model")))
    assert line == f"error: {tmp_path / 'file'} is a file, not a directory; {tmp_path / 'file' / 'model'} cannot be " \
                   f"created in it"
    assert (tmp_path / "file").read_text() == "mine"


def test_sigterm_while_writing_leaves_nothing_behind(tmp_path):
    # A CI timeout or `kill` stops init the way Ctrl-C does: the staging directory is removed.
    import signal
    import time

    out = tmp_path / "model"
    proc = subprocess.Popen([str(MIXEXPORT), "init", str(out), "--preset", "small", "--layers", "8",
                             "--max-shard-size", "10MB"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".model.partial-*/model-00002-of-*.safetensors")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "init wrote no shard within 60s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []
