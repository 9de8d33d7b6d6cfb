"""`mixexport generate`: tokens from an artifact's `ort` or `portable` graph, streamed as they come.

Two engines, one result: onnxruntime-genai (`mixexport[genai]`) reads the `genai_config.json` the
build wrote beside the graph; without it, a plain onnxruntime loop feeds the graph I/O contract
(`graph_io`) itself: the prompt in chunks of at most the built sequence length, then one token
per step, each step's presents fed back as the next step's past (for the shared KV layout, one
static buffer of prompt + new tokens, updated by the graph). Greedy by default; temperature,
top-k and top-p sample (the plain loop with numpy's generator, seeded by `seed`). Generation
stops at the end-of-sequence id or after `max_new_tokens`.

Everything a user passes is checked before a session opens: the artifact's manifest (schema and
paths), the target, every id against the vocabulary, the prompt plus the new tokens against the
built context.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mixexport import graph_io
from mixexport.artifact.manifest import artifact_path, read_manifest
from mixexport.checkpoint.tokenizer import TOKENIZER_FILE
from mixexport.errors import MixexportError, first_line
from mixexport.dtypes import dtype_info
from mixexport.safe_io import read_json_object, read_regular
from mixexport.targets import BACKENDS
from mixexport.targets.ort import moe_library
from mixexport.targets.ort.moe_library import check_library
from mixexport.targets.runtime_files import GENAI_CONFIG, GENERATION_CONFIG, MAX_TOKENIZER_BYTES

# The targets whose folder holds a graph onnxruntime runs on this machine, with their runtime files.
GENERATE_TARGETS = ("ort", "portable")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy unless a temperature, top-k or top-p is given."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature is None and self.top_k is None and self.top_p is None

    def check(self) -> None:
        if self.temperature is not None and not 0 < self.temperature <= 100:
            raise MixexportError(f"--temperature {self.temperature} must be in (0, 100]")
        if self.top_k is not None and self.top_k < 1:
            raise MixexportError(f"--top-k {self.top_k} must be at least 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise MixexportError(f"--top-p {self.top_p} must be in (0, 1]")


@dataclasses.dataclass
class Generation:
    """An artifact's target, opened for generation (`open_target`)."""

    folder: Path  # OUT/<target>
    target: str
    dtype: str
    config: dict[str, Any]  # the manifest's model (MixtralConfig.summary())
    max_sequence: int  # new tokens per graph call
    context: int  # past + new tokens
    eos: set[int]
    kv_layout: str = "concat"  # graph_io.KV_LAYOUTS: how the plain loop feeds the past
    library: Path | None = None  # the MoE op library its sessions load (`--ort-moe-library`)

    @property
    def vocab_size(self) -> int:
        return self.config["vocab_size"]


def open_target(out: str | Path, target: str | None, library: str | Path | None = None) -> Generation:
    """Check OUT and pick its target (default: ort, else portable); `library`: the MoE op library
    to load for a graph built with `--ort-moe-library` (native code is loaded only when named).

    Raises:
        MixexportError: for a missing or broken artifact, a target it lacks or that this machine's
            onnxruntime cannot run, a graph that needs its op library without one named, or a
            library that is not that op.
    """
    root = Path(out)
    if not root.is_dir():
        raise MixexportError(f"{out} is not a directory: give the OUT of a mixexport build")
    manifest = read_manifest(root)
    held = [t for t in GENERATE_TARGETS if t in manifest.targets]
    if target is None:
        if not held:
            raise MixexportError(f"{out} holds no ort or portable target (it holds {', '.join(manifest.targets)})")
        target = held[0]
    elif target not in GENERATE_TARGETS:
        raise MixexportError(f"--target {target!r}: generate runs {' or '.join(GENERATE_TARGETS)}")
    elif target not in held:
        raise MixexportError(f"{out} has no {target} target (it holds {', '.join(manifest.targets)})")
    dtype = manifest.targets[target].dtype
    refusal = BACKENDS[target].validation_refusal(dtype)
    if refusal:
        raise MixexportError(f"{out}: the {target} graph cannot run here: {refusal}")
    folder = root / target
    generation_config = artifact_path(root, f"{target}/{GENERATION_CONFIG}", f"{out}: {target}")
    eos = read_json_object(generation_config, 1024**2).get("eos_token_id")
    eos_ids = set(eos) if isinstance(eos, list) else {eos}
    dims = manifest.dynamic_dims
    needed = manifest.targets[target].extra.get(moe_library.MANIFEST_FIELD)
    if needed and library is None:
        raise MixexportError(f"{out}: the {target} graph's MoE runs in {moe_library.DOMAIN}.{moe_library.OP} from "
                             f"{folder / needed}; native code from an artifact is loaded only when named: pass "
                             f"--ort-moe-library {folder / needed}")
    if library is not None:
        if not needed:
            raise MixexportError(f"--ort-moe-library: {out}'s {target} graph does not use the MoE op library")
        check_library(Path(library))
    return Generation(folder, target, dtype, manifest.model, dims[graph_io.SEQUENCE][1], dims[graph_io.TOTAL][1],
                      {i for i in eos_ids if isinstance(i, int)}, graph_io.kv_layout_of(manifest.targets[target].extra),
                      Path(library) if library is not None else None)


