"""Lazy access to a Hugging Face Mixtral checkpoint directory.

A `Checkpoint` knows every tensor's file, dtype and shape from the safetensors headers, checks
them against the config up front, and reads tensors one at a time on demand (positioned reads, no memory map), so
later stages can stream a layer, or a single expert stack, without the model in memory.

Every tensor is hashed (sha256 of its bytes as stored) the first time it is read, so a build
fingerprints the weights it exported from the one read it makes anyway, instead of reading the
whole checkpoint a second time to hash its files. The same first read checks that a floating
point tensor holds no NaN or infinity (one min/max pass, no copy): a build reads every tensor,
so one build checks them all.

Every file is opened by `mixexport.safe_io`'s rule (regular files only, never blocking), and a
shard named by the index must lie inside the checkpoint directory.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Callable

import torch

from mixexport.checkpoint import names
from mixexport.checkpoint.config import CONFIG_FILE, MixtralConfig
from mixexport.checkpoint.safetensors_io import ST_CODES, ST_DTYPES, TensorInfo, read_header, read_tensor
from mixexport.dtypes import torch_dtype
from mixexport.errors import MixexportError
from mixexport.safe_io import cut, inside, os_error, read_json_object

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# An index maps each tensor name to a shard: about 100 bytes an entry, so 64 MiB admits over
# half a million tensors (Mixtral 8x22B has 1,739).
MAX_INDEX_BYTES = 64 * 1024**2
STACK_READERS = 2  # threads reading an expert stack (`Checkpoint.stack_experts`)
_FINITE_CHUNK = 2**20  # elements per step when locating a non-finite value
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
        allow_non_finite: read tensors holding NaN or infinity; by default reading one raises.
    """

    def __init__(self, path: str | Path, validate: bool = True, allow_non_finite: bool = False) -> None:
        self.path = Path(path)
        try:
            if not self.path.is_dir():  # follows a symlink the user named, as they would expect
                raise MixexportError(
                    f"checkpoint directory {self.path} does not exist" if not os.path.lexists(self.path) else
                    f"checkpoint directory {self.path} is not a directory (name the folder holding config.json)")
        except OSError as exc:
            raise os_error(exc, self.path) from None
        self.allow_non_finite = allow_non_finite
        self.config = MixtralConfig.from_file(self.path / CONFIG_FILE)
        self.tensors: dict[str, TensorInfo] = _index_tensors(self.path)
        self._check_counts()
        self._digests: dict[str, str] = {}  # tensor name -> sha256 of its stored bytes, once read
        if validate:
            self.validate()

    def _check_counts(self) -> None:
        """Refuse a config.json that asks for more layers or experts than the files hold.

        Runs before anything loops over layers or experts, so that a huge count in config.json
        fails here, at once, instead of after building tables proportional to it.
        """
        c, source = self.config, self.path / CONFIG_FILE
        layers, experts = names.stored_counts(self.tensors)
        if c.num_hidden_layers > layers:
            raise MixexportError(f"{source}: num_hidden_layers={c.num_hidden_layers}, but the safetensors files "
                                 f"hold tensors of {layers} layers (named {names.PREFIX.format(i='N')}...)")
        if c.num_local_experts > experts:
            raise MixexportError(f"{source}: num_local_experts={c.num_local_experts}, but the safetensors files "
                                 f"hold tensors of {experts} experts (named "
                                 f"{names.expert_name('N', 'N', 'w1')}, w2, w3)")

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
        # Lazily: the table is only ever built whole once every tensor it names is known to exist.
        for name, shape in names.iter_expected_shapes(self.config):
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
            if not self.allow_non_finite:
                _check_finite(tensor, name, info)
            self._digests[name] = hashlib.sha256(tensor.view(-1).view(torch.uint8).numpy()).hexdigest()
        return tensor

    def gate_up_expert(self, layer: int, expert: int, dtype: str | torch.dtype | None = None,
                       out: torch.Tensor | None = None) -> torch.Tensor:
        """[2I, H]: one expert's gate rows (w1) then up rows (w3), the MoE op's layout; into `out`
        (e.g. its slot of a stack, `stack_experts`) when given."""
        gate_name, up_name = (names.expert_name(layer, expert, w) for w in ("w1", "w3"))
        (i, h), stored = self.tensors[gate_name].shape, ST_DTYPES[self.tensors[gate_name].dtype]
        target = stored if dtype is None else torch_dtype(dtype)
        out = torch.empty((2 * i, h), dtype=target) if out is None else out
        if target == stored:  # both halves read straight into place
            self._read(gate_name, out[:i])
            self._read(up_name, out[i:])
        else:  # one pass: each half is converted while it is copied into place (no cat, then convert)
            out[:i].copy_(self._read(gate_name))
            out[i:].copy_(self._read(up_name))
        return out

    def down_expert(self, layer: int, expert: int, dtype: str | torch.dtype | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
        """[H, I]: one expert's down projection (w2); into `out` when given."""
        name = names.expert_name(layer, expert, "w2")
        if out is None:
            return self.tensor(name, dtype)
        if dtype is None or torch_dtype(dtype) == ST_DTYPES[self.tensors[name].dtype]:
            self._read(name, out)
        else:
            out.copy_(self._read(name))
        return out

    def gate_up(self, layer: int, dtype: str | torch.dtype | None = None) -> torch.Tensor:
        """[E, 2I, H]: every expert's gate rows then up rows."""
        return self.stack_experts(lambda e, out: self.gate_up_expert(layer, e, dtype, out))

    def down(self, layer: int, dtype: str | torch.dtype | None = None) -> torch.Tensor:
        """[E, H, I]: every expert's down projection."""
        return self.stack_experts(lambda e, out: self.down_expert(layer, e, dtype, out))

    def stack_experts(self, part: Callable[[int, torch.Tensor | None], torch.Tensor]) -> torch.Tensor:
        """[E, ...] from `part(e, out)`, which reads expert e into `out` (its slot of the stack;
        None: a new tensor), one allocation filled expert by expert."""
        # Each expert read straight into its slot: peak memory is the stack (plus the first expert,
        # read before the stack's shape is known), and no expert is copied twice. Two readers: a
        # read's sha256 and finiteness check (the first time) and the read itself release the GIL,
        # so one reader hashes while the other reads.
        first = part(0, None)
        out = torch.empty((self.config.num_local_experts, *first.shape), dtype=first.dtype)
        out[0] = first
        del first
        with ThreadPoolExecutor(STACK_READERS) as readers:
            list(readers.map(lambda e: part(e, out[e]), range(1, self.config.num_local_experts)))
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
            per_file.setdefault(info.file.relative_to(self.path).as_posix(), []).append(
                f"{name} {info.dtype} {list(info.shape)} {self._digests[name]}\n")
        return {file: hashlib.sha256("".join(lines).encode()).hexdigest() for file, lines in sorted(per_file.items())}


def _check_finite(tensor: torch.Tensor, name: str, info: TensorInfo) -> None:
    """Raise if a floating point tensor holds NaN or infinity, naming it and its file.

    aminmax is one pass with no temporary (NaN propagates to both results, an infinity shows as
    one); float8 has no aminmax kernel, and is never a model dtype, so it is widened first.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    values = tensor if tensor.element_size() > 1 else tensor.float()
    low, high = torch.aminmax(values)
    if torch.isfinite(low) and torch.isfinite(high):
        return
    # The error path only: count and locate for the message, a chunk at a time, so that a tensor
    # of NaNs costs no mask (or index list) the size of the tensor.
    flat = values.reshape(-1)
    count, first = 0, -1
    for start in range(0, flat.numel(), _FINITE_CHUNK):
        bad = ~torch.isfinite(flat[start:start + _FINITE_CHUNK])
        n = int(bad.sum())
        if n and first < 0:
            first = start + int(bad.to(torch.uint8).argmax())
        count += n
    index = [int(i) for i in torch.unravel_index(torch.tensor(first), tensor.shape)]
    raise MixexportError(
        f"{info.file}: tensor {name} holds {count} NaN or infinite value(s), the first at index {index} "
        f"(allow_non_finite / --allow-non-finite exports it anyway)")


def _present(path: Path) -> bool:
    """Whether a directory entry exists at `path` (a broken symlink counts: opening it says why)."""
    return os.path.lexists(path)


def _read_index(path: Path, index_path: Path) -> dict[str, str]:
    """The index's weight_map, checked: tensor name -> shard path relative to `path`."""
    index = read_json_object(index_path, MAX_INDEX_BYTES)
    metadata = index.get("metadata")
    if metadata is not None:
        total = metadata.get("total_size") if isinstance(metadata, dict) else None
        if not isinstance(metadata, dict) or not (
                total is None or (isinstance(total, int) and not isinstance(total, bool) and total >= 0)):
            raise MixexportError(f"{index_path}: metadata must be an object whose total_size is a non-negative "
                                 f"integer")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise MixexportError(f"{index_path}: weight_map must be a non-empty object mapping tensor names to shard "
                             f"files, got {type(weight_map).__name__}")
    checked = {}
    for name, shard in weight_map.items():
        rel = inside(path, shard, f"{index_path}: weight_map[{cut(repr(name))}]").relative_to(path)
        checked[name] = PurePosixPath(rel).as_posix()
    return checked


def _index_tensors(path: Path) -> dict[str, TensorInfo]:
    """Map every tensor name to its file, from the index (sharded) or the single file."""
    index_path = path / INDEX_FILE
    weight_map = None
    try:
        if _present(index_path):
            weight_map = _read_index(path, index_path)
            shard_names = sorted(set(weight_map.values()))
        elif _present(path / SINGLE_FILE):
            shard_names = [SINGLE_FILE]
        else:
            shard_names = sorted(p.name for p in path.glob("*.safetensors"))
            if not shard_names:
                pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
                if pickles:
                    raise MixexportError(f"{path}: holds only pickled weights ({', '.join(pickles)}). {CONVERT_HINT}")
                raise MixexportError(f"{path}: no model.safetensors or {INDEX_FILE} found")
            if len(shard_names) > 1:
                raise MixexportError(f"{path}: {len(shard_names)} safetensors files but no {INDEX_FILE} to say "
                                     f"which holds what")
    except OSError as exc:  # listing an unreadable directory
        raise os_error(exc, path) from None

    tensors: dict[str, TensorInfo] = {}
    for shard in shard_names:
        shard_path = path / shard
        if not _present(shard_path):
            raise MixexportError(f"{index_path}: names shard {shard}, which is missing from {path}")
        for name, info in read_header(shard_path).items():
            if name in tensors:
                raise MixexportError(f"tensor {name} is stored twice: in {tensors[name].file.relative_to(path)} and "
                                     f"{shard}")
            tensors[name] = info
    if weight_map is not None:
        for name, shard in weight_map.items():
            info = tensors.get(name)
            if info is None:
                raise MixexportError(f"{index_path}: maps tensor {name} to {shard}, which does not contain it")
            if info.file != path / shard:
                raise MixexportError(f"{index_path}: maps tensor {name} to {shard}, but it is in "
                                     f"{info.file.relative_to(path).as_posix()}")
    for name, info in tensors.items():
        if info.dtype not in ST_DTYPES:
            raise MixexportError(f"{info.file}: tensor {name} has unsupported dtype {info.dtype}")
    return tensors
