"""`init`'s writer: its checkpoints load in transformers and in our reader, sharded or not, and
the same preset + seed always gives the same bits."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import MixtralForCausalLM

from mixexport.checkpoint import Checkpoint, MixtralConfig, names, preset, write_checkpoint, writer
from mixexport.checkpoint.reader import INDEX_FILE, SINGLE_FILE
from mixexport.checkpoint.writer import parse_size
from mixexport.errors import MixexportError

TINY_SHARD_BYTES = 100_000  # preset tiny is ~1.2 MB in float32: about a dozen shards


def all_tensors(path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def assert_hf_holds_checkpoint(path) -> None:
    """from_pretrained loads every tensor of `path`, and each equals what our reader reads."""
    ckpt = Checkpoint(path)
    model, info = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    hf = model.state_dict()
    c = ckpt.config
    assert torch.equal(hf["model.embed_tokens.weight"], ckpt.tensor("model.embed_tokens.weight", torch.float32))
    assert torch.equal(hf["lm_head.weight"], ckpt.tensor("lm_head.weight", torch.float32))
    assert torch.equal(hf["model.norm.weight"], ckpt.tensor("model.norm.weight", torch.float32))
    for i in range(c.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                     "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight"):
            assert torch.equal(hf[prefix + name], ckpt.tensor(prefix + name, torch.float32)), prefix + name
        assert torch.equal(hf[prefix + "mlp.gate.weight"], ckpt.tensor(names.ROUTER.format(i=i), torch.float32))
        # Hugging Face fuses the experts into the same stacked layout the MoE op uses.
        assert torch.equal(hf[prefix + "mlp.experts.gate_up_proj"], ckpt.gate_up(i, torch.float32))
        assert torch.equal(hf[prefix + "mlp.experts.down_proj"], ckpt.down(i, torch.float32))
    assert model.config.num_local_experts == c.num_local_experts
    assert model.config.num_experts_per_tok == c.num_experts_per_tok
    assert model.config.rope_parameters["rope_theta"] == c.rope_theta
    assert model.config.tie_word_embeddings == c.tie_word_embeddings


@pytest.fixture(scope="module")
def tiny_preset_single(checkpoint_factory):
    return checkpoint_factory(preset("tiny"), seed=5)


@pytest.fixture(scope="module")
def tiny_preset_sharded(checkpoint_factory):
    return checkpoint_factory(preset("tiny"), seed=5, max_shard_size=TINY_SHARD_BYTES)


# -- round trip -----------------------------------------------------------------------------------

def test_single_file_layout(tiny_preset_single):
    assert sorted(p.name for p in tiny_preset_single.iterdir()) == ["config.json", SINGLE_FILE, "tokenizer.json",
                                                                    "tokenizer_config.json"]
    assert not tiny_preset_single.with_name(tiny_preset_single.name + ".partial").exists()


def test_config_json_round_trips(tiny_preset_single):
    assert MixtralConfig.from_file(tiny_preset_single / "config.json") == preset("tiny")


def test_reader_loads_what_init_writes(tiny_preset_single):
    ckpt = Checkpoint(tiny_preset_single)
    assert ckpt.config == preset("tiny")
    assert set(ckpt.tensors) == set(names.expected_shapes(preset("tiny")))
    assert {info.dtype for info in ckpt.tensors.values()} == {"F32"}


def test_transformers_loads_what_init_writes(tiny_preset_single):
    assert_hf_holds_checkpoint(tiny_preset_single)


def test_tied_embeddings_write_no_lm_head_and_load_in_transformers(checkpoint_factory, tiny_config):
    path = checkpoint_factory(tiny_config.replace(tie_word_embeddings=True))
    assert "lm_head.weight" not in all_tensors(path)
    assert_hf_holds_checkpoint(path)


# -- sharding -------------------------------------------------------------------------------------

def test_sharded_output_has_an_index_and_several_shards(tiny_preset_sharded):
    index = json.loads((tiny_preset_sharded / INDEX_FILE).read_text())
    shards = sorted(p.name for p in tiny_preset_sharded.glob("*.safetensors"))
    assert len(shards) > 2
    assert shards == [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    assert sorted(set(index["weight_map"].values())) == shards
    tensors = all_tensors(tiny_preset_sharded)
    assert set(index["weight_map"]) == set(tensors) == set(names.expected_shapes(preset("tiny")))
    for shard in shards:
        assert set(load_file(tiny_preset_sharded / shard)) == {n for n, s in index["weight_map"].items() if s == shard}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())


def test_shards_respect_the_size_limit_unless_one_tensor_is_larger(tiny_preset_sharded):
    for shard in tiny_preset_sharded.glob("*.safetensors"):
        tensors = load_file(shard)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        assert nbytes <= TINY_SHARD_BYTES or len(tensors) == 1, shard.name


def test_reader_loads_the_sharded_checkpoint(tiny_preset_sharded):
    ckpt = Checkpoint(tiny_preset_sharded)
    assert len(ckpt.files) > 2
    assert ckpt.config == preset("tiny")


def test_transformers_loads_the_sharded_checkpoint(tiny_preset_sharded):
    assert_hf_holds_checkpoint(tiny_preset_sharded)


# -- determinism ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_same_seed_same_bits_whatever_the_shard_size(dtype, tmp_path):
    config = preset("tiny").replace(dtype=dtype, num_hidden_layers=1)
    written = [all_tensors(write_checkpoint(tmp_path / f"shard{size}", config, seed=3, max_shard_size=size))
               for size in (10**9, 70_000, 1)]
    assert len(list((tmp_path / "shard1").glob("*.safetensors"))) == len(names.expected_shapes(config))
    first = written[0]
    assert {t.dtype for t in first.values()} == {getattr(torch, dtype)}
    for other in written[1:]:
        assert first.keys() == other.keys()
        for name in first:
            assert same_bits(first[name], other[name]), name


def test_different_seeds_differ_in_every_tensor(tmp_path):
    config = preset("tiny").replace(num_hidden_layers=1)
    a = all_tensors(write_checkpoint(tmp_path / "a", config, seed=0))
    b = all_tensors(write_checkpoint(tmp_path / "b", config, seed=1))
    assert a.keys() == b.keys()
    for name in a:
        assert not torch.equal(a[name], b[name]), name


def test_tensors_do_not_depend_on_the_layer_count(tmp_path):
    # Seeds come from (seed, tensor name): adding layers does not change the existing ones.
    one = all_tensors(write_checkpoint(tmp_path / "one", preset("tiny").replace(num_hidden_layers=1), seed=2))
    two = all_tensors(write_checkpoint(tmp_path / "two", preset("tiny"), seed=2))
    for name, value in one.items():
        assert same_bits(value, two[name]), name


def test_random_weights_have_the_documented_scales(tiny_preset_single):
    tensors = all_tensors(tiny_preset_single)
    h = preset("tiny").hidden_size
    assert abs(tensors["model.norm.weight"].mean().item() - 1.0) < 0.05
    assert abs(tensors["model.layers.0.block_sparse_moe.gate.weight"].std().item() - h**-0.5) < 0.2 * h**-0.5
    assert abs(tensors["model.layers.0.self_attn.q_proj.weight"].std().item() - 0.02) < 0.004


# -- refusals -------------------------------------------------------------------------------------

def test_refuses_a_non_empty_output_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(MixexportError, match=r"already exists and is not empty; choose another directory"):
        write_checkpoint(tmp_path, preset("tiny"))
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_writes_into_an_existing_empty_directory(tmp_path):
    write_checkpoint(tmp_path, preset("tiny").replace(num_hidden_layers=1))
    Checkpoint(tmp_path)


@pytest.mark.parametrize("text,expected", [("500MB", 500 * 10**6), ("2GB", 2 * 10**9), ("1.5GiB", 3 * 2**29),
                                           ("4096", 4096), ("10kib", 10240), (123, 123)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text,message", [
    ("abc", "use a byte count"), ("5XB", "use a byte count"), ("", "use a byte count"),
    ("0", "must be at least one byte"), ("-1MB", "must be at least one byte"), ("-1", "must be at least one byte"),
    ("0.5", "must be at least one byte"), (0, "must be at least one byte"), (-5, "must be at least one byte"),
    ("inf", "must be a finite size"), ("-inf", "must be a finite size"), ("nan", "must be a finite size"),
    ("NaNGB", "must be a finite size"), ("infMB", "must be a finite size"), ("1e400", "must be a finite size"),
    ("Infinity", "must be a finite size"),
])
def test_parse_size_refuses(text, message):
    with pytest.raises(MixexportError, match=rf"^--max-shard-size {text!r}:? {message}"):
        parse_size(text)


def test_a_shard_size_above_the_model_means_one_file(tmp_path):
    assert parse_size("1e30") == int(1e30)
    out = write_checkpoint(tmp_path / "one", preset("tiny").replace(num_hidden_layers=1), max_shard_size=10**30)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", SINGLE_FILE, "tokenizer.json",
                                                     "tokenizer_config.json"]


# -- never deleting what this run did not create --------------------------------------------------

def listing(root) -> set[str]:
    """Every path under root (hidden ones included), relative, as text."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_an_existing_partial_directory_is_not_ours_to_delete(tmp_path):
    # `init X` used to rmtree X.partial before writing.
    (tmp_path / "model.partial").mkdir()
    (tmp_path / "model.partial" / "notes.txt").write_text("mine")
    write_checkpoint(tmp_path / "model", preset("tiny").replace(num_hidden_layers=1))
    assert (tmp_path / "model.partial" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.partial"]


@pytest.mark.parametrize("error", [
    (errno.ENOSPC, "no space left on the device: free some space or choose another disk"),
    (errno.EDQUOT, "disk quota exceeded"),
    (errno.EIO, "input/output error"),
])
def test_an_os_error_while_writing_removes_only_what_this_run_wrote(tmp_path, monkeypatch, error):
    code, message = error
    (tmp_path / "model.partial").mkdir()  # someone else's, in the way of the old fixed name
    before = listing(tmp_path)
    real = writer.write_safetensors
    calls = []

    def fail_on_the_second_shard(path, tensors, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            path.write_bytes(b"half a shard")
            raise OSError(code, os.strerror(code), str(path))
        real(path, tensors, metadata)

    monkeypatch.setattr(writer, "write_safetensors", fail_on_the_second_shard)
    with pytest.raises(MixexportError, match=rf"^{re.escape(str(tmp_path / 'new' / 'model'))}: {message}"):
        write_checkpoint(tmp_path / "new" / "model", preset("tiny").replace(num_hidden_layers=1), max_shard_size=10**5)
    assert len(calls) == 2
    assert listing(tmp_path) == before  # the staging directory and the parent "new" made for it are gone


def test_an_interrupt_while_writing_removes_the_staging_directory(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "write_safetensors", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path / "model", preset("tiny"))
    assert listing(tmp_path) == set()


def test_not_enough_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    # The tiny preset, so that a regression writes a megabyte, not a disk's worth.
    config = preset("tiny")
    needed = sum(math.prod(shape) * 4 for shape in names.expected_shapes(config).values()) + 1024**2
    free = needed - 1
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - free, free))
    with pytest.raises(MixexportError, match=rf"^{re.escape(str(tmp_path / 'a' / 'b'))}: not enough free space for "
                                             rf"the checkpoint: it needs {needed} bytes \(\d\.\d MB\), "
                                             rf"{free} bytes \(\d\.\d MB\) are available$"):
        write_checkpoint(tmp_path / "a" / "b" / "model", config)
    assert listing(tmp_path) == set()


