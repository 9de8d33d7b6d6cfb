"""Every malformed checkpoint input ends in one MixexportError naming the file and field: config.json,
the index and each safetensors header are schema-checked before any arithmetic, every file is
read by the regular-file rule, and nothing blocks or allocates in proportion to a number it has
not checked."""

from __future__ import annotations

import json
import os
import shutil
import tracemalloc

import pytest
import torch

from checkpoint.helpers import deadline, header_of, with_field, write_raw_header
from mixexport.checkpoint import Checkpoint
from mixexport.checkpoint.reader import INDEX_FILE, MAX_INDEX_BYTES
from mixexport.errors import MixexportError

EXPERT = "model.layers.1.block_sparse_moe.experts.2.w3.weight"


@pytest.fixture
def single(tiny_checkpoint, checkpoint_copy):
    """A private copy of the single-file tiny checkpoint."""
    return checkpoint_copy(tiny_checkpoint)


@pytest.fixture
def sharded(tiny_sharded_checkpoint, checkpoint_copy):
    """A private copy of the sharded tiny checkpoint."""
    return checkpoint_copy(tiny_sharded_checkpoint)


def config_of(path) -> dict:
    return json.loads((path / "config.json").read_text())


# -- config.json: types and ranges of every field ---------------------------------------------------

