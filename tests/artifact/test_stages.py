"""`build --stages N`: stage artifacts of every target, their manifest chain, their validation.

The builds are a 3-layer tiny model in float16 (every target, trt through its CPU stand-in), cut
into 2 and 3 stages and validated by `build` (the whole graph, each stage, the chain). The chain
of stage files on disk is run in onnxruntime from input_ids to logits and compared with the whole
graph on a prefill and a decode step.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from artifact.shared import RANGES, SEED, edit_manifest, error_line, run_cli
from mixexport.artifact.manifest import file_entry, read_manifest, write_manifest
from mixexport.artifact.stages import balanced_stages
from mixexport.checkpoint.config import MixtralConfig
from mixexport.dtypes import dtype_info
from mixexport.driver.build import BuildOptions, build, reference_source
from mixexport.errors import MixexportError
from mixexport.targets import TARGETS, backend
from mixexport.validate.parity import REPORT_FILE, validate_artifact
from passes.ort_graphs import decoder_feeds

LAYERS = 3
OVERRIDES = {"num_hidden_layers": LAYERS, "dtype": "float16"}
_staged: dict[int, tuple] = {}


def staged_build(count: int, tmp_path_factory):
    """(OUT, manifest, progress lines) of the 3-layer tiny model with `--stages count`, validated."""
    if count not in _staged:
        out = tmp_path_factory.mktemp(f"staged-{count}") / "out"
        lines: list[str] = []
        with reference_source(None, "tiny", SEED, OVERRIDES, lines.append) as (ckpt, source):
            manifest = build(ckpt, source, out, BuildOptions(targets=TARGETS, stages=count, **RANGES), lines.append)
        _staged[count] = (out, manifest, lines)
    return _staged[count]


def _session(path, target: str, dtype: str) -> ort.InferenceSession:
    """A graph file of OUT opened as validation opens it (trt: the plugin through its CPU stand-in)."""
    model = onnx.load(str(path), load_external_data=False)
    backend(target).prepare_validation_model(model, dtype_info(dtype).onnx)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    backend(target).configure_session(options)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, feed: dict) -> dict:
    wanted = {i.name for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {k: v for k, v in feed.items() if k in wanted})))


@pytest.mark.parametrize("count", [2, 3])
def test_staged_build_validates_each_stage_and_the_chain(count, tmp_path_factory):
    out, manifest, lines = staged_build(count, tmp_path_factory)
    assert manifest.validation["passed"] and manifest.validation["compared"] == len(TARGETS)
    report = json.loads((out / REPORT_FILE).read_text())
    for target in TARGETS:
        result = report["targets"][target]
        assert result["status"] == result["stages"]["status"] == result["chain"]["status"] == "pass"
        assert result["stages"]["failed_stages"] == [] and result["chain"]["router_agreement"] == 1.0
        assert result["stage_decode_tokens"] == "seeded random"
        # The chain is compared on what it outputs, logits included; the stages on their boundaries too.
        assert set(result["chain"]["max_abs_diff"]) == {"logits", "present", "router_logits"}
        assert "hidden_states" in result["stages"]["max_abs_diff"]
        stages = manifest.targets[target].stages
        for i, stage in enumerate(stages):
            assert f"{target} stage {i + 1}/{count} ({stage['name']}): " in "\n".join(lines)
    assert any(line.startswith(f"comparing the {count} stage graphs of portable, ort, trt") for line in lines)
    assert any(line.startswith(f"streamed validation: stage {count}/{count} ({stages[-1]['name']})") for line in lines)
    assert any("no per-stage engines" in line for line in lines)
    assert manifest.targets["trt"].extra["stage_engines"]["status"] == "not built"


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("target", TARGETS)
def test_chained_stage_files_equal_the_whole_graph(count, target, tmp_path_factory):
    out, manifest, _ = staged_build(count, tmp_path_factory)
    config = MixtralConfig.from_hf_dict(manifest.source["config"], "source.config")
    stages = manifest.targets[target].stages
    assert len(stages) == count and [s["layers"] for s in stages][0][0] == 0 and stages[-1]["layers"][1] == LAYERS
    whole = _session(out / target / "model.onnx", target, config.dtype)
    sessions = [_session(out / s["onnx"], target, config.dtype) for s in stages]
    for stage, session in zip(stages, sessions):
        assert [i.name for i in session.get_inputs()] == [b["name"] for b in stage["inputs"]]
        assert [o.name for o in session.get_outputs()] == [b["name"] for b in stage["outputs"]]
    rng = np.random.default_rng(0)
    for past in (0, 5):  # a prefill, then a decode step over a past
        feed = decoder_feeds(config, batch=2, seq=7 if past == 0 else 1, past=past, pad=3, rng=rng)
        want = _run(whole, feed)
        chained = dict(feed)
        for stage, session in zip(stages, sessions):
            outputs = _run(session, chained)
            chained.update(outputs)
            chained.update({fed: outputs[name] for name, fed in stage["next"].items()})
        assert set(want) <= set(chained)
        for name, expected in want.items():
            np.testing.assert_allclose(chained[name], expected, rtol=1e-3, atol=1e-3, err_msg=f"{target} {name}")


def test_each_stage_holds_only_its_own_weights(tmp_path_factory):
    out, manifest, _ = staged_build(3, tmp_path_factory)
    for target in TARGETS:
        sizes = []
        for i, stage in enumerate(manifest.targets[target].stages):
            model = onnx.load(str(out / stage["onnx"]), load_external_data=False)
            names = {t.name for t in model.graph.initializer}
            others = {layer for layer in range(LAYERS) if not stage["layers"][0] <= layer < stage["layers"][1]}
            assert not {n for n in names if any(n.startswith(f"layers.{layer}.") for layer in others)}, (target, i)
            assert any(n.startswith("embed_tokens.") for n in names) == (i == 0)
            assert any(n.startswith("lm_head.") for n in names) == (i == LAYERS - 1)
            sizes.append((out / stage["data"][0]).stat().st_size)
        # The whole graph holds no weights of its own: they are read from the stages' files.
        whole = onnx.load(str(out / target / "model.onnx"), load_external_data=False)
        locations = {e.value for t in whole.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {f"stage-{i}/model.onnx.data" for i in range(LAYERS)}
        assert not (out / target / "model.onnx.data").exists()


def test_balanced_stages_minimise_the_largest_stage():
    rng = np.random.default_rng(1)
    for _ in range(30):
        sizes = [int(s) for s in rng.integers(1, 100, rng.integers(1, 9))]
        for count in range(1, len(sizes) + 1):
            stages = balanced_stages(sizes, count)
            assert len(stages) == count and stages[0].embedding and stages[-1].head
            assert [s.first for s in stages[1:]] == [s.end for s in stages[:-1]] and stages[-1].end == len(sizes)
            largest = max(sum(sizes[s.first:s.end]) for s in stages)
            best = min(max(sum(sizes[a:b]) for a, b in zip((0, *cuts), (*cuts, len(sizes))))
                       for cuts in itertools.combinations(range(1, len(sizes)), count - 1))
            assert largest == best, (sizes, count)


def test_uniform_layers_are_cut_evenly():
    stages = balanced_stages([10] * 32, 4)
    assert [(s.first, s.end) for s in stages] == [(0, 8), (8, 16), (16, 24), (24, 32)]


def test_manifest_round_trip(tmp_path_factory, tmp_path):
    out, manifest, _ = staged_build(2, tmp_path_factory)
    read = read_manifest(out)
    assert read.to_json() == json.loads((out / "manifest.json").read_text()) == manifest.to_json()
    assert read.targets["ort"].stages == manifest.targets["ort"].stages and "stages" not in read.targets["ort"].extra
    copy = shutil.copytree(out, tmp_path / "out")
    write_manifest(copy, read)
    assert read_manifest(copy).to_json() == read.to_json()


def test_inspect_shows_the_chain(tmp_path_factory):
    out, _, _ = staged_build(2, tmp_path_factory)
    result = run_cli("inspect", out)
    assert result.exit_code == 0, result.output
    assert ("stage 0 embedding+layers.0-1: ort/stage-0/model.onnx" in result.output
            or "stage 0 embedding+layers.0-0: ort/stage-0/model.onnx" in result.output)
    assert "feeds the next stage hidden_states." in result.output
    info = json.loads(run_cli("inspect", out, "--json").output)
    # the ort graph for CPU (the default) has no fused MoE node: one If per expert instead
    assert [s["moe_nodes"] for s in info["targets"]["ort"]["stages"]] == [0, 0]


def _first_two(m):
    return m["targets"]["ort"]["stages"]


@pytest.mark.parametrize("change, message", [
    (lambda m: _first_two(m)[0].update(onnx="../outside.onnx"),
     "targets.ort.stages[0].onnx '../outside.onnx' must be a relative path inside the artifact"),
    (lambda m: _first_two(m)[1].update(onnx="ort/stage-0/model.onnx"),
     "targets.ort.stages[1].onnx is 'ort/stage-0/model.onnx'; stage 1's graph is"),
    (lambda m: _first_two(m)[0].update(data=["ort/stage-1/model.onnx.data"]),
     "targets.ort.stages[0].data[0] is 'ort/stage-1/model.onnx.data', outside ort/stage-0/"),
    (lambda m: _first_two(m)[1].update(layers=[1, 3]),  # the chain is [0, 2), [2, 3)
     "targets.ort.stages[1].layers is [1, 3]: stages hold contiguous, non-empty layer ranges in order, 2 next"),
    (lambda m: _first_two(m)[0].update(next={"logits": "hidden_states.1"}),
     "targets.ort.stages[0].next links 'logits' -> 'hidden_states.1', which are not an output"),
    (lambda m: m["targets"]["ort"].update(stages=_first_two(m)[:1]),
     "targets.ort.stages must be a list of 2 to 1024 items"),
    (lambda m: m["targets"]["ort"].update(files=[f for f in m["targets"]["ort"]["files"]
                                                 if f["path"] != "ort/stage-1/model.onnx.data"]),
     "targets.ort.stages[1].data[0] names ort/stage-1/model.onnx.data, which targets.ort.files does not list"),
])
def test_a_broken_chain_is_refused(change, message, tmp_path_factory, tmp_path):
    out, _, _ = staged_build(2, tmp_path_factory)
    copy = shutil.copytree(out, tmp_path / "out")
    path = edit_manifest(copy, change)
    with pytest.raises(MixexportError) as exc:
        read_manifest(copy)
    assert str(exc.value).startswith(f"{path}: ") and message in str(exc.value), str(exc.value)


def test_a_stage_file_leading_outside_out_is_refused(tmp_path_factory, tmp_path):
    out, _, _ = staged_build(2, tmp_path_factory)
    copy = shutil.copytree(out, tmp_path / "out")
    data = copy / "ort" / "stage-1" / "model.onnx.data"
    outside = tmp_path / "elsewhere.data"
    shutil.move(data, outside)
    os.symlink(outside, data)
    result = run_cli("validate", copy)
    assert error_line(result) == (f"error: {copy / 'manifest.json'}: targets.ort.files[4].path: {data} leads outside "
                                  f"{copy} (to {outside}); an artifact's files must be inside it")


def test_a_tampered_stage_file_is_refused(tmp_path_factory, tmp_path):
    out, _, _ = staged_build(2, tmp_path_factory)
    copy = shutil.copytree(out, tmp_path / "out")
    data = copy / "ort" / "stage-1" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    result = run_cli("validate", copy)
    assert error_line(result) == f"error: target ort: {data} has changed since the build (size or sha256 differ)"


def test_a_stage_reading_another_stages_weights_is_refused(tmp_path_factory, tmp_path):
    out, manifest, _ = staged_build(2, tmp_path_factory)
    copy = shutil.copytree(out, tmp_path / "out")
    path = copy / "ort" / "stage-1" / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    next(e for e in tensor.external_data if e.key == "location").value = "../stage-0/model.onnx.data"
    onnx.save(model, str(path))
    _rerecord(copy, "ort")
    with pytest.raises(MixexportError) as exc:
        validate_artifact(copy, read_manifest(copy), None, lambda _: None)
    assert str(exc.value) == (f"{path}: tensor {tensor.name!r} keeps its data in '../stage-0/model.onnx.data', which "
                              f"is not one of the ort/stage-1 files {copy / 'manifest.json'}: targets.ort.stages[1] "
                              f"lists")


def _rerecord(out, target: str) -> None:
    """Re-record the target's file sizes and hashes, so that validation reaches what was changed."""
    edit_manifest(out, lambda m: m["targets"][target].update(
        files=[file_entry(out / f["path"], out) for f in m["targets"][target]["files"]]))


