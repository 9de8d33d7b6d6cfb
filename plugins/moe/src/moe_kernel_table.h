// Types of the generated kernel table (moe_kernels_generated.h, written by gen_kernels.py from the
// AOT build). Plain data: no TensorRT, no CUDA.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mixexport {
namespace moe {

enum class DType : int { kFP16 = 0, kBF16 = 1, kFP32 = 2, kAny = -1 };
// Launch order of one MoE forward (index.json "pipeline").
enum class Kernel : int { kRouting = 0, kAlignCount, kAlignScatter, kGateUp, kDown, kTopkReduce };
inline constexpr int kNumKernels = 6;
enum class Tile : int { kNone = -1, kSmallM = 0, kLargeM = 1 };

// Problem dimensions a formula may use (legend: N tokens, H hidden, I intermediate, E experts, K top-k).
struct Dims {
    int64_t N, H, I, E, K, normalize, BLOCK_M, ACT_BYTES, SPLIT_K;
};

// The functions a formula may call (`cdiv`, and `min` spelled imin).
constexpr int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

using Formula = int64_t (*)(const Dims&);

// What a kernel parameter is bound to (the AOT metadata's "bind").
enum class BindKind : int {
    kInput,      // plugin input `index` (x, router_logits, w_gate_up, w_down, s_gate_up, s_down)
    kOutput,     // the plugin output
    kWorkspace,  // workspace buffer `index` (kWorkspaceBuffers)
    kScalar,     // int32 value of `value`
    kScratch,    // triton scratch `index` (0 global, 1 profile): null when its size is 0
};

struct ParamSpec {
    const char* name;
    const char* type;  // triton type, e.g. "*fp16", "i32"
    BindKind kind;
    int index;
    int divisibility;  // 16: the kernel was compiled assuming the value (or address) is a multiple of 16
    bool is_pointer;
    Formula value;  // kScalar only
};

struct VariantSpec {
    const char* name;
    Kernel kernel;
    int arch;
    DType dtype;  // kAny: one build serves every dtype
    Tile tile;    // kNone for the non-GEMM kernels
    const char* entry;
    int threads_per_block;
    int shared_memory_bytes;
    int64_t global_scratch_bytes;   // per program
    int64_t profile_scratch_bytes;  // per program
    int block_m;                    // the GEMM tile's BLOCK_M, 0 for other kernels
    const ParamSpec* params;
    int num_params;
    Formula grid[3];
    const unsigned char* cubin;
    size_t cubin_size;
    const char* ptx;
    bool ptx_portable;  // false for arch-specific PTX (sm_90a): not JIT-able for another GPU
    const char* cubin_sha256;
    const char* ptxas_version;  // CUDA release of the ptxas that compiled it, e.g. "13.4"
    int cuda_for_cubin;         // driver CUDA version (cuDriverGetVersion) the cubin needs: 13000 = 13.0, R580
    int cuda_for_ptx;           // driver CUDA version that can JIT its PTX ISA
    int quant_bits;             // GEMMs: the weights it reads, 0 (the activation dtype), 8 or 4 (uint8 storage)
    int group_size;             // GEMMs: columns per scale, 0 = one per row
};

struct TileSpec {
    int arch;
    Tile tile;
    int block_m, block_n, block_k;
    int split_k;  // the down GEMM's splits of I (topk_reduce adds them)
};

struct WorkspaceBufferSpec {
    const char* name;
    Formula bytes;
};

}  // namespace moe
}  // namespace mixexport