def genai_library(folder: Path) -> Path | None:
    """The op library onnxruntime-genai would load for the model folder `folder`: the decoder's
    `custom_ops_library` in its genai_config.json (a relative name against the folder, as genai
    resolves it), or None.

    Raises:
        MixexportError: for a genai_config.json that is not a bounded JSON object, or a
            custom_ops_library that is not a non-empty string.
    """
    path = folder / GENAI_CONFIG
    config = read_json_object(path, 1024**2)
    node: Any = config
    for key in ("model", "decoder", "session_options"):
        node = node.get(key) if isinstance(node, dict) else None
    named = node.get("custom_ops_library") if isinstance(node, dict) else None
    if named is None:
        return None
    if not isinstance(named, str) or not named:
        raise MixexportError(f"{path}: model.decoder.session_options.custom_ops_library must be a file name, "
                             f"got {named!r:.80}")
    return Path(named) if Path(named).is_absolute() else folder / named


def parse_ids(text: str, vocab_size: int) -> list[int]:
    """'1,2,3' -> [1, 2, 3], each a token id below `vocab_size`."""
    ids = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or not part.isascii():
            raise MixexportError(f"--ids: {part[:40]!r} is not a token id (use comma-separated integers, e.g. 1,2,3)")
        value = int(part)
        if value >= vocab_size:
            raise MixexportError(f"--ids: {value} is not below the vocabulary size {vocab_size}")
        ids.append(value)
    return ids


def load_tokenizer(generation: Generation) -> Any:
    """The target's `tokenizer.json` as a `tokenizers.Tokenizer`.

    Raises:
        MixexportError: when the artifact has none (its checkpoint had none) or it does not parse.
    """
    from tokenizers import Tokenizer

    path = generation.folder / TOKENIZER_FILE
    if not path.exists():
        raise MixexportError(f"{path} not found: the checkpoint had no tokenizer; pass token ids with --ids")
    path = artifact_path(generation.folder.parent, f"{generation.target}/{TOKENIZER_FILE}", str(path))
    raw = read_regular(path, MAX_TOKENIZER_BYTES)
    try:
        tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as exc:  # tokenizers raises plain Exceptions for files it cannot read
        raise MixexportError(f"{path}: not a tokenizer the tokenizers library reads ({str(exc)[:120]})") from None
    if tokenizer.get_vocab_size() > generation.vocab_size:
        raise MixexportError(f"{path}: {tokenizer.get_vocab_size()} tokens, more than the model's vocabulary of "
                             f"{generation.vocab_size}")
    return tokenizer


def check_lengths(generation: Generation, prompt: list[int], max_new_tokens: int) -> None:
    """The prompt and the new tokens must fit the context the artifact was built for."""
    if not prompt:
        raise MixexportError("the prompt is empty: give at least one token")
    if len(prompt) + max_new_tokens > generation.context:
        raise MixexportError(f"the prompt ({len(prompt)} tokens) plus --max-new-tokens {max_new_tokens} exceeds the "
                             f"artifact's context of {generation.context} tokens (build with a larger --max-context)")