@pytest.mark.parametrize("field,text,message", [
    ("num_experts_per_tok", '"2"', r'num_experts_per_tok must be an integer, got "2"'),
    ("num_experts_per_tok", "null", r"num_experts_per_tok must be an integer, got null"),
    ("num_experts_per_tok", "1.5", r"num_experts_per_tok must be an integer, got 1\.5"),
    ("num_experts_per_tok", "2.0", r"num_experts_per_tok must be an integer, got 2\.0"),
    ("num_experts_per_tok", "true", r"num_experts_per_tok must be an integer, got true"),
    ("num_experts_per_tok", "[2]", r"num_experts_per_tok must be an integer, got \[2\]"),
    ("num_experts_per_tok", "-1", r"num_experts_per_tok must be between 1 and 1024, got -1"),
    ("hidden_size", '"48"', r'hidden_size must be an integer, got "48"'),
    ("hidden_size", "0", r"hidden_size must be between 1 and 65536, got 0"),
    ("hidden_size", "1" + "0" * 30, r"hidden_size must be between 1 and 65536, got 1000000000000000000000000000000"),
    ("intermediate_size", "-40", r"intermediate_size must be between 1 and 262144, got -40"),
    ("intermediate_size", "NaN", r"intermediate_size must be an integer, got NaN"),
    ("num_hidden_layers", "1000000000", r"num_hidden_layers must be between 1 and 1024, got 1000000000"),
    ("num_hidden_layers", "1e9", r"num_hidden_layers must be an integer, got 1000000000\.0"),
    ("num_attention_heads", "0", r"num_attention_heads must be between 1 and 1024, got 0"),
    ("num_attention_heads", '"4"', r'num_attention_heads must be an integer, got "4"'),
    ("num_key_value_heads", "0", r"num_key_value_heads must be between 1 and 1024, got 0"),
    ("num_key_value_heads", "2.5", r"num_key_value_heads must be an integer, got 2\.5"),
    ("head_dim", "16.0", r"head_dim must be an integer, got 16\.0"),
    ("head_dim", "-16", r"head_dim must be between 1 and 4096, got -16"),
    ("num_local_experts", "100000", r"num_local_experts must be between 1 and 1024, got 100000"),
    ("num_local_experts", "false", r"num_local_experts must be an integer, got false"),
    ("vocab_size", str(2**40), rf"vocab_size must be between 1 and 4194304, got {2**40}"),
    ("vocab_size", "Infinity", r"vocab_size must be an integer, got Infinity"),
    ("max_position_embeddings", '"4096"', r'max_position_embeddings must be an integer, got "4096"'),
    ("max_position_embeddings", "null", r"max_position_embeddings must be an integer, got null"),
    ("max_position_embeddings", "0", r"max_position_embeddings must be between 1 and 16777216, got 0"),
    ("max_position_embeddings", "-1", r"max_position_embeddings must be between 1 and 16777216, got -1"),
    ("max_position_embeddings", "1" + "0" * 30, r"max_position_embeddings must be between 1 and 16777216"),
    ("sliding_window", "0", r"sliding_window must be between 1 and 2147483647, got 0"),
    ("sliding_window", '"4096"', r'sliding_window must be an integer, got "4096"'),
    ("sliding_window", "true", r"sliding_window must be an integer, got true"),
    ("sliding_window", "4096.5", r"sliding_window must be an integer, got 4096\.5"),
    ("rms_norm_eps", "NaN", r"rms_norm_eps must be a finite number in \(0, 1\], got NaN"),
    ("rms_norm_eps", "Infinity", r"rms_norm_eps must be a finite number in \(0, 1\], got Infinity"),
    ("rms_norm_eps", "1e400", r"rms_norm_eps must be a finite number in \(0, 1\], got Infinity"),
    ("rms_norm_eps", "-1e-5", r"rms_norm_eps must be a finite number in \(0, 1\], got -1e-05"),
    ("rms_norm_eps", "0", r"rms_norm_eps must be a finite number in \(0, 1\], got 0"),
    ("rms_norm_eps", '"1e-5"', r'rms_norm_eps must be a number, got "1e-5"'),
    ("rms_norm_eps", "null", r"rms_norm_eps must be a number, got null"),
    ("rms_norm_eps", "true", r"rms_norm_eps must be a number, got true"),
    ("tie_word_embeddings", '"false"', r'tie_word_embeddings must be true or false, got "false"'),
    ("tie_word_embeddings", "0", r"tie_word_embeddings must be true or false, got 0"),
    ("architectures", '"MixtralForCausalLM"', r"architectures='MixtralForCausalLM' is not supported: expected a list"),
    ("architectures", "5", r"architectures=5 is not supported: expected a list"),
    ("attention_bias", '"false"', r"attention_bias='false' is not supported"),
    ("model_type", "5", r"model_type=5 is not supported"),
    ("dtype", "5", r"dtype=5 is not supported"),
    ("dtype", '["float32"]', r"dtype=\['float32'\] is not supported"),
    ("dtype", "{}", r"dtype=\{\} is not supported"),
    ("dtype", '""', r"dtype='' is not supported"),
    ("rope_parameters", "[1e6]", r"rope_parameters=\[1000000\.0\] is not supported: expected an object"),
    ("rope_scaling", "5", r"rope_scaling=5 is not supported"),
])
def test_config_field_of_the_wrong_type_or_range(single, field, text, message):
    (single / "config.json").write_text(with_field(config_of(single), field, text))
    with pytest.raises(MixexportError, match=rf"^{single / 'config.json'}: {message}"):
        Checkpoint(single)


@pytest.mark.parametrize("text,message", [
    ("NaN", r"rope_theta must be a finite number in \(0, 1e\+12\], got NaN"),
    ("-Infinity", r"rope_theta must be a finite number in \(0, 1e\+12\], got -Infinity"),
    ("1e400", r"rope_theta must be a finite number in \(0, 1e\+12\], got Infinity"),
    ("0", r"rope_theta must be a finite number in \(0, 1e\+12\], got 0"),
    ("-10000.0", r"rope_theta must be a finite number in \(0, 1e\+12\], got -10000\.0"),
    ("1e13", r"rope_theta must be a finite number in \(0, 1e\+12\], got 10000000000000\.0"),
    ('"1e6"', r'rope_theta must be a number, got "1e6"'),
    ("[1]", r"rope_theta must be a number, got \[1\]"),
])
@pytest.mark.parametrize("where", ["top level", "rope_parameters"])
def test_rope_theta_must_be_finite_and_positive(single, text, message, where):
    raw = config_of(single)
    if where == "top level":
        del raw["rope_parameters"]
        (single / "config.json").write_text(with_field(raw, "rope_theta", text))
    else:
        raw["rope_parameters"] = "PLACEHOLDER"
        (single / "config.json").write_text(json.dumps(raw).replace(
            '"PLACEHOLDER"', '{"rope_type": "default", "rope_theta": %s}' % text))
    with pytest.raises(MixexportError, match=rf"^{single / 'config.json'}: {message}"):
        Checkpoint(single)


