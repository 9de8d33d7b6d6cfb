"""The files beside an ONNX target's graph that runtimes read: what makes `OUT/<target>` a model
folder that onnxruntime-genai and Optimum open as it is.

- `genai_config.json` for onnxruntime-genai (0.18): model type "mistral" (genai refuses
  "mixtral"; the graph's interface is Mistral's, the MoE is inside the graph), the built context
  length, the graph's I/O names from `graph_io`, greedy search defaults, and
  `past_present_share_buffer`: false for the concat KV layout (the graph's attention concatenates
  past and new keys, so present grows each step), true for the ort target's shared layout
  (static buffers updated in place, `targets.ort.fuse_gqa`), and the execution provider in the
  decoder's session options: `cuda` for an ort graph built with `--ort-provider cuda` (genai runs
  on the CPU unless its config names a provider), none for a CPU graph.
- `config.json` + `generation_config.json` for Optimum's `ORTModelForCausalLM`, also with
  `model_type: "mistral"`: Optimum reads `num_key_value_heads` only for a fixed list of model types
  (Mistral's among them, Mixtral's not), and with the wrong head count its `generate` builds past
  tensors of the wrong shape. The Mixtral fields (experts, top-k) are kept for the reader; no
  weights sit beside it, so nothing loads this folder as a PyTorch Mistral.
- the checkpoint's tokenizer files, copied when it has them (`mixexport init` writes them).

Every file is written into the target's folder of the artifact being built and recorded in the
target's manifest `files`, so inventory and `verify` check it like the graph.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from mixexport import graph_io
from mixexport.checkpoint.config import CONFIG_FILE, MAX_CONFIG_BYTES, MixtralConfig
from mixexport.checkpoint.tokenizer import TOKENIZER_FILES
from mixexport.errors import MixexportError
from mixexport.safe_io import read_json_object, read_regular
from mixexport.targets.base import Backend, Progress
from mixexport.targets.ort import moe_library

GENAI_CONFIG, GENERATION_CONFIG = "genai_config.json", "generation_config.json"
# The model type both runtimes are told (see the module docstring for why not "mixtral").
RUNTIME_MODEL_TYPE = "mistral"
# What a float16 build of a target onnxruntime's CPU provider runs says (issue 14, measured on
# onnxruntime 1.32 x86: 58 Casts inserted at load, 979 MB resident against 599 MB for the fp32
# graph of the same `small` model, and slower than fp32).
FLOAT16_ON_CPU = ("{target}: float16 graph: onnxruntime's CPU provider has no x86 float16 kernels for its MatMuls, "
                  "so it casts to float32 at load and keeps float32 copies of the weights (more memory than a "
                  "float32 graph, and slower); for CPU build --dtype float32, or --experts-quant int4 for less memory")
# A tokenizer file is a few MB (Mixtral's tokenizer.json: 1.8 MB); anything far larger is not one.
MAX_TOKENIZER_BYTES = 256 * 1024**2


def special_token_ids(checkpoint: Path, vocab_size: int) -> dict[str, Any]:
    """bos, eos and pad ids from the checkpoint's config.json (where absent: Mixtral's 1 and 2, which
    `init` writes, and eos for padding).

    Raises:
        MixexportError: for an id that is not an integer in [0, vocab_size) (eos: or a list of them).
    """
    path = checkpoint / CONFIG_FILE
    raw = read_json_object(path, MAX_CONFIG_BYTES)
    ids: dict[str, Any] = {}
    for field, default in (("bos_token_id", 1), ("eos_token_id", 2), ("pad_token_id", None)):
        value = raw.get(field)
        values = value if field == "eos_token_id" and isinstance(value, list) and value else [value]
        if value is not None and not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab_size
                                         for v in values):
            raise MixexportError(f"{path}: {field} must be a token id in [0, {vocab_size})"
                                 f"{' or a list of them' if field == 'eos_token_id' else ''}, got {value!r:.80}")
        ids[field] = default if value is None else value
    if ids["pad_token_id"] is None:  # as Mistral's configs do: pad with eos (genai needs a pad id)
        eos = ids["eos_token_id"]
        ids["pad_token_id"] = eos[0] if isinstance(eos, list) else eos
    return ids


def genai_config(model: MixtralConfig, context: int, ids: dict[str, Any], kv_layout: str = "concat",
                 provider: str | None = None, custom_ops_library: str | None = None) -> dict[str, Any]:
    """`genai_config.json` for onnxruntime-genai 0.18 (`model.decoder` names the graph's I/O);
    `past_present_share_buffer` is true for a graph with the shared KV layout (`graph_io.KV_LAYOUTS`);
    `provider` is the onnxruntime execution provider the graph was lowered for (the ort target's
    `--ort-provider`; None: a graph for any provider), which genai names the same way;
    `custom_ops_library`: the file name, beside the graph, of an op library its session must load
    (the ort target's `--ort-moe-library`; genai resolves it against the model folder)."""
    session_options: dict[str, Any] = {"log_id": "onnxruntime-genai", "provider_options": genai_providers(provider)}
    if custom_ops_library:
        session_options["custom_ops_library"] = custom_ops_library
    past_key, past_value = graph_io.past_names("%d")  # genai's per-layer name patterns
    present_key, present_value = graph_io.present_names("%d")
    inputs = [b.name for b in graph_io.inputs(model, model.dtype)][:3]
    return {
        "model": {
            **ids,
            "context_length": context,
            "decoder": {
                "session_options": session_options,
                "filename": "model.onnx",
                "head_size": model.head_dim,
                "hidden_size": model.hidden_size,
                "inputs": {**{name: name for name in inputs}, "past_key_names": past_key,
                           "past_value_names": past_value},
                "outputs": {"logits": graph_io.outputs(model, model.dtype)[0].name,
                            "present_key_names": present_key, "present_value_names": present_value},
                "num_attention_heads": model.num_attention_heads,
                "num_hidden_layers": model.num_hidden_layers,
                "num_key_value_heads": model.num_key_value_heads,
            },
            "type": RUNTIME_MODEL_TYPE,
            "vocab_size": model.vocab_size,
        },
        "search": {
            "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": kv_layout == "shared", "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def genai_providers(provider: str | None) -> list[dict[str, Any]]:
    """genai's `provider_options` for a graph lowered for `provider`: empty (genai's CPU) unless a
    device provider, e.g. `[{"cuda": {}}]`."""
    return [] if provider in (None, "cpu") else [{provider: {}}]


def optimum_config(model: MixtralConfig, dtype: str, context: int, ids: dict[str, Any]) -> dict[str, Any]:
    """`config.json` for Optimum's ORTModelForCausalLM: the model's, as Mistral (module docstring)."""
    return {**model.to_hf_dict(), **ids, "model_type": RUNTIME_MODEL_TYPE, "architectures": ["MistralForCausalLM"],
            "max_position_embeddings": context, "torch_dtype": dtype, "dtype": dtype}


def write_runtime_files(root: Path, target: str, manifest: Any, checkpoint: Path,
                        record: Callable[[Path], dict]) -> list[str]:
    """Write the runtime files into `root/target` and add them to the target's manifest `files`.

    Args:
        root: the artifact being built (its staging directory).
        target: the target whose folder gets them (its graph is `root/target/model.onnx`).
        manifest: the manifest being built (the artifact stage's `Manifest`: `model`, `dtype`,
            `dynamic_dims`, `targets[target].files`).
        checkpoint: the checkpoint directory exported (its config.json and tokenizer files).
        record: a written file -> its manifest file entry.

    Returns:
        the names of the files written.

    Raises:
        MixexportError: for a checkpoint tokenizer file that is not a regular file of at most
            MAX_TOKENIZER_BYTES, or a bad special token id in its config.json.
    """
    model = MixtralConfig(**manifest.model)
    context = manifest.dynamic_dims[graph_io.TOTAL][1]
    ids = special_token_ids(checkpoint, model.vocab_size)
    folder = root / target
    extra = manifest.targets[target].extra
    documents = {
        GENAI_CONFIG: genai_config(model, context, ids, graph_io.kv_layout_of(extra), extra.get("provider"),
                                   extra.get(moe_library.MANIFEST_FIELD)),
        CONFIG_FILE: optimum_config(model, manifest.dtype, context, ids),
        GENERATION_CONFIG: {**ids, "do_sample": False, "max_length": context},
    }
    written = []
    for name, document in documents.items():
        (folder / name).write_text(json.dumps(document, indent=2) + "\n")
        written.append(name)
    for name in TOKENIZER_FILES:
        source = checkpoint / name
        if os.path.lexists(source):
            # Bounded, and a FIFO or device in its place is refused without blocking.
            (folder / name).write_bytes(read_regular(source, MAX_TOKENIZER_BYTES))
            written.append(name)
    manifest.targets[target].files += [record(folder / name) for name in written]
    return written



class RuntimeFilesBackend(Backend):
    """A target whose folder onnxruntime-genai and Optimum open: its `finish` writes the runtime
    files, and says so when its graph is float16 for onnxruntime's CPU provider (`FLOAT16_ON_CPU`)."""

    def for_cpu(self, options: Any) -> bool:
        """Whether the graph built with `options` is one onnxruntime's CPU provider is meant to run."""
        return True

    def finish(self, root: Path, out: Path, manifest: Any, options: Any, record: Callable[[Path], dict],
               progress: Progress, checkpoint: Path) -> None:
        if manifest.dtype == "float16" and self.for_cpu(options):
            progress(FLOAT16_ON_CPU.format(target=self.name))
        written = write_runtime_files(root, self.name, manifest, checkpoint, record)
        progress(f"{self.name}: files for onnxruntime-genai and Optimum beside the graph: {', '.join(written)}")
