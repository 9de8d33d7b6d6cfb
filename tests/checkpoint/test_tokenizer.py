"""The tokenizer `init` writes: exactly the config's vocabulary, bos/eos at the config's ids, every
text back from its tokens, and the files transformers loads."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from mixexport.checkpoint import preset, write_checkpoint
from mixexport.checkpoint.tokenizer import MIN_VOCAB, build_tokenizer

TEXTS = ["Hello world", "  two  spaces, a trailing one ", "héllo 世界 🤖\n\ttab\r\n", "", "\x00\x7f\U0010fffd"]


@pytest.mark.parametrize("vocab_size", [MIN_VOCAB, 256, 259, 260, 32000])
def test_vocabulary_size_and_round_trip(vocab_size):
    tokenizer = build_tokenizer(vocab_size)
    assert tokenizer.get_vocab_size() == vocab_size
    assert len(set(tokenizer.get_vocab().values())) == vocab_size
    assert [tokenizer.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    for text in TEXTS:
        ids = tokenizer.encode(text).ids
        assert ids[0] == 1 and max(ids) < vocab_size and 0 not in ids  # <s> first, never <unk>
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode("a</s>").ids[-1] == 2  # special tokens in text are the special ids


def test_too_small_a_vocabulary_gets_no_tokenizer(tmp_path):
    assert build_tokenizer(MIN_VOCAB - 1) is None
    out = write_checkpoint(tmp_path / "m", preset("tiny").replace(vocab_size=MIN_VOCAB - 1, num_hidden_layers=1))
    assert not (out / "tokenizer.json").exists()


def test_init_writes_what_transformers_loads(tmp_path):
    config = preset("tiny").replace(num_hidden_layers=1)
    out = write_checkpoint(tmp_path / "m", config)
    hf = json.loads((out / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == config.vocab_size
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (hf["bos_token_id"], hf["eos_token_id"])
    ids = tokenizer("héllo world 🤖").input_ids
    assert ids[0] == hf["bos_token_id"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "héllo world 🤖"
