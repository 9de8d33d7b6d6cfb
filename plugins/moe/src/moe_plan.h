// Launch plan of the MoE kernels: which compiled variant runs, with which grid, on which slice of
// the workspace, with which arguments. Pure host arithmetic over the generated kernel table; no
// TensorRT and no CUDA runtime, so it is unit-tested on any machine.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

#include "moe_kernel_table.h"

namespace mixexport {
namespace moe {

// Every workspace slice starts on this boundary (the kernels assume 16-byte aligned pointers;
// 256 matches cudaMalloc and TensorRT's own workspace alignment).
inline constexpr size_t kWorkspaceAlignment = 256;
inline constexpr int kMaxParams = 16;
inline constexpr int kMaxWorkspaceBuffers = 16;

struct Problem {
    int64_t N = 0;  // tokens
    int64_t H = 0;
    int64_t I = 0;
    int64_t E = 0;
    int64_t K = 0;
    bool normalize = true;
    DType dtype = DType::kFP16;
    int quant_bits = 0;  // experts' weights: 0 in dtype, 8 or 4 uint8-stored with scales (mixexport/quant.py)
    int group_size = 0;  // columns per scale, 0 = one per row
};

struct Device {
    int arch = 0;                     // compute capability major * 10 + minor
    int64_t max_shared_optin = 0;     // CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN; 0: not checked
};

struct Slice {
    const char* name = nullptr;
    size_t offset = 0;
    size_t bytes = 0;
};

struct WorkspaceLayout {
    int num_buffers = 0;
    std::array<Slice, kMaxWorkspaceBuffers> buffers{};  // kWorkspaceBuffers order
    Slice global_scratch{"global_scratch", 0, 0};       // shared by the launches (they run in order)
    Slice profile_scratch{"profile_scratch", 0, 0};
    size_t total_bytes = 0;
};

struct Launch {
    const VariantSpec* variant = nullptr;
    bool use_cubin = true;  // false: JIT the PTX (the device's exact arch was not built)
    uint32_t grid[3] = {0, 0, 0};
    uint32_t block = 0;
    uint32_t shared_bytes = 0;  // dynamic shared memory of the launch
};

struct Plan {
    Problem problem;
    int build_arch = 0;  // the AOT arch whose kernels run
    Tile tile = Tile::kNone;
    int block_m = 0;
    int split_k = 1;  // the down GEMM's splits of I
    WorkspaceLayout workspace;
    int num_launches = 0;  // 0 when N == 0: nothing to do
    std::array<Launch, kNumKernels> launches{};
};

// Device addresses of one enqueue.
struct Tensors {
    uint64_t inputs[6] = {0, 0, 0, 0, 0, 0};  // x, router_logits, w_gate_up, w_down, s_gate_up, s_down (quantized)
    uint64_t output = 0;
    uint64_t workspace = 0;
};

// The argument block of one cuLaunchKernel: values in param order, and `kernelParams()` pointing
// at them.
class KernelArgs {
public:
    union Slot {
        uint64_t ptr;
        int32_t i32;
    };
    int count = 0;
    std::array<Slot, kMaxParams> values{};
    // Valid while this object lives and is not moved.
    void** kernelParams();

private:
    std::array<void*, kMaxParams> pointers_{};
};

// Element size of a dtype in bytes.
int64_t dtypeBytes(DType dtype);
const char* dtypeName(DType dtype);

// Problem checks shared by the plugin's build-time and run-time paths. Empty string: ok.
std::string checkProblem(const Problem& problem);

// Which AOT build runs on `device`: the cubins of its exact arch, else the PTX of the newest older
// arch whose every variant the driver can JIT for it. Empty string on success.
std::string chooseBuild(const Device& device, int* build_arch, bool* use_cubin);

// Whether a driver that reports `driver_version` (cuDriverGetVersion: 1000 * major + 10 * minor)
// can load the kernels of `build_arch` as cubin or PTX. Empty string on success, else one line that
// says which driver is needed.
std::string checkDriver(int driver_version, int build_arch, bool use_cubin);

// Picks the variants for `device` (chooseBuild), the tile for N*K, grids and the workspace layout.
// Returns an empty string on success, else a message that says what to change.
std::string makePlan(const Problem& problem, const Device& device, Plan* plan);

// As makePlan but with the arch and tile fixed (tests, workspace bounds).
std::string makePlanFor(const Problem& problem, int build_arch, Tile tile, bool use_cubin, Plan* plan);

// Workspace bytes that cover every N <= problem.N on any built arch and tile (what TensorRT's
// getWorkspaceSize must return from the profile's largest N).
std::string workspaceBound(const Problem& problem, size_t* bytes);

// Argument block of launch `launch` of `plan` for the given device addresses; refuses addresses that
// break the kernels' 16-byte alignment assumption.
std::string bindArgs(const Plan& plan, int launch, const Tensors& tensors, KernelArgs* args);

const char* kernelName(Kernel kernel);

}  // namespace moe
}  // namespace mixexport