def choose_runtime(requested: str) -> str:
    """`auto`: onnxruntime-genai where it is installed, else the plain onnxruntime loop."""
    genai = importlib.util.find_spec("onnxruntime_genai") is not None
    if requested == "genai" and not genai:
        raise MixexportError("--runtime genai: onnxruntime-genai is not installed (pip install 'mixexport[genai]')")
    if requested == "auto":
        return "genai" if genai else "onnxruntime"
    return requested


def generate(generation: Generation, prompt: list[int], max_new_tokens: int, sampling: Sampling,
             runtime: str) -> Iterator[int]:
    """The new tokens, one at a time, as the model produces them.

    Args:
        generation: the opened target (`open_target`).
        prompt: token ids, each below the vocabulary size (`parse_ids`).
        max_new_tokens: at most this many; fewer when the end-of-sequence id comes.
        sampling: greedy or the sampling parameters (checked).
        runtime: "genai" or "onnxruntime" (`choose_runtime`).
    """
    sampling.check()
    check_lengths(generation, prompt, max_new_tokens)
    steps = _genai_steps if runtime == "genai" else _onnxruntime_steps
    for count, token in enumerate(steps(generation, prompt, max_new_tokens, sampling), 1):
        yield token
        if token in generation.eos or count == max_new_tokens:
            return


def _genai_steps(generation: Generation, prompt: list[int], max_new_tokens: int,
                 sampling: Sampling) -> Iterator[int]:
    import onnxruntime_genai as og

    model = og.Model(str(generation.folder))
    params = og.GeneratorParams(model)
    options: dict[str, Any] = {"max_length": len(prompt) + max_new_tokens, "batch_size": 1,
                               "do_sample": not sampling.greedy}
    if not sampling.greedy:
        options.update(temperature=sampling.temperature or 1.0, top_k=sampling.top_k or 0,
                       top_p=sampling.top_p or 1.0, random_seed=sampling.seed)
    params.set_search_options(**options)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
        yield int(generator.get_next_tokens()[0])


def _onnxruntime_steps(generation: Generation, prompt: list[int], max_new_tokens: int,
                       sampling: Sampling) -> Iterator[int]:
    config = generation.config
    loop = KvLoop(open_session(generation.folder / "model.onnx", library=generation.library),
                  config["num_hidden_layers"],
                  (config["num_key_value_heads"], config["head_dim"]), dtype_info(generation.dtype).numpy,
                  generation.kv_layout, len(prompt) + max_new_tokens)
    rng = np.random.default_rng(sampling.seed)
    done, pending = 0, list(prompt)
    while True:
        chunk, pending = pending[:generation.max_sequence], pending[generation.max_sequence:]
        logits = loop.run(np.array([chunk], np.int64), np.ones((1, done + len(chunk)), np.int64),
                          np.arange(done, done + len(chunk), dtype=np.int64)[None])
        done += len(chunk)
        if pending:
            continue  # still prefilling
        token = _choose(logits[0, -1], sampling, rng)
        yield token
        pending = [token]


