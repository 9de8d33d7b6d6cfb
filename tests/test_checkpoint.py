"""The checkpoint reader: what it reads, and one test per malformed checkpoint with its message."""

from __future__ import annotations

import json
import math
import pickle
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixexport.checkpoint import Checkpoint
from mixexport.checkpoint import names
from mixexport.checkpoint.reader import INDEX_FILE
from mixexport.errors import MixexportError

EXPERT = "model.layers.1.block_sparse_moe.experts.2.w3.weight"


def rewrite(path, change):
    """Load a safetensors file, let `change(tensors)` edit the dict in place, write it back."""
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def shard_of(ckpt_dir, name):
    return json.loads((ckpt_dir / INDEX_FILE).read_text())["weight_map"][name]


# -- reading ----------------------------------------------------------------------------------------

def test_single_file_checkpoint_reads_every_tensor(tiny_checkpoint, tiny_config):
    ckpt = Checkpoint(tiny_checkpoint)
    assert ckpt.config == tiny_config
    assert [f.name for f in ckpt.files] == ["model.safetensors"]
    raw = load_file(tiny_checkpoint / "model.safetensors")
    assert set(raw) == set(names.expected_shapes(tiny_config))
    for name, value in raw.items():
        assert torch.equal(ckpt.tensor(name), value), name


def test_sharded_checkpoint_reads_the_same_tensors(tiny_checkpoint, tiny_sharded_checkpoint):
    single, sharded = Checkpoint(tiny_checkpoint), Checkpoint(tiny_sharded_checkpoint)
    assert len(sharded.files) > 2
    assert set(single.tensors) == set(sharded.tensors)
    for name in single.tensors:
        assert torch.equal(single.tensor(name), sharded.tensor(name)), name


def test_expert_stacks_follow_the_moe_op_layout(tiny_checkpoint, tiny_config):
    c = tiny_config
    ckpt = Checkpoint(tiny_checkpoint)
    gate_up, down = ckpt.gate_up(1), ckpt.down(1)
    assert gate_up.shape == (c.num_local_experts, 2 * c.intermediate_size, c.hidden_size)
    assert down.shape == (c.num_local_experts, c.hidden_size, c.intermediate_size)
    for e in range(c.num_local_experts):
        assert torch.equal(gate_up[e, :c.intermediate_size], ckpt.tensor(names.expert_name(1, e, "w1")))
        assert torch.equal(gate_up[e, c.intermediate_size:], ckpt.tensor(names.expert_name(1, e, "w3")))
        assert torch.equal(down[e], ckpt.tensor(names.expert_name(1, e, "w2")))


def test_tensor_converts_dtype(tiny_checkpoint):
    ckpt = Checkpoint(tiny_checkpoint)
    value = ckpt.tensor("model.norm.weight", "bf16")
    assert value.dtype == torch.bfloat16
    assert torch.equal(value, ckpt.tensor("model.norm.weight").to(torch.bfloat16))


def test_tied_lm_head_reads_the_embedding(checkpoint_factory, tiny_config):
    ckpt = Checkpoint(checkpoint_factory(tiny_config.replace(tie_word_embeddings=True)))
    assert "lm_head.weight" not in ckpt.tensors
    assert torch.equal(ckpt.tensor("lm_head.weight"), ckpt.tensor("model.embed_tokens.weight"))


# -- malformed directories -------------------------------------------------------------------------

def test_directory_missing(tmp_path):
    with pytest.raises(MixexportError, match=r"checkpoint directory .*nowhere does not exist"):
        Checkpoint(tmp_path / "nowhere")