def test_a_corrupted_weight_fails_validation_naming_its_stage(tmp_path_factory, tmp_path):
    out, manifest, _ = staged_build(3, tmp_path_factory)
    copy = shutil.copytree(out, tmp_path / "out")
    stage = manifest.targets["ort"].stages[1]
    model = onnx.load(str(copy / stage["onnx"]), load_external_data=False)
    # the ort graph for CPU (the default) holds one gate/up initializer per expert: corrupt them all
    tensors = [t for t in model.graph.initializer
               if t.name.startswith("layers.1.moe.experts.") and t.name.endswith(".w_gate_up_t")]
    assert tensors
    data = copy / stage["data"][0]
    raw = bytearray(data.read_bytes())
    for tensor in tensors:
        info = {e.key: e.value for e in tensor.external_data}
        offset, length = int(info["offset"]), int(info["length"])
        region = np.frombuffer(bytes(raw[offset:offset + length]), np.float16) * -3.0
        raw[offset:offset + length] = region.astype(np.float16).tobytes()
    data.write_bytes(bytes(raw))
    _rerecord(copy, "ort")
    result = run_cli("validate", copy, "--validation-mode", "whole")
    assert error_line(result) == "error: parity failed for ort (tolerances float16: see the report)"
    report = json.loads((copy / REPORT_FILE).read_text())
    ort_report = report["targets"]["ort"]
    assert ort_report["status"] == "fail"
    assert ort_report["stages"]["failed_stages"] == [stage["name"]] == ["layers.1-1"]
    assert ort_report["chain"]["status"] == "fail"  # the broken stage's output feeds the rest of the chain
    assert ort_report["reason"].startswith("whole graph: outside tolerance; stages: outside tolerance in layers.1-1")
    assert report["targets"]["portable"]["status"] == report["targets"]["trt"]["status"] == "pass"