def open_session(path: Path, threads: int = 0, library: Path | None = None) -> Any:
    """A CPU onnxruntime session for the plain loop (`threads` 0: onnxruntime's default), loading
    the MoE op `library` where given."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if library is not None:
        moe_library.register(options, library)
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    # The concat layout's presents grow by a token a step: onnxruntime's CPU arena serves those
    # allocations slower than plain malloc (8% of a decode step on the mid-size benchmark model).
    options.enable_cpu_mem_arena = False
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception types: a broken graph, an op it lacks
        raise MixexportError(f"{path}: onnxruntime cannot open the graph ({first_line(exc)})") from None


class KvLoop:
    """One batch of sequences through a session of a mixexport graph, its KV cache kept between runs
    in onnxruntime values bound to the session (an IOBinding; nothing goes through numpy but the
    logits).

    - concat layout: each run's presents are bound as the next run's past.
    - shared layout: one static buffer per past input, `buffer_length` slots long, bound as both
      the past input and the present output of every run, so the graph writes each step's new keys
      into it in place, as onnxruntime-genai runs it with past_present_share_buffer. (Bound to
      freshly allocated outputs instead, GroupQueryAttention would copy the whole buffer every
      step: 4 GiB a step for Mixtral-8x7B at a 32k context.)

    A decode step (one new token per sequence) writes its ids and positions into arrays bound once
    and its logits into one bound [B, 1, V] array, so a step binds only the mask (and the concat
    presents): the weights a step streams evict Python's own working set from the caches, and
    every call the loop saves is a cold one (shared layout, mid-size benchmark model: 0.35 -> 0.19
    ms of Python a step).
    """

    def __init__(self, session: Any, layers: int, kv_shape: tuple[int, int], dtype: Any, kv_layout: str,
                 buffer_length: int, batch: int = 1):
        """
        Args:
            session: an onnxruntime session of the graph.
            layers: decoder layers (a past and a present pair each).
            kv_shape: (KV heads, head dim).
            dtype: the past tensors' numpy dtype.
            kv_layout: "concat" or "shared" (`graph_io.KV_LAYOUTS`).
            buffer_length: the shared layout's buffer slots: at least every token the run will hold.
            batch: sequences per run.
        """
        import onnxruntime as ort

        self.ort = ort
        self.session = session
        self.inputs = {i.name for i in session.get_inputs()}
        self.shared = kv_layout == "shared"
        self.binding = session.io_binding()
        self.past = [name for layer in range(layers) for name in graph_io.past_names(layer)]
        self.present = [name for layer in range(layers) for name in graph_io.present_names(layer)]
        shape = (batch, kv_shape[0], buffer_length if self.shared else 0, kv_shape[1])
        self.binding.bind_output("logits", "cpu")  # first: outputs come back in the order first bound
        self.buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype)) for _ in self.past]
        for past, present, value in zip(self.past, self.present, self.buffers):
            self.binding.bind_ortvalue_input(past, value)
            if self.shared:
                self.binding.bind_ortvalue_output(present, value)
        vocab = next(o.shape[-1] for o in session.get_outputs() if o.name == "logits")
        # The decode step's arrays, bound by the first step (None: a graph without a static vocab).
        self.step_ids = np.zeros((batch, 1), np.int64)
        self.step_positions = np.zeros((batch, 1), np.int64)
        self.step_logits = np.zeros((batch, 1, vocab), np.float32) if isinstance(vocab, int) else None
        self.step_bound = False

    def _bind_step(self, stepping: bool) -> None:
        """Bind the decode step's arrays (`stepping`), or unbind them for a run of other shape."""
        if stepping and not self.step_bound:
            for name, array in (("input_ids", self.step_ids), ("position_ids", self.step_positions)):
                if name in self.inputs:
                    self.binding.bind_ortvalue_input(name, self.ort.OrtValue.ortvalue_from_numpy(array))
            self.binding.bind_ortvalue_output("logits", self.ort.OrtValue.ortvalue_from_numpy(self.step_logits))
        elif not stepping:
            self.binding.bind_output("logits", "cpu")
        self.step_bound = stepping

    def run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One graph run over the new tokens `ids` [B, S] (`mask` [B, T] covering the past and
        them, `positions` [B, S]): the logits [B, S, V] (a decode step's: an array the next step
        overwrites); the cache holds the new tokens."""
        stepping = ids.shape == self.step_ids.shape and self.step_logits is not None
        self._bind_step(stepping)
        if stepping:
            self.step_ids[...] = ids
            self.step_positions[...] = positions
            self.binding.bind_cpu_input("attention_mask", np.ascontiguousarray(mask))
        else:
            for name, value in (("input_ids", ids), ("attention_mask", mask), ("position_ids", positions)):
                if name in self.inputs:
                    self.binding.bind_cpu_input(name, np.ascontiguousarray(value))
        if not self.shared:
            for name in self.present:  # bound anew: what onnxruntime allocates takes each run's shape
                self.binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(self.binding)
        if self.shared and stepping:
            return self.step_logits
        outputs = self.binding.get_outputs()
        if not self.shared:  # outputs: logits, then the presents, in the order bound
            for name, value in zip(self.past, outputs[1:]):
                self.binding.bind_ortvalue_input(name, value)
        return self.step_logits if stepping else outputs[0].numpy()


def _choose(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """Greedy (the lowest id among equal maxima, as argmax), or a sample after temperature, top-k, top-p."""
    if sampling.greedy:
        return int(np.argmax(logits))
    scores = logits.astype(np.float64) / (sampling.temperature or 1.0)
    order = np.argsort(-scores, kind="stable")
    if sampling.top_k is not None:
        order = order[:sampling.top_k]
    probs = np.exp(scores[order] - scores[order[0]])
    probs /= probs.sum()
    if sampling.top_p is not None:  # the smallest prefix whose mass reaches top_p
        keep = int(np.searchsorted(np.cumsum(probs), sampling.top_p)) + 1
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return int(order[rng.choice(len(order), p=probs)])


@dataclasses.dataclass
class Run:
    """What `run` did: for the closing line."""

    runtime: str
    target: str
    prompt_tokens: int
    new_tokens: list[int]
    first_token_s: float  # the prefill and the first token
    total_s: float

    def summary(self) -> str:
        rest = len(self.new_tokens) - 1
        rate = f"{rest / (self.total_s - self.first_token_s):.1f} tokens/s after the first" if rest > 0 and \
            self.total_s > self.first_token_s else "one token"
        return (f"{len(self.new_tokens)} new tokens in {self.total_s:.2f}s ({self.target}, {self.runtime}): "
                f"{len(self.new_tokens) / self.total_s:.1f} tokens/s overall, {rate}; prompt of "
                f"{self.prompt_tokens} tokens and first token in {self.first_token_s:.3f}s")


def run(out: str | Path, target: str | None, prompt: str | None, ids: str | None, max_new_tokens: int,
        sampling: Sampling, runtime: str, emit: Any, library: str | Path | None = None) -> Run:
    """`mixexport generate`: check everything, then stream the new tokens to `emit` as they come.

    Args:
        out: the artifact.
        target: "ort", "portable" or None (ort where present).
        prompt: text (needs the artifact's tokenizer), or None when `ids` is given.
        ids: comma-separated token ids, or None.
        max_new_tokens: at most this many new tokens.
        sampling: greedy or sampling parameters.
        runtime: "auto", "genai" or "onnxruntime" (`choose_runtime`).
        emit: called with each piece of output text: decoded text for a text prompt, else ids.
        library: the MoE op library for a graph built with `--ort-moe-library` (`open_target`).

    Returns:
        the `Run` (tokens and timings).
    """
    if (prompt is None) == (ids is None):
        raise MixexportError("give either --prompt TEXT or --ids 1,2,3")
    sampling.check()
    generation = open_target(out, target, library)
    tokenizer = None
    if prompt is not None:
        tokenizer = load_tokenizer(generation)
        prompt_ids = tokenizer.encode(prompt).ids
    else:
        prompt_ids = parse_ids(ids, generation.vocab_size)
    check_lengths(generation, prompt_ids, max_new_tokens)
    chosen = choose_runtime(runtime)
    if chosen == "genai":
        # genai loads whatever library its config names, whatever the manifest says: the gate is there.
        wanted = genai_library(generation.folder)
        if wanted is not None and (generation.library is None or generation.library.resolve() != wanted.resolve()):
            raise MixexportError(f"{generation.folder / GENAI_CONFIG} names custom_ops_library {wanted}, native code "
                                 f"onnxruntime-genai would load: pass --ort-moe-library {wanted} to allow it, or "
                                 f"--runtime onnxruntime")
    new: list[int] = []
    shown = ""
    start = time.perf_counter()
    first = 0.0
    for token in generate(generation, prompt_ids, max_new_tokens, sampling, chosen):
        if not new:
            first = time.perf_counter() - start
        new.append(token)
        if tokenizer is None:
            emit(("," if len(new) > 1 else "") + str(token))
        else:  # decode everything so far: a character may span several byte tokens
            text = tokenizer.decode(new)
            if not text.endswith("\ufffd"):
                emit(text[len(shown):])
                shown = text
    return Run(chosen, generation.target, len(prompt_ids), new, first, time.perf_counter() - start)