def test_a_directory_filled_while_writing_is_left_as_it_is(tmp_path, monkeypatch):
    out = tmp_path / "model"
    out.mkdir()
    real = writer.write_safetensors

    def someone_writes_into_out(path, tensors, metadata=None):
        (out / "theirs.txt").write_text("theirs")
        real(path, tensors, metadata)

    monkeypatch.setattr(writer, "write_safetensors", someone_writes_into_out)
    with pytest.raises(MixexportError, match=r"model: something was written into it while the checkpoint was being "
                                             r"written; it was left as it was"):
        write_checkpoint(out, preset("tiny").replace(num_hidden_layers=1))
    assert listing(tmp_path) == {"model", "model/theirs.txt"}


def test_a_name_too_long_for_the_file_system(tmp_path):
    out = tmp_path / ("m" * 300)
    with pytest.raises(MixexportError, match=r"m{300}: file name too long: choose a shorter path$"):
        write_checkpoint(out, preset("tiny").replace(num_hidden_layers=1))
    assert listing(tmp_path) == set()


def test_a_read_only_parent(tmp_path, monkeypatch):
    # Tests run as root here, which writes anywhere: make the OS answer EROFS.
    def read_only(prefix, dir):
        raise OSError(errno.EROFS, "Read-only file system", os.path.join(dir, prefix + "x"))

    monkeypatch.setattr(writer.tempfile, "mkdtemp", read_only)
    with pytest.raises(MixexportError, match=rf"^{re.escape(str(tmp_path))}: read-only file system: choose a "
                                             rf"writable directory$"):
        write_checkpoint(tmp_path / "model", preset("tiny"))