def test_integer_rope_theta_and_eps_are_read_as_floats(single):
    raw = config_of(single)
    del raw["rope_parameters"]
    raw.update(rope_theta=10000, rms_norm_eps=1)
    (single / "config.json").write_text(json.dumps(raw))
    config = Checkpoint(single).config
    assert (config.rope_theta, config.rms_norm_eps) == (10000.0, 1.0)
    assert isinstance(config.rope_theta, float) and isinstance(config.rms_norm_eps, float)


def test_max_position_embeddings_is_read(single):
    raw = config_of(single)
    raw["max_position_embeddings"] = 64
    (single / "config.json").write_text(json.dumps(raw))
    assert Checkpoint(single).config.max_position_embeddings == 64


def test_layer_count_beyond_the_files_fails_before_any_per_layer_work(single, monkeypatch):
    # In range, but the files hold two layers: refused from the headers before anything loops
    # over a thousand layers (a billion is refused by the range check above).
    from mixexport.checkpoint import names

    def per_layer_table(*args):
        raise AssertionError("a per-layer table was built before the layer count was checked")

    monkeypatch.setattr(names, "layer_shapes", per_layer_table)
    raw = config_of(single)
    raw["num_hidden_layers"] = 1000
    (single / "config.json").write_text(json.dumps(raw))
    tracemalloc.start()
    try:
        with pytest.raises(MixexportError, match=rf"^{single / 'config.json'}: num_hidden_layers=1000, but the "
                                                 rf"safetensors files hold tensors of 2 layers \(named model\.layers\.N\.\.\.\.\)$"):
            Checkpoint(single)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024  # the tiny checkpoint's headers and config, nothing per layer


def test_expert_count_beyond_the_files(single):
    raw = config_of(single)
    raw["num_local_experts"] = 1024
    (single / "config.json").write_text(json.dumps(raw))
    with pytest.raises(MixexportError, match=r"config\.json: num_local_experts=1024, but the safetensors files "
                                             r"hold tensors of 4 experts \(named model\.layers\.N\.block_sparse_moe\."
                                             r"experts\.N\.w1\.weight, w2, w3\)$"):
        Checkpoint(single)


def test_experts_under_other_names_are_reported_with_the_names_expected(single):
    # e.g. a layout that fuses the experts: no tensor is named like a classic Mixtral expert.
    weights = single / "model.safetensors"
    header, data = header_of(weights)
    renamed = {name.replace(".experts.", ".fused_experts."): entry for name, entry in header.items()}
    write_raw_header(weights, json.dumps(renamed).encode(), data)
    with pytest.raises(MixexportError, match=r"num_local_experts=4, but the safetensors files hold tensors of 0 "
                                             r"experts \(named model\.layers\.N\.block_sparse_moe\.experts\.N\.w1"):
        Checkpoint(single)


def test_validate_walks_the_expected_names_lazily(single, monkeypatch):
    # validate walks the expected names lazily and stops at the first missing one.
    from mixexport.checkpoint import names

    def whole_table(config):
        raise AssertionError("validate built the whole table of expected names")

    monkeypatch.setattr(names, "expected_shapes", whole_table)
    raw = config_of(single)
    raw["num_local_experts"] = 3  # fewer than stored is fine; w1 of a 5th layer would not be
    (single / "config.json").write_text(json.dumps(raw))
    with pytest.raises(MixexportError, match=r"gate\.weight has shape \[4, 48\], expected \[3, 48\]"):
        Checkpoint(single)  # the router's shape [E, H] disagrees first


# -- config.json: the file itself -------------------------------------------------------------------

