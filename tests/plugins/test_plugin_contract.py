"""The C++ plugin agrees with the plugin contract and with the Python kernel formulas.

The field list and input order the plugin uses are generated from plugin_contract.json
(plugins/moe/gen_kernels.py); the launch plan the plugin runs is checked against the AOT metadata
evaluated by `mixexport.kernels.configs.evaluate`. The native build (CMake, TensorRT-free parts) is
tested where cmake and nvcc are installed; TensorRT itself is never needed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mixexport.kernels.configs import cdiv, evaluate, tile_name
from mixexport.targets.trt.contract import CONTRACT_PATH, attribute_names, input_names, plugin_contract

REPO = Path(__file__).resolve().parents[2]
PLUGIN_DIR = REPO / "plugins" / "moe"
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="needs triton for the AOT kernel build (pip install -e '.[kernels]')")


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_kernels", PLUGIN_DIR / "gen_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def aot_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("plugin_aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # int8 GEMMs too, so the native plan and plugin tests dispatch quantized experts.
    result = subprocess.run([sys.executable, "-m", "mixexport.kernels.aot", "--arch", "80,90", "--dtype", "fp16",
                             "--quant", "none,int8", "-o", str(out)], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def generated_header(aot_dir) -> str:
    header, _ = _load_generator().generate(aot_dir, CONTRACT_PATH)
    return header


def _string_array(header: str, name: str) -> list[str]:
    body = re.search(rf"{name}\[\] = \{{(.*?)\}};", header).group(1)
    return re.findall(r'"([^"]*)"', body)


def test_generated_fields_and_inputs_match_contract(generated_header):
    assert _string_array(generated_header, "kFieldNames") == attribute_names(quantized=True)
    assert _string_array(generated_header, "kInputNames") == input_names(quantized=True)
    # quant_bits and group_size may be left out (= 0); the other fields may not.
    assert "kFieldHasDefault[] = {false, false, false, false, false, true, true};" in generated_header
    assert "kFieldDefaults[] = {0, 0, 0, 0, 0, 0, 0};" in generated_header
    assert "kNumInputsUnquantized = 4;" in generated_header
    contract = plugin_contract()
    for key, name in (("op_type", "kPluginName"), ("plugin_namespace", "kPluginNamespace"),
                      ("plugin_version", "kPluginVersion")):
        assert f'{name} = "{contract[key]}";' in generated_header


def test_plugin_source_reads_every_contract_field_through_the_generated_enum():
    source = (PLUGIN_DIR / "src" / "moe_plugin.cpp").read_text()
    assert set(re.findall(r"kField_(\w+)", source)) == set(attribute_names(quantized=True))
    # No field or plugin name spelled out by hand: they come from the contract.
    for name in [*attribute_names(quantized=True), plugin_contract()["op_type"]]:
        assert f'"{name}"' not in source, name
    assert "IPluginV3OneRuntime" in source
    # Registered under the contract's namespace (REGISTER_TENSORRT_PLUGIN would use ""), and the
    # entry points of IPluginRegistry::loadLibrary; test_trt_plugin checks both on the built library.
    assert "registerCreator(gCreator, kPluginNamespace)" in source
    assert "REGISTER_TENSORRT_PLUGIN(" not in source
    assert re.search(r"MIXEXPORT_EXPORT void setLoggerFinder\(nvinfer1::ILoggerFinder\* finder\)", source)
    assert re.search(r"MIXEXPORT_EXPORT nvinfer1::IPluginCreatorInterface\* const\* getCreators\(int32_t& nbCreators\)",
                     source)


def test_generator_refuses_unknown_formula_names(aot_dir, tmp_path):
    gen = _load_generator()
    with pytest.raises(gen.GenError, match="uses \\['M'\\]"):
        gen.cxx_formula("cdiv(N*K, M)", "test")
    with pytest.raises(gen.GenError, match="cdiv"):
        gen.cxx_formula("N/2", "test")
    assert gen.cxx_formula("(cdiv(N*K, 16) + E) * cdiv(I, 128)", "t") == "(cdiv(d.N*d.K, 16) + d.E) * cdiv(d.I, 128)"
    assert gen.cxx_formula("cdiv(N*K, 16) + min(E, N*K)", "t") == "cdiv(d.N*d.K, 16) + imin(d.E, d.N*d.K)"


def test_generator_refuses_other_metadata_format(aot_dir, tmp_path):
    broken = tmp_path / "aot"
    shutil.copytree(aot_dir, broken)
    index = json.loads((broken / "index.json").read_text())
    index["format"] = "mixexport-moe-kernels/99"
    (broken / "index.json").write_text(json.dumps(index))
    gen = _load_generator()
    with pytest.raises(gen.GenError, match="mixexport-moe-kernels/99"):
        gen.generate(broken, CONTRACT_PATH)


# ---- native build ----------------------------------------------------------------------------------------------

NATIVE_MISSING = [tool for tool in ("cmake", "nvcc") if shutil.which(tool) is None]


@pytest.fixture(scope="session")
def native_build(aot_dir, tmp_path_factory):
    if NATIVE_MISSING:
        pytest.skip(f"needs {' and '.join(NATIVE_MISSING)} on PATH for the native plugin build")
    build = tmp_path_factory.mktemp("native_build")
    jobs = str(os.cpu_count() or 2)
    steps = [
        ["cmake", "-S", str(REPO), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
         f"-DPython3_EXECUTABLE={sys.executable}", f"-DMIXEXPORT_AOT_DIR={aot_dir}"],
        ["cmake", "--build", str(build), "--parallel", jobs],
        ["ctest", "--test-dir", str(build), "--output-on-failure"],
    ]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{' '.join(step)}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return build


def _dump(build: Path, *args) -> dict:
    tool = build / "plugins" / "moe" / "tests" / "moe_plan_dump"
    result = subprocess.run([str(tool), *map(str, args)], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(result.stdout)


def test_native_build_and_ctest_pass(native_build):
    assert (native_build / "plugins" / "moe" / "libmixexport_moe_plan.a").exists()


def test_native_contract_matches_json(native_build):
    dumped = _dump(native_build, "--contract")
    contract = plugin_contract()
    assert dumped == {"name": contract["op_type"], "namespace": contract["plugin_namespace"],
                      "version": contract["plugin_version"], "fields": attribute_names(quantized=True),
                      "inputs": input_names(quantized=True)}


@pytest.mark.parametrize("arch,dims,quant_bits", [
    (90, {"N": 3, "H": 4096, "I": 14336, "E": 8, "K": 2}, 0),
    (80, {"N": 512, "H": 4096, "I": 14336, "E": 8, "K": 2}, 0),
    (80, {"N": 81, "H": 48, "I": 32, "E": 5, "K": 2}, 0),  # just past the small_m rule (162 > 32*5), irregular E
    (80, {"N": 80, "H": 48, "I": 32, "E": 5, "K": 2}, 0),  # the last small_m batch: the split-K down GEMM
    (90, {"N": 1, "H": 64, "I": 16, "E": 64, "K": 7}, 0),
    (90, {"N": 3, "H": 4096, "I": 14336, "E": 8, "K": 2}, 8),  # int8 experts: their GEMMs and scale inputs
    (80, {"N": 81, "H": 48, "I": 32, "E": 5, "K": 2}, 8),
])
def test_native_plan_matches_metadata(native_build, aot_dir, arch, dims, quant_bits):
    plan = _dump(native_build, arch, "fp16", dims["N"], dims["H"], dims["I"], dims["E"], dims["K"], quant_bits, 0)
    index = json.loads((aot_dir / "index.json").read_text())
    tile = tile_name(dims["N"] * dims["K"], dims["E"])
    block_m, split_k = (index["tiles"][str(arch)][tile][key] for key in ("block_m", "split_k"))
    assert plan["build_arch"] == arch and plan["block_m"] == block_m and plan["split_k"] == split_k
    values = {**dims, "BLOCK_M": block_m, "SPLIT_K": split_k, "ACT_BYTES": 2, "normalize": 1}
    offset = 0
    for name, formula in index["workspace_bytes"].items():
        assert plan["workspace"][name] == [offset, evaluate(formula, **values)], name
        offset = cdiv(offset + evaluate(formula, **values), 256) * 256
    assert plan["workspace_total"] == offset <= plan["workspace_bound"]

    fake = {"input:x": 1 << 32, "input:router_logits": 2 << 32, "input:w_gate_up": 3 << 32, "input:w_down": 4 << 32,
            "output:out": 5 << 32, "input:s_gate_up": 7 << 32, "input:s_down": 8 << 32}
    quant = {"bits": quant_bits, "group_size": 0}
    by_kernel = {v["kernel"]: v for v in index["variants"] if v["arch"] == arch and v["tile"] in (None, tile)
                 and v["quant"] in (None, quant)}
    assert [launch["variant"] for launch in plan["launches"]] == [by_kernel[k]["name"] for k in index["pipeline"]]
    for launch in plan["launches"]:
        meta = json.loads((aot_dir / f"{launch['variant']}.json").read_text())
        assert launch["error"] == ""
        assert launch["grid"] == [evaluate(g, **values) for g in meta["grid"]]
        assert launch["block"] == meta["threads_per_block"] and launch["shared"] == meta["shared_memory_bytes"]
        expected = []
        for param in meta["params"]:
            bind = param["bind"]
            if bind in fake:
                value = fake[bind]
            elif bind.startswith("workspace:"):
                value = (6 << 32) + plan["workspace"][bind.split(":", 1)[1]][0]
            elif bind.startswith("scratch:"):
                assert bind == "scratch:0"  # no kernel needs triton scratch today
                value = 0
            else:
                value = evaluate(bind, **values)
            expected.append([param["name"], value])
        assert launch["args"] == expected, launch["variant"]


def test_native_plan_refuses_bad_problems(native_build):
    assert "multiples of 16" in _dump(native_build, 90, "fp16", 4, 40, 32, 8, 2)["error"]
    assert "sm_80 or newer" in _dump(native_build, 75, "fp16", 4, 64, 32, 8, 2)["error"]
    assert "MIXEXPORT_KERNEL_DTYPES" in _dump(native_build, 90, "bf16", 4, 64, 32, 8, 2)["error"]
    assert "no GEMM kernels were built for int4-g32 expert weights; rebuild with -DMIXEXPORT_KERNEL_QUANT" in _dump(
        native_build, 90, "fp16", 4, 64, 32, 8, 2, 4, 32)["error"]
    assert "group_size=16 does not fit quant_bits=8" in _dump(native_build, 90, "fp16", 4, 64, 32, 8, 2, 8, 16)["error"]
    assert "quant_bits=2 must be 0, 8 or 4" in _dump(native_build, 90, "fp16", 4, 64, 32, 8, 2, 2, 0)["error"]
