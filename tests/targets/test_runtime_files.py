"""The runtime files' inputs from a checkpoint: special token ids checked before use, tokenizer
files copied only when they are regular files of a sane size."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from mixexport import graph_io
from mixexport.checkpoint import preset
from mixexport.errors import MixexportError
from mixexport.targets.runtime_files import special_token_ids, write_runtime_files

CONFIG = preset("tiny")


def _checkpoint(tmp_path, **fields):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**CONFIG.to_hf_dict(), **fields}))
    return folder


def _manifest():
    """What write_runtime_files reads of the artifact stage's Manifest (which targets cannot import)."""
    return SimpleNamespace(model=CONFIG.summary(), dtype="float32", dynamic_dims={graph_io.TOTAL: [1, 64]},
                           targets={"ort": SimpleNamespace(files=[], extra={})})


def test_ids_default_to_mixtrals_and_pad_with_eos(tmp_path):
    folder = _checkpoint(tmp_path, bos_token_id=None, eos_token_id=None)
    assert special_token_ids(folder, CONFIG.vocab_size) == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def test_a_list_of_eos_ids_is_kept(tmp_path):
    ids = special_token_ids(_checkpoint(tmp_path, eos_token_id=[2, 7]), CONFIG.vocab_size)
    assert ids["eos_token_id"] == [2, 7] and ids["pad_token_id"] == 2


@pytest.mark.parametrize("field, value", [("bos_token_id", "1"), ("eos_token_id", 256), ("pad_token_id", -1),
                                          ("eos_token_id", [2, "x"]), ("bos_token_id", True),
                                          ("bos_token_id", 1.0)])
def test_bad_ids_are_refused_naming_the_field(tmp_path, field, value):
    with pytest.raises(MixexportError, match=rf"config.json: {field} must be a token id in \[0, 256\)"):
        special_token_ids(_checkpoint(tmp_path, **{field: value}), CONFIG.vocab_size)


def test_a_fifo_in_a_tokenizer_files_place_is_refused_without_blocking(tmp_path):
    folder = _checkpoint(tmp_path)
    os.mkfifo(folder / "tokenizer.json")
    (tmp_path / "out" / "ort").mkdir(parents=True)
    with pytest.raises(MixexportError, match="tokenizer.json: is a FIFO"):
        write_runtime_files(tmp_path / "out", "ort", _manifest(), folder, lambda p: {"path": str(p)})


def test_every_file_written_is_recorded(tmp_path):
    folder = _checkpoint(tmp_path)
    (folder / "tokenizer.model").write_bytes(b"sentencepiece")
    root = tmp_path / "out"
    (root / "ort").mkdir(parents=True)
    manifest = _manifest()
    written = write_runtime_files(root, "ort", manifest, folder, lambda p: {"path": p.relative_to(root).as_posix()})
    assert written == ["genai_config.json", "config.json", "generation_config.json", "tokenizer.model"]
    assert [f["path"] for f in manifest.targets["ort"].files] == [f"ort/{name}" for name in written]
    assert sorted(p.name for p in (root / "ort").iterdir()) == sorted(written)
    assert (root / "ort" / "tokenizer.model").read_bytes() == b"sentencepiece"


@pytest.mark.parametrize("extra, providers", [({}, []), ({"provider": "cpu"}, []),
                                              ({"provider": "cuda"}, [{"cuda": {}}])])
def test_genai_config_names_the_provider_the_graph_was_lowered_for(tmp_path, extra, providers):
    """genai runs on its CPU provider unless the config names one: a CUDA build says cuda."""
    root = tmp_path / "out"
    (root / "ort").mkdir(parents=True)
    manifest = _manifest()
    manifest.targets["ort"].extra = extra
    write_runtime_files(root, "ort", manifest, _checkpoint(tmp_path), lambda p: {"path": str(p)})
    genai = json.loads((root / "ort" / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["session_options"]["provider_options"] == providers