def test_more_stages_than_layers_are_refused(tmp_path):
    result = run_cli("build", "--preset", "tiny", "-o", tmp_path / "out", "--stages", "3")
    assert error_line(result) == "error: --stages 3 exceeds the model's 2 decoder layers (each stage holds at least " \
                                 "one layer)"
    assert not (tmp_path / "out").exists()


def test_stages_of_quantized_experts_are_refused(tmp_path):
    result = run_cli("build", "--preset", "tiny", "-o", tmp_path / "out", "--stages", "2", "--experts-quant", "int8")
    assert error_line(result).startswith("error: --stages 2 with --experts-quant is not supported")


def test_stages_of_a_shared_kv_layout_are_refused(tmp_path):
    result = run_cli("build", "--preset", "tiny", "-o", tmp_path / "out", "--target", "ort", "--stages", "2",
                     "--kv-layout", "shared")
    assert error_line(result).startswith("error: --stages 2 with --kv-layout shared is not supported")
    assert not (tmp_path / "out").exists()


def test_zero_stages_are_refused(tmp_path):
    result = run_cli("build", "--preset", "tiny", "-o", tmp_path / "out", "--stages", "0")
    assert error_line(result) == ("error: Invalid value for '--stages': 0 is not in the range 1<=x<=2147483647. "
                                  "(see mixexport build --help)")