@pytest.mark.parametrize("raw,message", [
    (b'{"model_type": "mixtral\xff"}', r"not UTF-8 text"),
    (b"[" * 50_000 + b"]" * 50_000, r"JSON nested too deeply"),
    (b'{"hidden_size": 1' + b"0" * 5000 + b"}", r"not valid JSON \(Exceeds the limit"),
    (b"[]", r"must hold a JSON object, found list"),
    (b"7", r"must hold a JSON object, found int"),
    (b"", r"not valid JSON"),
])
def test_config_file_that_is_not_a_json_object(single, raw, message):
    (single / "config.json").write_bytes(raw)
    with pytest.raises(MixexportError, match=rf"^{single / 'config.json'}: {message}"):
        Checkpoint(single)


def test_config_with_a_duplicate_key(single):
    text = json.dumps(config_of(single))
    (single / "config.json").write_text(text[:-1] + ', "num_hidden_layers": 1}')
    with pytest.raises(MixexportError, match=r"config\.json: key 'num_hidden_layers' appears twice"):
        Checkpoint(single)


def test_huge_config_is_refused_before_reading(single):
    with open(single / "config.json", "r+b") as f:
        f.truncate(2**40)  # sparse
    with pytest.raises(MixexportError, match=rf"config\.json: {2**40} bytes, more than the 4194304 bytes"):
        Checkpoint(single)


# -- the index --------------------------------------------------------------------------------------

def index_of(path) -> dict:
    return json.loads((path / INDEX_FILE).read_text())


@pytest.mark.parametrize("text,message", [
    ("[]", r"weight_map must be a non-empty object mapping tensor names to shard files, got list"),
    ('"model.safetensors"', r"weight_map must be a non-empty object .* got str"),
    ("null", r"weight_map must be a non-empty object .* got NoneType"),
    ("{}", r"weight_map must be a non-empty object .* got dict"),
])
def test_weight_map_of_the_wrong_type(sharded, text, message):
    (sharded / INDEX_FILE).write_text(with_field(index_of(sharded), "weight_map", text))
    with pytest.raises(MixexportError, match=rf"^{sharded / INDEX_FILE}: {message}"):
        Checkpoint(sharded)


def test_index_without_weight_map(sharded):
    (sharded / INDEX_FILE).write_text('{"metadata": {}}')
    with pytest.raises(MixexportError, match=r"index\.json: weight_map must be a non-empty object"):
        Checkpoint(sharded)


@pytest.mark.parametrize("shard,message", [
    (5, r"file names must be strings, got 5"),
    (None, r"file names must be strings, got None"),
    (["a.safetensors"], r"file names must be strings"),
    ("", r"file name '' is empty"),
    ("../outside/model.safetensors", r"file name '\.\./outside/model\.safetensors' climbs out of the directory"),
    ("/etc/passwd", r"file name '/etc/passwd' is absolute"),
    ("x\0.safetensors", r"file name .* holds a NUL byte"),
    ("..\\outside\\model.safetensors", r"file name .* holds a backslash"),
])
def test_weight_map_entry_that_is_not_a_file_inside(sharded, shard, message):
    index = index_of(sharded)
    index["weight_map"][EXPERT] = shard
    (sharded / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(MixexportError, match=rf"^{sharded / INDEX_FILE}: weight_map\['{EXPERT}'\]: {message}"):
        Checkpoint(sharded)


def test_a_shard_outside_the_directory_is_never_opened(sharded, tmp_path, monkeypatch):
    # A real, valid shard outside: refused by its name, before anything opens it.
    outside = tmp_path / "outside"
    outside.mkdir()
    index = index_of(sharded)
    home = index["weight_map"][EXPERT]
    shutil.copy(sharded / home, outside / home)
    index["weight_map"] = {name: (f"../outside/{home}" if shard == home else shard)
                           for name, shard in index["weight_map"].items()}
    (sharded / INDEX_FILE).write_text(json.dumps(index))
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: opened.append(str(p)) or real_open(p, *a, **k))
    with pytest.raises(MixexportError, match=r"climbs out of the directory"):
        Checkpoint(sharded)
    assert opened and not [p for p in opened if p.startswith(str(outside))]