@pytest.mark.parametrize("layout,message", [
    ("out is a file", r"model already exists and is not a directory; choose another name"),
    ("parent is a file", r"parent is a file, not a directory; .*model cannot be created in it"),
    ("out is a symlink", r"model is a symlink; name a new directory, not a link"),
])
def test_outputs_that_cannot_be_a_checkpoint_directory(tmp_path, layout, message):
    if layout == "out is a file":
        out = tmp_path / "model"
        out.write_text("mine")
    elif layout == "parent is a file":
        (tmp_path / "parent").write_text("mine")
        out = tmp_path / "parent" / "model"
    else:
        (tmp_path / "empty").mkdir()
        out = tmp_path / "model"
        out.symlink_to("empty")
    before = {p: (p.read_text() if p.is_file() else None) for p in tmp_path.rglob("*")}
    with pytest.raises(MixexportError, match=message):
        write_checkpoint(out, preset("tiny"))
    assert {p: (p.read_text() if p.is_file() else None) for p in tmp_path.rglob("*")} == before


def test_the_current_directory_and_its_parents_are_refused(tmp_path, monkeypatch):
    here = tmp_path / "a" / "here"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    for out in (here, tmp_path / "a", tmp_path, "."):
        with pytest.raises(MixexportError, match=r"is the current directory or one of its parents"):
            write_checkpoint(out, preset("tiny"))
    assert listing(tmp_path) == {"a", "a/here"}
