"""Generate the C++ side of the MoE kernel table from the AOT build and the plugin contract.

    python plugins/moe/gen_kernels.py --aot DIR --contract plugin_contract.json --out GENDIR

Reads `DIR/index.json` and the per-variant metadata written by `python -m mixexport.kernels.aot`
(format `mixexport-moe-kernels/3`, see mixexport/kernels/README.md) and writes into GENDIR:

- `moe_kernels_generated.h`: a table of every variant (entry, threads, shared memory, ordered
  parameters with their bindings, grid), the GEMM tile rule, the workspace buffers, and the plugin
  contract (name, namespace, version, field and input names), all as C++ constants. Grid, scalar
  and workspace formulas become small C++ functions of the problem dimensions, so the plugin never
  parses JSON or evaluates strings at run time.
- `moe_kernels_blobs.cpp`: the cubins as byte arrays and the PTX as text, embedded in the library.

Anything the generator does not understand (a new metadata format, a bind kind, a formula with
names outside N, H, I, E, K, BLOCK_M, SPLIT_K, ACT_BYTES, normalize) stops the build with a message.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

FORMAT = "mixexport-moe-kernels/3"
# The C++ enum order of the launches; the AOT index must list the same pipeline.
PIPELINE = ("routing", "align_count", "align_scatter", "gate_up", "down", "topk_reduce")
KERNEL_ENUM = {"routing": "kRouting", "align_count": "kAlignCount", "align_scatter": "kAlignScatter",
               "gate_up": "kGateUp", "down": "kDown", "topk_reduce": "kTopkReduce"}
DTYPE_ENUM = {"fp16": "DType::kFP16", "bf16": "DType::kBF16", "fp32": "DType::kFP32"}
TILE_ENUM = {None: "Tile::kNone", "small_m": "Tile::kSmallM", "large_m": "Tile::kLargeM"}
# The launcher's input slots (Tensors::inputs): a 16-bit node has the first four, a quantized one all six.
INPUTS = ("x", "router_logits", "w_gate_up", "w_down", "s_gate_up", "s_down")
FORMULA_NAMES = {"N", "H", "I", "E", "K", "BLOCK_M", "SPLIT_K", "ACT_BYTES", "normalize"}
FORMULA_FUNCTIONS = {"cdiv": "cdiv", "min": "imin"}  # formula name -> the C++ function (moe_kernel_table.h)
TILE_RULE = re.compile(r"^small_m if N\*K <= (\d+)\*E else large_m$")


class GenError(Exception):
    pass


def cxx_formula(formula: str, where: str) -> str:
    """A grid/bind/workspace formula as a C++ int64 expression over `d.<name>`."""
    if not re.fullmatch(r"[A-Za-z0-9_+*() ,-]+", formula):
        raise GenError(f"{where}: formula {formula!r} uses characters other than + - * ( ) , and names "
                       "(division is written cdiv(a, b))")
    names = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", formula)) - set(FORMULA_FUNCTIONS)
    unknown = names - FORMULA_NAMES
    if unknown:
        raise GenError(f"{where}: formula {formula!r} uses {sorted(unknown)}; known: {sorted(FORMULA_NAMES)}")

    def name(match: re.Match) -> str:
        word = match.group(1)
        return FORMULA_FUNCTIONS.get(word, f"d.{word}")

    return re.sub(r"\b([A-Za-z_][A-Za-z0-9_]*)\b", name, formula)


def formula_fn(formula: str, where: str) -> str:
    return f"[](const Dims& d) -> int64_t {{ (void)d; return {cxx_formula(formula, where)}; }}"


def cxx_string(text: str) -> str:
    return json.dumps(text)  # JSON string escapes are valid C++ for the ASCII names used here


def cuda_version(text: str, where: str) -> int:
    """"13.4" as cuDriverGetVersion encodes it (1000 * major + 10 * minor)."""
    match = re.fullmatch(r"(\d+)\.(\d+)", str(text))
    if not match:
        raise GenError(f"{where}: CUDA version {text!r} is not 'major.minor'")
    return 1000 * int(match.group(1)) + 10 * int(match.group(2))


def ptx_is_portable(ptx: str) -> bool:
    """False for arch-specific PTX (`.target sm_90a`), which the driver cannot JIT for another GPU."""
    match = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M)
    return bool(match) and not match.group(1).endswith("a")


def param_entry(param: dict, workspace_names: list[str], where: str) -> str:
    bind, name = param["bind"], param["name"]
    is_pointer = param["c_type"] == "CUdeviceptr"
    kind, index, value = None, 0, "nullptr"
    if bind.startswith("input:"):
        kind, index = "BindKind::kInput", INPUTS.index(bind.split(":", 1)[1])
    elif bind.startswith("output:"):
        kind = "BindKind::kOutput"
    elif bind.startswith("workspace:"):
        buffer = bind.split(":", 1)[1]
        if buffer not in workspace_names:
            raise GenError(f"{where}: parameter {name} binds unknown workspace buffer {buffer!r}")
        kind, index = "BindKind::kWorkspace", workspace_names.index(buffer)
    elif bind.startswith("scratch:"):
        kind = "BindKind::kScratch"
        index = {"global_scratch": 0, "profile_scratch": 1}[name]
    else:
        if is_pointer:
            raise GenError(f"{where}: pointer parameter {name} has a scalar bind {bind!r}")
        if param["c_type"] != "int32_t":
            raise GenError(f"{where}: parameter {name} has C type {param['c_type']}; the launcher passes int32_t")
        kind, value = "BindKind::kScalar", formula_fn(bind, f"{where} param {name}")
    return (f"{{{cxx_string(name)}, {cxx_string(param['type'])}, {kind}, {index}, {int(param['divisibility'])}, "
            f"{'true' if is_pointer else 'false'}, {value}}}")


def generate(aot_dir: Path, contract_path: Path) -> tuple[str, str]:
    index = json.loads((aot_dir / "index.json").read_text())
    if index.get("format") != FORMAT:
        raise GenError(f"{aot_dir / 'index.json'}: format {index.get('format')!r}, this generator reads {FORMAT!r}")
    if tuple(index["pipeline"]) != PIPELINE:
        raise GenError(f"AOT pipeline {index['pipeline']} differs from the C++ launch order {list(PIPELINE)}")
    rule = TILE_RULE.match(index["tile_rule"])
    if not rule:
        raise GenError(f"tile rule {index['tile_rule']!r} is not 'small_m if N*K <= <slots>*E else large_m'")
    workspace = list(index["workspace_bytes"].items())
    workspace_names = [name for name, _ in workspace]
    contract = json.loads(contract_path.read_text())
    if [spec["name"] for spec in contract["inputs"]] != list(INPUTS):
        raise GenError(f"{contract_path}: inputs {[s['name'] for s in contract['inputs']]}, the launcher binds "
                       f"{list(INPUTS)}")
    if any(spec["type"] != "int" for spec in contract["attributes"]):
        raise GenError(f"{contract_path}: the plugin reads int attributes only")
    if any(not isinstance(spec.get("default", 0), int) for spec in contract["attributes"]):
        raise GenError(f"{contract_path}: an attribute's default must be an int")

    h, blobs = [], []
    h += ["// Generated by plugins/moe/gen_kernels.py from the AOT kernel build and plugin_contract.json.",
          "// Do not edit: change mixexport/kernels or the contract and rebuild.",
          "#pragma once", "", '#include "moe_kernel_table.h"', "", "namespace mixexport {", "namespace moe {", "",
          f"inline constexpr int64_t kSmallMMaxSlotsPerExpert = {int(rule.group(1))};",
          f"inline constexpr int64_t kMaxExperts = {int(index['max_experts'])};",
          f"inline constexpr int64_t kShapeMultiple = {int(index['shape_multiple'])};",
          f"inline constexpr int kBuiltArchs[] = {{{', '.join(str(a) for a in index['archs'])}}};",
          f"inline constexpr DType kBuiltDTypes[] = {{{', '.join(DTYPE_ENUM[d] for d in index['dtypes'])}}};",
          "", "// Plugin contract (mixexport/targets/trt/plugin_contract.json).",
          f"inline constexpr const char* kPluginName = {cxx_string(contract['op_type'])};",
          f"inline constexpr const char* kPluginNamespace = {cxx_string(contract['plugin_namespace'])};",
          f"inline constexpr const char* kPluginVersion = {cxx_string(contract['plugin_version'])};",
          "inline constexpr const char* kFieldNames[] = {"
          + ", ".join(cxx_string(a["name"]) for a in contract["attributes"]) + "};",
          "inline constexpr const char* kInputNames[] = {"
          + ", ".join(cxx_string(i["name"]) for i in contract["inputs"]) + "};",
          "enum Field : int { " + ", ".join(f"kField_{a['name']} = {i}" for i, a in enumerate(contract["attributes"]))
          + f", kNumFields = {len(contract['attributes'])} }};",
          "// A field a node may leave out, and its value then (quant_bits, group_size: 0).",
          "inline constexpr bool kFieldHasDefault[] = {"
          + ", ".join("true" if "default" in a else "false" for a in contract["attributes"]) + "};",
          "inline constexpr int32_t kFieldDefaults[] = {"
          + ", ".join(str(int(a.get("default", 0))) for a in contract["attributes"]) + "};",
          f"inline constexpr int kNumInputsUnquantized = {sum('only_when' not in i for i in contract['inputs'])};",
          "",
          "// Workspace buffers in layout order; ACT_BYTES is the element size of x.",
          f"inline constexpr int kNumWorkspaceBuffers = {len(workspace)};",
          "inline const WorkspaceBufferSpec kWorkspaceBuffers[] = {"]
    h += [f"    {{{cxx_string(name)}, {formula_fn(formula, f'workspace {name}')}}}," for name, formula in workspace]
    h += ["};", ""]

    tiles = []
    for arch, by_name in index["tiles"].items():
        for name, tile in by_name.items():
            tiles.append(f"    {{{int(arch)}, {TILE_ENUM[name]}, {tile['block_m']}, {tile['block_n']}, "
                         f"{tile['block_k']}, {tile['split_k']}}},")
    h += [f"inline constexpr int kNumTiles = {len(tiles)};", "inline constexpr TileSpec kTiles[] = {", *tiles, "};", ""]

    rows = []
    for i, entry in enumerate(index["variants"]):
        meta = json.loads((aot_dir / entry["metadata"]).read_text())
        where = f"{aot_dir / entry['metadata']}"
        if meta.get("format") != FORMAT:
            raise GenError(f"{where}: format {meta.get('format')!r}, expected {FORMAT!r}")
        params = meta["params"]
        if [p["name"] for p in params[-2:]] != ["global_scratch", "profile_scratch"]:
            raise GenError(f"{where}: the last two parameters must be triton's global and profile scratch pointers")
        cubin = (aot_dir / meta["cubin"]).read_bytes()
        ptx = (aot_dir / meta["ptx"]).read_text()
        if ")mixexport_ptx\"" in ptx:
            raise GenError(f"{where}: PTX contains the raw-string delimiter")
        blobs.append(f"extern const unsigned char kCubin{i}[] = {{")
        for start in range(0, len(cubin), 32):
            blobs.append(",".join(str(b) for b in cubin[start:start + 32]) + ",")
        blobs += ["};", f"extern const char kPtx{i}[] = R\"mixexport_ptx({ptx})mixexport_ptx\";"]
        h.append(f"extern const unsigned char kCubin{i}[];")
        h.append(f"extern const char kPtx{i}[];")
        h.append(f"inline const ParamSpec kParams{i}[] = {{")
        h += [f"    {param_entry(p, workspace_names, where)}," for p in params]
        h.append("};")
        grid = ", ".join(formula_fn(g, f"{where} grid") for g in meta["grid"])
        toolkit = meta["toolkit"]
        block_m = int(meta["constexprs"].get("BLOCK_M", 0))
        # Non-GEMM kernels read no weights (quant null): 0/0 in the table, like a 16-bit GEMM.
        quant = meta["quant"] or {"bits": 0, "group_size": 0}
        rows.append(
            f"    {{{cxx_string(meta['name'])}, Kernel::{KERNEL_ENUM[meta['kernel']]}, {int(meta['arch'])}, "
            f"{DTYPE_ENUM[meta['dtype']] if meta['dtype'] else 'DType::kAny'}, {TILE_ENUM[meta['tile']]}, "
            f"{cxx_string(meta['entry'])}, {int(meta['threads_per_block'])}, {int(meta['shared_memory_bytes'])}, "
            f"{int(meta['global_scratch_bytes'])}, {int(meta['profile_scratch_bytes'])}, {block_m}, "
            f"kParams{i}, {len(params)}, {{{grid}}}, kCubin{i}, {len(cubin)}, kPtx{i}, "
            f"{'true' if ptx_is_portable(ptx) else 'false'}, {cxx_string(meta['cubin_sha256'])}, "
            f"{cxx_string(toolkit['ptxas_version'])}, {cuda_version(toolkit['cuda_for_cubin'], where)}, "
            f"{cuda_version(toolkit['cuda_for_ptx'], where)}, {int(quant['bits'])}, {int(quant['group_size'])}}},")
    h += ["", f"inline constexpr int kNumVariants = {len(rows)};", "inline const VariantSpec kVariants[] = {", *rows,
          "};", "", "}  // namespace moe", "}  // namespace mixexport", ""]
    blob_src = ["// Generated by plugins/moe/gen_kernels.py: the AOT cubins and PTX, embedded.",
                "namespace mixexport {", "namespace moe {", *blobs, "}  // namespace moe",
                "}  // namespace mixexport", ""]
    return "\n".join(h), "\n".join(blob_src)


def write_if_changed(path: Path, text: str) -> None:
    # Unchanged outputs keep their timestamps, so a re-run does not recompile the library.
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aot", type=Path, required=True, help="folder written by python -m mixexport.kernels.aot")
    parser.add_argument("--contract", type=Path, required=True, help="plugin_contract.json")
    parser.add_argument("--out", type=Path, required=True, help="folder for the generated sources")
    args = parser.parse_args(argv)
    try:
        header, blobs = generate(args.aot, args.contract)
    except (GenError, OSError, KeyError, ValueError) as exc:
        print(f"gen_kernels.py: {exc}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    write_if_changed(args.out / "moe_kernels_generated.h", header)
    write_if_changed(args.out / "moe_kernels_blobs.cpp", blobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