@pytest.mark.parametrize("metadata", ['[]', '"x"', '{"total_size": "12"}', '{"total_size": -1}',
                                      '{"total_size": 1.5}', '{"total_size": true}', '{"total_size": NaN}'])
def test_index_metadata_of_the_wrong_type(sharded, metadata):
    (sharded / INDEX_FILE).write_text(with_field(index_of(sharded), "metadata", metadata))
    with pytest.raises(MixexportError, match=r"index\.json: metadata must be an object whose total_size is a "
                                             r"non-negative integer"):
        Checkpoint(sharded)


def test_index_metadata_without_total_size_is_fine(sharded):
    index = index_of(sharded)
    index["metadata"] = {"mergekit_version": "0.0.4"}
    (sharded / INDEX_FILE).write_text(json.dumps(index))
    assert len(Checkpoint(sharded).files) > 2


@pytest.mark.parametrize("raw,message", [
    (b'{"weight_map": {"\xff": "a"}}', r"not UTF-8 text"),
    (b'{"weight_map": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", r"JSON nested too deeply"),
    (b"[1]", r"must hold a JSON object, found list"),
])
def test_index_file_that_is_not_a_json_object(sharded, raw, message):
    (sharded / INDEX_FILE).write_bytes(raw)
    with pytest.raises(MixexportError, match=rf"^{sharded / INDEX_FILE}: {message}"):
        Checkpoint(sharded)


def test_index_with_a_duplicate_tensor(sharded):
    index = index_of(sharded)
    text = json.dumps(index["weight_map"])
    shard = index["weight_map"][EXPERT]
    (sharded / INDEX_FILE).write_text('{"weight_map": %s, "%s": "%s"}}' % (text[:-1], EXPERT, shard))
    with pytest.raises(MixexportError, match=rf"index\.json: key '{EXPERT}' appears twice"):
        Checkpoint(sharded)


def test_huge_index_is_refused_before_reading(sharded):
    with open(sharded / INDEX_FILE, "r+b") as f:
        f.truncate(MAX_INDEX_BYTES + 1)
    with pytest.raises(MixexportError, match=rf"index\.json: {MAX_INDEX_BYTES + 1} bytes, more than the "
                                             rf"{MAX_INDEX_BYTES} bytes"):
        Checkpoint(sharded)


# -- safetensors headers ----------------------------------------------------------------------------

def damage_entry(path, name, **changes):
    header, data = header_of(path)
    header[name].update(changes)
    write_raw_header(path, json.dumps(header).encode(), data)


@pytest.mark.parametrize("changes,message", [
    ({"dtype": 5}, r"dtype must be a string, got 5"),
    ({"dtype": None}, r"dtype must be a string, got None"),
    ({"shape": "[48]"}, r"shape must be a list of at most 8 integers in \[0, 1099511627776\], got '\[48\]'"),
    ({"shape": [48.0]}, r"shape must be a list .* got \[48\.0\]"),
    ({"shape": [True]}, r"shape must be a list .* got \[True\]"),
    ({"shape": [-48]}, r"shape must be a list .* got \[-48\]"),
    ({"shape": [10**30, 0]}, r"shape must be a list .* got \[1000000000000000000000000000000, 0\]"),
    ({"shape": [1] * 9}, r"shape must be a list of at most 8 integers"),
    ({"shape": None}, r"shape must be a list"),
    ({"data_offsets": [0.0, 192.0]}, r"data_offsets must be two integers 0 <= begin <= end, got \[0\.0, 192\.0\]"),
    ({"data_offsets": [192, 0]}, r"data_offsets must be two integers 0 <= begin <= end, got \[192, 0\]"),
    ({"data_offsets": [-192, 0]}, r"data_offsets must be two integers"),
    ({"data_offsets": [0]}, r"data_offsets must be two integers"),
    ({"data_offsets": "0-192"}, r"data_offsets must be two integers"),
    ({"data_offsets": [0, 10**30]}, r"data_offsets \[0, 1000000000000000000000000000000\] cover .* bytes, shape"),
    ({"data_offsets": [10**30, 10**30 + 192]}, r"truncated file: tensor 'model\.norm\.weight' needs bytes up to"),
])
def test_header_entry_of_the_wrong_type_or_range(single, changes, message):
    weights = single / "model.safetensors"
    damage_entry(weights, "model.norm.weight", **changes)
    with pytest.raises(MixexportError, match=rf"^{weights}: .*{message}"):
        Checkpoint(single)


@pytest.mark.parametrize("entry,message", [
    ([], r"expected an object with dtype, shape and data_offsets, got \[\]"),
    ("F32", r"expected an object with dtype, shape and data_offsets, got 'F32'"),
    (None, r"expected an object"),
    ({"dtype": "F32", "shape": [48]}, r"missing data_offsets"),
])
def test_header_entry_that_is_not_an_entry(single, entry, message):
    weights = single / "model.safetensors"
    header, data = header_of(weights)
    header["model.norm.weight"] = entry
    write_raw_header(weights, json.dumps(header).encode(), data)
    with pytest.raises(MixexportError, match=rf"^{weights}: corrupt safetensors header entry for tensor "
                                             rf"'model\.norm\.weight': {message}"):
        Checkpoint(single)


@pytest.mark.parametrize("metadata", [["format", "pt"], {"format": 1}, {"format": None}, "pt"])
def test_header_metadata_must_map_strings_to_strings(single, metadata):
    weights = single / "model.safetensors"
    header, data = header_of(weights)
    header["__metadata__"] = metadata
    write_raw_header(weights, json.dumps(header).encode(), data)
    with pytest.raises(MixexportError, match=r"corrupt safetensors header: __metadata__ must map strings to strings"):
        Checkpoint(single)


@pytest.mark.parametrize("raw,message", [
    (b'{"\xff": 1}', r"corrupt safetensors header: not UTF-8 text"),
    (b"[" * 50_000 + b"]" * 50_000, r"corrupt safetensors header: JSON nested too deeply"),
    (b"[1, 2]", r"corrupt safetensors header: must hold a JSON object, found list"),
    (b'{"a": {"dtype": "F32", "shape": [1' + b"0" * 5000 + b']}}', r"corrupt safetensors header: not valid JSON"),
])
def test_header_that_is_not_a_json_object(single, raw, message):
    weights = single / "model.safetensors"
    _, data = header_of(weights)
    write_raw_header(weights, raw, data)
    with pytest.raises(MixexportError, match=rf"^{weights}: {message}"):
        Checkpoint(single)


def test_header_with_a_duplicate_tensor(single):
    # json keeps the last of two equal keys silently: a header naming one tensor twice is refused.
    weights = single / "model.safetensors"
    header, data = header_of(weights)
    norm = json.dumps(header["model.norm.weight"])
    text = json.dumps(header)
    write_raw_header(weights, (text[:-1] + f', "model.norm.weight": {norm}}}').encode(), data)
    with pytest.raises(MixexportError, match=r"corrupt safetensors header: key 'model\.norm\.weight' appears twice"):
        Checkpoint(single)


def test_header_length_beyond_the_bound(single):
    weights = single / "model.safetensors"
    with open(weights, "r+b") as f:
        f.write((100 * 1024**2 + 8).to_bytes(8, "little"))
        f.truncate(200 * 1024**2)  # sparse: long enough to hold the claimed header
    with pytest.raises(MixexportError, match=r"truncated or corrupt safetensors file: header claims 104857608 bytes"):
        Checkpoint(single)


# -- files of the wrong kind, and files that change after the headers were read ---------------------

@pytest.mark.parametrize("what", ["config.json", "model.safetensors"])
@pytest.mark.parametrize("kind", ["fifo", "directory", "device", "broken symlink"])
def test_input_file_of_the_wrong_kind(single, what, kind):
    path = single / what
    path.unlink()
    message = {"fifo": r"is a FIFO \(named pipe\), expected a regular file",
               "directory": r"is a directory, expected a regular file",
               "device": r"is a character device, expected a regular file",
               "broken symlink": r"no such file or directory"}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "device":
        path.symlink_to("/dev/zero")
    else:
        path.symlink_to("../nowhere")
    with deadline(), pytest.raises(MixexportError, match=rf"^{path}: {message}$"):
        Checkpoint(single)


@pytest.mark.parametrize("kind", ["fifo", "directory"])
@pytest.mark.parametrize("which", ["index", "shard"])
def test_sharded_input_of_the_wrong_kind(sharded, kind, which):
    path = sharded / (INDEX_FILE if which == "index" else index_of(sharded)["weight_map"][EXPERT])
    path.unlink()
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    with deadline(), pytest.raises(MixexportError, match=rf"^{path}: is a (FIFO|directory)"):
        Checkpoint(sharded)


def test_checkpoint_path_that_is_a_file(single):
    with pytest.raises(MixexportError, match=rf"^checkpoint directory {single / 'config.json'} is not a directory "
                                             rf"\(name the folder holding config\.json\)$"):
        Checkpoint(single / "config.json")


def test_shard_truncated_after_its_header_was_read(single):
    ckpt = Checkpoint(single)
    weights = single / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(ckpt.tensors["lm_head.weight"].offset + 10)
    with pytest.raises(MixexportError, match=rf"^{weights}: truncated while reading a tensor at byte"):
        ckpt.tensor("lm_head.weight")


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_shard_replaced_after_its_header_was_read(single, kind):
    ckpt = Checkpoint(single)
    weights = single / "model.safetensors"
    weights.unlink()
    os.mkfifo(weights) if kind == "fifo" else weights.mkdir()
    with deadline(), pytest.raises(MixexportError, match=rf"^{weights}: is a (FIFO|directory)"):
        ckpt.tensor("model.norm.weight")


def test_unreadable_shard_is_one_line(single, monkeypatch):
    weights = single / "model.safetensors"
    real_open = os.open

    def denied(p, *args, **kwargs):
        if str(p) == str(weights):
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(MixexportError, match=rf"^{weights}: permission denied"):
        Checkpoint(single)


# -- Hugging Face cache layout: symlinks into ../../blobs keep working --------------------------------

def hub_layout(source, root):
    """`source`'s files as a hub cache snapshot: real files in blobs/, symlinks in snapshots/<rev>/."""
    repo = root / "models--tiny--mixtral"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for k, file in enumerate(sorted(source.iterdir())):
        shutil.copy(file, blobs / f"blob{k:04d}")
        (snapshot / file.name).symlink_to(f"../../blobs/blob{k:04d}")
    return snapshot


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_hub_cache_snapshot_with_symlinks_into_blobs(layout, tiny_checkpoint, tiny_sharded_checkpoint, tmp_path):
    source = tiny_checkpoint if layout == "single" else tiny_sharded_checkpoint
    snapshot = hub_layout(source, tmp_path / "hub")
    assert all(p.is_symlink() for p in snapshot.iterdir())
    linked, plain = Checkpoint(snapshot), Checkpoint(source)
    assert linked.config == plain.config
    assert linked.weights_sha256() == plain.weights_sha256()
    for name in plain.tensors:
        assert torch.equal(linked.tensor(name), plain.tensor(name)), name


def test_hub_snapshot_symlink_to_a_fifo_is_refused(tiny_checkpoint, tmp_path):
    snapshot = hub_layout(tiny_checkpoint, tmp_path / "hub")
    blob = (snapshot / "model.safetensors").resolve()
    blob.unlink()
    os.mkfifo(blob)
    with deadline(), pytest.raises(MixexportError, match=r"model\.safetensors: is a FIFO"):
        Checkpoint(snapshot)