def test_no_weights_at_all(tmp_path, tiny_checkpoint):
    (tmp_path / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    with pytest.raises(MixexportError, match=r"no model\.safetensors or model\.safetensors\.index\.json found"):
        Checkpoint(tmp_path)


def test_bin_only_directory_is_refused_without_unpickling(tmp_path, tiny_checkpoint, monkeypatch):
    def unpickle(*args, **kwargs):
        raise AssertionError("the reader tried to unpickle a .bin file")

    for module, attr in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(module, attr, unpickle)
    (tmp_path / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04garbage, not a pickle\x00" * 8)
    with pytest.raises(MixexportError,
                       match=r"holds only pickled weights \(pytorch_model\.bin\)\. mixexport never unpickles"):
        Checkpoint(tmp_path)


def test_several_safetensors_without_index(tiny_sharded_checkpoint, checkpoint_copy):
    path = checkpoint_copy(tiny_sharded_checkpoint)
    (path / INDEX_FILE).unlink()
    with pytest.raises(MixexportError, match=r"\d+ safetensors files but no model\.safetensors\.index\.json"):
        Checkpoint(path)


# -- malformed files ------------------------------------------------------------------------------

def test_truncated_shard(tiny_checkpoint, checkpoint_copy):
    path = checkpoint_copy(tiny_checkpoint)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    with pytest.raises(MixexportError, match=re.escape(
            f"{weights}: truncated file: tensor 'lm_head.weight' needs bytes up to {len(data)}, "
            f"file has {len(data) - 100} bytes")):
        Checkpoint(path)


def test_corrupt_header_bytes(tiny_checkpoint, checkpoint_copy):
    path = checkpoint_copy(tiny_checkpoint)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"\xff\xfe garbage in the header \x00\x01\x02\x03"[:32]
    weights.write_bytes(bytes(data))
    with pytest.raises(MixexportError, match=rf"{re.escape(str(weights))}: corrupt safetensors header"):
        Checkpoint(path)


def test_garbage_file(tiny_checkpoint, checkpoint_copy):
    path = checkpoint_copy(tiny_checkpoint)
    weights = path / "model.safetensors"
    weights.write_bytes(b"this is not a safetensors file at all" * 4)
    with pytest.raises(MixexportError, match=r"truncated or corrupt safetensors file: header claims \d+ bytes, "
                                             r"file has 148 bytes"):
        Checkpoint(path)


def test_file_too_short_for_a_header(tiny_checkpoint, checkpoint_copy):
    path = checkpoint_copy(tiny_checkpoint)
    (path / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(MixexportError, match=r"corrupt safetensors file \(2 bytes, too short for a header\)"):
        Checkpoint(path)


def test_header_offsets_that_disagree_with_shape(tiny_checkpoint, checkpoint_copy):
    # data_offsets covering fewer bytes than shape x dtype: safetensors refuses such a file only
    # when a tensor is read; the reader must say so up front, naming the file and the tensor.
    path = checkpoint_copy(tiny_checkpoint)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    begin, end = header["model.norm.weight"]["data_offsets"]
    header["model.norm.weight"]["data_offsets"] = [begin, end - 4]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    weights.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + header_len:])
    with pytest.raises(MixexportError, match=rf"{re.escape(str(weights))}: corrupt safetensors header entry for "
                                             rf"tensor 'model\.norm\.weight'"):
        Checkpoint(path)


# -- malformed sharded checkpoints ----------------------------------------------------------------

def test_missing_shard_named_by_the_index(tiny_sharded_checkpoint, checkpoint_copy):
    path = checkpoint_copy(tiny_sharded_checkpoint)
    shard = shard_of(path, EXPERT)
    (path / shard).unlink()
    with pytest.raises(MixexportError, match=rf"names shard {re.escape(shard)}, which is missing from"):
        Checkpoint(path)


def test_index_maps_a_tensor_to_the_wrong_shard(tiny_sharded_checkpoint, checkpoint_copy):
    path = checkpoint_copy(tiny_sharded_checkpoint)
    index = json.loads((path / INDEX_FILE).read_text())
    right = index["weight_map"][EXPERT]
    wrong = index["weight_map"]["model.embed_tokens.weight"]
    assert right != wrong
    index["weight_map"][EXPERT] = wrong
    (path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(MixexportError, match=rf"maps tensor {re.escape(EXPERT)} to {re.escape(wrong)}, "
                                             rf"but it is in {re.escape(right)}"):
        Checkpoint(path)


def test_index_names_a_tensor_no_shard_holds(tiny_sharded_checkpoint, checkpoint_copy):
    path = checkpoint_copy(tiny_sharded_checkpoint)
    index = json.loads((path / INDEX_FILE).read_text())
    shard = index["weight_map"][EXPERT]
    index["weight_map"]["model.layers.0.self_attn.q_proj.bias"] = shard
    (path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(MixexportError, match=rf"maps tensor model\.layers\.0\.self_attn\.q_proj\.bias to "
                                             rf"{re.escape(shard)}, which does not contain it"):
        Checkpoint(path)


def test_index_not_json(tiny_sharded_checkpoint, checkpoint_copy):
    path = checkpoint_copy(tiny_sharded_checkpoint)
    (path / INDEX_FILE).write_text("{not json")
    with pytest.raises(MixexportError, match=r"model\.safetensors\.index\.json: not valid JSON"):
        Checkpoint(path)


def test_same_tensor_in_two_shards(tiny_sharded_checkpoint, checkpoint_copy):
    path = checkpoint_copy(tiny_sharded_checkpoint)
    home = shard_of(path, EXPERT)
    other = shard_of(path, "model.norm.weight")
    assert home != other
    copy = load_file(path / home)[EXPERT]
    rewrite(path / other, lambda tensors: tensors.__setitem__(EXPERT, copy))
    first, second = sorted([home, other])
    with pytest.raises(MixexportError, match=rf"tensor {re.escape(EXPERT)} is stored twice: in {re.escape(first)} "
                                             rf"and {re.escape(second)}"):
        Checkpoint(path)


# -- contents that disagree with config.json ------------------------------------------------------

def test_missing_expected_tensor(tiny_checkpoint, checkpoint_copy):
    path = checkpoint_copy(tiny_checkpoint)
    rewrite(path / "model.safetensors", lambda tensors: tensors.pop(EXPERT))
    with pytest.raises(MixexportError, match=rf"tensor {re.escape(EXPERT)} is missing \(expected shape \[40, 48\], "
                                             rf"F32\); checked model\.safetensors"):
        Checkpoint(path)


def test_wrong_shape(tiny_checkpoint, checkpoint_copy):
    path = checkpoint_copy(tiny_checkpoint)
    rewrite(path / "model.safetensors", lambda tensors: tensors.__setitem__(EXPERT, torch.zeros(48, 40)))
    with pytest.raises(MixexportError, match=rf"tensor {re.escape(EXPERT)} has shape \[48, 40\], expected \[40, 48\] "
                                             rf"from config\.json"):
        Checkpoint(path)


def test_wrong_dtype(tiny_checkpoint, checkpoint_copy):
    path = checkpoint_copy(tiny_checkpoint)
    rewrite(path / "model.safetensors",
            lambda tensors: tensors.__setitem__(EXPERT, tensors[EXPERT].to(torch.float16)))
    with pytest.raises(MixexportError, match=rf"tensor {re.escape(EXPERT)} has dtype F16, expected F32 "
                                             rf"\(config\.json says float32\)"):
        Checkpoint(path)


def test_unknown_tensor_name_read_on_demand(tiny_checkpoint):
    with pytest.raises(MixexportError, match=r"tensor model\.layers\.9\.mlp\.gate\.weight is not in the checkpoint"):
        Checkpoint(tiny_checkpoint).tensor("model.layers.9.mlp.gate.weight")


# -- weights fingerprint ----------------------------------------------------------------------------

def test_weights_fingerprint_ignores_read_order_and_sharding_of_reads(tiny_checkpoint):
    fresh = Checkpoint(tiny_checkpoint).weights_sha256()
    partly_read = Checkpoint(tiny_checkpoint)
    for name in sorted(partly_read.tensors, reverse=True)[:5]:
        partly_read.tensor(name, "float16")  # digests are of the stored bytes, not the conversion
    assert partly_read.weights_sha256() == fresh
    assert list(fresh) == ["model.safetensors"]


def test_weights_fingerprint_names_the_shard_whose_tensor_changed(tiny_sharded_checkpoint, checkpoint_copy):
    before = Checkpoint(tiny_sharded_checkpoint).weights_sha256()
    copy = checkpoint_copy(tiny_sharded_checkpoint)
    shard = shard_of(copy, EXPERT)
    rewrite(copy / shard, lambda t: t[EXPERT].add_(1e-3))
    after = Checkpoint(copy).weights_sha256()
    assert set(after) == set(before) and len(after) > 2
    assert [f for f in after if after[f] != before[f]] == [shard]


def test_weights_fingerprint_ignores_header_metadata(tiny_checkpoint, checkpoint_copy):
    copy = checkpoint_copy(tiny_checkpoint)
    save_file(load_file(copy / "model.safetensors"), copy / "model.safetensors", metadata={"format": "pt", "x": "y"})
    assert Checkpoint(copy).weights_sha256() == Checkpoint(tiny_checkpoint).weights_sha256()


# -- non-finite weights ---------------------------------------------------------------------------

EMBED = "model.embed_tokens.weight"


@pytest.fixture(params=["float32", "float16", "bfloat16"])
def dtype_checkpoint(request, checkpoint_factory, tiny_config, checkpoint_copy):
    """A private copy of the tiny checkpoint in each float dtype."""
    return checkpoint_copy(checkpoint_factory(tiny_config.replace(dtype=request.param)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_weight_is_refused_naming_the_tensor(dtype_checkpoint, bad):
    weights = dtype_checkpoint / "model.safetensors"
    rewrite(weights, lambda tensors: tensors[EMBED][5].__setitem__(3, bad))
    ckpt = Checkpoint(dtype_checkpoint)  # opening reads headers only
    with pytest.raises(MixexportError, match=rf"^{re.escape(str(weights))}: tensor {re.escape(EMBED)} holds 1 NaN "
                                             rf"or infinite value\(s\), the first at index \[5, 3\] "
                                             rf"\(allow_non_finite / --allow-non-finite exports it anyway\)$"):
        ckpt.tensor(EMBED, "float32")
    with pytest.raises(MixexportError, match=r"holds 1 NaN"):  # a failed read is not remembered as checked
        ckpt.weights_sha256()
    allowed = Checkpoint(dtype_checkpoint, allow_non_finite=True).tensor(EMBED, "float32")
    value = allowed[5, 3].item()
    assert math.isnan(value) if math.isnan(bad) else value == bad
    assert torch.isfinite(allowed[:5]).all() and torch.isfinite(allowed[6:]).all()


def test_a_non_finite_expert_weight_read_into_a_stack_is_refused(tiny_checkpoint, checkpoint_copy):
    path = checkpoint_copy(tiny_checkpoint)
    rewrite(path / "model.safetensors", lambda tensors: tensors[EXPERT][-1].fill_(float("nan")))
    ckpt = Checkpoint(path)
    ckpt.gate_up_expert(1, 1)  # other experts are fine
    with pytest.raises(MixexportError, match=rf"tensor {re.escape(EXPERT)} holds 48 NaN or infinite value\(s\), "
                                             rf"the first at index \[39, 0\]"):
        ckpt.gate_up_expert(1, 2)  # read straight into the stack's second half
    with pytest.raises(MixexportError, match=rf"tensor {re.escape(EXPERT)} holds 48 NaN"):
        ckpt.gate_up(1, "float16")


def test_finite_weights_read_as_before(tiny_checkpoint):
    ckpt = Checkpoint(tiny_checkpoint)
    assert ckpt.allow_non_finite is False
    raw = load_file(tiny_checkpoint / "model.safetensors")
    for name, value in raw.items():
        assert torch.equal(ckpt.tensor(name), value), name


def test_a_build_of_a_checkpoint_with_one_nan_fails_with_one_line(checkpoint_factory, tiny_config, checkpoint_copy,
                                                                  tmp_path):
    # The build reads every tensor once, in reader threads: the error must come out of them as
    # the user error it is. One NaN in an embedding row the parity scenario may never touch.
    from click.testing import CliRunner

    from mixexport.cli.main import cli

    path = checkpoint_copy(checkpoint_factory(tiny_config.replace(num_hidden_layers=1)))
    weights = path / "model.safetensors"
    rewrite(weights, lambda tensors: tensors[EMBED][90].__setitem__(7, float("nan")))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["build", str(path), "-o", str(out), "--target", "portable", "--no-validate",
                                      "--max-sequence", "32"],
                                prog_name="mixexport")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.stderr.splitlines()[-1] == (
        f"error: {weights}: tensor {EMBED} holds 1 NaN or infinite value(s), the first at index [90, 7] "
        f"(allow_non_finite / --allow-non-finite exports it anyway)")
    assert not out.exists()
