"""The tokenizer `mixexport init` writes beside a random checkpoint, so a preset can be run on text.

Laid out as Llama's and Mistral's tokenizers are (what onnxruntime-genai's "mistral" model type and
transformers' LlamaTokenizerFast read): ids 0, 1, 2 are `<unk>`, `<s>` (the config's bos) and `</s>`
(its eos); then one `<0xXX>` token per byte, which BPE's byte fallback uses for any character the
vocabulary lacks, so every text encodes and decodes back to itself (but for `▁` itself, which
decodes as a space, as in Llama's tokenizers); then `▁` (a space) and single
characters, printable ASCII first (then `<unused{n}>` tokens, past the last printable code point),
until the vocabulary has exactly the config's size. There are no merges: the weights are random, so
longer tokens would buy nothing but a bigger file.

A vocabulary too small for 256 bytes (the `tiny` preset's 256 ids) drops the 13 byte values that
never occur in UTF-8 (0xC0, 0xC1, 0xF5-0xFF): text still round-trips. Below that size
(MIN_VOCAB) no tokenizer can round-trip text, and none is written.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Iterator

from tokenizers import Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE

from mixexport.checkpoint.config import MixtralConfig
from mixexport.errors import InternalError

TOKENIZER_FILE, TOKENIZER_CONFIG_FILE = "tokenizer.json", "tokenizer_config.json"
# The files a runtime reads beside the model (what build copies from a checkpoint that has them).
TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, "special_tokens_map.json", "tokenizer.model")
# In the order of their ids, which are the config's bos/eos ids (MixtralConfig.to_hf_dict).
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (UNK, BOS, EOS)
SPACE = "\u2581"  # "▁", SentencePiece's space
_NOT_UTF8 = {0xC0, 0xC1, *range(0xF5, 0x100)}
MIN_VOCAB = len(SPECIAL_TOKENS) + 256 - len(_NOT_UTF8) + 1  # + "▁"


def _bytes_for(vocab_size: int) -> list[int]:
    if vocab_size >= len(SPECIAL_TOKENS) + 256 + 1:
        return list(range(256))
    return [b for b in range(256) if b not in _NOT_UTF8]


def _fillers() -> Iterator[str]:
    """Tokens to fill the vocabulary: printable ASCII, then printable code points in order, then
    numbered placeholders (a vocabulary may be larger than Unicode's printable characters)."""
    yield from (chr(c) for c in range(0x21, 0x7F))
    for code in range(0xA1, 0x110000):
        char = chr(code)
        if char.isprintable() and not 0xD800 <= code < 0xE000 and char != SPACE:
            yield char
    yield from (f"<unused{n}>" for n in itertools.count())


def build_tokenizer(vocab_size: int) -> Tokenizer | None:
    """The tokenizer for a vocabulary of `vocab_size` ids, or None when it is below MIN_VOCAB.

    Args:
        vocab_size: the config's vocab_size; the tokenizer has exactly this many tokens.

    Returns:
        a `tokenizers.Tokenizer` (byte-fallback BPE with no merges), or None.
    """
    if vocab_size < MIN_VOCAB:
        return None
    tokens = [*SPECIAL_TOKENS, *(f"<0x{b:02X}>" for b in _bytes_for(vocab_size)), SPACE]
    tokens += itertools.islice(_fillers(), vocab_size - len(tokens))
    model = BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=[], unk_token=UNK, byte_fallback=True,
                fuse_unk=True)
    tokenizer = Tokenizer(model)
    # Llama's layout: a leading "▁" and spaces as "▁", undone (one leading space stripped) on decode.
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    # `<s>` first, as Llama's tokenizers add it (tokenizer_config.json says add_bos_token).
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                             special_tokens=[(BOS, SPECIAL_TOKENS.index(BOS))])
    return tokenizer


def tokenizer_config(config: MixtralConfig) -> dict:
    """`tokenizer_config.json`: the class and special tokens transformers and onnxruntime-genai read."""
    return {
        "tokenizer_class": "LlamaTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": None,
        "add_bos_token": True, "add_eos_token": False,
        "model_max_length": config.max_position_embeddings,
        "clean_up_tokenization_spaces": False, "legacy": False,
        "added_tokens_decoder": {str(i): {"content": token, "special": True, "lstrip": False, "rstrip": False,
                                          "normalized": False, "single_word": False}
                                 for i, token in enumerate(SPECIAL_TOKENS)},
    }


def write_tokenizer(folder: Path, config: MixtralConfig) -> list[Path]:
    """Write `tokenizer.json` and `tokenizer_config.json` for `config` into `folder`.

    Args:
        folder: the checkpoint being written.
        config: its config (vocab_size; bos and eos are ids 1 and 2, as `to_hf_dict` writes them).

    Returns:
        the files written; none when the vocabulary is below MIN_VOCAB.
    """
    tokenizer = build_tokenizer(config.vocab_size)
    if tokenizer is None:
        return []
    hf = config.to_hf_dict()
    if (tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)) != (hf["bos_token_id"], hf["eos_token_id"]):
        raise InternalError("the tokenizer's <s> and </s> ids must be the config's bos and eos ids")
    tokenizer.save(str(folder / TOKENIZER_FILE))
    (folder / TOKENIZER_CONFIG_FILE).write_text(json.dumps(tokenizer_config(config), indent=2) + "\n")
    return [folder / TOKENIZER_FILE, folder / TOKENIZER_CONFIG_FILE]
