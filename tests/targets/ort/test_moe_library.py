"""The ort target's CPU MoE op library (plugins/ort_moe, `build --ort-moe-library`): its op
computes the MoE op's reference (routing edge cases, every token count, 1 and 2 threads), a build
with it validates and generates transformers' tokens, and everything around it fails closed: a
library that is not the op is refused in one line, and an artifact's copy is loaded only when named."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from artifact.shared import error_line, run_cli
from mixexport.errors import MixexportError
from mixexport.model.moe import moe_reference
from mixexport.runtime.generate import Sampling, generate, open_target
from mixexport.targets.ort import moe_library
from runtime import artifacts


def _session(library, e, h, i, k, normalize, w_gate_up, w_down, threads):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    moe_library.register(options, library)
    return ort.InferenceSession(moe_library.op_model(w_gate_up, w_down, k, bool(normalize)), options,
                                providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("e, h, i, k, normalize, n", [
    (4, 48, 40, 2, 1, 1),      # the tiny preset's decode step
    (8, 64, 136, 2, 1, 7),     # I not a multiple of the kernel's 64-row blocks
    (8, 33, 17, 2, 0, 40),     # odd sizes, no renormalisation, a prefill of 40 tokens
    (5, 16, 8, 5, 1, 9),       # top_k = E
    (3, 24, 70, 1, 1, 0),      # no token
    (16, 96, 64, 3, 1, 130),   # many experts, tokens in passes of four and a remainder
    (4, 300, 270, 2, 1, 64),   # ~32 tokens an expert: the many-token path, H over two K chunks, rows in partial blocks
    (4, 40, 72, 1, 0, 100),    # the many-token path with short rows and a group of fewer tokens
    (2, 72, 300, 2, 1, 70),    # every expert 70 tokens: three groups, the last of 6; I over two K chunks
])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_op_computes_the_reference(ort_moe_library, e, h, i, k, normalize, n, threads):
    rng = np.random.default_rng(e * 1000 + n)
    w_gate_up = rng.standard_normal((e, 2 * i, h), dtype=np.float32) * 0.2
    w_down = rng.standard_normal((e, h, i), dtype=np.float32) * 0.2
    x = rng.standard_normal((n, h), dtype=np.float32)
    logits = rng.standard_normal((n, e), dtype=np.float32)
    if n >= 7:  # the routing edge cases the reference defines
        logits[1] = 0.25                      # all tied: the lowest indices win
        logits[2, e - 1] = np.nan             # no softmax: experts 0..k-1, a NaN row
        logits[3, 0] = np.inf
        logits[4] = -np.inf
        logits[5, :2] = 3.0                   # a tie for the top
        logits[6, 1] = -np.inf                # one expert never chosen
    (y,) = _session(ort_moe_library, e, h, i, k, normalize, w_gate_up, w_down, threads).run(
        None, {"x": x, "router_logits": logits})
    want = moe_reference(*(torch.from_numpy(a) for a in (x, logits, w_gate_up, w_down)), k, bool(normalize)).numpy()
    assert y.shape == want.shape == (n, h)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(want))
    # float32 sums in another order: an element near zero of a row of large ones differs by the
    # rounding of the large ones
    scale = float(np.abs(np.nan_to_num(want)).max(initial=1.0))
    np.testing.assert_allclose(np.nan_to_num(y), np.nan_to_num(want), rtol=1e-4, atol=2e-6 * scale)


def test_the_op_refuses_inputs_that_disagree(ort_moe_library):
    rng = np.random.default_rng(0)
    w_gate_up = rng.standard_normal((4, 16, 8), dtype=np.float32)
    w_down = rng.standard_normal((4, 8, 8), dtype=np.float32)
    session = _session(ort_moe_library, 4, 8, 8, 2, 1, w_gate_up, w_down, 1)
    with pytest.raises(Exception, match="shapes disagree"):
        session.run(None, {"x": np.zeros((3, 8), np.float32), "router_logits": np.zeros((2, 4), np.float32)})
    with pytest.raises(Exception, match="top_k 5 > experts 4"):
        _session(ort_moe_library, 4, 8, 8, 5, 1, w_gate_up, w_down, 1).run(
            None, {"x": np.zeros((3, 8), np.float32), "router_logits": np.zeros((3, 4), np.float32)})


def test_check_library_refuses_what_is_not_the_op(ort_moe_library, tmp_path):
    moe_library.check_library(ort_moe_library)  # the real one passes its probe
    text = tmp_path / "lib.so"
    text.write_text("not a library")
    for path, message in [(tmp_path / "missing.so", "is not a file"), (tmp_path, "is not a file"),
                          (text, "cannot load it as a custom-op library")]:
        with pytest.raises(MixexportError, match=message) as caught:
            moe_library.check_library(path)
        assert "\n" not in str(caught.value)


@pytest.fixture(scope="module")
def library_build(tmp_path_factory, ort_moe_library):
    """(transformers' model of the tiny preset, its ort artifact built with --ort-moe-library)."""
    model, _ = artifacts.tiny_preset(tmp_path_factory)
    out = tmp_path_factory.mktemp("ort-moe") / "out"
    result = run_cli("build", "--preset", "tiny", "-o", out, "--target", "ort", "--max-batch", 4,
                     "--max-sequence", 32, "--max-context", 64, "--ort-moe-library", ort_moe_library)
    assert result.exit_code == 0, result.output
    return model, out


def test_a_build_with_the_library_validates_and_records_it(library_build, ort_moe_library):
    _, out = library_build
    manifest = json.loads((out / "manifest.json").read_text())
    target = manifest["targets"]["ort"]
    assert target["moe_op"] == "mixexport.ort.MoE" and target["moe_nodes"] == 2
    assert target["moe_library"] == moe_library.LIBRARY_FILE
    assert any(f["path"] == f"ort/{moe_library.LIBRARY_FILE}" for f in target["files"])
    assert manifest["validation"]["targets"] == {"ort": "pass"}
    assert (out / "ort" / moe_library.LIBRARY_FILE).read_bytes() == ort_moe_library.read_bytes()
    genai = json.loads((out / "ort" / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["session_options"]["custom_ops_library"] == moe_library.LIBRARY_FILE
    inspected = run_cli("inspect", out)
    assert "2 MoE nodes" in inspected.output and "MoE 2" in inspected.output


def test_validate_loads_the_library_only_when_named(library_build):
    _, out = library_build
    unnamed = run_cli("validate", out)
    assert "validation loads native code only when named" in unnamed.output
    assert "compared nothing" in error_line(unnamed)  # fail closed: the one target was not run
    named = run_cli("validate", out, "--ort-moe-library", out / "ort" / moe_library.LIBRARY_FILE)
    assert named.exit_code == 0, named.output


PROMPT = [5, 17, 33, 90, 7, 3]


def test_generate_matches_transformers_with_the_library(library_build):
    model, out = library_build
    library = out / "ort" / moe_library.LIBRARY_FILE
    want = artifacts.transformers_greedy(model, [PROMPT], 24, stop_at_eos=True)[0][len(PROMPT):]
    generation = open_target(out, "ort", library)
    assert list(generate(generation, PROMPT, 24, Sampling(), "onnxruntime")) == want
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install "
                                                    "'mixexport[genai]')")
    # genai loads the library its config names, relative to the model folder, whatever the cwd
    assert list(generate(generation, PROMPT, 24, Sampling(), "genai")) == want


def test_generate_needs_the_library_named(library_build, tmp_path, tmp_path_factory, ort_moe_library):
    _, out = library_build
    assert "loaded only when named: pass --ort-moe-library" in error_line(
        run_cli("generate", out, "--ids", "1,2,3"))
    _, plain = artifacts.tiny_preset(tmp_path_factory)  # its ort graph runs the standard-ONNX form
    assert "does not use the MoE op library" in error_line(
        run_cli("generate", plain, "--ids", "1,2,3", "--ort-moe-library", ort_moe_library))
    other = tmp_path / "copy.so"
    shutil.copy(ort_moe_library, other)
    if importlib.util.find_spec("onnxruntime_genai") is not None:
        # genai would load the artifact's own copy, not the one named
        assert "native code onnxruntime-genai would load" in error_line(
            run_cli("generate", out, "--ids", "1,2,3", "--runtime", "genai", "--ort-moe-library", other))
    ok = run_cli("generate", out, "--ids", "1,2,3", "--max-new-tokens", 4, "--runtime", "onnxruntime",
                 "--ort-moe-library", other)
    assert ok.exit_code == 0, ok.output


def test_no_runtime_loads_a_library_the_manifest_hides(library_build, tmp_path):
    """A manifest without `moe_library` over a graph (and genai config) that need it: the plain loop
    fails in one line, and genai, which would load what its config names, is not started."""
    _, out = library_build
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["targets"]["ort"]["moe_library"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    plain = error_line(run_cli("generate", copy, "--ids", "1,2,3", "--runtime", "onnxruntime"))
    assert "onnxruntime cannot open the graph" in plain and "mixexport.ort" in plain
    if importlib.util.find_spec("onnxruntime_genai") is not None:
        assert "native code onnxruntime-genai would load" in error_line(
            run_cli("generate", copy, "--ids", "1,2,3", "--runtime", "genai"))
    config = json.loads((copy / "ort" / "genai_config.json").read_text())
    config["model"]["decoder"]["session_options"]["custom_ops_library"] = 7
    (copy / "ort" / "genai_config.json").write_text(json.dumps(config))
    if importlib.util.find_spec("onnxruntime_genai") is not None:
        assert "custom_ops_library must be a file name" in error_line(
            run_cli("generate", copy, "--ids", "1,2,3", "--runtime", "genai"))


@pytest.mark.parametrize("target", ["portable", "trt"])
def test_targets_without_a_library_refuse_to_lower_to_one(target):
    from mixexport.errors import InternalError
    from mixexport.targets import backend

    with pytest.raises(InternalError, match="has no MoE op library"):
        backend(target).lowering(2, library=True)


def test_a_manifest_naming_another_library_file_is_refused(library_build, tmp_path):
    _, out = library_build
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["targets"]["ort"]["moe_library"] = "../../evil.so"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert "moe_library" in error_line(run_cli("validate", copy))


@pytest.mark.parametrize("args, message", [
    (["--dtype", "float16"], "the library's op is float32"),
    (["--dtype", "float32", "--experts-quant", "int8"], "does not go with --experts-quant"),
    (["--dtype", "float32", "--ort-provider", "cuda"], "does not go with --ort-provider cuda"),
    (["--dtype", "float32", "--target", "portable"], "the library is for the ort target"),
])
def test_a_build_the_library_cannot_serve_is_refused(ort_moe_library, tmp_path, args, message):
    result = run_cli("build", "--preset", "tiny", "-o", tmp_path / "out", "--ort-moe-library", ort_moe_library, *args)
    assert message in error_line(result)
    assert not (tmp_path / "out").exists()


def test_a_build_refuses_a_library_that_is_not_the_op(tmp_path):
    bogus = tmp_path / "libbogus.so"
    bogus.write_bytes(b"\x7fELF not really")
    result = run_cli("build", "--preset", "tiny", "-o", tmp_path / "out", "--target", "ort", "--ort-moe-library", bogus)
    assert f"{bogus}: onnxruntime cannot load it as a custom-op library" in error_line(result)
    assert not (tmp_path / "out").exists()


def test_streamed_validation_and_stage_graphs_load_the_library(library_build, ort_moe_library, tmp_path):
    """Every session validation opens loads the named library: layer-streamed stage graphs, and a
    staged target's stage graphs and chain (`--stages 2`)."""
    _, out = library_build
    streamed = run_cli("validate", out, "--validation-mode", "streamed", "--ort-moe-library",
                       out / "ort" / moe_library.LIBRARY_FILE)
    assert streamed.exit_code == 0, streamed.output
    staged = tmp_path / "staged"
    result = run_cli("build", "--preset", "tiny", "-o", staged, "--target", "ort", "--stages", 2,
                     "--max-context", 64, "--ort-moe-library", ort_moe_library)
    assert result.exit_code == 0, result.output
    manifest = json.loads((staged / "manifest.json").read_text())
    assert manifest["validation"]["targets"] == {"ort": "pass"}
    assert all(moe_library.uses_library(onnx.load(staged / s["onnx"], load_external_data=False))
               for s in manifest["targets"]["ort"]["stages"])