def test_one_stage_is_the_default_layout(tmp_path):
    """`--stages 1` and no `--stages` write the same files: the whole graph only, as before."""
    files = {}
    for name, extra in (("default", {}), ("one", {"stages": 1})):
        out = tmp_path / name
        with reference_source(None, "tiny", SEED, {}, lambda _: None) as (ckpt, source):
            manifest = build(ckpt, source, out, BuildOptions(targets=("ort",), validate=False, **RANGES, **extra),
                             lambda _: None)
        entry = json.loads((out / "manifest.json").read_text())["targets"]["ort"]
        assert "stages" not in entry and manifest.targets["ort"].stages is None
        assert not list((out / "ort").glob("stage-*"))
        files[name] = entry["files"]
    assert files["default"] == files["one"]
    assert [f["path"] for f in files["default"]][:2] == ["ort/model.onnx", "ort/model.onnx.data"]


def test_streamed_validation_of_a_staged_artifact(tmp_path_factory, tmp_path):
    out = shutil.copytree(staged_build(3, tmp_path_factory)[0], tmp_path / "out")  # the report is written into it
    result = run_cli("validate", out, "--validation-mode", "streamed")
    assert result.exit_code == 0, result.output
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["mode"] == "streamed" and report["passed"]
    for target in TARGETS:
        assert report["targets"][target]["chain"]["status"] == report["targets"][target]["stages"]["status"] == "pass"
    assert "streamed validation: stage 3/3 (layers.2-2+head) compared" in result.output


