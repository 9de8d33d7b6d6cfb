"""Lazy access to a Hugging Face Mixtral checkpoint directory.

A `Checkpoint` knows every tensor's file, dtype and shape from the safetensors headers, checks
them against the config up front, and reads tensors one at a time on demand (positioned reads, no memory map), so
later stages can stream a layer, or a single expert stack, without the model in memory.

Every tensor is hashed (sha256 of its bytes as stored) the first time it is read, so a build
fingerprints the weights it exported from the one read it makes anyway, instead of reading the
whole checkpoint a second time to hash its files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch

from mixexport.checkpoint import names
from mixexport.checkpoint.config import MixtralConfig
from mixexport.checkpoint.safetensors_io import ST_CODES, ST_DTYPES, TensorInfo, read_header, read_tensor
from mixexport.dtypes import torch_dtype
from mixexport.errors import MixexportError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
CONVERT_HINT = (
    "mixexport never unpickles weights (a pickle can run arbitrary code). Convert once on a trusted "
    "machine: python -c \"from transformers import AutoModelForCausalLM as M; "
    "M.from_pretrained('IN').save_pretrained('OUT', safe_serialization=True)\"")


class Checkpoint:
    """A Mixtral checkpoint directory: config + lazily read safetensors tensors.

    Args:
        path: directory holding `config.json` and `model.safetensors` or sharded safetensors with
            `model.safetensors.index.json`.
        validate: check every expected tensor's presence, shape and dtype now (default).
    """

    def __init__(self, path: str | Path, validate: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise MixexportError(f"checkpoint directory {self.path} does not exist")
        self.config = MixtralConfig.from_file(self.path / "config.json")
        self.tensors: dict[str, TensorInfo] = _index_tensors(self.path)
        self._digests: dict[str, str] = {}  # tensor name -> sha256 of its stored bytes, once read
        if validate:
            self.validate()

    @property
    def files(self) -> list[Path]:
        """The safetensors files, in name order."""
        return sorted({info.file for info in self.tensors.values()})

    def validate(self) -> None:
        """Check presence, shape and dtype of every tensor the config implies.

        Raises:
            MixexportError: naming the tensor, its file, what was expected and what was found.
        """
        expected_code = ST_CODES[torch_dtype(self.config.dtype)]
        for name, shape in names.expected_shapes(self.config).items():
            info = self.tensors.get(name)
            if info is None:
                raise MixexportError(
                    f"{self.path}: tensor {name} is missing (expected shape {list(shape)}, {expected_code}); "
                    f"checked {', '.join(f.name for f in self.files)}")
            if info.shape != shape:
                raise MixexportError(
                    f"{info.file}: tensor {name} has shape {list(info.shape)}, expected {list(shape)} "
                    f"from config.json")
            if info.dtype != expected_code:
                raise MixexportError(
                    f"{info.file}: tensor {name} has dtype {info.dtype}, expected {expected_code} "
                    f"(config.json says {self.config.dtype})")

    # -- reading ------------------------------------------------------------------------------

    def tensor(self, name: str, dtype: str | torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor, converted to `dtype` when given."""
        tensor = self._read(name)
        return tensor if dtype is None else tensor.to(torch_dtype(dtype))

    def _read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor as stored (into `out` when given), hashing it the first time."""
        if name == "lm_head.weight" and name not in self.tensors and self.config.tie_word_embeddings:
            name = "model.embed_tokens.weight"
        info = self.tensors.get(name)
        if info is None:
            raise MixexportError(f"{self.path}: tensor {name} is not in the checkpoint")
        tensor = read_tensor(info, out)
        if name not in self._digests:  # sha256 releases the GIL: reader threads hash in parallel
            self._digests[name] = hashlib.sha256(tensor.view(-1).view(torch.uint8).numpy()).hexdigest()
        return tensor

    def gate_up_expert(self, layer: int, expert: int, dtype: str | torch.dtype | None = None) -> torch.Tensor:
        """[2I, H]: one expert's gate rows (w1) then up rows (w3), the MoE op's layout."""
        gate_name, up_name = (names.expert_name(layer, expert, w) for w in ("w1", "w3"))
        (i, h), stored = self.tensors[gate_name].shape, ST_DTYPES[self.tensors[gate_name].dtype]
        if dtype is None or torch_dtype(dtype) == stored:
            out = torch.empty((2 * i, h), dtype=stored)  # both halves read straight into place
            self._read(gate_name, out[:i])
            self._read(up_name, out[i:])
            return out
        # One pass: each half is converted while it is copied into place (no cat, then convert).
        out = torch.empty((2 * i, h), dtype=torch_dtype(dtype))
        out[:i].copy_(self._read(gate_name))
        out[i:].copy_(self._read(up_name))
        return out

    def down_expert(self, layer: int, expert: int, dtype: str | torch.dtype | None = None) -> torch.Tensor:
        """[H, I]: one expert's down projection (w2)."""
        return self.tensor(names.expert_name(layer, expert, "w2"), dtype)

    def gate_up(self, layer: int, dtype: str | torch.dtype | None = None) -> torch.Tensor:
        """[E, 2I, H]: every expert's gate rows then up rows."""
        return self.stack_experts(lambda e: self.gate_up_expert(layer, e, dtype))

    def down(self, layer: int, dtype: str | torch.dtype | None = None) -> torch.Tensor:
        """[E, H, I]: every expert's down projection."""
        return self.stack_experts(lambda e: self.down_expert(layer, e, dtype))

    def stack_experts(self, part: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """[E, ...] from `part(e)`, one allocation filled expert by expert."""
        # Filled expert by expert into one allocation: peak memory is the stack plus one expert,
        # not the stack twice as torch.stack over a list would need.
        first = part(0)
        out = torch.empty((self.config.num_local_experts, *first.shape), dtype=first.dtype)
        out[0] = first
        for e in range(1, self.config.num_local_experts):
            out[e] = part(e)
        return out

    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def weights_sha256(self) -> dict[str, str]:
        """A fingerprint of the weights per safetensors file: file name -> sha256.

        Each file's digest covers the model's tensors in it (name, dtype, shape and the sha256
        of the stored bytes, in name order); tensors the model does not use and the header's
        metadata are not part of it. Tensors already read are not read again.
        """
        per_file: dict[str, list[str]] = {}
        for name in sorted(names.expected_shapes(self.config)):
            info = self.tensors[name]
            if name not in self._digests:
                self.tensor(name)
            per_file.setdefault(info.file.name, []).append(
                f"{name} {info.dtype} {list(info.shape)} {self._digests[name]}\n")
        return {file: hashlib.sha256("".join(lines).encode()).hexdigest() for file, lines in sorted(per_file.items())}


def _index_tensors(path: Path) -> dict[str, TensorInfo]:
    """Map every tensor name to its file, from the index (sharded) or the single file."""
    index_path = path / INDEX_FILE
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise MixexportError(f"{index_path}: not a valid safetensors index ({exc!r})") from None
        shard_names = sorted(set(weight_map.values()))
    elif (path / SINGLE_FILE).exists():
        weight_map, shard_names = None, [SINGLE_FILE]
    else:
        shard_names = sorted(p.name for p in path.glob("*.safetensors"))
        if not shard_names:
            pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise MixexportError(f"{path}: holds only pickled weights ({', '.join(pickles)}). {CONVERT_HINT}")
            raise MixexportError(f"{path}: no model.safetensors or {INDEX_FILE} found")
        if len(shard_names) > 1:
            raise MixexportError(f"{path}: {len(shard_names)} safetensors files but no {INDEX_FILE} to say which "
                                 f"holds what")
        weight_map = None

    tensors: dict[str, TensorInfo] = {}
    for shard in shard_names:
        shard_path = path / shard
        if not shard_path.exists():
            raise MixexportError(f"{index_path}: names shard {shard}, which is missing from {path}")
        for name, info in read_header(shard_path).items():
            if name in tensors:
                raise MixexportError(f"tensor {name} is stored twice: in {tensors[name].file.name} and {shard}")
            tensors[name] = info
    if weight_map is not None:
        for name, shard in weight_map.items():
            info = tensors.get(name)
            if info is None:
                raise MixexportError(f"{index_path}: maps tensor {name} to {shard}, which does not contain it")
            if info.file.name != shard:
                raise MixexportError(f"{index_path}: maps tensor {name} to {shard}, but it is in {info.file.name}")
    for name, info in tensors.items():
        if info.dtype not in ST_DTYPES:
            raise MixexportError(f"{info.file}: tensor {name} has unsupported dtype {info.dtype}")
    return tensors
