"""AOT build: cubins for sm_80 and sm_90, metadata that a driver-API launcher can trust."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from mixexport.errors import MixexportError
from mixexport.kernels import aot
from mixexport.kernels.configs import (GEMM_TILES, GRIDS, SHARED_MEMORY_LIMIT, TILE_RULE, GemmTile, evaluate, gemm_tile,
                                       kernel_shape_refusal)
from mixexport.quant import QuantScheme

MIXTRAL = {"N": 512, "H": 4096, "I": 14336, "E": 8, "K": 2}


def _run_cli(*args):
    # A fresh process: this one interprets the kernels (TRITON_INTERPRET=1, see conftest.py).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "mixexport.kernels.aot", *args], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot")
    result = _run_cli("--arch", "80,90", "--dtype", "fp16", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "wrote 16 kernel variants" in result.stdout
    return out, json.loads((out / "index.json").read_text())


def _metadata(out, entry):
    return json.loads((out / entry["metadata"]).read_text())


def test_index_lists_every_kernel_variant(built):
    out, index = built
    names = {v["name"] for v in index["variants"]}
    # 4 small kernels + 2 GEMMs x 2 tiles, per arch (one dtype).
    assert len(names) == len(index["variants"]) == 2 * (4 + 2 * 2)
    assert {"gate_up_small_m_fp16_sm80", "down_large_m_fp16_sm90", "align_scatter_sm90"} <= names
    assert index["pipeline"] == ["routing", "align_count", "align_scatter", "gate_up", "down", "topk_reduce"]
    assert set(index["workspace_bytes"]) == {"topk_weights", "topk_ids", "chunk_counts", "sorted_ids",
                                             "expert_ids", "act", "y"}


def test_params_match_kernel_signature_and_ptx(built):
    out, index = built
    for entry in index["variants"]:
        meta = _metadata(out, entry)
        fn = aot.kernel_function(aot.KERNELS[entry["kernel"]])
        constexprs = set(meta["constexprs"])
        runtime_args = [name for name in fn.arg_names if name not in constexprs]
        assert [p["name"] for p in meta["params"]] == runtime_args + ["global_scratch", "profile_scratch"]
        assert set(fn.arg_names) == set(runtime_args) | constexprs
        ptx = (out / meta["ptx"]).read_text()
        entry_params = re.search(rf"\.entry {meta['entry']}\((.*?)\)", ptx, re.S).group(1)
        ptx_types = re.findall(r"\.param \.(u64|u32)", entry_params)
        assert ptx_types == ["u64" if p["c_type"] == "CUdeviceptr" else "u32" for p in meta["params"]], meta["name"]
        cubin = (out / meta["cubin"]).read_bytes()
        assert cubin[:4] == b"\x7fELF" and hashlib.sha256(cubin).hexdigest() == meta["cubin_sha256"]


def test_metadata_records_the_ptxas_and_the_driver_it_needs(built):
    out, index = built
    for entry in index["variants"]:
        meta = _metadata(out, entry)
        toolkit = meta["toolkit"]
        assert os.path.isfile(toolkit["ptxas"]), meta["name"]
        major = toolkit["ptxas_version"].split(".")[0]
        assert re.fullmatch(r"\d+\.\d+", toolkit["ptxas_version"])
        assert toolkit["cuda_for_cubin"] == f"{major}.0" and toolkit["cuda_for_ptx"] == toolkit["ptxas_version"]
        ptx = (out / meta["ptx"]).read_text()
        assert re.search(rf"^\.version {re.escape(toolkit['ptx_isa'])}$", ptx, re.M), meta["name"]


def test_toolkit_requirements():
    assert aot.toolkit_requirements("12.9", ".version 8.8\n.target sm_80") == {
        "ptxas_version": "12.9", "ptx_isa": "8.8", "cuda_for_cubin": "12.0", "cuda_for_ptx": "12.9"}
    with pytest.raises(MixexportError, match="cannot read the CUDA version"):
        aot.toolkit_requirements("unknown", ".version 8.8")


def test_cli_refuses_a_ptxas_triton_would_not_run(tmp_path):
    result = _run_cli("--arch", "80", "--dtype", "fp16", "--ptxas", str(tmp_path / "ptxas"), "-o", str(tmp_path / "o"))
    assert result.returncode == 1 and "triton does not run it for sm_80" in result.stderr


LOCAL_PTXAS = shutil.which("ptxas")


@pytest.mark.skipif(LOCAL_PTXAS is None, reason="no CUDA toolkit ptxas on PATH to compile with")
def test_cli_compiles_with_another_ptxas(tmp_path):
    result = _run_cli("--arch", "80", "--dtype", "fp16", "--ptxas", LOCAL_PTXAS, "-o", str(tmp_path))
    assert result.returncode == 0, result.stderr
    version = re.search(r"release (\d+\.\d+)", subprocess.run([LOCAL_PTXAS, "--version"], capture_output=True,
                                                                text=True).stdout).group(1)
    meta = json.loads((tmp_path / "routing_fp16_sm80.json").read_text())
    assert os.path.samefile(meta["toolkit"]["ptxas"], LOCAL_PTXAS) and meta["toolkit"]["ptxas_version"] == version


def test_shared_memory_within_arch_limit(built):
    out, index = built
    for entry in index["variants"]:
        meta = _metadata(out, entry)
        assert 0 <= meta["shared_memory_bytes"] <= SHARED_MEMORY_LIMIT[meta["arch"]], meta["name"]
        assert meta["threads_per_block"] == 32 * meta["num_warps"]


def test_grid_formulas_evaluate_from_problem_dims(built):
    out, index = built
    for entry in index["variants"]:
        meta = _metadata(out, entry)
        grid = [evaluate(g, **MIXTRAL) for g in meta["grid"]]
        assert grid[0] > 0 and grid[1:] == [1, 1]
        if meta["tile"]:
            tile = GEMM_TILES[meta["arch"]][meta["tile"]]
            expected = evaluate(GRIDS[entry["kernel"]], **MIXTRAL, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
                                SPLIT_K=tile.split_k)
            assert grid[0] == expected
            assert meta["constexprs"].get("SPLIT_K", 1) == (tile.split_k if entry["kernel"] == "down" else 1)
    # The tiles the plugin reads carry the split the down GEMM was compiled with.
    assert {t["split_k"] for tiles in index["tiles"].values() for t in tiles.values()} == {1, 4}


def test_tile_follows_tokens_per_expert():
    # 32 routed slots per expert on average is the last small_m batch, for any E.
    assert gemm_tile(90, 256, 8)[0] == "small_m" and gemm_tile(90, 257, 8)[0] == "large_m"
    assert gemm_tile(80, 2048, 64)[0] == "small_m" and gemm_tile(80, 2049, 64)[0] == "large_m"
    assert gemm_tile(90, 2, 8)[1].split_k == 4 and gemm_tile(90, 4096, 8)[1].split_k == 1
    assert TILE_RULE == "small_m if N*K <= 32*E else large_m"


def test_refuses_to_compile_interpreted_kernels(tmp_path):
    with pytest.raises(MixexportError, match="without TRITON_INTERPRET=1"):
        aot.build([86], ["bf16"], tmp_path)


@pytest.mark.parametrize("args,message", [(["--arch", "75"], "--arch '75'"), (["--dtype", "int8"], "--dtype 'int8'")])
def test_cli_refuses_unknown_targets(tmp_path, args, message):
    result = CliRunner().invoke(aot.main, [*args, "-o", str(tmp_path)])
    assert result.exit_code == 1 and message in result.output


@pytest.fixture(scope="session")
def built_quant(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot_quant")
    result = _run_cli("--arch", "90", "--dtype", "bf16", "--quant", "int8,int4-g32", "-o", str(out))
    assert result.returncode == 0, result.stderr
    # 4 small kernels + 2 GEMMs x 2 tiles x 2 weight schemes; no 16-bit GEMMs were asked for.
    assert "wrote 12 kernel variants" in result.stdout
    return out, json.loads((out / "index.json").read_text())


def test_quantized_gemm_variants_take_bytes_and_scales(built_quant):
    out, index = built_quant
    assert index["quants"] == [{"bits": 8, "group_size": 0}, {"bits": 4, "group_size": 32}]
    gemms = [v for v in index["variants"] if v["kernel"] in ("gate_up", "down")]
    assert {v["name"] for v in gemms} >= {"gate_up_small_m_bf16_int8_sm90", "down_large_m_bf16_int4g32_sm90"}
    for entry in gemms:
        meta = _metadata(out, entry)
        assert meta["quant"] == entry["quant"] and meta["quant"]["bits"] in (8, 4)
        params = {p["name"]: p for p in meta["params"]}
        weights = "w_gate_up" if entry["kernel"] == "gate_up" else "w_down"
        assert params["w_ptr"]["type"] == "*u8" and params["w_ptr"]["bind"] == f"input:{weights}"
        assert params["s_ptr"]["type"] == "*bf16" and params["s_ptr"]["bind"] == f"input:s_{weights[2:]}"
        assert meta["constexprs"]["QUANT_BITS"] == meta["quant"]["bits"]
        assert meta["constexprs"]["GROUP_SIZE"] == meta["quant"]["group_size"]
        assert 0 <= meta["shared_memory_bytes"] <= SHARED_MEMORY_LIMIT[90], meta["name"]
        ptx = (out / meta["ptx"]).read_text()
        entry_params = re.search(rf"\.entry {meta['entry']}\((.*?)\)", ptx, re.S).group(1)
        assert len(re.findall(r"\.param \.(u64|u32)", entry_params)) == len(meta["params"]), meta["name"]


def test_sixteen_bit_gemms_have_no_scale_parameter(built):
    out, index = built
    for entry in index["variants"]:
        meta = _metadata(out, entry)
        if entry["kernel"] in ("gate_up", "down"):
            assert meta["quant"] == {"bits": 0, "group_size": 0} and "s_ptr" not in {p["name"] for p in meta["params"]}
        else:
            assert meta["quant"] is None
    assert index["quants"] == [{"bits": 0, "group_size": 0}]


def test_cli_refuses_an_unknown_weight_scheme(tmp_path):
    result = CliRunner().invoke(aot.main, ["--quant", "int4-g48", "-o", str(tmp_path)])
    assert result.exit_code == 1 and "--quant 'int4-g48'" in result.output


def test_kernel_shape_rule_covers_the_group_size(monkeypatch):
    assert kernel_shape_refusal(4096, 14336, 8, QuantScheme(4, 128)) is None
    assert kernel_shape_refusal(4096, 14336, 8, QuantScheme(8)) is None
    refusal = kernel_shape_refusal(192, 256, 8, QuantScheme(4, 128))
    assert refusal == ("the MixtralMoE plugin's int4-g128 kernels dequantize whole groups: int4-g128 needs "
                       "hidden_size (192) to be a multiple of the group size 128")
    # A K block that neither holds whole groups nor lies inside one is declined, naming the tile.
    monkeypatch.setitem(GEMM_TILES, 86, {**GEMM_TILES[86], "large_m": GemmTile(64, 64, 48, 4, 4)})
    assert kernel_shape_refusal(4096, 14336, 8, QuantScheme(4, 32)) == (
        "the MixtralMoE plugin's int4-g32 kernels need the group size 32 and the sm_86 large_m tile's K block 48 "
        "to divide one another")