@pytest.mark.parametrize("runtime", ["onnxruntime", "genai"])
def test_the_whole_graph_of_a_staged_target_still_generates(runtime, tmp_path_factory):
    """The runtime files stay valid: the whole graph reads its weights from the stages' files."""
    if runtime == "genai":
        pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    out, _, _ = staged_build(2, tmp_path_factory)
    result = run_cli("generate", out, "--target", "ort", "--ids", "1,2,3", "--max-new-tokens", "4",
                     "--runtime", runtime)
    assert result.exit_code == 0, result.output
    new = [int(t) for t in result.stdout.strip().splitlines()[-1].split(",")]
    config = MixtralConfig.from_hf_dict(_staged[2][1].source["config"], "source.config")
    # The greedy tokens of the chained stage files, run here step by step.
    stages = _staged[2][1].targets["ort"].stages
    sessions = [_session(out / s["onnx"], "ort", config.dtype) for s in stages]
    ids, past = [1, 2, 3], {}
    for _ in range(4):
        step = ids if not past else ids[-1:]
        total = len(ids)
        feed = {"input_ids": np.array([step]), "attention_mask": np.ones((1, total), np.int64),
                "position_ids": np.arange(total - len(step), total)[None]}
        for i in range(config.num_hidden_layers):
            for kind in ("key", "value"):
                feed[f"past_key_values.{i}.{kind}"] = past.get(f"present.{i}.{kind}", np.zeros(
                    (1, config.num_key_value_heads, 0, config.head_dim), np.float16))
        for session in sessions:
            feed.update(_run(session, feed))
        past = {k: v for k, v in feed.items() if k.startswith("present.")}
        ids.append(int(feed["logits"][0, -1].argmax()))
    assert new == ids[3:]


def test_stages_that_do_not_fit_in_memory_are_not_validated(tmp_path_factory, tmp_path, monkeypatch):
    out = shutil.copytree(staged_build(2, tmp_path_factory)[0], tmp_path / "out")
    # Room for the streamed whole graph, not for the largest stage compared whole.
    monkeypatch.setattr("mixexport.validate.staged.memory_available", lambda: 400 * 1024**2)
    result = run_cli("validate", out, "--validation-mode", "streamed")
    # Fail closed: a target whose stages were not compared is not validated, so nothing passed.
    assert error_line(result) == (f"error: {out}: compared nothing: no target could be run here (not validated: "
                                  f"portable, ort, trt); a gate that compared nothing has not passed")
    report = json.loads((out / REPORT_FILE).read_text())
    for target in TARGETS:
        entry = report["targets"][target]
        assert entry["status"] == entry["stages"]["status"] == entry["chain"]["status"] == "not validated"
        assert entry["reason"].startswith("stages: comparing its largest stage (")
        assert "or build with more --stages" in entry["reason"]
    assert not report["passed"] and report["summary"]["not_validated"] == list(TARGETS)
